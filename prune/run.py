"""`prune run RECIPE`: the whole job, for every ranking strategy side by side.

validate recipe -> check tasks -> load model -> baseline evaluation -> for each
strategy: rank, greedy removal with re-evaluation -> export one checkpoint per
strategy (with a model card comparing all of them) -> comparison.json/.md,
relevance.png, recipe.yaml -> optional push.

Every evaluation goes through `prune.evaluate.evaluate_removals` on the *full*
model with original layer indices, so results are cached on disk under one key
per (model, removed set, task, settings): the strategies share evaluations, an
interrupted run resumes from the cache, and a re-run is quick. Each variant is
written atomically by `export_checkpoint`; the top-level files are written
through temporary files and renamed, comparison.json last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prune import __version__
from prune.errors import PruneError
from prune.recipe import (
    Recipe,
    apply_overrides,
    check_depth,
    default_out,
    load_recipe,
    target_removals,
)

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


@dataclass
class RunResult:
    """What `run_recipe` produced: the output folder, the comparison record and the variant folders."""

    out: Path
    comparison: dict[str, Any]
    variants: dict[str, Path] = field(default_factory=dict)
    pushed: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _atomic_write(path: Path, content: str | bytes) -> None:
    """Write a file through a temporary sibling and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prepare_out(out: Path, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise PruneError(
            "--overwrite and --resume exclude each other (overwrite starts over, resume continues)"
        )
    if out.exists() and not out.is_dir():
        raise PruneError(f"output '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise PruneError(
            f"output folder '{out}' exists and is not empty (pass --overwrite to start over, "
            "or --resume to continue from the evaluation cache)"
        )


def eval_settings(recipe: Recipe, strategy: Any | None = None) -> Any:
    """EvalSettings for the reporting tasks, or for an accuracy strategy's ranking tasks."""
    from prune.evaluate import EvalSettings

    ev = recipe.evaluation
    tasks = tuple(strategy.tasks if strategy is not None and strategy.tasks else ev.tasks)
    limit = strategy.limit if strategy is not None and strategy.limit is not None else ev.limit
    fewshot = (
        strategy.num_fewshot
        if strategy is not None and strategy.num_fewshot is not None
        else ev.num_fewshot
    )
    metric = strategy.metric if strategy is not None and strategy.metric is not None else ev.metric
    return EvalSettings(
        tasks=tasks,
        limit=limit,
        num_fewshot=fewshot,
        batch_size=ev.batch_size or 8,
        task_metric=metric,
        data_dir=recipe.data_dir,
        seed=recipe.seed,
    )


def check_tasks(recipe: Recipe) -> None:
    """Fail on unknown task names before any model is loaded."""
    from prune.tasks import resolve_task_names, task_manager

    names = list(recipe.evaluation.tasks)
    for strat in recipe.strategies:
        names += list(strat.tasks or [])
    names = list(dict.fromkeys(names))
    resolve_task_names(names, task_manager(recipe.data_dir, None, names))


# --------------------------------------------------------------------------- the job


class Job:
    """One run: holds the loaded model, the cache and the evaluation helpers."""

    def __init__(
        self, recipe: Recipe, loaded: Any, engine: str, progress: bool, echo: Echo
    ) -> None:
        from prune.evaluate import ResultCache
        from prune.summary import count_parameters
        from prune.surgery import count_layers, locate_layers

        self.recipe = recipe
        self.loaded = loaded
        self.engine = engine
        self.progress = progress
        self.echo = echo
        self.cache = ResultCache()
        self.depth = count_layers(loaded.model)
        self.total_params = count_parameters(loaded.model)
        self.block_params = [count_parameters(b) for b in locate_layers(loaded.model).layers]
        self.report_settings = eval_settings(recipe)
        self.calibration_texts: list[str] | None = None
        self.full_rankings: dict[str, Any] = {}

    def params(self, removed: tuple[int, ...]) -> int:
        return self.total_params - sum(self.block_params[i] for i in removed)

    def evaluate(
        self, settings: Any, candidates: list[tuple[int, ...]], progress: bool = False
    ) -> list[dict[str, Any]]:
        from prune.evaluate import evaluate_removals

        return evaluate_removals(
            self.loaded,
            settings,
            candidates,
            engine=self.engine,
            cache=self.cache,
            progress=progress and self.progress,
        )

    def prefetch(self, candidates: list[tuple[int, ...]]) -> None:
        """Evaluate the steps a one-shot schedule will take in one batch (the fast engine shares work)."""
        self.evaluate(self.report_settings, candidates, progress=True)

    def score(self, removed: tuple[int, ...]) -> dict[str, float]:
        """Reporting-task scores with `removed` (original indices) taken out."""
        return {t: s.value for t, s in self.evaluate(self.report_settings, [removed])[0].items()}

    def texts(self) -> list[str]:
        if self.calibration_texts is None:
            from prune.calibration import load_calibration

            cal = self.recipe.calibration
            source = None if cal.source in (None, "default") else cal.source
            self.calibration_texts = load_calibration(
                source, samples=cal.samples, data_dir=self.recipe.data_dir
            )
        return self.calibration_texts

    def ranker(self, strategy: Any) -> Callable[[tuple[int, ...]], dict[int, float]]:
        """A function: removed original indices -> relevance of every remaining original layer.

        The full model's `Ranking` of each strategy is kept in `self.full_rankings`
        (for the figure and the correlations).
        """
        from prune import relevance
        from prune.surgery import layers_removed

        cal = self.recipe.calibration
        name = strategy.name
        settings = eval_settings(self.recipe, strategy) if name == "accuracy" else None

        def measure() -> Any:
            return relevance.rank_layers(
                name,
                self.loaded,
                texts=self.texts() if name in ("cosine", "perplexity") else None,
                settings=settings,
                seq_len=cal.seq_len,
                batch_size=cal.batch_size,
                engine=self.engine,
                cache=self.cache,
                progress=self.progress,
            )

        def rank(removed: tuple[int, ...]) -> dict[int, float]:
            if not removed:
                ranking = measure()
                self.full_rankings[name] = ranking
                return {s.index: s.score for s in ranking.scores}
            if name == "accuracy":
                return self._accuracy_on_full_model(settings, removed)
            rest = [i for i in range(self.depth) if i not in removed]
            with layers_removed(self.loaded.model, removed):
                ranking = measure()
            return {rest[s.index]: s.score for s in ranking.scores}  # back to original numbering

        return rank

    def _accuracy_on_full_model(self, settings: Any, removed: tuple[int, ...]) -> dict[int, float]:
        """Accuracy drop of each remaining layer given `removed`, evaluated as removals from the full
        model (original indices), so the results share cache entries with every other step."""
        rest = [i for i in range(self.depth) if i not in removed]
        candidates = [removed] + [tuple(sorted((*removed, i))) for i in rest]
        results = self.evaluate(settings, candidates, progress=True)
        base = results[0]
        relevance = {}
        for layer, scores in zip(rest, results[1:], strict=True):
            drops = [
                (base[t].value - scores[t].value) * (1 if base[t].higher_is_better else -1)
                for t in base
            ]
            relevance[layer] = sum(drops) / len(drops)
        return relevance


def _bar(iterable: Any, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False)


def run_recipe(
    recipe_path: str | Path,
    *,
    out: str | Path | None = None,
    limit: int | None = None,
    device: str | None = None,
    push: bool | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    echo: Echo | None = None,
) -> RunResult:
    """Run a recipe end to end (see the module docstring); returns the paths and the comparison."""
    from prune.card import render_card
    from prune.export import export_checkpoint
    from prune.greedy import greedy_prune
    from prune.models import load_model
    from prune.surgery import drop_layers, restore_layers

    echo = echo or (lambda msg: log.info(msg))
    t_start = time.perf_counter()
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)  # all recipe problems, before any model is loaded
    recipe, overrides = apply_overrides(recipe, out=out, limit=limit, device=device, push=push)
    out_dir = Path(recipe.export.out or default_out(recipe))
    _prepare_out(out_dir, overwrite, resume)
    for warning in recipe.warnings:
        echo(f"Warning: {warning}")
    check_tasks(recipe)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    echo(f"loading {recipe.model}")
    loaded = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    timings["load"] = time.perf_counter() - t0
    from prune.surgery import count_layers

    depth = count_layers(loaded.model)
    check_depth(recipe, depth)
    # An old comparison.json would describe a finished run; it is rewritten last.
    for name in ("comparison.json", "comparison.md"):
        (out_dir / name).unlink(missing_ok=True)
    engine = recipe.evaluation.engine  # auto = fast, falling back to lm-eval where it cannot
    job = Job(recipe, loaded, engine, progress, echo)

    t0 = time.perf_counter()
    echo(f"baseline evaluation on {', '.join(recipe.evaluation.tasks)} ({engine} engine)")
    base_full = job.evaluate(job.report_settings, [()])[0]
    baseline = {t: s.value for t, s in base_full.items()}
    timings["baseline"] = time.perf_counter() - t0

    pr = recipe.prune
    target = target_removals(pr, depth)
    results: dict[str, Any] = {}
    strategy_seconds: dict[str, float] = {}
    for strat in recipe.strategies:
        t0 = time.perf_counter()
        echo(f"[{strat.name}] ranking and removing ({pr.schedule})")
        bar = _bar(range(target or depth - 1), f"{strat.name}: greedy removal", progress)

        def on_step(step: Any, bar: Any = bar) -> None:
            if step.step:
                bar.update(1)
                bar.set_postfix_str(f"layer {step.removed_layer}, mean {step.mean_score:.3f}")

        results[strat.name] = greedy_prune(
            depth,
            job.ranker(strat),
            job.score,
            schedule=pr.schedule,
            target=target,
            max_drop=pr.max_drop,
            protect=pr.protect,
            count_params=job.params,
            baseline=baseline,
            on_step=on_step,
            prefetch=job.prefetch if target is not None else None,
        )
        bar.close()
        strategy_seconds[strat.name] = time.perf_counter() - t0
    timings.update({f"strategy_{k}": v for k, v in strategy_seconds.items()})

    comparison = build_comparison(recipe, loaded, job, base_full, results, overrides, engine)
    figure = _figure(comparison, job)

    t0 = time.perf_counter()
    variants: dict[str, Path] = {}
    recipe_bytes = recipe_path.read_bytes()
    for name, result in results.items():
        folder = out_dir / "variants" / name
        removed = sorted(result.removed)
        if resume and _variant_done(folder, removed, loaded):
            variants[name] = folder
            continue
        card = render_card(
            comparison,
            name,
            recipe_text=recipe.raw_text,
            figure="relevance.png" if figure else None,
            repo_id=_repo_for(recipe, name, depth - len(removed)),
        )
        files: dict[str, str | bytes] = {"README.md": card, "recipe.yaml": recipe_bytes}
        if figure:
            files["relevance.png"] = figure
        removal = drop_layers(loaded.model, removed) if removed else None
        try:
            export_checkpoint(
                loaded,
                folder,
                removed,
                depth,
                overwrite=True,
                max_shard_size=recipe.export.max_shard_size,
                extra={
                    "strategy": name,
                    "schedule": result.schedule,
                    "removal_order": result.removed,
                    "history": [s.to_dict() for s in result.history],
                },
                files=files,
            )
        finally:
            if removal is not None:
                restore_layers(loaded.model, removal)
        variants[name] = folder
    timings["export"] = time.perf_counter() - t0

    for name in (
        list((out_dir / "variants").iterdir())
        if overwrite and (out_dir / "variants").is_dir()
        else []
    ):
        if name.name not in variants and not name.name.startswith("."):
            shutil.rmtree(name, ignore_errors=True)  # a strategy this recipe no longer runs
    _atomic_write(out_dir / "recipe.yaml", recipe_bytes)
    if figure:
        _atomic_write(out_dir / "relevance.png", figure)
    timings["total"] = time.perf_counter() - t_start
    comparison["timings"] = {k: round(v, 2) for k, v in timings.items()}
    comparison["variants"] = {k: str(v.relative_to(out_dir)) for k, v in variants.items()}
    _atomic_write(out_dir / "comparison.md", render_report(comparison))
    _atomic_write(out_dir / "comparison.json", json.dumps(comparison, indent=2) + "\n")

    pushed: dict[str, str] = {}
    if recipe.push.enabled:
        try:
            pushed = _push(recipe, comparison, variants, echo)
        except PruneError as exc:
            raise PruneError(
                f"{exc} (the outputs in {out_dir} are complete; retry with `prune push {out_dir}/variants/<strategy> "
                "--repo-id ...`)"
            ) from exc
        comparison["pushed"] = pushed
        _atomic_write(out_dir / "comparison.json", json.dumps(comparison, indent=2) + "\n")
    return RunResult(out_dir, comparison, variants, pushed)


def _variant_done(folder: Path, removed: list[int], loaded: Any) -> bool:
    """A variant from an interrupted run can be kept when it removed the same layers of the same model."""
    try:
        record = json.loads((folder / "prune.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        record.get("removed_layers") == removed and record.get("source") == loaded.source.to_dict()
    )


def _repo_for(recipe: Recipe, strategy: str, layers: int) -> str | None:
    """The recipe's repo id with {strategy} and {layers} (the layers kept) filled in."""
    from prune.hub import render_repo_id

    return render_repo_id(recipe.push.repo_id, strategy, layers) if recipe.push.repo_id else None


def build_comparison(
    recipe: Recipe,
    loaded: Any,
    job: Job,
    base_full: dict[str, Any],
    results: dict[str, Any],
    overrides: dict[str, Any],
    engine: str,
) -> dict[str, Any]:
    """The JSON record of a run (everything the card and the report show)."""
    from prune.compare import build_report

    baseline = {t: s.value for t, s in base_full.items()}
    base_mean = sum(baseline.values()) / len(baseline)
    strategies: dict[str, Any] = {}
    for name, result in results.items():
        final = result.final
        strategies[name] = {
            "schedule": result.schedule,
            "removed": list(result.removed),
            "removed_sorted": sorted(result.removed),
            "stop_reason": result.stop_reason,
            "ranking": {str(k): v for k, v in sorted(result.rankings[0].items())}
            if result.rankings
            else {},
            "rankings": len(result.rankings),
            "history": [s.to_dict() for s in result.history],
            "rejected": result.rejected.to_dict() if result.rejected else None,
            "final": {
                "layers": final.layers_left,
                "params": final.params,
                "scores": final.scores,
                "mean": final.mean_score,
                "drop": final.drop,
                "retained": {
                    t: (final.scores[t] / baseline[t] if baseline.get(t) else None)
                    for t in final.scores
                },
            },
        }
    names = list(results)
    relevance = build_report(loaded.source.spec, job.full_rankings, {}) if job.full_rankings else {}
    correlations = {
        pair: {k: v for k, v in stats.items() if k != "overlaps"}
        for pair, stats in relevance.get("pairs", {}).items()
    }
    overlap = None
    if len(names) == 2:
        sa, sb = set(results[names[0]].removed), set(results[names[1]].removed)
        overlap = len(sa & sb) / len(sa | sb) if sa | sb else 1.0
    best = max(
        names, key=lambda n: (strategies[n]["final"]["mean"], -strategies[n]["final"]["layers"])
    )
    source = loaded.source
    return {
        "prune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe_file": "recipe.yaml",
        "overrides": overrides,
        "settings": recipe.to_dict(),
        "warnings": list(recipe.warnings),
        "engine": engine,
        "model": {
            "spec": source.spec,
            "hub_id": source.hub_id,
            "license": source.license,
            "source": source.to_dict(),
            "model_type": getattr(loaded.model.config, "model_type", None),
            "num_layers": job.depth,
            "parameters": job.total_params,
        },
        "evaluation": {
            "tasks": list(baseline),
            "limit": job.report_settings.limit,
            "num_fewshot": job.report_settings.num_fewshot,
            "metrics": {t: s.metric for t, s in base_full.items()},
        },
        "baseline": {
            "scores": baseline,
            "stderr": {t: s.stderr for t, s in base_full.items()},
            "n": {t: s.n for t, s in base_full.items()},
            "mean": base_mean,
        },
        "strategies": strategies,
        "correlations": correlations,
        "overlap": overlap,
        "relevance": {
            "layers": relevance.get("layers", []),
            "orders": relevance.get("orders", {}),
            "settings": relevance.get("settings", {}),
            "overlaps": {
                pair: stats.get("overlaps") for pair, stats in relevance.get("pairs", {}).items()
            },
        },
        "best": best,
    }


def _figure(comparison: dict[str, Any], job: Job) -> bytes | None:
    """PNG bytes of the per-layer relevance under each strategy (prune.plot's figure)."""
    from prune.compare import build_report
    from prune.plot import plot_relevance

    if not job.full_rankings:
        return None
    return plot_relevance(build_report(comparison["model"]["spec"], job.full_rankings, {}))


def _push(
    recipe: Recipe, comparison: dict[str, Any], variants: dict[str, Path], echo: Echo
) -> dict[str, str]:
    """Push the chosen variants with prune.hub (all checked before the first upload); strategy -> URL.

    `publish: all` pushes every variant; a strategy name pushes that one; `best`
    pushes every variant when the repo id has a {strategy} placeholder (one repo
    each) and otherwise only the variant with the best re-evaluated mean score.
    """
    from prune import hub

    publish = recipe.push.publish
    if publish == "all" or (publish == "best" and "{strategy}" in (recipe.push.repo_id or "")):
        chosen = list(variants)
    else:
        chosen = [comparison["best"] if publish == "best" else publish]
    pushes = [
        (variants[n], _repo_for(recipe, n, comparison["strategies"][n]["final"]["layers"]))
        for n in chosen
    ]
    for folder, repo_id in pushes:
        echo(f"pushing {folder} to {repo_id}")
    results = hub.push_many(pushes, private=recipe.push.private)
    return {name: result.url for name, result in zip(chosen, results, strict=True)}


# --------------------------------------------------------------------------- text report


def headline_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """The headline table: one row for the base model and one per strategy."""
    model = comparison["model"]
    base = comparison["baseline"]
    rows = [["model", "layers", "params kept", "mean score", "retained", "removed layers"]]
    rows.append(["base", str(model["num_layers"]), "100.0%", f"{base['mean']:.4f}", "100.0%", "-"])
    for name, data in comparison["strategies"].items():
        final = data["final"]
        share = final["params"] / model["parameters"]
        retained = final["mean"] / base["mean"] if base["mean"] else float("nan")
        rows.append(
            [
                name,
                str(final["layers"]),
                f"{100 * share:.1f}%",
                f"{final['mean']:.4f}",
                f"{100 * retained:.1f}%",
                ",".join(map(str, data["removed"])) or "-",
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Plain aligned columns for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_report(comparison: dict[str, Any]) -> str:
    """comparison.md: the same content as the cards, for the run as a whole."""
    from prune.card import render_card

    names = list(comparison["strategies"])
    card = render_card(
        comparison, names[0], recipe_text="(see recipe.yaml)", figure="relevance.png"
    )
    # The card's comparison sections, without its front matter, title and usage notes.
    body = card[card.index("## Removed layers") : card.index("## Use")].rstrip()
    rows = headline_rows(comparison)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    timings = comparison.get("timings", {})
    lines = [
        f"# prune run: {comparison['model']['spec']}",
        "",
        *table,
        "",
        f"Best by mean score: **{comparison['best']}**. Engine: {comparison['engine']}."
        + (
            f" CLI overrides: {json.dumps(comparison['overrides'])}."
            if comparison.get("overrides")
            else ""
        ),
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        "",
        body,
        "",
    ]
    return "\n".join(lines)
