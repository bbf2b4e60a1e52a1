"""Score a model, and the model with candidate sets of blocks removed, on lm-eval tasks.

`evaluate` scores the model as it is now; `evaluate_removals` scores it with each
candidate set of blocks removed (`()` is the full model), reusing and filling the
result cache (`prune.evaluate.cache`) so interrupted runs resume and repeated runs
are instant. Both take an engine name from `prune.defaults.ENGINES`:

- "lm-eval": the real lm-evaluation-harness (`prune.evaluate.harness.LmEvalRunner`),
  removing blocks in place with `prune.surgery.layers_removed`, one candidate at a
  time;
- "fast": `prune.evaluate.harness.evaluate_candidates`, all candidates in one shared
  computation with the same numbers, each candidate cached as soon as it is finished;
- "auto": "fast", and "lm-eval" wherever the fast engine cannot serve the task or
  model (`with_fallback`).

lm-eval is imported only when an evaluation runs, so importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from prune.defaults import ENGINES
from prune.distributed import gather, is_main, share_work, world
from prune.errors import FastEngineUnsupported, PruneError
from prune.evaluate.cache import ResultCache, model_fingerprint
from prune.evaluate.settings import EvalSettings, TaskScore

log = logging.getLogger(__name__)


def evaluate(
    model: Any, tokenizer: Any, settings: EvalSettings, *, engine: str = "auto"
) -> dict[str, TaskScore]:
    """Score the model as it is now on the settings' tasks; returns task -> TaskScore."""
    check_engine(engine)
    if engine == "auto":
        return with_fallback(lambda e: evaluate(model, tokenizer, settings, engine=e))
    if engine == "lm-eval":
        from prune.evaluate.harness import lm_eval_runner

        return lm_eval_runner(model, tokenizer, settings).run()
    return _fast_engine()(model, tokenizer, settings, [()])[0]


def with_fallback(call: Callable[[str], Any]) -> Any:
    """Run `call` with the fast engine; where it cannot handle the task or model, with lm-eval."""
    try:
        return call("fast")
    except FastEngineUnsupported as exc:
        log.warning("%s: falling back to the lm-eval engine", exc.reason)
        return call("lm-eval")


def check_engine(engine: str) -> None:
    """PruneError unless `engine` is one of `prune.defaults.ENGINES`."""
    if engine not in ENGINES:
        raise PruneError(f"unknown engine '{engine}' (accepted: {', '.join(ENGINES)})")


def _fast_engine() -> Callable:
    """The fast engine's entry point (a seam: tests put a stand-in here)."""
    try:
        from prune.evaluate.harness import evaluate_candidates
    except ImportError as exc:
        raise PruneError(f"the fast engine could not be loaded ({exc})") from exc
    return evaluate_candidates


def evaluate_removals(
    loaded: Any,
    settings: EvalSettings,
    candidates: list[tuple[int, ...]],
    *,
    engine: str = "auto",
    cache: ResultCache | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
) -> list[dict[str, TaskScore]]:
    """Score the model with each candidate set of blocks removed; `()` is the full model.

    Indices refer to the model as it is now. With a `cache`, results already on
    disk are reused and each candidate's new results are written as soon as that
    candidate is finished (with either engine), so an interrupted run resumes with
    the candidates it had not finished. Returns one task -> TaskScore dict per
    candidate, in order.

    "lm-eval" removes and restores blocks in place, one candidate at a time (peak
    memory: one model), with a progress bar over candidates. Other engines get the
    uncached candidates in one call of `prune.evaluate.harness.evaluate_candidates` (which
    shares work across them), or in calls of `chunk_size` candidates each; the engine
    reports each candidate as it finishes (`on_done`), and it is cached then.

    Under torchrun (`prune.distributed`) every process looks the candidates up in the
    cache, scores every size-th uncached one (caching what it scored) and receives the
    others' scores, so every process returns the same list as one process would.
    """
    from tqdm.auto import tqdm

    from prune.surgery import count_layers, layers_removed, normalize_indices

    check_engine(engine)
    if engine == "auto":
        return with_fallback(
            lambda e: evaluate_removals(
                loaded,
                settings,
                candidates,
                engine=e,
                cache=cache,
                progress=progress,
                chunk_size=chunk_size,
            )
        )
    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = count_layers(model)
    normed = [tuple(normalize_indices(list(c), num_layers)) if c else () for c in candidates]
    names = _task_names(settings)
    fingerprint = model_fingerprint(loaded) if cache is not None else ""

    def key(removed: tuple[int, ...], name: str) -> str:
        return ResultCache.key(fingerprint, removed, name, settings, engine)

    def store(removed: tuple[int, ...], fresh: dict[str, TaskScore]) -> None:
        if cache is None:
            return
        meta = {"removed": list(removed), "settings": asdict(settings), "engine": engine}
        for name, score in fresh.items():
            cache.put(key(removed, name), score, meta)

    found: dict[tuple[int, ...], dict[str, TaskScore]] = {}
    for removed in dict.fromkeys(normed):
        hits = {}
        if cache is not None:
            for name in names:
                hit = cache.get(key(removed, name))
                if hit is not None:
                    hits[name] = hit
        found[removed] = hits
    if world()[1] > 1:
        # Every process must see the same work left: a cache on one node's disk may hold
        # entries another node's lacks, so each takes every hit any process found.
        for other in gather(found):
            for removed, hits in other.items():
                found[removed] = {**hits, **found[removed]}
        progress = progress and is_main()
    todo = [r for r, hits in found.items() if len(hits) < len(names)]

    def evaluate_share(share: list[tuple[int, ...]]) -> dict[tuple[int, ...], dict[str, TaskScore]]:
        """Score the candidates of `share`, caching each as it finishes; removed -> fresh scores."""
        fresh: dict[tuple[int, ...], dict[str, TaskScore]] = {r: {} for r in share}
        if share and engine == "lm-eval":
            from prune.evaluate.harness import lm_eval_runner

            runner = lm_eval_runner(model, tokenizer, settings)
            bar = tqdm(share, desc="evaluating removals", unit="model", disable=not progress)
            for removed in bar:
                bar.set_postfix_str(f"removed={list(removed)}")
                missing = [n for n in names if n not in found[removed]]
                with layers_removed(model, removed):
                    fresh[removed] = runner.run(missing)
                store(removed, fresh[removed])
        elif share:
            evaluate_candidates = _fast_engine()
            size = chunk_size or len(share)
            chunks = [share[i : i + size] for i in range(0, len(share), size)]

            def keep(removed: tuple[int, ...], scores: dict[str, TaskScore]) -> None:
                new = {
                    n: s
                    for n, s in scores.items()
                    if n not in found[removed] and n not in fresh[removed]
                }
                store(removed, new)
                fresh[removed].update(new)

            for chunk in tqdm(
                chunks,
                desc=f"evaluating removals ({engine})",
                unit="chunk",
                disable=not progress or len(chunks) < 2,
            ):
                # Each candidate is cached the moment the engine finishes it (`on_done`); the
                # returned list then only fills what an engine did not report that way.
                results = evaluate_candidates(
                    model,
                    tokenizer,
                    settings,
                    chunk,
                    progress=progress,
                    on_done=lambda i, scores, chunk=chunk: keep(chunk[i], scores),
                )
                for removed, scores in zip(chunk, results, strict=True):
                    keep(removed, scores)
        return fresh

    # Under torchrun the candidates are split across the processes (`prune.distributed`);
    # the fast engine scores each candidate on its own, so the split changes no number.
    for removed, fresh in share_work(todo, evaluate_share).items():
        found[removed].update({n: s for n, s in fresh.items() if n not in found[removed]})
    # Task order as requested, whether a score came from the cache or not.
    return [{**{n: found[r][n] for n in names if n in found[r]}, **found[r]} for r in normed]


def _task_names(settings: EvalSettings) -> list[str]:
    from prune.tasks import resolve_task_names, task_manager

    return resolve_task_names(
        settings.tasks, task_manager(settings.data_dir, settings.include_path, settings.tasks)
    )
