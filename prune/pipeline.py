"""`prune run RECIPE` as a pipeline of named steps, for every ranking strategy side by side.

    prepare -> baseline -> rank -> remove -> export -> heal -> report -> publish

- prepare: read and validate the recipe (all problems, before any model is loaded),
  apply the CLI overrides, check the output folder and the task names, load the model.
- baseline: score the full model on the reporting tasks.
- rank: each strategy's measure ranks the blocks of the full model.
- remove: greedy removal per strategy (`prune.greedy`), re-evaluating after every
  step; the iterative schedule re-ranks the slimmed model each time.
- export: one checkpoint per strategy, with a model card comparing all of them.
- heal (only with a `heal:` section): distil the recipe's model (or `heal.teacher`) into
  each variant with `prune.heal.heal_variant`, writing `variants/<name>-healed`, then score
  each healed variant on the reporting tasks like the raw ones, so the comparison and the
  cards show raw and healed side by side with paired intervals.
- report: comparison.json / comparison.md, relevance.png, tradeoff.png, recipe.yaml.
- publish: push the chosen variants to the Hub when asked.

Under torchrun every process runs every step (same inputs, same decisions) and the
evaluations are split across them (`prune.distributed`); only process 0 writes the
output folder and pushes. Healing trains in one process, so a recipe that heals is
refused under torchrun.

Every evaluation goes through `evaluate_removals` on the *full* model with
original layer indices, so results are cached on disk under one key per (model,
removed set, task, settings): strategies share evaluations, an interrupted run
resumes from the cache and a re-run is quick. Variants are written atomically;
comparison.json is written last, so its presence marks a finished run. With --resume,
a variant whose prune.json holds this run's fingerprint keeps its weights, a healed one
too (its fingerprint also covers the heal section), and an interrupted heal continues
from the state `heal_variant` saved beside its folder.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune.atomic import sweep_temporaries, write_file
from prune.defaults import HEALED_SUFFIX
from prune.distributed import is_main, world
from prune.errors import PruneError
from prune.recipe import (
    Recipe,
    apply_overrides,
    check_depth,
    check_output_folder,
    default_out,
    load_recipe,
    target_removals,
)

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


@dataclass
class RunResult:
    """What `run_recipe` produced: the output folder, the comparison record and the variant
    folders (by variant name: `<name>-healed` for the healed ones)."""

    out: Path
    comparison: dict[str, Any]
    variants: dict[str, Path] = field(default_factory=dict)
    pushed: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """The state the steps pass along: what the user asked for, then what each step produced."""

    recipe_path: Path
    cli: dict[str, Any]  # CLI overrides as given: out, limit, device, push
    overwrite: bool
    resume: bool
    progress: bool
    echo: Echo
    recipe: Recipe | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    loaded: Any = None
    depth: int = 0
    cache: Any = None
    report_settings: Any = None
    texts: list[str] | None = None
    total_params: int = 0
    block_params: list[int] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)  # task -> TaskScore of the full model
    rankings: dict[str, Any] = field(default_factory=dict)  # strategy -> full-model Ranking
    results: dict[str, Any] = field(default_factory=dict)  # strategy -> GreedyResult
    finals: dict[str, Any] = field(default_factory=dict)  # strategy -> task -> TaskScore
    comparison: dict[str, Any] = field(default_factory=dict)
    figure: bytes | None = None  # relevance.png
    tradeoff: bytes = b""  # tradeoff.png
    variants: dict[str, Path] = field(default_factory=dict)
    kept: set[str] = field(default_factory=set)  # variants whose earlier weights were kept
    healed: dict[str, Path] = field(default_factory=dict)  # strategy -> its healed folder
    pushed: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def engine(self) -> str:
        return self.recipe.evaluation.engine

    def folders(self) -> dict[str, Path]:
        """Every variant folder written, by variant name, each healed one after its raw one."""
        out = {}
        for name, folder in self.variants.items():
            out[name] = folder
            if name in self.healed:
                out[f"{name}{HEALED_SUFFIX}"] = self.healed[name]
        return out

    def params(self, removed: tuple[int, ...]) -> int:
        """Parameters left with the `removed` blocks (original indices) taken out."""
        return self.total_params - sum(self.block_params[i] for i in removed)


# --------------------------------------------------------------------------- helpers


def eval_settings(recipe: Recipe, strategy: Any | None = None) -> Any:
    """EvalSettings for the reporting tasks, or for a strategy's ranking tasks (its own
    task settings where it gives them, the evaluation section's otherwise)."""
    from prune.evaluate.settings import EvalSettings

    ev = recipe.evaluation

    def pick(key: str) -> Any:
        own = getattr(strategy, key, None) if strategy is not None else None
        return own if own is not None else getattr(ev, key)

    tasks = strategy.tasks if strategy is not None and strategy.tasks else ev.tasks
    kwargs = {} if ev.batch_size is None else {"batch_size": ev.batch_size}
    return EvalSettings(
        tasks=tuple(tasks),
        limit=pick("limit"),
        num_fewshot=pick("num_fewshot"),
        task_metric=pick("metric"),
        data_dir=recipe.data_dir,
        seed=recipe.seed,
        **kwargs,
    )


def _evaluate(run: Run, settings: Any, candidates: list[tuple[int, ...]], progress: bool) -> list:
    from prune.evaluate.removals import evaluate_removals

    return evaluate_removals(
        run.loaded,
        settings,
        candidates,
        engine=run.engine,
        cache=run.cache,
        progress=progress and run.progress,
    )


def _texts(run: Run) -> list[str]:
    """The calibration texts, read once on first use."""
    if run.texts is None:
        from prune.calibration import load_calibration

        cal = run.recipe.calibration
        source = None if cal.source in (None, "default") else cal.source
        run.texts = load_calibration(source, samples=cal.samples, data_dir=run.recipe.data_dir)
    return run.texts


def _rank(
    run: Run, strategy: Any, removed: tuple[int, ...], starts: list[int] | None = None
) -> Any:
    """The strategy's ranking of the blocks (or spans) left after `removed`, original indices
    throughout; `starts` limits a measured strategy to the candidates starting there."""
    from prune.measures import get_measure
    from prune.measures.base import RankRequest

    measure = get_measure(strategy.name)
    cal = run.recipe.calibration
    request = RankRequest(
        loaded=run.loaded,
        texts=_texts(run) if measure.needs_texts else None,
        settings=eval_settings(run.recipe, strategy) if measure.needs_tasks else None,
        seq_len=cal.seq_len,
        batch_size=cal.batch_size,
        block_size=strategy.span,
        layers=starts if measure.per_layer else None,
        adaptive=_adaptive_cut(run, strategy, removed, starts) if strategy.adaptive else None,
        engine=run.engine,
        cache=run.cache,
        progress=run.progress,
        removed=removed,
    )
    return measure.rank(request)


def _adaptive_cut(
    run: Run, strategy: Any, removed: tuple[int, ...], starts: list[int] | None
) -> int | None:
    """K for adaptive sampling: the spans the removal will take from the full model, then one
    (the next pick) in each iterative round; None where no cut separates the candidates."""
    target = target_removals(run.recipe.prune, run.depth)
    k = 1 if removed else (target or 0) // strategy.span
    left = run.depth - len(removed) - strategy.span + 1  # candidate spans in the model now
    candidates = min(left, len(starts)) if starts is not None else left
    return k if 1 <= k < candidates else None


def _relevance(ranking: Any) -> dict[Any, float]:
    """A ranking as the greedy loop takes it: block -> score, or span (tuple) -> score."""
    return {(s.layers if s.span > 1 else s.index): s.score for s in ranking.scores}


def _rescored(
    rounds: list[Any],
    removed: tuple[int, ...],
    count: int,
    span: int,
    depth: int,
    protect: Sequence[int] = (),
) -> list[int]:
    """The first blocks of the `count` candidates that looked least relevant when last measured
    (`rounds`: the rankings so far, newest first) and still start a span of `span` remaining
    blocks after `removed`, none of them in `protect`: the candidates an iterative round with
    `rescore` measures again."""
    from prune.measures._blocks import windows

    latest: dict[int, float] = {}
    for ranking in rounds:
        for score in ranking.scores:
            latest.setdefault(score.index, score.score)
    keep = {i % depth for i in protect if -depth <= i < depth}
    spans = {span_[0]: span_ for span_ in windows(depth, span, removed, None)}
    usable = [i for i in latest if i in spans and not keep & set(spans[i])]
    return sorted(usable, key=lambda i: (latest[i], i))[:count]


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# --------------------------------------------------------------------------- the steps


def prepare(run: Run) -> None:
    """Recipe, overrides, output folder and task names (all before loading), then the model."""
    from prune.evaluate.cache import ResultCache
    from prune.models import load_model
    from prune.summary import count_parameters
    from prune.surgery import count_layers, locate_layers
    from prune.tasks import resolve_task_names, task_manager

    recipe = load_recipe(run.recipe_path)
    run.recipe, run.overrides = apply_overrides(recipe, **run.cli)
    run.out = Path(run.recipe.export.out or default_out(run.recipe))
    if is_main():  # under torchrun only process 0 writes (and so sweeps) the output folder
        sweep_temporaries(run.out, depth=2)  # what killed runs left (variants/.kl.tmp-*, ...)
    _check_out(run.out, run.overwrite, run.resume)
    check_output_folder(run.out)  # `--out` too, which the recipe's check does not see
    if run.recipe.heal is not None and world()[1] > 1:
        raise PruneError(
            f"heal: healing trains in one process, and this run has {world()[1]} (torchrun); "
            "leave the heal section out here and heal the variants with `prune heal`, or run "
            "the recipe without torchrun"
        )
    for warning in run.recipe.warnings:
        run.echo(f"Warning: {warning}")
    names = list(run.recipe.evaluation.tasks)
    for strategy in run.recipe.strategies:
        names += list(strategy.tasks or [])
    names = list(dict.fromkeys(names))
    resolve_task_names(names, task_manager(run.recipe.data_dir, None, names))

    run.echo(f"loading {run.recipe.model}")
    run.loaded = load_model(
        run.recipe.model,
        dtype=run.recipe.dtype,
        device=run.recipe.device,
        tokenizer_for="prune run",
        device_map=run.recipe.device_map,
        max_memory=run.recipe.max_memory,
    )
    run.depth = count_layers(run.loaded.model)
    check_depth(run.recipe, run.depth)
    # An old comparison would describe a finished run; it is written again at the end.
    for name in ("comparison.json", "comparison.md"):
        if is_main():
            (run.out / name).unlink(missing_ok=True)
    run.cache = ResultCache()
    run.report_settings = eval_settings(run.recipe)
    run.total_params = count_parameters(run.loaded.model)
    run.block_params = [count_parameters(b) for b in locate_layers(run.loaded.model).layers]


def baseline(run: Run) -> None:
    """Score the full model on the reporting tasks."""
    tasks = ", ".join(run.recipe.evaluation.tasks)
    run.echo(f"baseline evaluation on {tasks} ({run.engine} engine)")
    run.baseline = _evaluate(run, run.report_settings, [()], progress=False)[0]


def rank(run: Run) -> None:
    """Each strategy ranks the blocks of the full model."""
    for strategy in run.recipe.strategies:
        key = strategy.key(run.recipe.prune.schedule)
        what = f"spans of {strategy.span} blocks" if strategy.span > 1 else "blocks"
        run.echo(f"[{key}] ranking the {what} of {run.depth}")
        start = time.perf_counter()
        run.rankings[key] = _rank(run, strategy, ())
        run.timings[f"rank_{key}"] = time.perf_counter() - start


def remove(run: Run) -> None:
    """Greedy removal per strategy, re-evaluating the reporting tasks after every step."""
    from prune.greedy import greedy_prune

    pr = run.recipe.prune
    target = target_removals(pr, run.depth)
    base_scores = {t: s.value for t, s in run.baseline.items()}

    def score(removed: tuple[int, ...]) -> dict[str, float]:
        result = _evaluate(run, run.report_settings, [removed], progress=False)[0]
        return {t: s.value for t, s in result.items()}

    def prefetch(candidates: list[tuple[int, ...]]) -> None:
        # The steps a one-shot schedule will take, in one batch (the fast engine shares work).
        _evaluate(run, run.report_settings, candidates, progress=True)

    for strategy in run.recipe.strategies:
        name = strategy.key(pr.schedule)
        schedule = strategy.schedule or pr.schedule
        run.echo(f"[{name}] removing blocks ({schedule})")
        start = time.perf_counter()
        bar = _bar(target or run.depth - 1, f"{name}: greedy removal", run.progress)
        rounds = [run.rankings[name]]  # the latest ranking first

        def relevance(removed: tuple[int, ...], strategy: Any = strategy, rounds=rounds) -> dict:
            if not removed:
                return _relevance(rounds[0])
            starts = None
            if strategy.rescore is not None:
                starts = _rescored(
                    rounds, removed, strategy.rescore, strategy.span, run.depth, pr.protect
                )
            ranking = _rank(run, strategy, removed, starts)
            rounds.insert(0, ranking)
            return _relevance(ranking)

        def on_step(step: Any, bar: Any = bar) -> None:
            if step.step:
                bar.update(len(step.removed_span or [step.removed_layer]))
                what = step.removed_span or step.removed_layer
                bar.set_postfix_str(f"layer {what}, mean {step.mean_score:.3f}")

        try:
            run.results[name] = greedy_prune(
                run.depth,
                relevance,
                score,
                schedule=schedule,
                target=target,
                max_drop=pr.max_drop,
                protect=pr.protect,
                count_params=run.params,
                baseline=base_scores,
                on_step=on_step,
                prefetch=prefetch if target is not None else None,
            )
        finally:
            bar.close()
        run.timings[f"remove_{name}"] = time.perf_counter() - start


def export(run: Run) -> None:
    """Build the comparison record, then write one checkpoint per strategy with its card."""
    from prune.export import export_checkpoint
    from prune.layer_report import build_report, ranking_stability
    from prune.plot import plot_relevance, plot_tradeoff
    from prune.report import build_comparison, paired_comparison, step_intervals
    from prune.streaming import stream_drop_source
    from prune.surgery import drop_layers, restore_layers

    # The per-block table and figure: the first single-block ranking of each measure.
    per_block: dict[str, Any] = {}
    for strategy in run.recipe.strategies:
        if strategy.span == 1 and strategy.name not in per_block:
            per_block[strategy.name] = run.rankings[strategy.key(run.recipe.prune.schedule)]
    relevance = build_report(run.loaded.source.spec, per_block, {}) if per_block else {}
    # Every step was evaluated during the removal: these come from the cache.
    steps = {
        name: _evaluate(run, run.report_settings, [tuple(s.removed) for s in result.history], False)
        for name, result in run.results.items()
    }
    finals = run.finals = {name: scores[-1] for name, scores in steps.items()}
    with_outcomes = all(
        s.outcomes is not None
        for scores in (run.baseline, *(x for v in steps.values() for x in v))
        for s in scores.values()
    )
    seed = run.recipe.seed
    removals = {name: len(result.removed) for name, result in run.results.items()}
    run.comparison = build_comparison(
        recipe=run.recipe,
        loaded=run.loaded,
        depth=run.depth,
        parameters=run.total_params,
        report_settings=run.report_settings,
        base_scores=run.baseline,
        results=run.results,
        relevance=relevance,
        overrides=run.overrides,
        engine=run.engine,
        paired=paired_comparison(run.baseline, finals, seed) if with_outcomes else None,
        stable=ranking_stability(run.rankings, removals, run.recipe.prune.protect, seed),
        intervals={n: step_intervals(run.baseline, v, seed) for n, v in steps.items()}
        if with_outcomes
        else None,
    )
    run.figure = plot_relevance(relevance) if relevance else None
    run.tradeoff = plot_tradeoff(run.comparison)
    if not is_main():  # under torchrun the other processes only took part in the evaluations
        return
    fingerprint = _run_fingerprint(run.recipe)
    for name, result in run.results.items():
        folder = run.out / "variants" / name
        removed = sorted(result.removed)
        files = functools.partial(_variant_files, run, name, removed)
        if run.resume and _variant_done(folder, removed, run.loaded, fingerprint, run.echo):
            # The weights are what this run would write; the card compares every strategy
            # and quotes the recipe text, so the small files are always this run's.
            record = json.loads((folder / "prune.json").read_text())
            for file, content in files(record).items():
                write_file(folder / file, content)
            if not run.figure:
                (folder / "relevance.png").unlink(missing_ok=True)
            run.variants[name] = folder
            run.kept.add(name)
            continue
        extra = {
            "run_fingerprint": fingerprint,
            "strategy": name,
            "schedule": result.schedule,
            "removal_order": result.removed,
            "history": [s.to_dict() for s in result.history],
        }
        # On the source's safetensors files where it can (the source dtype, about one shard
        # of memory); else from the loaded model, in the dtype it was computed in.
        streamed = stream_drop_source(
            run.recipe.model,
            removed,
            folder,
            max_shard_size=run.recipe.export.max_shard_size,
            overwrite=True,
            extra=extra,
            files=files,
            compute_dtype=run.loaded.model.dtype,
            revision=run.loaded.source.revision,
        )
        if streamed is None:
            removal = drop_layers(run.loaded.model, removed) if removed else None
            try:
                export_checkpoint(
                    run.loaded,
                    folder,
                    removed,
                    run.depth,
                    overwrite=True,
                    max_shard_size=run.recipe.export.max_shard_size,
                    extra=extra,
                    files=files,
                    compute_dtype=run.loaded.model.dtype,
                )
            finally:
                if removal is not None:
                    restore_layers(run.loaded.model, removal)
        run.variants[name] = folder
    variants_dir = run.out / "variants"
    if run.overwrite and variants_dir.is_dir():
        planned = set(run.recipe.variant_names())  # healed ones included: heal replaces them
        for folder in variants_dir.iterdir():
            if folder.name not in planned and not folder.name.startswith("."):
                shutil.rmtree(folder, ignore_errors=True)  # a strategy the recipe no longer runs


def heal(run: Run) -> None:
    """With a `heal:` section: heal every variant into `variants/<name>-healed`, score each
    healed one on the reporting tasks (the raw variants' settings, engine and cache), and add
    it to the comparison beside its raw variant; the raw variants' cards are written again
    to show both. The full model is released first: the heal loads the teacher itself."""
    from prune.evaluate.removals import evaluate_removals
    from prune.models import load_model
    from prune.report import healed_record

    if run.recipe.heal is None or not run.variants:
        return
    settings = heal_settings(run.recipe)
    teacher = run.recipe.heal.teacher or run.recipe.model
    fingerprint = _run_fingerprint(run.recipe, heal=True)
    _release_model(run)
    for name, folder in run.variants.items():
        healed = folder.with_name(f"{name}{HEALED_SUFFIX}")
        start = time.perf_counter()
        reuse = run.resume and name in run.kept
        if not (reuse and _healed_done(healed, folder, fingerprint, run.echo)):
            what = f"{settings.method}, {settings.steps} steps, teacher {teacher}"
            run.echo(f"[{healed.name}] healing {folder.name} ({what})")
            _heal_variant(run, folder, healed, teacher, settings, fingerprint, resume=reuse)
        run.echo(f"[{healed.name}] evaluating on {', '.join(run.recipe.evaluation.tasks)}")
        loaded = load_model(
            str(healed),
            dtype=run.recipe.dtype,
            device=run.recipe.device,
            tokenizer_for="prune run",
            device_map=run.recipe.device_map,
            max_memory=run.recipe.max_memory,
        )
        healed_scores = evaluate_removals(
            loaded, run.report_settings, [()], engine=run.engine, cache=run.cache, progress=False
        )[0]
        del loaded
        _free_memory()
        run.comparison["strategies"][name]["healed"] = healed_record(
            run.baseline,
            run.finals[name],
            healed_scores,
            run.comparison["strategies"][name]["final"],
            json.loads((healed / "prune.json").read_text())["healing"],
            str(healed.relative_to(run.out)),
            seed=run.recipe.seed,
        )
        run.healed[name] = healed
        run.timings[f"heal_{name}"] = time.perf_counter() - start
    for name, folder in run.variants.items():  # the cards now compare raw and healed
        write_file(folder / "README.md", _card(run, name))


def report(run: Run) -> None:
    """recipe.yaml, relevance.png, comparison.md, then comparison.json (last: the run is done)."""
    from prune.report import render_comparison

    if not is_main():
        return
    write_file(run.out / "recipe.yaml", run.recipe.raw_text)
    write_file(run.out / "tradeoff.png", run.tradeoff)
    if run.figure:
        write_file(run.out / "relevance.png", run.figure)
    run.comparison["timings"] = {k: round(v, 2) for k, v in run.timings.items()}
    run.comparison["variants"] = {k: str(v.relative_to(run.out)) for k, v in run.folders().items()}
    write_file(run.out / "comparison.md", render_comparison(run.comparison))
    _write_comparison(run)


def publish(run: Run) -> None:
    """Push the chosen variants (all checked before the first upload) when the recipe asks.

    `publish: all` pushes every variant, the healed ones (`<name>-healed`) too; a variant
    name pushes that one; `best` pushes every variant when the repo id has a {strategy}
    placeholder (one repo each, `{strategy}` filled with the variant name) and otherwise
    only the raw variant with the distinguishably best re-evaluated mean score.
    """
    from prune import hub

    push = run.recipe.push
    if not push.enabled or not is_main():
        return
    folders = run.folders()
    if push.publish == "all" or (push.publish == "best" and "{strategy}" in (push.repo_id or "")):
        chosen = list(folders)
    elif push.publish == "best" and run.comparison["best"] is None:
        raise PruneError(
            f"push.publish is 'best' but no variant is distinguishably better "
            f"({run.comparison['verdict']}); the outputs in {run.out} are complete: set "
            "push.publish to a strategy name or 'all', or push one with `prune push`"
        )
    else:
        chosen = [run.comparison["best"] if push.publish == "best" else push.publish]
    strategy = {n: n for n in run.variants} | {f"{n}{HEALED_SUFFIX}": n for n in run.healed}
    layers = {n: run.comparison["strategies"][strategy[n]]["final"]["layers"] for n in chosen}
    pushes = [(folders[n], _repo_for(run.recipe, n, layers[n])) for n in chosen]
    for folder, repo_id in pushes:
        run.echo(f"pushing {folder} to {repo_id}")
    try:
        results = hub.push_many(pushes, private=push.private)
    except PruneError as exc:
        raise PruneError(
            f"{exc} (the outputs in {run.out} are complete; retry with "
            f"`prune push {run.out}/variants/<strategy> --repo-id ...`)"
        ) from exc
    run.pushed = {name: result.url for name, result in zip(chosen, results, strict=True)}
    run.comparison["pushed"] = run.pushed
    _write_comparison(run)


STEPS: tuple[Callable[[Run], None], ...] = (
    prepare,
    baseline,
    rank,
    remove,
    export,
    heal,
    report,
    publish,
)


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
    device_map: str | None = None,
    max_memory: Any = None,
) -> RunResult:
    """Run a recipe end to end, step by step (see the module docstring)."""
    run = Run(
        recipe_path=Path(recipe_path),
        cli={
            "out": out,
            "limit": limit,
            "device": device,
            "device_map": device_map,
            "max_memory": max_memory,
            "push": push,
        },
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        echo=echo or log.info,
    )
    started = time.perf_counter()
    for step in STEPS:
        if step is report:  # the record's timings cover everything before it is written
            run.timings["total"] = time.perf_counter() - started
        t0 = time.perf_counter()
        step(run)
        run.timings[step.__name__] = time.perf_counter() - t0
    return RunResult(run.out, run.comparison, run.folders(), run.pushed)


# --------------------------------------------------------------------------- small parts


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
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


def heal_settings(recipe: Recipe) -> Any:
    """The recipe's heal section as `prune.heal.HealSettings`: unset keys take the heal's
    defaults, except the calibration text (the recipe's), the seed and the dtype (the
    recipe's)."""
    from prune.heal import HealSettings

    h = recipe.heal
    source = h.calibration if h.calibration is not None else recipe.calibration.source
    return HealSettings(
        method=h.method,
        steps=h.steps,
        lr=h.lr,
        batch_size=h.batch_size,
        seq_len=h.seq_len,
        grad_accum=h.grad_accum,
        lm_weight=h.lm_weight,
        lora_rank=h.lora_rank,
        calibration=None if source in (None, "default") else source,
        samples=h.samples,
        seed=recipe.seed if h.seed is None else h.seed,
        dtype=h.dtype or recipe.dtype,
    )


def _card(run: Run, name: str, record: Mapping[str, Any] | None = None) -> str:
    """The README.md of the raw variant `name`: the comparison as it stands now (`record`:
    its prune.json, default the one in its folder, for the dtypes it was written in)."""
    from prune.card import render_card

    if record is None:
        try:
            record = json.loads((run.out / "variants" / name / "prune.json").read_text())
        except (OSError, ValueError):
            record = None
    layers = run.comparison["strategies"][name]["final"]["layers"]
    return render_card(
        run.comparison,
        name,
        recipe_text=run.recipe.raw_text,
        figure="relevance.png" if run.figure else None,
        repo_id=_repo_for(run.recipe, name, layers),
        record=record,
    )


def _variant_files(
    run: Run, name: str, removed: list[int], record: Mapping[str, Any]
) -> dict[str, str | bytes]:
    """The small files of the raw variant `name` beside its weights, given its prune.json
    `record` (the mergekit config names the dtype the weights were written in)."""
    from prune.drop_card import mergekit_config

    dtype = record.get("export_dtype") or run.loaded.model.dtype
    files: dict[str, str | bytes] = {
        "README.md": _card(run, name, record),
        "recipe.yaml": run.recipe.raw_text,
        "tradeoff.png": run.tradeoff,
        "mergekit.yaml": mergekit_config(run.loaded.source.to_dict(), removed, run.depth, dtype),
    }
    if run.figure:
        files["relevance.png"] = run.figure
    return files


def _free_memory() -> None:
    """Hand freed tensors' memory back (to the accelerator too) before the next model loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release_model(run: Run) -> None:
    """Drop the full model (no step after export needs it), so a heal has room for its own
    teacher and student."""
    run.loaded = None
    _free_memory()


def _heal_variant(
    run: Run,
    folder: Path,
    healed: Path,
    teacher: str,
    settings: Any,
    fingerprint: str,
    resume: bool,
) -> None:
    """Heal `folder` into `healed`, its prune.json stamped with the run's `fingerprint`.

    With `resume` (an earlier run's variant kept as it was), an interrupted heal's saved
    state is continued; a state that turns out not to fit (another heal section) is
    discarded before the first step and the heal starts over.
    """
    from prune.heal import heal_variant
    from prune.heal_state import STATE_FILE, HealStateMismatch, state_dir_for

    name = folder.name
    layers = run.comparison["strategies"][name]["final"]["layers"]
    kwargs = dict(
        teacher=teacher,
        settings=settings,
        report=run.report_settings,  # the healed card's before/after scores
        engine=run.engine,
        device=run.recipe.device,
        data_dir=run.recipe.data_dir,
        overwrite=True,
        progress=run.progress,
        extra={"run_fingerprint": fingerprint},
        report_before=run.finals[name],  # the raw variant's scores: not measured twice
        repo_id=_repo_for(run.recipe, healed.name, layers),
    )
    state = state_dir_for(healed) / STATE_FILE
    done = False
    if resume and state.is_file():
        try:
            heal_variant(folder, healed, resume=True, **kwargs)
            done = True
        except HealStateMismatch as exc:  # other errors keep the state for the next resume
            run.echo(f"[{healed.name}] healing from the start: {exc}")
    if not done:
        heal_variant(folder, healed, **kwargs)


def _healed_done(healed: Path, folder: Path, fingerprint: str, echo: Echo) -> bool:
    """Whether the healed folder of an earlier run is what this run would write: healed
    from the variant now in `folder` (same export) by the same recipe (heal section
    included) and prune version. A folder that exists but is not is announced (one line
    saying why) and then healed again by the caller."""
    try:
        record = json.loads((healed / "prune.json").read_text())
    except FileNotFoundError:
        return False  # never healed (e.g. the run was interrupted before it)
    except (OSError, ValueError):
        record = None
    try:
        created = json.loads((folder / "prune.json").read_text()).get("created")
    except (OSError, ValueError, AttributeError):
        created = None
    chain = record.get("chain") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("healing"), dict):
        why = "its prune.json is unreadable or records no healing"
    elif record.get("run_fingerprint") != fingerprint:
        why = "the recipe (its heal section included) or prune's version changed since"
    elif not chain or not isinstance(chain[-1], dict) or chain[-1].get("created") != created:
        why = f"it was healed from another export of {folder.name}"
    else:
        echo(f"[{healed.name}] keeping the healed weights (same recipe and variant)")
        return True
    echo(f"[{healed.name}] healing again: {why}")
    return False


def _write_comparison(run: Run) -> None:
    write_file(run.out / "comparison.json", json.dumps(run.comparison, indent=2) + "\n")


def _variant_done(
    folder: Path, removed: list[int], loaded: Any, fingerprint: str, echo: Echo
) -> bool:
    """Whether the variant in `folder` (from an earlier run) is what this run would export: the
    same run fingerprint (recipe and prune version), removed layers and source. A folder that
    exists but is not is announced (one line saying why) and then rebuilt by the caller."""
    try:
        record = json.loads((folder / "prune.json").read_text())
    except FileNotFoundError:
        return False  # never exported (e.g. the run was interrupted before it)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        why = "its prune.json is unreadable"
    elif record.get("run_fingerprint") != fingerprint:
        why = "the recipe or prune's version changed since it was exported"
    elif record.get("removed_layers") != removed:
        why = f"it removed layers {record.get('removed_layers')}, this run removes {removed}"
    elif record.get("source") != loaded.source.to_dict():
        why = "it was pruned from another source model"
    else:
        echo(f"[{folder.name}] keeping the exported weights (same recipe, layers and source)")
        return True
    echo(f"[{folder.name}] rebuilding the variant: {why}")
    return False


# Recipe settings that change nothing in a variant's weights or prune.json: where the outputs
# go, publishing (the card, which names the repo, is rewritten on every run anyway), the
# free-text description, and the evaluation batch size (the result cache ignores it too).
_NOT_FINGERPRINTED = (("export", "out"), ("push",), ("description",), ("evaluation", "batch_size"))


def _run_fingerprint(recipe: Recipe, heal: bool = False) -> str:
    """SHA-256 (hex) of the effective recipe (CLI overrides applied, defaults filled in) and
    prune's version: what a resumed run requires of a variant before it keeps its weights.
    The heal section counts only with `heal` (for healed folders): a raw variant does not
    depend on it."""
    import hashlib

    from prune import __version__

    settings = recipe.to_dict()
    if not heal:
        settings.pop("heal", None)
    for path in _NOT_FINGERPRINTED:
        parent = settings
        for key in path[:-1]:
            parent = parent.get(key, {})
        parent.pop(path[-1], None)
    payload = json.dumps(
        {"recipe": settings, "prune_version": __version__}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _repo_for(recipe: Recipe, strategy: str, layers: int) -> str | None:
    """The recipe's repo id with {strategy} and {layers} (the layers kept) filled in."""
    from prune.hub import render_repo_id

    return render_repo_id(recipe.push.repo_id, strategy, layers) if recipe.push.repo_id else None
