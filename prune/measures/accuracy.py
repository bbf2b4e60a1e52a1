"""Accuracy drop: the benchmark score lost when a block is removed (measured, not a proxy).

Score of a block: baseline score minus the score with the block removed, per task
and averaged over tasks, through `prune.evaluate.removals.evaluate_removals` (so
results are cached per removed set). With blocks already removed (the iterative
schedule) the baseline is the model without them and each candidate removes one
more, always as removals from the full model with original indices, so every step
shares cache entries with every other. Opt-in adaptive sampling spends more
documents only on the blocks whose place in the removal set is still uncertain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from prune.errors import PruneError
from prune.measures._blocks import windows
from prune.measures.base import (
    LayerScore,
    Measure,
    Ranking,
    RankRequest,
    adaptive_rounds,
    check_adaptive,
    cut_value,
    settled,
)


def accuracy_drop(
    index: int,
    base: dict[str, Any],
    result: dict[str, Any],
    *,
    span: int = 1,
    documents: int | None = None,
    signal: str = "correct",
    seed: int = 0,
    keep: dict[int, dict[str, dict[int, float]]] | None = None,
) -> LayerScore:
    """What removing the blocks cost, from `base` to `result` (task -> `TaskScore`): per task
    the mean per-document contribution of `signal` (see `_signals`; "correct" gives the drop
    in the task's score), averaged over tasks (tasks weigh equally).

    With per-document outcomes on both sides (every evaluation keeps them) the standard
    error and the 95% interval are paired (`prune.stats.paired_difference`): both runs score
    the same documents. Without them (only `signal="correct"`), the two runs' lm-eval
    standard errors are combined as if independent (conservative) and there is no interval.
    `keep`, when given, receives the per-document contributions (task -> doc_id -> value)
    under `index` (for ranking stability).
    """
    paired = all(
        getattr(b, "outcomes", None) is not None and getattr(result[t], "outcomes", None)
        for t, b in base.items()
    )
    if paired:
        score, per_doc = _paired_drop(index, base, result, span, documents, signal, seed)
        if keep is not None:
            keep[index] = per_doc
        return score
    if signal != "correct":
        raise PruneError(
            f"the {signal} signal needs per-document outcomes (evaluations without them: "
            f"{', '.join(t for t, b in base.items() if getattr(b, 'outcomes', None) is None)})"
        )
    per_task, per_err = {}, {}
    for task, b in base.items():
        r = result[task]
        diff = b.value - r.value
        per_task[task] = diff if b.higher_is_better else -diff
        per_err[task] = (
            math.hypot(b.stderr, r.stderr)
            if b.stderr is not None and r.stderr is not None
            else None
        )
    mean = sum(per_task.values()) / len(per_task)
    errs = list(per_err.values())
    err = (
        math.sqrt(sum(e * e for e in errs)) / len(errs)
        if errs and all(e is not None for e in errs)
        else None
    )
    return LayerScore(index, mean, err, span, per_task, per_err, documents)


def _paired_drop(
    index: int,
    base: dict[str, Any],
    result: dict[str, Any],
    span: int,
    documents: int | None,
    signal: str,
    seed: int,
) -> tuple[LayerScore, dict[str, dict[int, float]]]:
    """The paired score of one candidate and its per-document contributions."""
    import numpy as np

    from prune.measures._signals import contributions
    from prune.stats import paired_difference

    per_doc = {}
    for task, b in base.items():
        cost = contributions(signal, b.outcomes, result[task].outcomes, b.metric)
        flip = -1.0 if signal == "correct" and not b.higher_is_better else 1.0
        per_doc[task] = {doc: flip * v for doc, v in cost.items()}
    zeros = {task: dict.fromkeys(docs, 0.0) for task, docs in per_doc.items()}
    total = paired_difference(per_doc, zeros, seed=seed)
    per_task, per_err = {}, {}
    for task, docs in per_doc.items():
        values = np.fromiter(docs.values(), dtype=np.float64)
        per_task[task] = float(values.mean())
        per_err[task] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    score = LayerScore(
        index, total.diff, total.stderr, span, per_task, per_err, documents, total.ci95
    )
    return score, per_doc


def accuracy_relevance(
    loaded: Any,
    settings: Any,
    *,
    layers: Sequence[int] | None = None,
    block_size: int = 1,
    engine: str = "auto",
    cache: Any = None,
    progress: bool = True,
    adaptive: int | None = None,
    removed: Sequence[int] = (),
    signal: str = "correct",
    measure: str = "accuracy",
) -> Ranking:
    """Rank blocks by what removing each costs: the baseline's `signal` minus the candidate's
    (see `prune.measures._signals`; "correct" is the accuracy drop), named `measure`.

    `settings` is an `EvalSettings`, `cache` a `ResultCache` or None. `removed` lists
    original indices already taken out: the baseline is the model without them, and
    the remaining blocks are scored under their original indices.

    `adaptive` = K (opt-in, needs `settings.limit`) samples documents adaptively for a
    removal of K candidates: round 1 scores every candidate on about limit/8 documents per
    task (`adaptive_rounds`); after each round the cut is the midpoint between the K-th
    and (K+1)-th smallest latest scores, and a candidate whose 95% interval lies entirely
    on one side of it is settled (`settled`). Only the unsettled ones are scored again on
    twice as many documents, up to `settings.limit`; it stops once none is unsettled.
    A score settled early records its documents per task (`LayerScore.documents`); the
    ranking's settings record K, the rounds run, how many candidates each scored and the
    candidate-documents used against the exhaustive count, and its baseline is the last
    round's. Without it every candidate is scored on every document.
    """
    from prune.evaluate.removals import evaluate_removals
    from prune.surgery import count_layers

    num_layers = count_layers(loaded.model)
    gone = tuple(sorted(set(removed)))
    candidates = windows(num_layers, block_size, gone, layers)
    rounds = adaptive_rounds(settings.limit, adaptive)
    if adaptive is not None:
        check_adaptive(adaptive, len(candidates))
    latest: dict[tuple[int, ...], LayerScore] = {}
    per_doc: dict[int, dict[str, dict[int, float]]] = {}  # of candidates scored on every document
    pending = list(candidates)
    run: list[tuple[int, int]] = []  # (documents per task, candidates scored) per round
    base: Any = None
    for number, docs in enumerate(rounds, start=1):
        last = number == len(rounds)
        step = settings if last else replace(settings, limit=docs)
        results = evaluate_removals(
            loaded,
            step,
            [gone, *(tuple(sorted((*gone, *span))) for span in pending)],
            engine=engine,
            cache=cache,
            progress=progress,
        )
        base = results[0]
        run.append((docs, len(pending)))
        for span, result in zip(pending, results[1:], strict=True):
            score = accuracy_drop(
                span[0],
                base,
                result,
                span=block_size,
                documents=None if last else docs,
                signal=signal,
                seed=settings.seed,
                keep=per_doc if last else None,
            )
            if span != tuple(range(span[0], span[0] + len(span))):
                score.blocks = span  # a span across removed blocks names its blocks
            latest[span] = score
        if last:
            break
        cut = cut_value([latest[span].score for span in candidates], adaptive)  # type: ignore[arg-type]
        pending = [span for span in pending if not settled(latest[span], cut)]
        if not pending:  # the removal set is stable
            break
    scores = [latest[span] for span in candidates]
    meta = dict(settings.__dict__) | {"engine": engine, "block_size": block_size, "signal": signal}
    meta["tasks"] = list(settings.tasks)
    if adaptive is not None:
        full = settings.limit * len(candidates)
        meta |= {
            "adaptive": adaptive,
            "rounds": [docs for docs, _ in run],
            "round_candidates": [count for _, count in run],
            # Candidate-documents per task (the baseline's evaluations left out).
            "documents_used": {"used": sum(d * c for d, c in run), "exhaustive": full},
        }
    if gone:
        meta["removed"] = list(gone)
    # Per-document contributions exist for the candidates scored on every document only
    # (ranking stability needs them for every block).
    return Ranking(measure, scores, num_layers, base, meta, per_doc or None)


def family_ranker(signal: str, measure: str):
    """The ranking function of an accuracy-family measure: `signal` drops on the tasks."""

    def rank(request: RankRequest) -> Ranking:
        return accuracy_relevance(
            request.loaded,
            request.settings,
            layers=request.layers,
            block_size=request.block_size,
            engine=request.engine,
            cache=request.cache,
            progress=request.progress,
            adaptive=request.adaptive,
            removed=request.removed,
            signal=signal,
            measure=measure,
        )

    rank.__doc__ = f"The {measure} of each remaining block (of `layers` only, when given)."
    return rank


MEASURE = Measure(
    name="accuracy",
    label="accuracy drop",
    column="accuracy_drop",
    description="the drop in benchmark accuracy when the block is removed (measured)",
    ranker=family_ranker("correct", "accuracy"),
    needs_tasks=True,
    per_layer=True,
    adaptive=True,
    documents_column="accuracy_documents",
    per_task_column="per_task_drop",
    color="tab:red",
    order=20,
)
