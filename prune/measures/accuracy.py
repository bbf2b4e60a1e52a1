"""Accuracy drop: the benchmark score lost when a block is removed (measured, not a proxy).

Score of a block: baseline score minus the score with the block removed, per task
and averaged over tasks, through `prune.evaluate.removals.evaluate_removals` (so
results are cached per removed set). With blocks already removed (the iterative
schedule) the baseline is the model without them and each candidate removes one
more, always as removals from the full model with original indices, so every step
shares cache entries with every other. Opt-in successive halving spends fewer
documents on blocks that clearly matter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from prune.errors import PruneError
from prune.measures._blocks import remaining_layers, spans
from prune.measures.base import LayerScore, Measure, Ranking, RankRequest, halving_rounds


def accuracy_drop(
    index: int,
    base: dict[str, Any],
    result: dict[str, Any],
    *,
    span: int = 1,
    documents: int | None = None,
) -> LayerScore:
    """The score lost from `base` to `result` (task -> `TaskScore`), per task and averaged.

    A drop is positive when the score got worse (lower for higher-is-better metrics).
    Its stderr combines the two runs' lm-eval standard errors as if independent
    (conservative: the runs share documents); the mean's is sqrt(sum of squares) / tasks.
    """
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


def accuracy_relevance(
    loaded: Any,
    settings: Any,
    *,
    layers: Sequence[int] | None = None,
    block_size: int = 1,
    engine: str = "auto",
    cache: Any = None,
    progress: bool = True,
    halving: int | None = None,
    removed: Sequence[int] = (),
) -> Ranking:
    """Rank blocks by the score lost when each is removed: baseline - score without it.

    `settings` is an `EvalSettings`, `cache` a `ResultCache` or None. `removed` lists
    original indices already taken out: the baseline is the model without them, and
    the remaining blocks are scored under their original indices.

    `halving` (opt-in early stopping) runs successive halving over the candidates:
    every block on the first limit/8 or so documents, then the half that looks least
    relevant on twice as many, and so on up to `settings.limit`, keeping at least
    `halving` blocks to the end. Those get exact scores; blocks dropped earlier keep
    the estimate of their last round (`LayerScore.documents`). Without it every
    block is scored on every document.
    """
    from prune.evaluate.removals import evaluate_removals
    from prune.surgery import count_layers

    num_layers = count_layers(loaded.model)
    gone = tuple(sorted(set(removed)))
    if num_layers - len(gone) - block_size < 1:
        raise PruneError(
            f"{num_layers - len(gone)} of {num_layers} blocks remain: too few to remove "
            f"{block_size} more (at least one block must stay)"
        )
    wanted = remaining_layers(num_layers, gone, layers) if gone else layers
    candidates = [
        span for span in spans(num_layers, block_size, wanted) if not set(span) & set(gone)
    ]
    rounds = halving_rounds(settings.limit, halving)
    final: dict[tuple[int, ...], LayerScore] = {}
    alive = list(candidates)
    for number, docs in enumerate(rounds, start=1):
        last = number == len(rounds)
        step = settings if last else replace(settings, limit=docs)
        results = evaluate_removals(
            loaded,
            step,
            [gone, *(tuple(sorted((*gone, *span))) for span in alive)],
            engine=engine,
            cache=cache,
            progress=progress,
        )
        base = results[0]
        scored = {
            span: accuracy_drop(
                span[0], base, result, span=block_size, documents=None if last else docs
            )
            for span, result in zip(alive, results[1:], strict=True)
        }
        if last:
            final.update(scored)
            break
        # Keep the half that looks least relevant (and at least `halving` blocks).
        keep = max(halving or 0, math.ceil(len(alive) / 2))
        ranked = sorted(alive, key=lambda span: (scored[span].score, span[0]))
        alive = sorted(ranked[:keep])
        final.update({span: scored[span] for span in ranked[keep:]})
    scores = [final[span] for span in candidates]
    meta = dict(settings.__dict__) | {"engine": engine, "block_size": block_size}
    meta["tasks"] = list(settings.tasks)
    if halving is not None:
        meta |= {"halving": halving, "rounds": rounds}
    if gone:
        meta["removed"] = list(gone)
    return Ranking("accuracy", scores, num_layers, base, meta)


def rank(request: RankRequest) -> Ranking:
    """The accuracy drop of each remaining block (of `layers` only, when given)."""
    return accuracy_relevance(
        request.loaded,
        request.settings,
        layers=request.layers,
        block_size=request.block_size,
        engine=request.engine,
        cache=request.cache,
        progress=request.progress,
        halving=request.halving,
        removed=request.removed,
    )


MEASURE = Measure(
    name="accuracy",
    label="accuracy drop",
    column="accuracy_drop",
    description="the drop in benchmark accuracy when the block is removed (measured)",
    ranker=rank,
    needs_tasks=True,
    per_layer=True,
    halving=True,
    documents_column="accuracy_documents",
    per_task_column="per_task_drop",
    color="tab:red",
    order=20,
)
