"""Block bookkeeping shared by the measures: which spans to score, and ranking what is left
after some blocks were removed (scores mapped back to the original indices).

Not a measure (the leading underscore keeps it out of the registry).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from prune.errors import PruneError
from prune.measures.base import Ranking, RankRequest


def check_block_size(block_size: int, num_layers: int) -> None:
    """PruneError unless 1 <= block_size <= num_layers - 1 (at least one block must stay)."""
    if not 1 <= block_size <= num_layers - 1:
        raise PruneError(
            f"block size {block_size} is invalid for {num_layers} layers "
            f"(accepted: 1..{num_layers - 1})"
        )


def spans(num_layers: int, block_size: int, layers: Sequence[int] | None) -> list[tuple[int, ...]]:
    """The spans of `block_size` consecutive blocks to score: every one, or those starting at
    `layers` (negative indices count from the end)."""
    check_block_size(block_size, num_layers)
    starts = range(num_layers - block_size + 1) if layers is None else layers
    out = []
    for start in starts:
        if -num_layers <= start < 0:
            start += num_layers
        if not 0 <= start <= num_layers - block_size:
            raise PruneError(
                f"layer {start} is out of range (accepted: 0..{num_layers - block_size})"
            )
        out.append(tuple(range(start, start + block_size)))
    return out


def windows(
    num_layers: int, block_size: int, removed: Sequence[int], starts: Sequence[int] | None
) -> list[tuple[int, ...]]:
    """Spans of `block_size` consecutive *remaining* blocks (original indices) once `removed`
    are gone: every one, or those starting at `starts` (original indices, negatives counted
    from the end). Without removals these are `spans(...)`."""
    gone = set(removed)
    rest = [i for i in range(num_layers) if i not in gone]
    check_block_size(block_size, len(rest) + len(gone))
    if block_size > len(rest) - 1:
        raise PruneError(
            f"{len(rest)} of {num_layers} blocks remain: too few to remove {block_size} more "
            "(at least one block must stay)"
        )
    wanted = remaining_layers(num_layers, removed, starts)
    position = {layer: n for n, layer in enumerate(rest)}
    firsts = range(len(rest) - block_size + 1) if wanted is None else [position[i] for i in wanted]
    out = []
    for first in firsts:
        if first > len(rest) - block_size:
            raise PruneError(
                f"layer {rest[first]} starts no span of {block_size} remaining blocks (accepted: "
                f"{', '.join(str(i) for i in rest[: len(rest) - block_size + 1])})"
            )
        out.append(tuple(rest[first : first + block_size]))
    return out


def remaining_layers(
    num_layers: int, removed: Sequence[int], layers: Sequence[int] | None
) -> list[int] | None:
    """`layers` (original indices, negative ones counted from the end; None = all) as
    non-negative original indices; PruneError when one is out of range or already removed."""
    if layers is None:
        return None
    out = []
    for layer in layers:
        original = layer + num_layers if -num_layers <= layer < 0 else layer
        if not 0 <= original < num_layers:
            raise PruneError(f"layer {layer} is out of range (accepted: 0..{num_layers - 1})")
        if original in removed:
            raise PruneError(
                f"layer {original} was already removed (remaining: "
                f"{', '.join(str(i) for i in range(num_layers) if i not in removed)})"
            )
        out.append(original)
    return out


def rank_remaining(request: RankRequest, rank: Callable[[RankRequest], Ranking]) -> Ranking:
    """Rank the blocks left after `request.removed` by running `rank` on the model with those
    blocks temporarily taken out, then map the scores back to the original indices.

    `rank` sees a request without `removed` whose `layers` are indices of the smaller model.
    """
    if not request.removed:
        return rank(request)
    from prune.surgery import count_layers, layers_removed

    model = request.loaded.model
    depth = count_layers(model)
    rest = [i for i in range(depth) if i not in request.removed]
    wanted = remaining_layers(depth, request.removed, request.layers)
    position = {original: new for new, original in enumerate(rest)}
    inner = replace(
        request,
        removed=(),
        layers=None if wanted is None else [position[i] for i in wanted],
    )
    with layers_removed(model, request.removed):
        ranking = rank(inner)
    scores = [
        replace(
            s,
            index=rest[s.index],
            blocks=tuple(rest[s.index : s.index + s.span]) if s.span > 1 else None,
        )
        for s in ranking.scores
    ]
    settings = {**ranking.settings, "removed": list(request.removed)}
    return Ranking(ranking.measure, scores, depth, ranking.baseline, settings)
