"""Recipes: one YAML file that describes a whole `prune run`, loaded strictly.

A recipe names the model, the calibration data, the ranking strategies, the
stopping rule, the reporting tasks, the export/push settings and, optionally, how to
heal every variant (`heal:`, the settings of `prune heal`). Loading reports
*all* problems together, each with its path (`prune.remove: must be < 30, got 31`)
and "did you mean" for misspelt keys, in two stages: the pydantic models give each
key its type and default (strictly: a string is not a number, unknown keys are
errors), and a value they reject is reported and dropped so its default stands in;
`_check` then judges the values and how they fit together on that complete object,
skipping paths already reported. Checks that need the model's depth use it when it
can be read cheaply (a local config, a cached Hub config, an embedded model's cached
config or GGUF header) and are repeated at run time once the model is loaded. The
raw text is kept so it can be copied next to the results and into cards. Torch-free,
like everything it imports.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from prune import defaults
from prune.defaults import HEALED_SUFFIX
from prune.errors import PruneError
from prune.hub import check_repo_id, repo_id_placeholders
from prune.measures import get_measure, measure_names
from prune.sizes import ACCEPTED as SIZES_ACCEPTED
from prune.sizes import parse_max_memory, parse_size
from prune.tasks import LOCAL_TASKS

# --- the schema: types and defaults --------------------------------------------------


def _describe(value: Any) -> str:
    """A value as it reads in YAML: `null`, `true`, `'two'`, `list`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return repr(value)


def _list_of(noun: str, split_text: bool = False) -> BeforeValidator:
    """Require a list (of `noun`, for the message); with `split_text`, `"a,b"` means `[a, b]`."""

    def check(value: Any) -> Any:
        if split_text and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [part.strip() for part in str(value).split(",") if part.strip()]
        if not isinstance(value, list):
            raise PydanticCustomError(
                "list_of",
                "must be a list of {noun}, got {got}",
                {"noun": noun, "got": _describe(value)},
            )
        return value

    return BeforeValidator(check)


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _text_as_number(value: Any) -> Any:
    """`'2e-4'` as 2e-4: YAML 1.1 reads exponents without a dot as text."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Text = Annotated[str, BeforeValidator(_number_as_text)]  # e.g. max_shard_size: 2000000
Number = Annotated[float, BeforeValidator(_text_as_number)]  # e.g. lr: 2e-4
Tasks = Annotated[list[Text], _list_of("strings", split_text=True)]


class _Section(BaseModel):
    """Strict (a string is not a number), no unknown keys; an empty section means defaults."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data


class Calibration(_Section):
    """Text used by the measures that rank on calibration text (cosine, perplexity, ...)."""

    # None (or "default"): LAMBADA text from the data folder; else a .txt/.jsonl file or a dataset name
    source: Text | None = None
    samples: int = defaults.CALIBRATION_SAMPLES
    seq_len: int = defaults.CALIBRATION_SEQ_LEN
    batch_size: int = defaults.CALIBRATION_BATCH_SIZE


class Strategy(_Section):
    """One ranking strategy (a registered measure); task settings default to `evaluation`'s."""

    name: Text = ""
    tasks: Tasks | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    metric: Text | None = None
    # Rank and remove contiguous spans of this many blocks (1 = single blocks).
    span: int = 1
    # This strategy's schedule (default: prune.schedule).
    schedule: Text | None = None
    # Iterative schedule, measured strategies: re-measure only this many of the least relevant
    # candidates of the previous round after each removal (None = every remaining candidate).
    rescore: int | None = None
    # Measured strategies: sample documents adaptively (more only for the candidates whose
    # interval straddles the cut of the removal; see `prune rank --adaptive`).
    adaptive: bool = False
    # The variant's name (folder, card, comparison); default: see `key`.
    variant: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data  # "- cosine" shorthand

    def key(self, default_schedule: str = "one-shot") -> str:
        """The variant's name: `variant`, else the measure's name, plus `-spanN` for spans of
        N > 1 blocks and `-SCHEDULE` when the strategy's schedule differs from the recipe's."""
        if self.variant:
            return self.variant
        key = self.name + (f"-span{self.span}" if self.span > 1 else "")
        if self.schedule and self.schedule != default_schedule:
            key += f"-{self.schedule}"
        return key


class Evaluation(_Section):
    """The tasks used to *report* quality (and to check `max_drop`)."""

    tasks: Tasks = Field(default_factory=lambda: list(defaults.REPORT_TASKS))
    limit: int | None = None
    num_fewshot: int = 0
    metric: Text | None = None
    batch_size: int | None = None
    engine: Text = "auto"


class PruneSpec(_Section):
    """Which blocks go: the schedule and the stopping rule."""

    schedule: Text = "one-shot"
    remove: int | None = None
    keep: int | None = None
    fraction: float | None = None
    max_drop: float | None = None
    protect: Annotated[list[int], _list_of("integers")] = Field(default_factory=list)


class Export(_Section):
    """Where the outputs go."""

    out: Text | None = None
    max_shard_size: Text = defaults.DEFAULT_SHARD_SIZE


class Push(_Section):
    """Publishing to the Hub (off unless `enabled` or `--push`)."""

    enabled: bool = False
    repo_id: Text | None = None
    private: bool = False
    publish: Text = "best"


class Heal(_Section):
    """Heal every variant after export (`prune heal`'s settings); absent: no healing.

    Each `variants/<name>` is distilled from the teacher into `variants/<name>-healed`,
    which is then scored on the reporting tasks like the raw variants.
    """

    teacher: Text | None = None  # default: the recipe's model
    method: Text = "lora"  # one of defaults.HEAL_METHODS
    steps: int = defaults.HEAL_STEPS
    lr: Number | None = None  # default: the method's (defaults.HEAL_LEARNING_RATES)
    batch_size: int = defaults.HEAL_BATCH_SIZE
    seq_len: int = defaults.CALIBRATION_SEQ_LEN
    grad_accum: int = 1
    lm_weight: Number = 0.0
    lora_rank: int = defaults.HEAL_LORA_RANK
    calibration: Text | None = None  # default: calibration.source
    samples: int = defaults.HEAL_SAMPLES
    seed: int | None = None  # default: the recipe's seed
    dtype: Text | None = None  # default: the recipe's dtype


class Settings(_Section):
    """Everything a recipe file may say."""

    model: Text = ""
    dtype: Text = "auto"
    device: Text = "auto"
    # accelerate's big-model placement (`--device-map`, `--max-memory`); max_memory is a
    # mapping `{0: 20GiB, cpu: 64GiB}` or the CLI's text `0=20GiB,cpu=64GiB`.
    device_map: Text | None = None
    max_memory: Any = None
    data_dir: Text | None = None
    seed: int = defaults.SEED
    description: Text | None = None
    calibration: Calibration = Field(default_factory=Calibration)
    strategies: Annotated[list[Strategy], _list_of("mappings")] = Field(
        default_factory=lambda: [Strategy(name=name) for name in defaults.DEFAULT_STRATEGIES]
    )
    evaluation: Evaluation = Field(default_factory=Evaluation)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    export: Export = Field(default_factory=Export)
    push: Push = Field(default_factory=Push)
    heal: Heal | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_heal_means_defaults(cls, data: Any) -> Any:
        # `heal:` with nothing under it heals with the defaults, as other empty sections do.
        if isinstance(data, dict) and "heal" in data and data["heal"] is None:
            return {**data, "heal": {}}
        return data

    def strategy_names(self) -> list[str]:
        return [s.name for s in self.strategies]

    def variant_names(self) -> list[str]:
        """The variants a run writes: one per strategy, then `<name>-healed` for each when
        the recipe heals."""
        names = [s.key(self.prune.schedule) for s in self.strategies]
        return names + ([f"{n}{HEALED_SUFFIX}" for n in names] if self.heal is not None else [])


class Recipe(Settings):
    """A validated recipe and where it came from; `raw_text` is the file exactly as given."""

    raw_text: str = Field(default="", repr=False, exclude=True)
    path: str | None = Field(default=None, exclude=True)
    warnings: list[str] = Field(default_factory=list, repr=False, exclude=True)

    def to_dict(self) -> dict[str, Any]:
        """The effective settings (defaults filled in), JSON-ready."""
        return self.model_dump()


# The model whose keys each section may use (for "did you mean").
_SECTIONS: dict[str, type[BaseModel]] = {
    "calibration": Calibration,
    "strategies": Strategy,
    "evaluation": Evaluation,
    "prune": PruneSpec,
    "export": Export,
    "push": Push,
    "heal": Heal,
}


class RecipeError(PruneError):
    """A recipe with one or more problems; `problems` lists `path: message` lines."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"recipe '{source}' is invalid ({count}):\n  " + "\n  ".join(problems))


# --- stage one: types, with pydantic's errors in the recipe's words ----------------------

_TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "model_type": "a mapping",
}


def _path(loc: Sequence[str | int]) -> str:
    """`("strategies", 0, "name")` -> `strategies[0].name`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _explain(error: dict[str, Any]) -> str:
    """One `path: message` line for a pydantic error."""
    loc, kind = error["loc"], error["type"]
    if kind == "extra_forbidden":
        known = list((Settings if len(loc) == 1 else _SECTIONS[loc[0]]).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
        return f"{_path(loc)}: unknown key ({hint})"
    if kind in _TYPE_NAMES:
        return f"{_path(loc)}: must be {_TYPE_NAMES[kind]}, got {_describe(error['input'])}"
    return f"{_path(loc)}: {error['msg']}"  # list_of, or anything unforeseen


def _position(data: Any, loc: Sequence[str | int]) -> list[int]:
    """Where `loc` sits in the document, so problems are listed in reading order."""
    place = []
    for part in loc:  # every loc reported here was written by the user (no key is required)
        place.append(list(data).index(part) if isinstance(data, dict) else part)
        data = data[part]
    return place


def _text_keys(data: Any) -> Any:
    """A copy whose keys are all text, as the schema's are (YAML also allows `1:` and `null:`)."""
    if isinstance(data, dict):
        return {str(key): _text_keys(value) for key, value in data.items()}
    return [_text_keys(item) for item in data] if isinstance(data, list) else data


@dataclass
class _Dropped:
    """What stage one reported and dropped, so stage two neither repeats nor misplaces it."""

    paths: set[str] = field(default_factory=set)
    entries: dict[str, list[int]] = field(default_factory=dict)  # list path -> indices in the file

    def covers(self, path: str) -> bool:
        """Whether `path` is, or lies inside, a path already reported."""
        return any(path == p or path.startswith((f"{p}.", f"{p}[")) for p in self.paths)

    def in_file(self, line: str) -> str:
        """`line` with its list indices counted as in the file, dropped entries included."""
        # Outer lists first: the paths of inner lists were recorded with file indices.
        for path in sorted(self.entries, key=len):
            match = re.match(rf"{re.escape(path)}\[(\d+)\]", line)
            if match:
                index = int(match[1])
                for entry in sorted(self.entries[path]):
                    index += entry <= index
                line = f"{path}[{index}]{line[match.end() :]}"
        return line


def _validate(data: dict[str, Any]) -> tuple[Settings, list[str], _Dropped]:
    """The settings, the problems in reading order, and what was dropped.

    Every rejected value is dropped and the rest validated again, so its default stands in:
    a complete object, for the checks that look across keys.
    """
    data = _text_keys(data)
    try:
        return Settings.model_validate(data), [], _Dropped()
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: _position(data, e["loc"]))
    dropped = _Dropped()
    for error in reversed(errors):  # last first, so list indices stay right
        *parents, last = error["loc"]
        holder = data
        for part in parents:
            holder = holder[part]
        del holder[last]
        dropped.paths.add(_path(error["loc"]))
        if isinstance(last, int):
            dropped.entries.setdefault(_path(parents), []).append(last)
    return Settings.model_validate(data), [_explain(e) for e in errors], dropped


# --- stage two: values, and how they fit together -------------------------------------


def _choice(value: str | None, accepted: Sequence[str], path: str, problems: list[str]) -> None:
    if value is not None and value not in accepted:
        problems.append(f"{path}: {_not_one_of(value, accepted)}")


def _not_one_of(value: str, accepted: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, accepted, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"must be one of {', '.join(accepted)}, got '{value}'{hint}"


def _at_least(value: int | None, minimum: int, path: str, problems: list[str]) -> None:
    if value is not None and value < minimum:
        problems.append(f"{path}: must be >= {minimum}, got {value}")


def _check_task_names(names: list[str], path: str, problems: list[str]) -> None:
    """Local task names are known without lm-eval; other names are checked at run time."""
    for i, name in enumerate(names):
        if name.startswith("local_") and name not in LOCAL_TASKS:
            close = difflib.get_close_matches(name, list(LOCAL_TASKS), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{close[0]}'?" if close else f"local tasks: {', '.join(LOCAL_TASKS)}"
            )
            problems.append(f"{path}[{i}]: unknown local task '{name}' ({hint})")


def _check_placement(recipe: Settings, problems: list[str]) -> None:
    """device_map and max_memory as `prune.models.check_placement` takes them."""
    _choice(recipe.device_map, defaults.DEVICE_MAPS, "device_map", problems)
    if recipe.max_memory is not None:
        try:
            parse_max_memory(recipe.max_memory)
        except PruneError as exc:
            problems.append(str(exc))
    if (recipe.device_map or recipe.max_memory is not None) and recipe.device != "auto":
        problems.append(
            f"device: '{recipe.device}' contradicts device_map/max_memory, which place every "
            "block themselves (leave device out, or set it to auto)"
        )


SEED_MAX = 2**32 - 1  # numpy's random seeds are unsigned 32-bit


def _check(recipe: Settings, depth: int | None, dropped: _Dropped) -> tuple[list[str], list[str]]:
    """Problems and warnings: ranges, choices and contradictions, depth-dependent ones only
    when `depth` is known; none where stage one already reported (and dropped) a value."""
    problems: list[str] = []
    warnings: list[str] = []
    if not recipe.model:
        problems.append(
            "model: required (a Hub id, a checkpoint folder, a .gguf file or an embedded name)"
        )
    _choice(recipe.dtype, defaults.DTYPES, "dtype", problems)
    _choice(recipe.device, defaults.DEVICES, "device", problems)
    _check_placement(recipe, problems)

    cal = recipe.calibration
    _at_least(cal.samples, 1, "calibration.samples", problems)
    _at_least(cal.seq_len, 2, "calibration.seq_len", problems)
    _at_least(cal.batch_size, 1, "calibration.batch_size", problems)

    ev = recipe.evaluation
    if not ev.tasks:
        problems.append("evaluation.tasks: must name at least one task")
    _at_least(ev.limit, 1, "evaluation.limit", problems)
    _at_least(ev.num_fewshot, 0, "evaluation.num_fewshot", problems)
    _at_least(ev.batch_size, 1, "evaluation.batch_size", problems)
    _choice(ev.metric, defaults.METRICS, "evaluation.metric", problems)
    _choice(ev.engine, defaults.ENGINES, "evaluation.engine", problems)
    _check_task_names(ev.tasks, "evaluation.tasks", problems)

    _check_strategies(recipe, problems, warnings)
    _check_calibration_overlap(recipe, warnings)
    _check_calibration_file(recipe, problems)
    _check_task_metrics(recipe, problems)

    pr = recipe.prune
    _choice(pr.schedule, defaults.SCHEDULES, "prune.schedule", problems)
    # A rule whose value was rejected still counts as given.
    rules = ("remove", "keep", "fraction", "max_drop")
    given = [k for k in rules if getattr(pr, k) is not None or f"prune.{k}" in dropped.paths]
    targets = [k for k in given if k != "max_drop"]
    if len(targets) > 1:
        problems.append(
            f"prune: give only one of remove, keep, fraction (got {' and '.join(targets)})"
        )
    if not given:
        problems.append("prune: give a stopping rule: remove, keep or fraction, and/or max_drop")
    _at_least(pr.remove, 1, "prune.remove", problems)
    _at_least(pr.keep, 1, "prune.keep", problems)
    if pr.fraction is not None and not 0 < pr.fraction < 1:
        problems.append(f"prune.fraction: must be between 0 and 1 (exclusive), got {pr.fraction:g}")
    if pr.max_drop is not None and not 0 <= pr.max_drop <= 1:
        problems.append(
            f"prune.max_drop: must be between 0 and 1 (a drop in accuracy), got {pr.max_drop:g}"
        )
    if len(set(pr.protect)) != len(pr.protect):
        problems.append(f"prune.protect: lists a layer twice: {pr.protect}")
    if depth is not None:
        problems.extend(_depth_problems(pr, depth) + _span_problems(recipe, depth))

    size = recipe.export.max_shard_size
    try:
        parse_size(size)  # the export parses it again with the same function
    except PruneError:
        problems.append(f"export.max_shard_size: must be {SIZES_ACCEPTED}, got '{size}'")
    _check_output(recipe, problems)

    if isinstance(recipe.seed, int) and not 0 <= recipe.seed <= SEED_MAX:
        problems.append(f"seed: must be between 0 and {SEED_MAX} (2**32 - 1), got {recipe.seed}")
    _check_push(recipe, problems)
    _check_heal(recipe, problems, warnings)
    problems = [dropped.in_file(line) for line in problems]
    return [line for line in problems if not dropped.covers(line.split(":", 1)[0])], warnings


def default_rank_tasks(report_tasks: Sequence[str]) -> list[str]:
    """The tasks a strategy that evaluates tasks ranks on when its recipe names none:
    `defaults.RANK_TASKS` less the reporting tasks, or the reporting tasks when that leaves
    none (a warning then says the reported scores are optimistic)."""
    unseen = [t for t in defaults.RANK_TASKS if t not in report_tasks]
    return unseen or list(report_tasks)


def _check_calibration_overlap(recipe: Settings, warnings: list[str]) -> None:
    """The default calibration text is the first LAMBADA passages: the same documents
    local_lambada reports on first. Say so when a text-ranked strategy would see them."""
    text_users = [
        s.name
        for s in recipe.strategies
        if s.name in measure_names() and get_measure(s.name).needs_texts
    ]
    if (
        text_users
        and "local_lambada" in recipe.evaluation.tasks
        and recipe.calibration.source in (None, "default")
    ):
        warnings.append(
            f"calibration: the default text is the first LAMBADA passages, which local_lambada "
            f"also reports on, so {', '.join(text_users)} ranked on reporting data (set "
            "calibration.source to other text)"
        )


def _check_strategies(recipe: Settings, problems: list[str], warnings: list[str]) -> None:
    names = measure_names()
    if not recipe.strategies:
        problems.append(f"strategies: must list at least one of {', '.join(names)}")
    task_users = [n for n in names if get_measure(n).needs_tasks]
    uses = "strategy uses" if len(task_users) == 1 else "strategies use"
    users = (
        ", ".join(task_users[:-1]) + " and " + task_users[-1]
        if len(task_users) > 1
        else task_users[0]
    )
    report_tasks = recipe.evaluation.tasks
    seen: set[str] = set()
    for i, strat in enumerate(recipe.strategies):
        where = f"strategies[{i}]"
        if not strat.name:
            problems.append(f"{where}.name: required (one of {', '.join(names)})")
            continue
        known = strat.name in names
        if not known:
            close = difflib.get_close_matches(strat.name, names, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(
                f"{where}.name: unknown strategy '{strat.name}'{hint}; accepted: {', '.join(names)}"
            )
        key = strat.key(recipe.prune.schedule)
        if key in seen:
            problems.append(
                f"{where}: a variant named '{key}' is already listed (give one of them another "
                "`variant:` name, or a different span or schedule)"
            )
        seen.add(key)
        if strat.variant is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", strat.variant):
            problems.append(
                f"{where}.variant: '{strat.variant}' is not a usable folder name (accepted: "
                "letters, digits, '_', '-', '.', starting with a letter or digit)"
            )
        _at_least(strat.span, 1, f"{where}.span", problems)
        _choice(strat.schedule, defaults.SCHEDULES, f"{where}.schedule", problems)
        _at_least(strat.rescore, 1, f"{where}.rescore", problems)
        schedule = strat.schedule or recipe.prune.schedule
        if strat.rescore is not None and (
            schedule != "iterative" or not (known and get_measure(strat.name).needs_tasks)
        ):
            problems.append(
                f"{where}.rescore: applies to measured strategies (such as kl or accuracy) under "
                f"the iterative schedule; '{strat.name}' runs {schedule}"
            )
        if strat.adaptive and not (known and get_measure(strat.name).adaptive):
            accepting = ", ".join(n for n in names if get_measure(n).adaptive)
            problems.append(
                f"{where}.adaptive: applies to the {accepting} strategies; '{strat.name}' "
                "scores every block in one pass"
            )
        elif strat.adaptive and (strat.limit or recipe.evaluation.limit) is None:
            problems.append(
                f"{where}.adaptive: needs a document limit (strategies[].limit or "
                "evaluation.limit): its last round uses that many documents per task"
            )
        elif strat.adaptive and all(
            getattr(recipe.prune, k) is None for k in ("remove", "keep", "fraction")
        ):
            problems.append(
                f"{where}.adaptive: needs a number of blocks to remove (prune.remove, keep or "
                "fraction): the cut it samples around"
            )
        target = recipe.prune.remove
        if strat.span > 1 and target is not None and target % strat.span:
            problems.append(
                f"{where}.span: {strat.span} does not divide prune.remove {target} (spans remove "
                f"{strat.span} blocks at a time; accepted: a remove count that is a multiple)"
            )
        needs_tasks = known and get_measure(strat.name).needs_tasks
        if known and not needs_tasks:
            for key in ("tasks", "num_fewshot", "metric"):
                if getattr(strat, key) is not None:
                    problems.append(
                        f"{where}.{key}: only the {users} {uses} tasks; '{strat.name}' ranks on the calibration text"
                    )
        _at_least(strat.limit, 1, f"{where}.limit", problems)
        _at_least(strat.num_fewshot, 0, f"{where}.num_fewshot", problems)
        _choice(strat.metric, defaults.METRICS, f"{where}.metric", problems)
        _check_task_names(strat.tasks or [], f"{where}.tasks", problems)
        if needs_tasks and strat.tasks is not None and not strat.tasks:
            problems.append(
                f"{where}.tasks: must name at least one task (or leave it out to rank on "
                f"{', '.join(default_rank_tasks(report_tasks))})"
            )
        ranked_on = default_rank_tasks(report_tasks) if strat.tasks is None else strat.tasks
        shared = sorted(set(ranked_on) & set(report_tasks))
        if needs_tasks and shared:
            warnings.append(
                f"{where}: ranks on the reporting task(s) {', '.join(shared)}: the reported scores of its "
                "variant are optimistic (set strategies[].tasks to tasks not in evaluation.tasks)"
            )


def _check_calibration_file(recipe: Settings, problems: list[str]) -> None:
    """A calibration source that names a local file must exist, be readable and hold text,
    when a strategy reads it (a dataset name is loaded, online, at run time)."""
    from prune.calibration import file_source, read_text_file

    source = recipe.calibration.source
    readers = [s for s in recipe.strategies if s.name in measure_names()]
    if source in (None, "default") or not any(get_measure(s.name).needs_texts for s in readers):
        return
    path = file_source(source)
    if path is None:
        return
    try:
        read_text_file(path)  # the same reader the run uses
    except PruneError as exc:
        problems.append(f"calibration.source: {exc}")


def _check_task_metrics(recipe: Settings, problems: list[str]) -> None:
    """A `metric:` must be reported by every local task it applies to (the reporting tasks
    for evaluation.metric; a strategy's ranking tasks for its own metric or, without one,
    evaluation.metric). lm-eval's and the user's tasks are not known offline: lm-eval checks
    those when it evaluates them."""
    from prune.tasks import local_task_metrics

    reported = local_task_metrics()

    def check(metric: str | None, tasks: Sequence[str], path: str, note: str = "") -> None:
        if metric not in defaults.METRICS:  # None, or already reported as not a metric
            return
        for task in dict.fromkeys(tasks):
            if task in reported and metric not in reported[task]:
                problems.append(
                    f"{path}: task '{task}'{note} has no metric '{metric}' (accepted for it: "
                    f"{', '.join(reported[task])})"
                )

    ev = recipe.evaluation
    check(ev.metric, ev.tasks, "evaluation.metric")
    for i, strat in enumerate(recipe.strategies):
        if strat.name not in measure_names() or not get_measure(strat.name).needs_tasks:
            continue
        tasks = strat.tasks if strat.tasks else default_rank_tasks(ev.tasks)
        if strat.metric is not None:
            check(strat.metric, tasks, f"strategies[{i}].metric")
        else:
            check(ev.metric, tasks, "evaluation.metric", f" (ranked on by strategies[{i}])")


def _check_output(recipe: Settings, problems: list[str]) -> None:
    """The output folder (export.out, or the default one) can be created and written."""
    problem = output_folder_problem(recipe.export.out or default_out(recipe))  # type: ignore[arg-type]
    if problem is not None:
        problems.append(f"export.out: {problem}")


def output_folder_problem(out: str | os.PathLike) -> str | None:
    """Why the output folder `out` cannot be created or written, or None when it can: the
    nearest existing folder on its path must be a writable folder."""
    path = Path(out).expanduser()
    for folder in (path, *path.parents):
        try:
            folder.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet (or below a file, which is found further up)
        except OSError as exc:
            return f"output folder '{out}' cannot be created: cannot read '{folder}' ({exc.strerror or exc})"
        if folder == path and not folder.is_dir():
            return f"output '{out}' exists and is not a folder"
        if not folder.is_dir():
            return f"output folder '{out}' cannot be created: '{folder}' is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            if folder == path:
                return f"output folder '{out}' is not writable"
            return f"output folder '{out}' cannot be created: '{folder}' is not writable"
        return None
    return None


def check_output_folder(out: str | os.PathLike) -> None:
    """PruneError unless the output folder `out` can be created and written (`run --out`,
    which the recipe's own check does not see, is checked with this before loading)."""
    problem = output_folder_problem(out)
    if problem is not None:
        raise PruneError(problem)


def _check_push(recipe: Settings, problems: list[str]) -> None:
    pu = recipe.push
    accepted = tuple(
        dict.fromkeys(("best", "all", *recipe.strategy_names(), *recipe.variant_names()))
    )
    _choice(pu.publish, accepted, "push.publish", problems)
    if pu.repo_id is None:
        if pu.enabled:
            problems.append("push.repo_id: required when push.enabled is true")
        return
    try:
        placeholders = repo_id_placeholders(pu.repo_id)
        check_repo_id(pu.repo_id.replace("{strategy}", "cosine").replace("{layers}", "24"))
    except PruneError as exc:
        placeholders = set()
        problems.append(f"push.repo_id: {exc}")
    if pu.publish == "all" and "strategy" not in placeholders and len(recipe.variant_names()) > 1:
        problems.append(
            "push.publish: 'all' pushes every strategy's variant, so push.repo_id needs a {strategy} placeholder"
        )


def _check_heal(recipe: Settings, problems: list[str], warnings: list[str]) -> None:
    """The heal section as `prune.heal.HealSettings.check` judges it, before any model is
    loaded (a heal runs after all the pruning), plus what only the recipe can tell."""
    from prune.calibration import file_source, read_text_file

    heal = recipe.heal
    if heal is None:
        return
    if heal.teacher is not None and not heal.teacher.strip():
        problems.append(
            "heal.teacher: must name a model (or leave it out to use the recipe's model)"
        )
    _choice(heal.method, defaults.HEAL_METHODS, "heal.method", problems)
    _at_least(heal.steps, 1, "heal.steps", problems)
    if heal.lr is not None and not 0 < heal.lr < math.inf:
        problems.append(f"heal.lr: must be a finite number > 0, got {heal.lr:g}")
    _at_least(heal.batch_size, 1, "heal.batch_size", problems)
    _at_least(heal.seq_len, 2, "heal.seq_len", problems)
    _at_least(heal.grad_accum, 1, "heal.grad_accum", problems)
    if not 0 <= heal.lm_weight < math.inf:
        problems.append(f"heal.lm_weight: must be a finite number >= 0, got {heal.lm_weight:g}")
    _at_least(heal.lora_rank, 1, "heal.lora_rank", problems)
    if heal.samples < 2:  # HealSettings accepts 1, but the split needs one text of each kind
        problems.append(
            f"heal.samples: must be >= 2 (one text to train on, one held out), got {heal.samples}"
        )
    _choice(heal.dtype, defaults.DTYPES, "heal.dtype", problems)
    if heal.seed is not None and not 0 <= heal.seed <= SEED_MAX:
        problems.append(f"heal.seed: must be between 0 and {SEED_MAX} (2**32 - 1), got {heal.seed}")
    source = heal.calibration
    if source not in (None, "default") and (path := file_source(source)) is not None:
        try:
            read_text_file(path)
        except PruneError as exc:
            problems.append(f"heal.calibration: {exc}")
    keys = [s.key(recipe.prune.schedule) for s in recipe.strategies]
    for i, key in enumerate(keys):
        if key.endswith(HEALED_SUFFIX) and key.removesuffix(HEALED_SUFFIX) in keys:
            problems.append(
                f"strategies[{i}]: the variant name '{key}' is the healed copy of "
                f"'{key.removesuffix(HEALED_SUFFIX)}' (give it another `variant:` name)"
            )
    texts = source if source is not None else recipe.calibration.source
    if texts in (None, "default") and "local_lambada" in recipe.evaluation.tasks:
        warnings.append(
            "heal: trains on the default calibration text, the first LAMBADA passages, which "
            "local_lambada also reports on, so the healed scores are optimistic (set "
            "heal.calibration or calibration.source to other text)"
        )


def _span_problems(recipe: Settings, depth: int) -> list[str]:
    """Spans that do not fit the model, or do not divide the number of blocks to remove."""
    problems = []
    target = target_removals(recipe.prune, depth)
    for i, strat in enumerate(recipe.strategies):
        if strat.span <= 1:
            continue
        if strat.span > depth - 1:
            problems.append(
                f"strategies[{i}].span: must be <= {depth - 1} (the model has {depth} layers), "
                f"got {strat.span}"
            )
        elif target is not None and target % strat.span and recipe.prune.remove is None:
            problems.append(
                f"strategies[{i}].span: {strat.span} does not divide the {target} blocks the "
                f"stopping rule removes (accepted: a span that divides {target})"
            )
    return problems


def _depth_problems(pr: PruneSpec, depth: int) -> list[str]:
    """Checks that need the model's number of layers."""
    problems = []
    protected: set[int] = set()
    for i, idx in enumerate(pr.protect):
        if not -depth <= idx < depth:
            problems.append(
                f"prune.protect[{i}]: must be in 0..{depth - 1} (or -{depth}..-1), got {idx}"
            )
        else:
            protected.add(idx % depth)
    free = depth - len(protected)
    if free <= 1 and pr.protect:
        problems.append(
            f"prune.protect: protects {len(protected)} of {depth} layers, so none can be removed"
        )
        return problems
    if pr.remove is not None:
        if pr.remove >= depth:
            problems.append(f"prune.remove: must be < {depth}, got {pr.remove}")
        elif pr.remove > free - 1 and protected:
            problems.append(
                f"prune.remove: must be <= {free - 1} ({depth} layers, {len(protected)} protected, one must remain), got {pr.remove}"
            )
    if pr.keep is not None:
        if pr.keep >= depth:
            problems.append(
                f"prune.keep: must be < {depth} (the model has {depth} layers), got {pr.keep}"
            )
        elif pr.keep < max(1, len(protected)):
            problems.append(f"prune.keep: must be >= {max(1, len(protected))}, got {pr.keep}")
    if pr.fraction is not None and 0 < pr.fraction < 1 and target_removals(pr, depth) < 1:
        problems.append(f"prune.fraction: {pr.fraction:g} of {depth} layers removes none")
    return problems


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
    if spec in defaults.EMBEDDED:
        entry = defaults.EMBEDDED[spec]
        stem = Path(entry.filename).stem
        cached = sorted((defaults.cache_root() / "gguf").glob(f"{stem}-*/config.json"))
        if cached:
            return _read_config(cached[-1])
        # Read the GGUF header only where the file is already on disk (never assemble it here).
        spec_info = importlib.util.find_spec(entry.package)
        for folder in (spec_info.submodule_search_locations or []) if spec_info else []:
            shipped = Path(folder) / entry.filename
            if shipped.is_file():
                return _gguf_depth(shipped)
        assembled = defaults.cache_root() / "embedded" / entry.filename
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` may be overridden by design
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class explains it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"key {key!r} is given twice (first at line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def parse_recipe(
    text: str, source: str = "<recipe>", depth: int | None = None, resolve_depth: bool = True
) -> Recipe:
    """Parse and validate recipe text; raise RecipeError listing every problem."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # safe, and no key twice
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(source, [f"not valid YAML{where}: {problem}"]) from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise RecipeError(
            source, ["not a usable recipe: nested too deeply (a recipe is a few levels deep)"]
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(source, [f"recipe: must be a mapping of settings, got {_describe(data)}"])
    settings, problems, dropped = _validate(data)
    if depth is None and resolve_depth and settings.model:
        depth = model_depth(settings.model)
    checks, warnings = _check(settings, depth, dropped)
    problems += checks
    if problems:
        raise RecipeError(source, problems)
    for strategy in settings.strategies:  # the effective ranking tasks, written out
        if strategy.tasks is None and get_measure(strategy.name).needs_tasks:
            strategy.tasks = default_rank_tasks(settings.evaluation.tasks)
    return Recipe.model_construct(**dict(settings), raw_text=text, path=source, warnings=warnings)


def load_recipe(path: str | Path, depth: int | None = None, resolve_depth: bool = True) -> Recipe:
    """Read and validate a recipe file; the raw text is kept in `recipe.raw_text`."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()  # exactly as written (no newline translation)
    except FileNotFoundError:
        raise PruneError(f"recipe file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PruneError(f"cannot read recipe file '{path}': {exc}") from None
    return parse_recipe(text, str(path), depth=depth, resolve_depth=resolve_depth)


def check_depth(recipe: Recipe, depth: int) -> None:
    """Re-run the depth checks once the model is loaded (raises RecipeError)."""
    problems = _depth_problems(recipe.prune, depth) + _span_problems(recipe, depth)
    if problems:
        raise RecipeError(recipe.path or "<recipe>", problems)


def apply_overrides(recipe: Recipe, **overrides: Any) -> tuple[Recipe, dict[str, Any]]:
    """Apply CLI overrides (`out`, `limit`, `device`, `device_map`, `max_memory`, `push`) to a
    copy; returns it and what changed."""
    new = recipe.model_copy(deep=True)
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
                if get_measure(strat.name).needs_tasks:
                    strat.limit = value
        elif key == "device":
            if value not in defaults.DEVICES:
                raise PruneError(f"--device: {_not_one_of(value, defaults.DEVICES)}")
            new.device = value
        elif key in ("device_map", "max_memory"):
            if key == "device_map" and value not in defaults.DEVICE_MAPS:
                raise PruneError(f"--device-map: {_not_one_of(value, defaults.DEVICE_MAPS)}")
            if isinstance(value, dict):  # text keys, as a recipe's (JSON sorts mixed keys badly)
                value = applied[key] = {str(k): v for k, v in value.items()}
            setattr(new, key, value)
            # A placement given on the command line replaces the recipe's device.
            if overrides.get("device") is None:
                new.device = "auto"
        elif key == "push":
            new.push.enabled = bool(value)
            if value and not new.push.repo_id:
                raise PruneError(
                    "--push needs push.repo_id in the recipe (e.g. you/model-pruned-{strategy})"
                )
        else:
            raise PruneError(f"unknown override '{key}'")
    return new, applied


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
        if get_measure(strat.name).needs_tasks:
            tasks = ",".join(strat.tasks or recipe.evaluation.tasks)
            limit = strat.limit or recipe.evaluation.limit
            strategies.append(f"{strat.name} on {tasks}" + (f" (limit {limit})" if limit else ""))
        else:
            strategies.append(
                f"{strat.name} on {recipe.calibration.samples} x {recipe.calibration.seq_len} tokens"
            )
    limit = recipe.evaluation.limit
    heal = recipe.heal
    healing = (
        [
            f"healing:     {heal.method}, {heal.steps} steps from {heal.teacher or recipe.model} "
            f"into variants/<name>{HEALED_SUFFIX}"
        ]
        if heal is not None
        else []
    )
    return [
        f"model:       {recipe.model}"
        + (f" ({depth} layers)" if depth else " (depth checked when loaded)"),
        f"strategies:  {'; '.join(strategies)}",
        f"schedule:    {pr.schedule}; {', or '.join(rule)}"
        + (f"; protect {pr.protect}" if pr.protect else ""),
        f"evaluation:  {','.join(recipe.evaluation.tasks)}"
        + (f" (limit {limit})" if limit else ""),
        *healing,
        f"output:      {recipe.export.out or default_out(recipe)}",
    ]


def default_out(recipe: Recipe) -> str:
    """`out/<model name>` when the recipe gives no export.out."""
    name = Path(recipe.model.rstrip("/")).name or "model"
    return str(Path("out") / re.sub(r"[^\w.-]+", "-", name.removesuffix(".gguf")))
