"""Recipes: one YAML file that describes a whole `prune run`, loaded strictly.

A recipe names the model, the calibration data, the ranking strategies, the
stopping rule, the reporting tasks and the export/push settings. Loading it
checks everything at once and reports *all* problems together, each with its
path in the recipe (`prune.remove: must be < 30, got 31`), with "did you mean"
for misspelt keys. Checks that need the model's depth use it when it can be
read cheaply (a local config, a cached Hub config, an embedded model's cached
config or GGUF header) and are repeated at run time once the model is loaded.
The raw text is kept so it can be copied next to the results and into cards.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from prune.errors import PruneError
from prune.models import DEVICES, DTYPES

STRATEGIES = ("cosine", "accuracy", "perplexity")
SCHEDULES = ("one-shot", "iterative")
METRICS = ("acc", "acc_norm")
ENGINES = ("auto", "fast", "lm-eval")


@dataclass
class Calibration:
    """Text used by the cosine and perplexity measures."""

    # None (or "default"): LAMBADA text from the data folder; else a .txt/.jsonl file or a dataset name
    source: str | None = None
    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8


@dataclass
class Strategy:
    """One ranking strategy; task settings default to the `evaluation` section's."""

    name: str = ""
    tasks: list[str] | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    metric: str | None = None


@dataclass
class Evaluation:
    """The tasks used to *report* quality (and to check `max_drop`)."""

    tasks: list[str] = field(default_factory=lambda: ["local_arc_easy"])
    limit: int | None = None
    num_fewshot: int = 0
    metric: str | None = None
    batch_size: int | None = None
    engine: str = "auto"


@dataclass
class PruneSpec:
    """Which blocks go: the schedule and the stopping rule."""

    schedule: str = "one-shot"
    remove: int | None = None
    keep: int | None = None
    fraction: float | None = None
    max_drop: float | None = None
    protect: list[int] = field(default_factory=list)


@dataclass
class Export:
    """Where the outputs go."""

    out: str | None = None
    max_shard_size: str = "2GB"


@dataclass
class Push:
    """Publishing to the Hub (off unless `enabled` or `--push`)."""

    enabled: bool = False
    repo_id: str | None = None
    private: bool = False
    publish: str = "best"


@dataclass
class Recipe:
    """A validated recipe; `raw_text` is the file exactly as given."""

    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    data_dir: str | None = None
    seed: int = 1234
    description: str | None = None
    calibration: Calibration = field(default_factory=Calibration)
    strategies: list[Strategy] = field(
        default_factory=lambda: [Strategy("cosine"), Strategy("accuracy")]
    )
    evaluation: Evaluation = field(default_factory=Evaluation)
    prune: PruneSpec = field(default_factory=PruneSpec)
    export: Export = field(default_factory=Export)
    push: Push = field(default_factory=Push)
    raw_text: str = field(default="", repr=False)
    path: str | None = None
    warnings: list[str] = field(default_factory=list, repr=False)

    def strategy_names(self) -> list[str]:
        return [s.name for s in self.strategies]

    def to_dict(self) -> dict[str, Any]:
        """The effective settings (defaults filled in), JSON-ready."""
        data = dataclasses.asdict(self)
        for key in ("raw_text", "path", "warnings"):
            data.pop(key)
        return data


# Keys the user may write; the bookkeeping fields are not among them.
_INTERNAL = {"raw_text", "path", "warnings"}


class RecipeError(PruneError):
    """A recipe with one or more problems; `problems` lists `path: message` lines."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"recipe '{source}' is invalid ({count}):\n  " + "\n  ".join(problems))


# --- generic, type-driven loading -------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names)
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(
            item, "mappings"
        )
        return f"a list of {plural}"
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp)
    )


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return repr(value)


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, errors)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [v.strip() for v in str(value).split(",") if v.strip()]  # "a,b" shorthand
        if not isinstance(value, list):
            errors.append(f"{path}: must be {_type_name(tp)}, got {_describe(value)}")
            return None
        items = [_convert(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return [v for v in items if v is not None] if dataclasses.is_dataclass(item_tp) else items
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. max_shard_size: 2000000
    if not ok:
        errors.append(f"{path}: must be {_type_name(tp)}, got {_describe(value)}")
        return None
    return float(value) if tp is float else value


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, reporting unknown keys and bad types."""
    if data is None:
        data = {}
    if cls is Strategy and isinstance(data, str):
        data = {"name": data}  # "- cosine" shorthand
    if not isinstance(data, dict):
        errors.append(f"{path or 'recipe'}: must be a mapping, got {_describe(data)}")
        return None
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
            errors.append(f"{where}: unknown key{hint}")
            continue
        converted = _convert(hints[key], value, where, errors)
        if converted is not None or value is None:
            kwargs[key] = converted
    obj = cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    return obj


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


# --- semantic checks ----------------------------------------------------------------


def _choice(value: str | None, accepted: tuple[str, ...], path: str, errors: list[str]) -> None:
    if value is not None and value not in accepted:
        close = difflib.get_close_matches(value, accepted, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        errors.append(f"{path}: must be one of {', '.join(accepted)}, got '{value}'{hint}")


def _positive(value: int | None, path: str, errors: list[str], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        errors.append(f"{path}: must be >= {minimum}, got {value}")


_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?", re.IGNORECASE)


def _check_task_names(names: list[str | None], path: str, errors: list[str]) -> None:
    """Local task names are known without lm-eval; other names are checked at run time."""
    from prune.tasks import LOCAL_TASKS

    for i, name in enumerate(names):
        if name is not None and name.startswith("local_") and name not in LOCAL_TASKS:
            close = difflib.get_close_matches(name, list(LOCAL_TASKS), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{close[0]}'?" if close else f"local tasks: {', '.join(LOCAL_TASKS)}"
            )
            errors.append(f"{path}[{i}]: unknown local task '{name}' ({hint})")


def _check(recipe: Recipe, depth: int | None, errors: list[str], warnings: list[str]) -> None:
    """Ranges and contradictions; depth-dependent checks only when `depth` is known."""
    if not recipe.model:
        errors.append(
            "model: required (a Hub id, a checkpoint folder, a .gguf file or an embedded name)"
        )
    _choice(recipe.dtype, DTYPES, "dtype", errors)
    _choice(recipe.device, DEVICES, "device", errors)

    cal = recipe.calibration
    _positive(cal.samples, "calibration.samples", errors)
    _positive(cal.seq_len, "calibration.seq_len", errors, 2)
    _positive(cal.batch_size, "calibration.batch_size", errors)

    ev = recipe.evaluation
    if not ev.tasks:
        errors.append("evaluation.tasks: must name at least one task")
    _positive(ev.limit, "evaluation.limit", errors)
    _positive(ev.num_fewshot, "evaluation.num_fewshot", errors, 0)
    _positive(ev.batch_size, "evaluation.batch_size", errors)
    _choice(ev.metric, METRICS, "evaluation.metric", errors)
    _choice(ev.engine, ENGINES, "evaluation.engine", errors)
    _check_task_names(ev.tasks, "evaluation.tasks", errors)

    if not recipe.strategies:
        errors.append(f"strategies: must list at least one of {', '.join(STRATEGIES)}")
    seen: set[str] = set()
    for i, strat in enumerate(recipe.strategies):
        where = f"strategies[{i}]"
        if not strat.name:
            errors.append(f"{where}.name: required (one of {', '.join(STRATEGIES)})")
            continue
        if strat.name not in STRATEGIES:
            close = difflib.get_close_matches(strat.name, STRATEGIES, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(
                f"{where}.name: unknown strategy '{strat.name}'{hint}; accepted: {', '.join(STRATEGIES)}"
            )
        if strat.name in seen:
            errors.append(f"{where}.name: strategy '{strat.name}' is listed twice")
        seen.add(strat.name)
        if strat.name != "accuracy":
            for key in ("tasks", "num_fewshot", "metric"):
                if getattr(strat, key) is not None:
                    errors.append(
                        f"{where}.{key}: only the accuracy strategy uses tasks; '{strat.name}' ranks on the calibration text"
                    )
        _positive(strat.limit, f"{where}.limit", errors)
        _positive(strat.num_fewshot, f"{where}.num_fewshot", errors, 0)
        _choice(strat.metric, METRICS, f"{where}.metric", errors)
        _check_task_names(strat.tasks or [], f"{where}.tasks", errors)
        if strat.name == "accuracy" and strat.tasks is not None and not strat.tasks:
            errors.append(
                f"{where}.tasks: must name at least one task (or leave it out to rank on evaluation.tasks)"
            )
        if strat.name == "accuracy" and set(strat.tasks or ev.tasks) & set(ev.tasks):
            shared = sorted(set(strat.tasks or ev.tasks) & set(ev.tasks))
            warnings.append(
                f"{where}: ranks on the reporting task(s) {', '.join(shared)}: the reported scores of its "
                "variant are optimistic (set strategies[].tasks to tasks not in evaluation.tasks)"
            )

    pr = recipe.prune
    _choice(pr.schedule, SCHEDULES, "prune.schedule", errors)
    targets = [k for k in ("remove", "keep", "fraction") if getattr(pr, k) is not None]
    if len(targets) > 1:
        errors.append(
            f"prune: give only one of remove, keep, fraction (got {' and '.join(targets)})"
        )
    flagged = {e.split(":", 1)[0] for e in errors}
    if (
        not targets
        and pr.max_drop is None
        and not flagged & {f"prune.{k}" for k in ("remove", "keep", "fraction", "max_drop")}
    ):
        errors.append("prune: give a stopping rule: remove, keep or fraction, and/or max_drop")
    _positive(pr.remove, "prune.remove", errors)
    _positive(pr.keep, "prune.keep", errors)
    if pr.fraction is not None and not 0 < pr.fraction < 1:
        errors.append(f"prune.fraction: must be between 0 and 1 (exclusive), got {pr.fraction:g}")
    if pr.max_drop is not None and not 0 <= pr.max_drop <= 1:
        errors.append(
            f"prune.max_drop: must be between 0 and 1 (a drop in accuracy), got {pr.max_drop:g}"
        )
    if len(set(pr.protect)) != len(pr.protect):
        errors.append(f"prune.protect: lists a layer twice: {pr.protect}")
    if depth is not None:
        _check_depth(pr, depth, errors)

    ex = recipe.export
    if not _SIZE.fullmatch(str(ex.max_shard_size).strip()):
        errors.append(
            f"export.max_shard_size: must be a size like 2GB or 500MB, got '{ex.max_shard_size}'"
        )

    pu = recipe.push
    accepted = ("best", "all", *recipe.strategy_names())
    _choice(pu.publish, tuple(dict.fromkeys(accepted)), "push.publish", errors)
    if pu.repo_id is not None:
        from prune.hub import check_repo_id, repo_id_placeholders

        try:
            names = repo_id_placeholders(pu.repo_id)
            check_repo_id(pu.repo_id.replace("{strategy}", "cosine").replace("{layers}", "24"))
        except PruneError as exc:
            names = set()
            errors.append(f"push.repo_id: {exc}")
        if pu.publish == "all" and "strategy" not in names and len(recipe.strategies) > 1:
            errors.append(
                "push.publish: 'all' pushes every strategy's variant, so push.repo_id needs a {strategy} placeholder"
            )
    elif pu.enabled:
        errors.append("push.repo_id: required when push.enabled is true")


def _check_depth(pr: PruneSpec, depth: int, errors: list[str]) -> None:
    """Checks that need the model's number of layers."""
    protected: set[int] = set()
    for i, idx in enumerate(pr.protect):
        if idx is None:
            continue
        if not -depth <= idx < depth:
            errors.append(
                f"prune.protect[{i}]: must be in 0..{depth - 1} (or -{depth}..-1), got {idx}"
            )
        else:
            protected.add(idx % depth)
    free = depth - len(protected)
    if free <= 1 and pr.protect:
        errors.append(
            f"prune.protect: protects {len(protected)} of {depth} layers, so none can be removed"
        )
        return
    if pr.remove is not None:
        if pr.remove >= depth:
            errors.append(f"prune.remove: must be < {depth}, got {pr.remove}")
        elif pr.remove > free - 1 and protected:
            errors.append(
                f"prune.remove: must be <= {free - 1} ({depth} layers, {len(protected)} protected, one must remain), got {pr.remove}"
            )
    if pr.keep is not None:
        if pr.keep >= depth:
            errors.append(
                f"prune.keep: must be < {depth} (the model has {depth} layers), got {pr.keep}"
            )
        elif pr.keep < max(1, len(protected)):
            errors.append(f"prune.keep: must be >= {max(1, len(protected))}, got {pr.keep}")
    if pr.fraction is not None and 0 < pr.fraction < 1:
        count = target_removals(pr, depth)
        if count < 1:
            errors.append(f"prune.fraction: {pr.fraction:g} of {depth} layers removes none")


def target_removals(pr: PruneSpec, depth: int) -> int | None:
    """How many blocks the stopping rule allows to remove (None: only `max_drop` limits it)."""
    if pr.remove is not None:
        return pr.remove
    if pr.keep is not None:
        return depth - pr.keep
    if pr.fraction is not None:
        return int(round(pr.fraction * depth))
    return None


# --- depth of the model, cheaply ------------------------------------------------------


def _depth_from_config(config: dict[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return _depth_from_config(text) if isinstance(text, dict) else None


def _read_config(path: Path) -> int | None:
    try:
        return _depth_from_config(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _gguf_depth(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        arch_field = fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        count = fields[f"{arch}.block_count"]
        return int(count.parts[count.data[0]][0])
    except Exception:  # an unreadable header only means "depth unknown"
        return None


def model_depth(spec: str) -> int | None:
    """The model's number of blocks when it can be read without loading weights, else None."""
    from prune.models import EMBEDDED, cache_root

    if spec in EMBEDDED:
        stem = Path(EMBEDDED[spec].filename).stem
        cached = sorted((cache_root() / "gguf").glob(f"{stem}-*/config.json"))
        if cached:
            return _read_config(cached[-1])
        # Read the GGUF header only where the file is already on disk (never assemble it here).
        spec_info = importlib.util.find_spec(EMBEDDED[spec].package)
        for folder in (spec_info.submodule_search_locations or []) if spec_info else []:
            shipped = Path(folder) / EMBEDDED[spec].filename
            if shipped.is_file():
                return _gguf_depth(shipped)
        assembled = cache_root() / "embedded" / EMBEDDED[spec].filename
        return _gguf_depth(assembled) if assembled.is_file() else None
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_config(path / "config.json")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_depth(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # not a valid repo id, no cache: depth unknown
        return None
    return _read_config(Path(found)) if isinstance(found, str) else None


# --- entry points -----------------------------------------------------------------------


def parse_recipe(
    text: str, source: str = "<recipe>", depth: int | None = None, resolve_depth: bool = True
) -> Recipe:
    """Parse and validate recipe text; raise RecipeError listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(source, [f"not valid YAML{where}: {problem}"]) from None
    errors: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError(source, [f"recipe: must be a mapping of settings, got {_describe(data)}"])
    recipe = _build(Recipe, data, "", errors)
    if "strategies" not in data:
        recipe.strategies = [Strategy("cosine"), Strategy("accuracy")]
    if depth is None and resolve_depth and isinstance(recipe.model, str) and recipe.model:
        depth = model_depth(recipe.model)
    warnings: list[str] = []
    _check(recipe, depth, errors, warnings)
    if errors:
        raise RecipeError(source, errors)
    recipe.raw_text = text
    recipe.path = source
    recipe.warnings = warnings
    return recipe


def load_recipe(path: str | Path, depth: int | None = None, resolve_depth: bool = True) -> Recipe:
    """Read and validate a recipe file; the raw text is kept in `recipe.raw_text`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PruneError(f"recipe file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PruneError(f"cannot read recipe file '{path}': {exc}") from None
    return parse_recipe(text, str(path), depth=depth, resolve_depth=resolve_depth)


def check_depth(recipe: Recipe, depth: int) -> None:
    """Re-run the depth checks once the model is loaded (raises RecipeError)."""
    errors: list[str] = []
    _check_depth(recipe.prune, depth, errors)
    if errors:
        raise RecipeError(recipe.path or "<recipe>", errors)


def apply_overrides(recipe: Recipe, **overrides: Any) -> tuple[Recipe, dict[str, Any]]:
    """Apply CLI overrides (`out`, `limit`, `device`, `push`) to a copy; returns it and what changed."""
    new = dataclasses.replace(
        recipe,
        evaluation=dataclasses.replace(recipe.evaluation),
        strategies=[dataclasses.replace(s) for s in recipe.strategies],
        export=dataclasses.replace(recipe.export),
        push=dataclasses.replace(recipe.push),
    )
    applied: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        applied[key] = str(value) if isinstance(value, Path) else value
        if key == "out":
            new.export.out = str(value)
        elif key == "limit":
            if value < 1:
                raise PruneError(f"--limit must be >= 1, got {value}")
            new.evaluation.limit = value
            for strat in new.strategies:
                if strat.name == "accuracy":
                    strat.limit = value
        elif key == "device":
            _choice_or_raise(value, DEVICES, "--device")
            new.device = value
        elif key == "push":
            new.push.enabled = bool(value)
            if value and not new.push.repo_id:
                raise PruneError(
                    "--push needs push.repo_id in the recipe (e.g. you/model-pruned-{strategy})"
                )
        else:
            raise PruneError(f"unknown override '{key}'")
    return new, applied


def _choice_or_raise(value: str, accepted: tuple[str, ...], what: str) -> None:
    if value not in accepted:
        raise PruneError(f"{what}: must be one of {', '.join(accepted)}, got '{value}'")


def summarize_recipe(recipe: Recipe) -> list[str]:
    """A few human lines saying what a valid recipe will do (for `prune validate`)."""
    depth = model_depth(recipe.model)
    pr = recipe.prune
    rule = []
    if pr.remove is not None:
        rule.append(f"remove {pr.remove} layers")
    if pr.keep is not None:
        rule.append(f"keep {pr.keep} layers")
    if pr.fraction is not None:
        rule.append(
            f"remove {pr.fraction:g} of the layers"
            + (f" ({target_removals(pr, depth)})" if depth else "")
        )
    if pr.max_drop is not None:
        rule.append(f"stop before the mean score drops more than {pr.max_drop:g}")
    strategies = []
    for strat in recipe.strategies:
        if strat.name == "accuracy":
            tasks = ",".join(strat.tasks or recipe.evaluation.tasks)
            limit = strat.limit or recipe.evaluation.limit
            strategies.append(f"accuracy on {tasks}" + (f" (limit {limit})" if limit else ""))
        else:
            strategies.append(
                f"{strat.name} on {recipe.calibration.samples} x {recipe.calibration.seq_len} tokens"
            )
    limit = recipe.evaluation.limit
    return [
        f"model:       {recipe.model}"
        + (f" ({depth} layers)" if depth else " (depth checked when loaded)"),
        f"strategies:  {'; '.join(strategies)}",
        f"schedule:    {pr.schedule}; {', or '.join(rule)}"
        + (f"; protect {pr.protect}" if pr.protect else ""),
        f"evaluation:  {','.join(recipe.evaluation.tasks)}"
        + (f" (limit {limit})" if limit else ""),
        f"output:      {recipe.export.out or default_out(recipe)}",
    ]


def default_out(recipe: Recipe) -> str:
    """`out/<model name>` when the recipe gives no export.out."""
    name = Path(recipe.model.rstrip("/")).name or "model"
    return str(Path("out") / re.sub(r"[^\w.-]+", "-", name.removesuffix(".gguf")))
