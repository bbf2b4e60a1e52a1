"""Per-layer relevance scores: cosine (ShortGPT / Gromov et al.), accuracy drop, perplexity increase.

Every measure returns a `Ranking`: one `LayerScore` per block (or per span of
`block_size` consecutive blocks), where a higher score means the block matters
more. `Ranking.order()` lists block indices least relevant first, the order in
which a pruner would remove them.

- cosine: `1 - cos(h_in, h_out)` between a block's real input and output, read
  with forward hooks (not `output_hidden_states`, whose last entry is
  final-normed in most architectures), averaged over all non-padding tokens.
  With `block_size=n > 1` it is the angular distance arccos(cos)/pi between the
  input of block i and the output of block i+n-1 (Gromov et al.).
- accuracy: baseline score minus the score with the block removed, per task and
  averaged over tasks (lm-eval, through `prune.evaluate.evaluate_removals`).
- perplexity: perplexity with the block removed minus the baseline perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from prune.calibration import padded_batches
from prune.errors import PruneError
from prune.evaluate import (
    EvalSettings,
    ResultCache,
    TaskScore,
    check_engine,
    evaluate_removals,
    model_fingerprint,
    perplexity,
    with_fallback,
)

MEASURES = ("cosine", "accuracy", "perplexity")


@dataclass
class LayerScore:
    """The relevance of one block (or of the span `index .. index+span-1`); higher = matters more."""

    index: int
    score: float
    stderr: float | None = None
    span: int = 1
    per_task: dict[str, float] = field(default_factory=dict)
    per_task_stderr: dict[str, float | None] = field(default_factory=dict)
    # Documents per task behind the score when successive halving dropped this block
    # early (an estimate); None = every document the settings name.
    documents: int | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks this score is about."""
        return tuple(range(self.index, self.index + self.span))


@dataclass
class Ranking:
    """Scores of one measure for every block of a model (indices of the model as given)."""

    measure: str  # "cosine", "angular", "accuracy" or "perplexity"
    scores: list[LayerScore]
    num_layers: int
    baseline: dict[str, TaskScore] | float | None = None  # task scores, or the base perplexity
    settings: dict[str, Any] = field(default_factory=dict)

    def order(self) -> list[int]:
        """Block (span start) indices, least relevant first; ties keep the lower index first.
        After successive halving, blocks measured on every document come first, then those
        dropped in later rounds before those dropped earlier (they looked more relevant)."""

        def key(s: LayerScore) -> tuple:
            return (-(math.inf if s.documents is None else s.documents), s.score, s.index)

        return [s.index for s in sorted(self.scores, key=key)]

    def by_index(self) -> dict[int, LayerScore]:
        return {s.index: s for s in self.scores}

    def to_dict(self) -> dict[str, Any]:
        base = self.baseline
        if isinstance(base, dict):
            base = {k: v.to_dict() for k, v in base.items()}
        return {
            "measure": self.measure,
            "num_layers": self.num_layers,
            "baseline": base,
            "settings": self.settings,
            "order": self.order(),
            "layers": [asdict(s) for s in self.scores],
        }


# --------------------------------------------------------------------------- cosine


def _hidden(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a block's input args or output (tensor or tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise PruneError(
        f"cannot read hidden states from a block output of type {type(value).__name__}"
    )


@torch.no_grad()
def block_cosines(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, block_size: int = 1
) -> torch.Tensor:
    """cos(input of block i, output of block i+block_size-1) per token: (spans, B, T).

    Hooks capture each block's real input and output during one forward pass.
    """
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
                h_in, h_out = inputs.pop(i).float(), _hidden(output).detach().float()
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
    return torch.stack(cosines)  # (spans, B, T)


def cosine_relevance(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
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
    from tqdm.auto import tqdm

    from prune.surgery import count_layers

    num_layers = count_layers(model)
    if not 1 <= block_size <= num_layers - 1:
        raise PruneError(
            f"block size {block_size} is invalid for {num_layers} layers (accepted: 1..{num_layers - 1})"
        )
    if seq_len < 2 or batch_size < 1:
        raise PruneError(
            f"seq_len {seq_len} / batch_size {batch_size} invalid (accepted: seq_len >= 2, batch_size >= 1)"
        )
    use_angular = block_size > 1 if angular is None else angular
    device = next(model.parameters()).device
    per_text: list[torch.Tensor] = []  # (spans,) mean score of each text
    total, count = None, 0
    batches = list(padded_batches(tokenizer, texts, seq_len, batch_size, device))
    for input_ids, mask in tqdm(
        batches, desc="cosine relevance", unit="batch", disable=not progress
    ):
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
        for i, (m, s) in enumerate(zip(means, stderr, strict=False))
    ]
    settings = {
        "samples": len(texts),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "block_size": block_size,
        "tokens": count,
    }
    return Ranking("angular" if use_angular else "cosine", scores, num_layers, None, settings)


def cached_cosine_relevance(
    loaded: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    block_size: int = 1,
    cache: ResultCache | None = None,
    progress: bool = False,
) -> Ranking:
    """`cosine_relevance` on `loaded.model`, reusing a cached ranking for the same weights and texts."""
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
            progress=progress,
        )

    if cache is None:
        return compute()
    payload = {
        "model": model_fingerprint(loaded),
        "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "seq_len": seq_len,
        "block_size": block_size,
        "measure": "cosine",
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
    data = cache.get_json(key)
    if isinstance(data, dict):
        try:
            scores = [LayerScore(**row) for row in data["layers"]]
            return Ranking(data["measure"], scores, data["num_layers"], None, data["settings"])
        except (KeyError, TypeError):
            pass  # an old or corrupt entry: recompute
    ranking = compute()
    cache.put_json(key, ranking.to_dict())
    return ranking


# --------------------------------------------------------------------------- accuracy / perplexity


def _spans(num_layers: int, block_size: int, layers: Sequence[int] | None) -> list[tuple[int, ...]]:
    if not 1 <= block_size <= num_layers - 1:
        raise PruneError(
            f"block size {block_size} is invalid for {num_layers} layers (accepted: 1..{num_layers - 1})"
        )
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


def _drop(base: TaskScore, removed: TaskScore) -> float:
    diff = base.value - removed.value
    return diff if base.higher_is_better else -diff


def accuracy_relevance(
    loaded: Any,
    settings: EvalSettings,
    *,
    layers: Sequence[int] | None = None,
    block_size: int = 1,
    engine: str = "auto",
    cache: ResultCache | None = None,
    progress: bool = True,
    halving: int | None = None,
) -> Ranking:
    """Rank blocks by the score lost when each is removed: baseline - score without it.

    `halving` (opt-in early stopping) runs successive halving over the candidates:
    every block on the first limit/8 or so documents, then the half that looks least
    relevant on twice as many, and so on up to `settings.limit`, keeping at least
    `halving` blocks to the end. Those get exact scores; blocks dropped earlier keep
    the estimate of their last round (`LayerScore.documents`). Without it every
    block is scored on every document.

    Per task and averaged over tasks. `stderr` of a drop combines the two runs'
    lm-eval standard errors as if independent (conservative: the runs share
    documents); the mean's stderr is sqrt(sum of squares) / number of tasks.
    """
    from prune.surgery import count_layers

    num_layers = count_layers(loaded.model)
    spans = _spans(num_layers, block_size, layers)
    rounds = halving_rounds(settings.limit, halving)
    final: dict[tuple[int, ...], LayerScore] = {}
    alive = list(spans)
    for number, docs in enumerate(rounds, start=1):
        last = number == len(rounds)
        step = settings if last else replace(settings, limit=docs)
        results = evaluate_removals(
            loaded, step, [(), *alive], engine=engine, cache=cache, progress=progress
        )
        base = results[0]
        scored = {
            span: _accuracy_score(span, base, result, block_size, None if last else docs)
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
    scores = [final[span] for span in spans]
    meta = {k: v for k, v in settings.__dict__.items()} | {
        "engine": engine,
        "block_size": block_size,
    }
    meta["tasks"] = list(settings.tasks)
    if halving is not None:
        meta |= {"halving": halving, "rounds": rounds}
    return Ranking("accuracy", scores, num_layers, base, meta)


# Documents per task in the first round of successive halving (fewer make drops too noisy).
HALVING_MIN_DOCUMENTS = 16


def halving_rounds(limit: int | None, halving: int | None) -> list[int]:
    """Documents per task in each round: `limit` halved until one more halving would go below
    HALVING_MIN_DOCUMENTS, smallest first (e.g. 200 -> [25, 50, 100, 200]); `[limit]` without
    halving."""
    if halving is None:
        return [limit]  # type: ignore[list-item]
    if isinstance(halving, bool) or not isinstance(halving, int) or halving < 1:
        raise PruneError(
            f"halving {halving!r} is invalid (accepted: the number of least relevant blocks to "
            "measure on every document, an integer >= 1)"
        )
    if limit is None:
        raise PruneError(
            "successive halving needs a document limit (--limit N): the last round uses N "
            "documents per task, earlier rounds N/2, N/4, ..."
        )
    rounds = [limit]
    while rounds[0] // 2 >= HALVING_MIN_DOCUMENTS:
        rounds.insert(0, math.ceil(rounds[0] / 2))
    return rounds


def _accuracy_score(
    span: tuple[int, ...],
    base: dict[str, TaskScore],
    result: dict[str, TaskScore],
    block_size: int,
    documents: int | None,
) -> LayerScore:
    """The mean drop over tasks (with its stderr) of removing `span`."""
    per_task, per_err = {}, {}
    for task, b in base.items():
        r = result[task]
        per_task[task] = _drop(b, r)
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
    return LayerScore(span[0], mean, err, block_size, per_task, per_err, documents)


def perplexity_relevance(
    loaded: Any,
    texts: Sequence[str],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    block_size: int = 1,
    cache: ResultCache | None = None,
    progress: bool = True,
    engine: str = "auto",
) -> Ranking:
    """Rank blocks by the perplexity increase on `texts` when each is removed (SLEB style).

    The fast engine (`engine` "auto" or "fast") scores every candidate in one shared run
    (prefix reuse); "lm-eval" runs the plain forward pass per candidate, the reference."""
    import hashlib

    from tqdm.auto import tqdm

    from prune.surgery import count_layers, layers_removed

    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = count_layers(model)
    spans = _spans(num_layers, block_size, layers)
    text_id = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    pseudo = EvalSettings(tasks=(f"perplexity:{text_id}:{seq_len}",), seed=0)
    fingerprint = model_fingerprint(loaded) if cache is not None else ""
    candidates = [(), *spans]

    def plain(missing: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], float]]:
        for removed in tqdm(
            missing, desc="perplexity relevance", unit="model", disable=not progress
        ):
            with layers_removed(model, removed):
                yield (
                    removed,
                    perplexity(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size),
                )

    def fast(missing: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], float]]:
        from prune.fasteval import perplexities

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
        missing = [c for c in candidates if values.get(c) is None]
        if missing:
            for removed, value in (plain if chosen == "lm-eval" else fast)(missing):
                values[removed] = value
                if cache:
                    score = TaskScore(pseudo.tasks[0], "perplexity", value, None, len(texts), False)
                    cache.put(keys[removed], score)
        return [values[c] for c in candidates]

    check_engine(engine)
    values = with_fallback(measure) if engine == "auto" else measure(engine)
    base = values[0]
    scores = [
        LayerScore(span[0], v - base if math.isfinite(v) else float("inf"), None, block_size)
        for span, v in zip(spans, values[1:], strict=False)
    ]
    settings = {
        "samples": len(texts),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "block_size": block_size,
        "engine": engine,
    }
    return Ranking("perplexity", scores, num_layers, base, settings)


def rank_layers(
    measure: str,
    loaded: Any,
    *,
    texts: Sequence[str] | None = None,
    settings: EvalSettings | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    block_size: int = 1,
    layers: Sequence[int] | None = None,
    engine: str = "auto",
    cache: ResultCache | None = None,
    progress: bool = True,
    halving: int | None = None,
) -> Ranking:
    """Rank the blocks of `loaded` by one measure, named as in MEASURES.

    Cosine and perplexity read `texts` (calibration); accuracy evaluates `settings`
    (with successive halving when `halving` is set, see `accuracy_relevance`).
    `layers` limits the per-layer evaluations of accuracy and perplexity.
    """
    if measure == "cosine":
        return cached_cosine_relevance(
            loaded,
            texts,
            seq_len=seq_len,
            batch_size=batch_size,
            block_size=block_size,
            cache=cache,
            progress=progress,
        )
    if measure == "accuracy":
        return accuracy_relevance(
            loaded,
            settings,
            layers=layers,
            block_size=block_size,
            engine=engine,
            cache=cache,
            progress=progress,
            halving=halving,
        )
    if measure == "perplexity":
        return perplexity_relevance(
            loaded,
            texts,
            seq_len=seq_len,
            batch_size=batch_size,
            layers=layers,
            block_size=block_size,
            cache=cache,
            progress=progress,
            engine=engine,
        )
    raise PruneError(f"unknown measure '{measure}' (accepted: {', '.join(MEASURES)})")
