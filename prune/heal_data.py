"""Healing data: calibration texts split into training and held-out parts, cut into
token chunks, read in a seeded order that is a pure function of the step, and the
learning-rate schedule.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from typing import Any

from prune.defaults import HEAL_HELDOUT_SHARE
from prune.errors import PruneError

WARMUP_SHARE = 0.05  # of the steps, linear warm-up before a cosine decay to MIN_LR_SHARE
MIN_LR_SHARE = 0.1


def split_texts(
    texts: Sequence[str], seed: int, share: float = HEAL_HELDOUT_SHARE
) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: a seeded `share` of the texts (at least one) is held out."""
    if len(texts) < 2:
        raise PruneError(
            f"healing needs at least 2 calibration texts (one to train on, one held out); "
            f"got {len(texts)} (raise --samples or use a longer --calibration source)"
        )
    order = random.Random(seed).sample(range(len(texts)), len(texts))
    held = max(1, round(len(texts) * share))
    return [texts[i] for i in sorted(order[:-held])], [texts[i] for i in sorted(order[-held:])]


def chunk_tokens(tokenizer: Any, texts: Sequence[str], seq_len: int) -> Any:
    """The texts' tokens (each followed by EOS) cut into (N, seq_len) chunks; a stream
    shorter than one chunk is one shorter chunk, the tail of a longer one is dropped."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, verbose=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise PruneError("calibration texts produced fewer than 2 tokens")
    if len(ids) < seq_len:
        return torch.tensor([ids])
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


@functools.lru_cache(maxsize=8)
def _permutation(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(size, generator=generator).tolist())


def batch_rows(size: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Chunk indices of micro-batch `index`: the chunks in seeded per-epoch orders, read in
    turn (a pure function, so a resumed run reads what an uninterrupted one would)."""
    rows = []
    for position in range(index * batch_size, (index + 1) * batch_size):
        epoch, offset = divmod(position, size)
        rows.append(_permutation(size, seed, epoch)[offset])
    return rows


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over WARMUP_SHARE of the steps, then cosine decay to MIN_LR_SHARE."""
    warmup = max(1, round(steps * WARMUP_SHARE))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress)))
