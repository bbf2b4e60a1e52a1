"""Token-level perplexity of one model, as it is now, on plain texts.

The reference the fast engine's `prune.evaluate.engine.perplexities` reproduces for
many block-removal candidates at once; the perplexity measure uses it on the
lm-eval engine's path (one candidate at a time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from prune.defaults import CALIBRATION_BATCH_SIZE, CALIBRATION_SEQ_LEN
from prune.errors import PruneError


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = CALIBRATION_SEQ_LEN,
    batch_size: int = CALIBRATION_BATCH_SIZE,
) -> float:
    """Token-level perplexity: exp(mean negative log-likelihood over all predicted tokens).

    Each text is truncated to `seq_len` tokens (with the tokenizer's special tokens)
    and scored on its own; padding is excluded.
    """
    if not texts:
        raise PruneError("perplexity needs at least one text")
    from prune.calibration import padded_batches
    from prune.models import input_device

    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    for input_ids, mask in padded_batches(
        tokenizer,
        texts,
        seq_len,
        batch_size,
        device,
        min_tokens=2,
        empty_error="perplexity: every text is shorter than two tokens",
    ):
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, T, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        target = input_ids[:, 1:]
        nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        valid = mask[:, 1:].bool()
        total_nll += float(nll[valid].sum())
        total_tokens += int(valid.sum())
    return math.exp(total_nll / total_tokens)
