"""Cosine relevance (ShortGPT's block influence): how much a block turns the hidden state.

Score of a block: `1 - cos(h_in, h_out)` between its real input and output, read
with forward hooks (not `output_hidden_states`, whose last entry is final-normed
in most architectures), averaged over every non-padding token of the calibration
texts. One forward pass scores every block. With `block_size=n > 1` the score of
the span i..i+n-1 is the angular distance arccos(cos)/pi between the input of
block i and the output of block i+n-1 (Gromov et al.), as the `angular` measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from prune.defaults import CALIBRATION_BATCH_SIZE, CALIBRATION_SEQ_LEN
from prune.errors import PruneError
from prune.measures._blocks import check_block_size, rank_remaining
from prune.measures.base import LayerScore, Measure, Ranking, RankRequest


def _hidden(value: Any) -> Any:
    """The hidden-state tensor of a block's input args or output (tensor or tuple)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise PruneError(
        f"cannot read hidden states from a block output of type {type(value).__name__}"
    )


def block_cosines(model: Any, input_ids: Any, attention_mask: Any, block_size: int = 1) -> Any:
    """cos(input of block i, output of block i+block_size-1) per token: (spans, B, T).

    Hooks capture each block's real input and output during one forward pass.
    """
    import torch

    from prune.surgery import locate_layers

    blocks = list(locate_layers(model).layers)
    n_spans = len(blocks) - block_size + 1
    inputs: dict[int, torch.Tensor] = {}
    cosines: list[torch.Tensor | None] = [None] * n_spans
    handles = []

    def pre_hook(i):
        def hook(module, args, kwargs):
            states = args[0] if args else kwargs.get("hidden_states")
            inputs[i] = _hidden(states).detach()

        return hook

    def post_hook(j):
        def hook(module, args, kwargs, output):
            i = j - block_size + 1
            if i >= 0:
                h_out = _hidden(output).detach().float()
                # Under a device map the block's input may still be on the previous block's device.
                h_in = inputs.pop(i).float().to(h_out.device)
                cosines[i] = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # (B, T)

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        with torch.no_grad():
            try:
                model(**kwargs, logits_to_keep=1)  # the LM head is not needed
            except TypeError:
                model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in cosines):
        raise PruneError(
            "a block was not called during the forward pass; cannot compute cosine relevance"
        )
    return torch.stack([c.to(attention_mask.device) for c in cosines])  # (spans, B, T)


def cosine_relevance(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = CALIBRATION_SEQ_LEN,
    batch_size: int = CALIBRATION_BATCH_SIZE,
    block_size: int = 1,
    angular: bool | None = None,
    progress: bool = False,
) -> Ranking:
    """Rank blocks by how much they change the hidden state, from one pass over `texts`.

    Score per token: `1 - cos` (block_size 1), or the angular distance
    `arccos(cos) / pi` (block_size > 1, or `angular=True`). The layer score is the
    mean over all non-padding tokens of all texts; `stderr` is the standard error
    across texts (tokens of one text are not independent).
    """
    import torch
    from tqdm.auto import tqdm

    from prune.calibration import padded_batches
    from prune.models import input_device
    from prune.surgery import count_layers

    num_layers = count_layers(model)
    check_block_size(block_size, num_layers)
    if seq_len < 2 or batch_size < 1:
        raise PruneError(
            f"seq_len {seq_len} / batch_size {batch_size} invalid "
            "(accepted: seq_len >= 2, batch_size >= 1)"
        )
    use_angular = block_size > 1 if angular is None else angular
    device = input_device(model)
    per_text: list[torch.Tensor] = []  # (spans,) mean score of each text
    total, count = None, 0
    batches = list(padded_batches(tokenizer, texts, seq_len, batch_size, device))
    desc = "angular relevance" if use_angular else "cosine relevance"
    for input_ids, mask in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        cos = block_cosines(model, input_ids, mask, block_size).clamp(-1.0, 1.0)  # (S, B, T)
        score = torch.arccos(cos) / math.pi if use_angular else 1.0 - cos
        weights = mask.to(score.dtype)  # (B, T)
        summed = (score * weights).sum(dim=-1)  # (S, B)
        per_text.extend((summed / weights.sum(dim=-1).clamp(min=1)).T)
        batch_total = summed.sum(dim=-1)
        total = batch_total if total is None else total + batch_total
        count += int(weights.sum())
    means = (total / count).tolist()
    stacked = torch.stack(per_text)  # (N, S)
    stderr = (
        (stacked.std(dim=0, unbiased=True) / math.sqrt(len(per_text))).tolist()
        if len(per_text) > 1
        else [None] * len(means)
    )
    scores = [
        LayerScore(i, float(m), None if s is None else float(s), span=block_size)
        for i, (m, s) in enumerate(zip(means, stderr, strict=True))
    ]
    settings = {
        "samples": len(texts),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "block_size": block_size,
        "tokens": count,
    }
    # Each text's mean score per block: the documents of ranking stability (texts weigh equally).
    signals = _text_signals(stacked.T.tolist())  # from (S, N)
    measure = "angular" if use_angular else "cosine"
    return Ranking(measure, scores, num_layers, None, settings, signals)


def _text_signals(per_text: list[list[float]]) -> dict[int, dict[str, dict[int, float]]]:
    """`Ranking.signals` from each block's per-text scores (block -> text -> score): the
    calibration texts are the documents of ranking stability."""
    return {i: {"calibration": dict(enumerate(row))} for i, row in enumerate(per_text)}


def cached_cosine_relevance(
    loaded: Any,
    texts: Sequence[str],
    *,
    seq_len: int = CALIBRATION_SEQ_LEN,
    batch_size: int = CALIBRATION_BATCH_SIZE,
    block_size: int = 1,
    angular: bool | None = None,
    cache: Any = None,
    progress: bool = False,
) -> Ranking:
    """`cosine_relevance` on `loaded.model`, reusing a cached ranking for the same weights,
    texts and settings (`cache`: a `prune.evaluate.cache.ResultCache`, or None)."""
    import hashlib
    import json

    def compute() -> Ranking:
        return cosine_relevance(
            loaded.model,
            loaded.tokenizer,
            texts,
            seq_len=seq_len,
            batch_size=batch_size,
            block_size=block_size,
            angular=angular,
            progress=progress,
        )

    if cache is None:
        return compute()
    from prune.evaluate.cache import model_fingerprint

    payload = {
        "model": model_fingerprint(loaded),
        "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "seq_len": seq_len,
        "block_size": block_size,
        # "cosine" also for spans (which it scores by angular distance), as before `angular`.
        "measure": "angular" if angular else "cosine",
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
    data = cache.get_json(key)
    if isinstance(data, dict):
        try:
            scores = [LayerScore(**row) for row in data["layers"]]
            per_text = data.get("per_text")  # block -> each text's mean score
            signals = _text_signals(per_text) if per_text else None
            return Ranking(
                data["measure"], scores, data["num_layers"], None, data["settings"], signals
            )
        except (KeyError, TypeError):
            pass  # an old or corrupt entry: recompute
    ranking = compute()
    per_text = [
        [ranking.signals[i]["calibration"][t] for t in sorted(ranking.signals[i]["calibration"])]
        for i in sorted(ranking.signals)
    ]
    cache.put_json(key, {**ranking.to_dict(), "per_text": per_text})
    return ranking


def rank_by_hooks(request: RankRequest, *, angular: bool | None) -> Ranking:
    """The cosine or angular ranking a request asks for (blocks already removed taken out)."""

    def rank(req: RankRequest) -> Ranking:
        return cached_cosine_relevance(
            req.loaded,
            req.texts,
            seq_len=req.seq_len,
            batch_size=req.batch_size,
            block_size=req.block_size,
            angular=angular,
            cache=req.cache,
            progress=req.progress,
        )

    return rank_remaining(request, rank)


def rank(request: RankRequest) -> Ranking:
    """1 - cos per block (the angular distance for spans); `layers` is ignored: one pass
    scores every block."""
    return rank_by_hooks(request, angular=None)


MEASURE = Measure(
    name="cosine",
    label="cosine (1-cos)",
    span_label="angular",
    column="cosine",
    description="1 - cos(input, output) of a block's hidden states (ShortGPT's block influence)",
    ranker=rank,
    needs_texts=True,
    color="tab:blue",
    order=10,
)
