"""Perplexity increase (SLEB style): how much worse the model predicts plain text without a block.

Score of a block: the perplexity on the calibration texts with the block removed
minus the baseline perplexity. The fast engine scores every candidate in one shared
run (prefix reuse); the plain path ("lm-eval") runs a forward pass per candidate,
the reference. Each value is cached as it comes, so an interrupted run resumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from prune.defaults import CALIBRATION_BATCH_SIZE, CALIBRATION_SEQ_LEN
from prune.measures._blocks import rank_remaining, spans
from prune.measures.base import LayerScore, Measure, Ranking, RankRequest


def perplexity_relevance(
    loaded: Any,
    texts: Sequence[str],
    *,
    seq_len: int = CALIBRATION_SEQ_LEN,
    batch_size: int = CALIBRATION_BATCH_SIZE,
    layers: Sequence[int] | None = None,
    block_size: int = 1,
    cache: Any = None,
    progress: bool = True,
    engine: str = "auto",
) -> Ranking:
    """Rank blocks by the perplexity increase on `texts` when each is removed.

    `engine` "auto" or "fast" uses the fast engine (auto falls back to the plain
    path where it cannot serve the model); "lm-eval" the plain forward pass.
    `cache` is a `prune.evaluate.cache.ResultCache` or None.
    """
    import hashlib

    from tqdm.auto import tqdm

    from prune.distributed import gather, is_main, share_work, world
    from prune.evaluate.cache import ResultCache, model_fingerprint
    from prune.evaluate.removals import check_engine, with_fallback
    from prune.evaluate.settings import EvalSettings, TaskScore
    from prune.surgery import count_layers, layers_removed

    model, tokenizer = loaded.model, loaded.tokenizer
    progress = progress and is_main()  # one set of bars under torchrun
    num_layers = count_layers(model)
    candidate_spans = spans(num_layers, block_size, layers)
    text_id = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    pseudo = EvalSettings(tasks=(f"perplexity:{text_id}:{seq_len}",), seed=0)
    fingerprint = model_fingerprint(loaded) if cache is not None else ""
    candidates = [(), *candidate_spans]

    def plain(missing: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], float]]:
        from prune.evaluate.perplexity import perplexity

        for removed in tqdm(
            missing, desc="perplexity relevance", unit="model", disable=not progress
        ):
            with layers_removed(model, removed):
                yield (
                    removed,
                    perplexity(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size),
                )

    def fast(missing: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], float]]:
        from prune.evaluate.engine import perplexities

        values = perplexities(model, tokenizer, texts, missing, seq_len=seq_len, progress=progress)
        yield from zip(missing, values, strict=True)

    def measure(chosen: str) -> list[float]:
        """Cached values first; the missing ones from the chosen path, each cached as it comes
        (the plain path one candidate at a time, so an interrupted run resumes)."""
        kind = "perplexity" if chosen == "lm-eval" else "perplexity-fast"  # separate cache entries
        keys = {
            c: ResultCache.key(fingerprint, c, pseudo.tasks[0], pseudo, kind) if cache else ""
            for c in candidates
        }
        values = {c: cache.get_value(keys[c]) for c in candidates} if cache else {}
        for other in gather(values) if world()[1] > 1 else []:  # every process: the same work
            values.update({c: v for c, v in other.items() if values.get(c) is None})
        missing = [c for c in candidates if values.get(c) is None]

        def compute(share: list[tuple[int, ...]]) -> dict[tuple[int, ...], float]:
            done: dict[tuple[int, ...], float] = {}
            for removed, value in (plain if chosen == "lm-eval" else fast)(share) if share else []:
                done[removed] = value
                if cache:
                    score = TaskScore(pseudo.tasks[0], "perplexity", value, None, len(texts), False)
                    cache.put(keys[removed], score)
            return done

        values.update(share_work(missing, compute))  # split across processes under torchrun
        return [values[c] for c in candidates]

    check_engine(engine)
    values = with_fallback(measure) if engine == "auto" else measure(engine)
    base = values[0]
    scores = [
        LayerScore(span[0], v - base if math.isfinite(v) else float("inf"), None, block_size)
        for span, v in zip(candidate_spans, values[1:], strict=True)
    ]
    settings = {
        "samples": len(texts),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "block_size": block_size,
        "engine": engine,
    }
    return Ranking("perplexity", scores, num_layers, base, settings)


def rank(request: RankRequest) -> Ranking:
    """The perplexity increase of each remaining block (of `layers` only, when given); blocks
    already removed are taken out of the model first."""

    def rank_here(req: RankRequest) -> Ranking:
        return perplexity_relevance(
            req.loaded,
            req.texts,
            seq_len=req.seq_len,
            batch_size=req.batch_size,
            layers=req.layers,
            block_size=req.block_size,
            cache=req.cache,
            progress=req.progress,
            engine=req.engine,
        )

    return rank_remaining(request, rank_here)


MEASURE = Measure(
    name="perplexity",
    label="perplexity increase",
    column="perplexity_increase",
    description="the rise in perplexity on the calibration texts when the block is removed",
    ranker=rank,
    needs_texts=True,
    per_layer=True,
    stderr=False,
    digits=2,
    color="tab:green",
    order=30,
)
