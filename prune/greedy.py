"""Greedy block removal: drop the least relevant block, re-evaluate, repeat until a stopping rule holds.

The loop works on *original* layer indices only and never touches a model:
ranking and scoring are callables that receive the tuple of original indices
removed so far (sorted) and return, respectively, a relevance per layer
(higher = more important) and a score per reporting task. `prune.run` builds
them from the real measures and evaluator (temporarily removing the blocks, so
every call sees the slimmed model); tests pass dict lookups.

Schedules:
- `one-shot`: rank the full model once and remove in that order;
- `iterative`: re-rank the slimmed model after every removal (SLEB style).

A ranking may score spans of consecutive blocks (tuple keys) instead of single
blocks: each step then removes a whole span, never one overlapping a block already
removed or protected (Gromov et al.; Minitron's contiguous removal).

Stopping rules, whichever comes first: `target` removals reached, or the mean
reporting score falls more than `max_drop` below the baseline (that last step is
undone and kept as `rejected`), or nothing removable is left (protected layers
are never removed and at least one block always remains).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prune.errors import PruneError

# A candidate is one block (an int) or a span of blocks (a tuple of original indices).
RankFn = Callable[[tuple[int, ...]], Mapping[int | tuple[int, ...], float]]
ScoreFn = Callable[[tuple[int, ...]], Mapping[str, float]]
ParamsFn = Callable[[tuple[int, ...]], int]


@dataclass
class PruneStep:
    """One row of the history; step 0 is the unpruned model."""

    step: int
    removed_layer: int | None  # original index of the (first) block removed at this step
    removed: list[int]  # all original indices removed so far, sorted
    layers_left: int
    params: int | None
    scores: dict[str, float]
    mean_score: float
    drop: float  # baseline mean score minus this step's mean score
    relevance: float | None  # the removed block's relevance when it was picked
    seconds: float
    # Every block removed at this step (several when the strategy removes spans).
    removed_span: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GreedyResult:
    """What greedy pruning did: the kept steps, why it stopped, and the rankings it used."""

    schedule: str
    depth: int
    removed: list[int]  # original indices, in removal order
    history: list[PruneStep]
    stop_reason: str
    rejected: PruneStep | None = None
    rankings: list[dict[int, float]] = field(default_factory=list)

    @property
    def final(self) -> PruneStep:
        return self.history[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "depth": self.depth,
            "removed": list(self.removed),
            "history": [s.to_dict() for s in self.history],
            "stop_reason": self.stop_reason,
            "rejected": self.rejected.to_dict() if self.rejected else None,
            "rankings": [{str(k): v for k, v in r.items()} for r in self.rankings],
        }


def _mean(scores: Mapping[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")


def _order(
    relevance: Mapping[int | tuple[int, ...], float], excluded: set[int]
) -> list[tuple[tuple[int, ...], float]]:
    """Candidates (as tuples of blocks) none of whose blocks is excluded, least relevant
    first; ties go to the lower index so runs are reproducible."""
    units = (((k,) if isinstance(k, int) else tuple(k), float(r)) for k, r in relevance.items())
    return sorted(
        ((u, r) for u, r in units if not set(u) & excluded),
        key=lambda x: (x[1], x[0]),
    )


def _plan(queue: list[tuple[tuple[int, ...], float]], limit: int) -> list[tuple[int, ...]]:
    """The removals a one-shot schedule will make, in order: candidates least relevant first,
    skipping those that overlap a block already planned, until `limit` blocks."""
    taken: set[int] = set()
    planned = []
    for unit, _ in queue:
        if len(taken) + len(unit) > limit:
            break
        if not set(unit) & taken:
            taken |= set(unit)
            planned.append(tuple(sorted(taken)))
    return planned


def greedy_prune(
    depth: int,
    rank: RankFn,
    score: ScoreFn,
    *,
    schedule: str = "one-shot",
    target: int | None = None,
    max_drop: float | None = None,
    protect: Iterable[int] = (),
    count_params: ParamsFn | None = None,
    baseline: Mapping[str, float] | None = None,
    on_step: Callable[[PruneStep], None] | None = None,
    prefetch: Callable[[list[tuple[int, ...]]], None] | None = None,
) -> GreedyResult:
    """Remove blocks least-relevant-first until `target` removals or `max_drop`; see the module doc.

    `prefetch`, when given, receives the sets a one-shot schedule will score, in
    order, right after ranking, so an evaluator can compute them in one batch (and
    cache them) before the loop asks for them one by one.
    """
    if schedule not in ("one-shot", "iterative"):
        raise PruneError(f"unknown schedule '{schedule}' (accepted: one-shot, iterative)")
    protected = {i % depth for i in protect if -depth <= i < depth}
    if target is None and max_drop is None:
        raise PruneError(
            "greedy pruning needs a stopping rule: a target number of removals or max_drop"
        )
    removable = min(depth - 1, depth - len(protected))
    if target is not None and not 0 <= target <= removable:
        raise PruneError(
            f"cannot remove {target} of {depth} layers with {len(protected)} protected (at most {removable})"
        )

    start = time.perf_counter()
    base_scores = dict(baseline) if baseline is not None else dict(score(()))
    base_mean = _mean(base_scores)
    history = [
        PruneStep(
            0,
            None,
            [],
            depth,
            count_params(()) if count_params else None,
            base_scores,
            base_mean,
            0.0,
            None,
            time.perf_counter() - start,
        )
    ]
    if on_step:
        on_step(history[0])
    removed: list[int] = []
    rankings: list[dict[int, float]] = []
    queue: list[tuple[tuple[int, ...], float]] = []
    stop_reason = ""
    rejected = None
    limit = removable if target is None else target
    while True:
        if len(removed) >= limit:
            stop_reason = (
                f"removed {len(removed)} layers (target)"
                if target is not None
                else "no removable layer left"
            )
            break
        t0 = time.perf_counter()
        current = tuple(sorted(removed))
        if schedule == "iterative" or not rankings:
            relevance = rank(current)
            rankings.append({_unit_key(k): float(v) for k, v in relevance.items()})
            queue = _order(relevance, protected | set(removed))
            if prefetch is not None and schedule == "one-shot":
                prefetch(_plan(queue, limit))
        # Spans that overlap a removed block, or would pass the target or leave no block.
        room = min(limit, depth - 1) - len(removed)
        queue = [c for c in queue if not set(c[0]) & set(removed) and len(c[0]) <= room]
        if not queue:
            stop_reason = "no removable layer left"
            break
        unit, rel = queue.pop(0)
        trial = tuple(sorted((*removed, *unit)))
        scores = dict(score(trial))
        mean = _mean(scores)
        step = PruneStep(
            len(history),
            unit[0],
            list(trial),
            depth - len(trial),
            count_params(trial) if count_params else None,
            scores,
            mean,
            base_mean - mean,
            rel,
            time.perf_counter() - t0,
            list(unit) if len(unit) > 1 else None,
        )
        if max_drop is not None and step.drop > max_drop + 1e-12:
            rejected = step
            what = f"layer {unit[0]}" if len(unit) == 1 else f"layers {unit[0]}-{unit[-1]}"
            stop_reason = f"removing {what} would drop the mean score by {step.drop:.4f} > max_drop {max_drop:g}"
            break
        removed.extend(unit)
        history.append(step)
        if on_step:
            on_step(step)
    return GreedyResult(schedule, depth, removed, history, stop_reason, rejected, rankings)


def _unit_key(key: int | tuple[int, ...]) -> int:
    """How a ranking is recorded in the history: by a span's first block."""
    return key if isinstance(key, int) else int(key[0])
