"""A fast log-likelihood engine for "one model with some blocks removed", many candidates at once.

Ranking blocks by accuracy drop costs one full evaluation per candidate (a tuple
of removed block indices, `()` = the full model). `FastEngine` scores tokenized
requests (`Request`: model inputs and the tokens to score) under all candidates
in one shared computation, with the numbers a plain forward of each pruned
model gives:

- **One token tree per document.** A document's requests (the context followed by
  each choice; WinoGrande's two contexts before a shared continuation) are merged
  into a prefix tree and run as one packed sequence with a tree attention mask
  (each token sees its ancestors only, positions are tree depths), so a shared
  prefix is computed once. Documents that open alike (WinoGrande's twin
  sentences, a prompt's fixed "Question:") share one tree while it fits a row.
  Trees are packed into rows, rows into batches.
- **Prefix reuse across candidates.** Removing block `i` leaves the state
  entering block `i` unchanged. One pass of the "trunk" (the model minus the
  blocks every candidate removes) saves the state entering each block where some
  candidate starts to differ; a candidate then runs only the blocks after it.
  Saved states are bounded by a memory budget: beyond it, documents are handled
  in chunks. Candidates run one after another within a chunk, so each is complete
  as soon as its pass over the last chunk ends (`FastEngine.run`'s `on_done`
  reports it then, which lets callers cache it before the others finish).
- **Logits only where scored.** `logits_to_keep` (a boolean mask) applies the LM
  head, and any logit soft-capping of the model, only at continuation positions;
  the last block's feed-forward (position-wise) runs only there too.

Blocks are swapped in and out of the model's own block list (no weight copies)
and the model's own forward builds embeddings, rotary tables and the final norm,
so no architecture is re-implemented. A self-check compares the packed path with
a plain forward on the first batch and refuses to go on when they disagree.

The engine keeps the model on one device: a model a device map spreads over several
devices (or offloads to disk) is refused with FastEngineUnsupported
(`check_single_device`), and the "auto" engine then takes the lm-eval path.

This module needs torch only: it never imports lm-eval. Turning lm-eval tasks into
requests and answers back into task scores is `prune.evaluate.harness`'s job;
`perplexities` is the engine's other client (the perplexity measure).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prune.architectures import feed_forward_attr
from prune.defaults import CALIBRATION_SEQ_LEN
from prune.errors import FastEngineUnsupported, PruneError
from prune.surgery import (
    layers_removed,
    locate_layers,
    normalize_indices,
    restore_config,
    retarget_config,
    text_config,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # a request's (context, continuation)
Answer = tuple[float, bool]  # (log-likelihood, is greedy), as lm-eval's loglikelihood returns

# Saved block inputs kept at once (bytes); PRUNE_FAST_STATE_BUDGET overrides.
DEFAULT_STATE_BUDGET = 1 << 30
# Packed tokens per row and padded tokens per batch (rows x row length).
DEFAULT_ROW_TOKENS = 192
DEFAULT_BATCH_TOKENS = 1024


# --------------------------------------------------------------------------- token trees


@dataclass
class Request:
    """One unique loglikelihood request, tokenized: the model input and the scored tokens."""

    key: Key
    group: tuple[str, int]  # (task, document): requests of one document share a tree
    inputs: list[int]  # (context + continuation)[-(max_length + 1):][:-1], as HFLM feeds it
    targets: list[int]  # the continuation tokens, predicted at the last len(targets) inputs


@dataclass
class _Tree:
    """A document's requests merged into a prefix tree of tokens."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1 for roots
    depths: list[int] = field(default_factory=list)
    scored: list[tuple[int, list[int], list[int]]] = field(
        default_factory=list
    )  # (request, nodes, targets)
    _children: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, request_id: int, req: Request) -> None:
        parent, path = -1, []
        for token in req.inputs:
            node = self._children.get((parent, token))
            if node is None:
                node = len(self.tokens)
                self._children[(parent, token)] = node
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(len(path))
            path.append(node)
            parent = node
        self.scored.append((request_id, path[len(path) - len(req.targets) :], req.targets))

    def growth(self, requests: Sequence[Request]) -> int:
        """How many tokens adding `requests` would add (their prefixes already here cost nothing)."""
        new: dict[tuple[Any, int], Any] = {}
        for req in requests:
            parent: Any = -1
            for token in req.inputs:
                node = self._children.get((parent, token))
                if node is None:
                    node = new.setdefault((parent, token), ("new", len(new)))
                parent = node
        return len(new)


@dataclass
class _Batch:
    """Packed rows of trees, ready for the model."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T) tree depths
    masks: dict[int | None, torch.Tensor]  # attention window -> (B, 1, T, T)
    keep: torch.Tensor  # (B, T) bool: positions whose logits are needed
    pair_rows: torch.Tensor  # (M,) row of each scored token in the kept logits
    pair_targets: torch.Tensor  # (M,)
    pair_request: torch.Tensor  # (M,) batch-local request index
    request_ids: list[int]  # batch-local -> global request id

    def to(self, device: torch.device) -> _Batch:
        """The same batch with every tensor on `device`."""
        moved = {id(m): m.to(device) for m in self.masks.values()}  # shared masks stay shared
        return _Batch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            {w: moved[id(m)] for w, m in self.masks.items()},
            self.keep.to(device),
            self.pair_rows.to(device),
            self.pair_targets.to(device),
            self.pair_request.to(device),
            self.request_ids,
        )


def _pack_rows(trees: list[_Tree], row_tokens: int) -> list[list[_Tree]]:
    """First-fit decreasing: trees into rows of at most `row_tokens` (or one big tree)."""
    rows: list[list[_Tree]] = []
    sizes: list[int] = []
    for tree in sorted(trees, key=lambda t: -len(t.tokens)):
        n = len(tree.tokens)
        for i, used in enumerate(sizes):
            if used + n <= row_tokens:
                rows[i].append(tree)
                sizes[i] += n
                break
        else:
            rows.append([tree])
            sizes.append(n)
    return rows


def _make_batch(
    rows: list[list[_Tree]], windows: set[int | None], float_mask: torch.dtype | None, pad_id: int
) -> _Batch:
    width = max(sum(len(t.tokens) for t in row) for row in rows)
    B = len(rows)
    ids = np.full((B, width), pad_id, dtype=np.int64)
    pos = np.zeros((B, width), dtype=np.int64)
    allowed = np.zeros((B, width, width), dtype=bool)  # allowed[b, q, k]: q may attend to k
    keep = np.zeros((B, width), dtype=bool)
    scored: list[tuple[int, int, list[int], list[int]]] = []  # (row, request, flat nodes, targets)
    for b, row in enumerate(rows):
        offset = 0
        for tree in row:
            for n, (tok, par, dep) in enumerate(
                zip(tree.tokens, tree.parents, tree.depths, strict=True)
            ):
                q = offset + n
                ids[b, q], pos[b, q] = tok, dep
                if par >= 0:  # parents come before children: copy the parent's ancestors
                    allowed[b, q, offset:q] = allowed[b, offset + par, offset:q]
                allowed[b, q, q] = True
            for req_id, nodes, targets in tree.scored:
                keep[b, [offset + n for n in nodes]] = True
                scored.append((b, req_id, [offset + n for n in nodes], targets))
            offset += len(tree.tokens)
        for q in range(offset, width):  # padding attends to itself only (no empty softmax rows)
            allowed[b, q, q] = True
    # Row of each kept (b, t) in the flattened logits that logits_to_keep returns.
    flat_row = np.cumsum(keep.reshape(-1)) - 1
    pair_rows, pair_targets, pair_request, request_ids = [], [], [], []
    for b, req_id, nodes, targets in scored:
        local = len(request_ids)
        request_ids.append(req_id)
        pair_rows += [int(flat_row[b * width + t]) for t in nodes]
        pair_targets += targets
        pair_request += [local] * len(targets)
    # A window longer than the deepest position cuts nothing: it shares the full mask.
    deepest = int(pos.max(initial=0))
    effective = {w: None if w is None or w > deepest else w for w in windows}
    built: dict[int | None, torch.Tensor] = {}
    for window in set(effective.values()):
        mask = allowed  # the diagonal is always allowed, so no softmax row is empty
        if window is not None:
            mask = allowed & ((pos[:, :, None] - pos[:, None, :]) < window)  # (B, T, T)
        tensor = torch.from_numpy(np.ascontiguousarray(mask))[:, None]  # (B, 1, T, T)
        if float_mask is not None:  # eager attention adds the mask to the scores
            tensor = torch.zeros(tensor.shape, dtype=float_mask).masked_fill_(
                ~tensor, torch.finfo(float_mask).min
            )
        built[window] = tensor
    masks = {w: built[e] for w, e in effective.items()}
    return _Batch(
        torch.from_numpy(ids),
        torch.from_numpy(pos),
        masks,
        torch.from_numpy(keep),
        torch.tensor(pair_rows, dtype=torch.long),
        torch.tensor(pair_targets, dtype=torch.long),
        torch.tensor(pair_request, dtype=torch.long),
        request_ids,
    )


def plan_batches(
    requests: Sequence[Request],
    *,
    row_tokens: int = DEFAULT_ROW_TOKENS,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    across_documents: bool = True,
) -> list[list[list[_Tree]]]:
    """Merge requests into token trees, pack trees into rows and rows into batches (longest
    first). Masks are built later, per chunk (`_make_batch`), to bound memory.

    A tree holds one document's requests, or with `across_documents` several documents that
    share a prefix (WinoGrande's twin sentences, a prompt's fixed opening): documents are
    sorted by their tokens and merged in that order while the tree stays within `row_tokens`.
    """
    docs: dict[tuple, list[tuple[int, Request]]] = {}
    for req_id, req in enumerate(requests):
        docs.setdefault(req.group, []).append((req_id, req))
    trees: list[_Tree] = []
    order = (
        sorted(docs.values(), key=lambda reqs: reqs[0][1].inputs)
        if across_documents
        else list(docs.values())
    )
    for reqs in order:
        tree = trees[-1] if trees and across_documents else None
        if tree is None or len(tree.tokens) + tree.growth([r for _, r in reqs]) > row_tokens:
            tree = _Tree()
            trees.append(tree)
        for req_id, req in reqs:
            tree.add(req_id, req)
    rows = _pack_rows(trees, row_tokens)
    rows.sort(key=lambda row: -_row_width(row))
    plans, current, current_width = [], [], 0
    for row in rows:
        width = _row_width(row)
        if current and (len(current) + 1) * max(current_width, width) > batch_tokens:
            plans.append(current)
            current, current_width = [], 0
        current.append(row)
        current_width = max(current_width, width)
    if current:
        plans.append(current)
    return plans


def _row_width(row: list[_Tree]) -> int:
    return sum(len(t.tokens) for t in row)


def _plan_tokens(plan: list[list[_Tree]]) -> int:
    """Padded tokens of a planned batch (rows x longest row)."""
    return len(plan) * max(_row_width(row) for row in plan)


# --------------------------------------------------------------------------- block stacks


def attention_windows(config: Any, num_layers: int) -> list[int | None]:
    """Each block's sliding attention window (None = full attention), as transformers builds masks.

    Configs with `layer_types` mark sliding blocks there (Gemma 2/3, Qwen2, ...);
    otherwise a set `sliding_window` applies to every block (Mistral), unless
    `use_sliding_window` is False.
    """
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return [None] * num_layers
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == num_layers:
        return [window if t == "sliding_attention" else None for t in types]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * num_layers
    return [window] * num_layers


class _Run:
    """Mutable state the block wrappers read during one forward."""

    def __init__(self) -> None:
        self.masks: dict[int | None, torch.Tensor] = {}
        self.start: torch.Tensor | None = None
        self.record: dict[int, torch.Tensor] | None = None
        self.tuple_output = False
        self.keep: torch.Tensor | None = None  # (B, T) positions whose logits are needed
        # The last installed block: its feed-forward runs at `keep` only.
        self.last: int | None = None


class _Block(nn.Module):
    """A model block run with the packed tree mask; optionally saves the state entering it."""

    def __init__(
        self, block: nn.Module, index: int, window: int | None, run: _Run, record: bool
    ) -> None:
        super().__init__()
        self.block, self.index, self.window, self.save = block, index, window, record
        self.__dict__["run"] = run  # plain attribute, not a submodule
        self.ff_attr = feed_forward_attr(block)
        self.signature = inspect.signature(block.forward)

    def forward(self, hidden_states, *args, **kwargs):
        run = self.run
        if self.save and run.record is not None:
            run.record[self.index] = hidden_states.clone()
        args, kwargs = self._with_mask((hidden_states, *args), kwargs, run.masks[self.window])
        if self.ff_attr is not None and run.keep is not None and run.last == self.index:
            out = self._kept_rows_forward(*args, **kwargs)
        else:
            out = self.block(*args, **kwargs)
        run.tuple_output = isinstance(out, tuple)
        return out

    def _with_mask(self, args: tuple, kwargs: dict, mask: torch.Tensor) -> tuple[tuple, dict]:
        """The call's arguments with the packed tree mask as its attention mask, wherever the
        model passes it (Llama-style models by keyword, GPT-2 positionally)."""
        if len(args) > 1 and "attention_mask" in self.signature.parameters:
            bound = self.signature.bind_partial(*args, **kwargs)
            bound.arguments["attention_mask"] = mask
            return bound.args, bound.kwargs
        return args, {**kwargs, "attention_mask": mask}

    def _kept_rows_forward(self, *args, **kwargs):
        """The block with its feed-forward applied at the kept positions only (zeros elsewhere:
        only kept positions reach the LM head, and a feed-forward mixes no positions)."""
        inner = getattr(self.block, self.ff_attr)
        wrapper = _KeptRowsOnly(inner, self.run.keep)
        setattr(self.block, self.ff_attr, wrapper)
        try:
            out = self.block(*args, **kwargs)
        finally:
            setattr(self.block, self.ff_attr, inner)
        if wrapper.unsupported:  # e.g. a mixture of experts returning router logits too
            self.ff_attr = None
        return out


class _KeptRowsOnly(nn.Module):
    """Runs a position-wise module on the rows `keep` selects and scatters the result into zeros."""

    def __init__(self, inner: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.keep, self.unsupported = inner, keep, False

    def forward(self, x, *args, **kwargs):
        keep = self.keep
        if args or kwargs or x.dim() != 3 or x.shape[:2] != keep.shape:
            self.unsupported = True
            return self.inner(x, *args, **kwargs)
        y = self.inner(x[keep])
        if not isinstance(y, torch.Tensor) or y.dim() != 2:
            self.unsupported = True
            return self.inner(x, *args, **kwargs)
        out = y.new_zeros((*keep.shape, y.shape[-1]))
        out[keep] = y
        return out


class _Start(nn.Module):
    """Stands in for the removed blocks before a candidate's first kept one: returns the saved state."""

    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.__dict__["run"] = run

    def forward(self, hidden_states, *args, **kwargs):
        state = self.run.start
        return (state,) if self.run.tuple_output else state


@contextmanager
def _installed(model: nn.Module, modules: list[nn.Module], origin: list[int]) -> Iterator[None]:
    """Temporarily make `modules` the model's block list; `origin[i]` is the original block whose
    per-layer config entries (layer types, ...) module i takes."""
    stack = locate_layers(model)
    config = text_config(model)
    old = retarget_config(config, origin)
    try:
        setattr(stack.parent, stack.attr, nn.ModuleList(modules))
        yield
    finally:
        setattr(stack.parent, stack.attr, stack.layers)
        restore_config(config, old)


# --------------------------------------------------------------------------- the engine


def check_single_device(model: nn.Module) -> None:
    """FastEngineUnsupported when a device map (`hf_device_map`) puts the model on more than
    one device or offloads it: the engine saves block inputs and swaps blocks on one device,
    while accelerate's hooks would move (and reload) them behind its back."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return
    devices = list(dict.fromkeys(str(where) for where in placed.values()))
    if len(devices) > 1 or devices[0] in ("disk", "meta"):
        raise FastEngineUnsupported(
            "the fast engine needs the model on one device, and this one is dispatched across "
            f"devices by its device map ({', '.join(devices)})"
        )


def _budget() -> int:
    raw = os.environ.get("PRUNE_FAST_STATE_BUDGET")
    if raw:
        try:
            return max(1, int(float(raw)))
        except ValueError:
            raise PruneError(f"PRUNE_FAST_STATE_BUDGET={raw!r} is not a number of bytes") from None
    return DEFAULT_STATE_BUDGET


class FastEngine:
    """Scores tokenized requests under many block-removal candidates of one model."""

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int = 0,
        row_tokens: int = DEFAULT_ROW_TOKENS,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        state_budget: int | None = None,
        progress: bool = False,
        share_prefixes: bool = True,
        share_across_documents: bool = True,
        reuse_states: bool = True,
        scored_logits_only: bool = True,
        scored_last_feed_forward: bool = True,
    ) -> None:
        """The four switches turn the engine's ideas off one by one (for measuring what each pays)."""
        check_single_device(model)
        self.model = model
        self.share_prefixes, self.reuse_states = share_prefixes, reuse_states
        self.share_across_documents = share_prefixes and share_across_documents
        self.scored_logits_only = scored_logits_only
        self.scored_last_feed_forward = scored_last_feed_forward
        self.blocks = list(locate_layers(model).layers)
        config = text_config(model)
        self.windows = attention_windows(config, len(self.blocks))
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise FastEngineUnsupported(
                f"the fast engine needs 'sdpa' or 'eager' attention (this model uses '{impl}')"
            )
        self.float_mask = next(model.parameters()).dtype if impl == "eager" else None
        self.pad_id, self.row_tokens, self.batch_tokens = pad_id, row_tokens, batch_tokens
        self.state_budget = state_budget if state_budget is not None else _budget()
        self.progress = progress
        self.hidden_size = int(model.get_input_embeddings().weight.shape[-1])
        self.device = next(model.parameters()).device
        self.checked = False

    # -- one forward ---------------------------------------------------------------
    def _forward(self, batch: _Batch, run: _Run) -> list[tuple[int, Answer]]:
        run.masks = batch.masks
        run.keep = batch.keep if self.scored_last_feed_forward else None
        kwargs = {
            "input_ids": batch.input_ids,
            "position_ids": batch.position_ids,
            "use_cache": False,
        }
        if self.scored_logits_only:
            try:
                logits = self.model(**kwargs, logits_to_keep=batch.keep).logits  # (N, V)
                if logits.dim() != 2 or logits.shape[0] != int(batch.keep.sum()):
                    raise ValueError("logits_to_keep ignored the boolean mask")
            except (TypeError, IndexError, ValueError, RuntimeError) as exc:
                # Older transformers take no boolean logits_to_keep: compute every logit.
                log.info("fast engine: computing all logits (%s)", exc)
                self.scored_logits_only = False
                return self._forward(batch, run)
        else:
            logits = self.model(**kwargs).logits[batch.keep]  # (N, V) from (B, T, V)
        return self._answers(logits, batch)

    @staticmethod
    def _answers(logits: torch.Tensor, batch: _Batch) -> list[tuple[int, Answer]]:
        logprobs = F.log_softmax(logits, dim=-1)  # HFLM: log_softmax in the logits' dtype
        dev = logprobs.device
        rows, targets, req = (
            batch.pair_rows.to(dev),
            batch.pair_targets.to(dev),
            batch.pair_request.to(dev),
        )
        picked = logprobs[rows, targets]  # (M,)
        n = len(batch.request_ids)
        sums = torch.zeros(n, dtype=picked.dtype, device=dev).index_add_(0, req, picked)
        # HFLM: greedy when argmax == target. "No token scores higher" is the same test except
        # when two tokens tie exactly at the maximum, and amax is ~15x cheaper than argmax on CPU.
        misses = torch.zeros(n, dtype=torch.long, device=dev).index_add_(
            0, req, (picked < logprobs.amax(-1)[rows]).long()
        )
        sums, misses = sums.tolist(), misses.tolist()
        return [(rid, (float(sums[i]), misses[i] == 0)) for i, rid in enumerate(batch.request_ids)]

    def _self_check(
        self, batch: _Batch, requests: Sequence[Request], got: dict[int, Answer]
    ) -> None:
        """Compare a few answers with a plain (unpacked, full-logits) forward, as HFLM computes them."""
        worst = 0.0
        for rid in batch.request_ids[:4]:
            req = requests[rid]
            logits = self.model(
                torch.tensor([req.inputs], device=self.device), use_cache=False
            ).logits[0]
            logprobs = F.log_softmax(logits[-len(req.targets) :], dim=-1)
            ll = float(
                logprobs.gather(-1, torch.tensor(req.targets, device=self.device)[:, None]).sum()
            )
            worst = max(worst, abs(ll - got[rid][0]) / (1.0 + abs(ll)))
        tolerance = 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 5e-2
        if not worst <= tolerance:
            model_type = getattr(text_config(self.model), "model_type", type(self.model).__name__)
            raise FastEngineUnsupported(
                f"the fast engine does not reproduce the forward pass of '{model_type}' "
                f"(relative log-likelihood difference {worst:.2e})"
            )
        self.checked = True

    # -- many candidates ----------------------------------------------------------
    def run(
        self,
        requests: Sequence[Request],
        candidates: Sequence[Sequence[int]],
        *,
        on_done: Callable[[int, list[Answer]], None] | None = None,
    ) -> list[list[Answer]]:
        """(log-likelihood, is greedy) of every request under every candidate (removed block indices).

        `on_done(i, answers)` is called as soon as candidate `i` has an answer for every
        request: in the last chunk, the trunk's candidate right after the trunk pass (and
        the self-check) and every other candidate right after its own pass, so a caller
        can keep each result before the others are computed (an interrupted ranking then
        resumes from there). A candidate listed twice is reported under both indices.
        """
        L = len(self.blocks)
        normed = [tuple(normalize_indices(list(c), L)) if len(c) else () for c in candidates]
        unique = list(dict.fromkeys(normed))
        reported: set[tuple[int, ...]] = set()

        def report(cand: tuple[int, ...]) -> None:
            if on_done is None or cand in reported:
                return
            reported.add(cand)
            for i, c in enumerate(normed):
                if c == cand:
                    on_done(i, answers[cand])  # type: ignore[arg-type]

        trunk_removed = set.intersection(*(set(c) for c in unique)) if unique else set()
        trunk = [j for j in range(L) if j not in trunk_removed]
        starts = {c: min(set(c) - trunk_removed) for c in unique if set(c) != trunk_removed}
        saved = sorted(set(starts.values())) if self.reuse_states else []
        if not self.share_prefixes:  # every request its own tree
            requests = [replace(r, group=(*r.group, i)) for i, r in enumerate(requests)]  # type: ignore[arg-type]
        plans = plan_batches(
            requests,
            row_tokens=self.row_tokens,
            batch_tokens=self.batch_tokens,
            across_documents=self.share_across_documents,
        )
        answers: dict[tuple[int, ...], list[Answer | None]] = {
            c: [None] * len(requests) for c in unique
        }
        run = _Run()
        trunk_modules = [_Block(self.blocks[j], j, self.windows[j], run, j in saved) for j in trunk]
        bytes_per_token = (
            max(1, len(saved)) * self.hidden_size * next(self.model.parameters()).element_size()
        )
        chunks = _chunks(plans, max(1, self.state_budget // max(1, bytes_per_token)))
        from tqdm.auto import tqdm

        total = len(plans) * (1 + len(starts))
        bar = tqdm(total=total, desc="fast engine", unit="batch", disable=not self.progress)
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            for chunk_index, planned in enumerate(chunks):
                last_chunk = chunk_index == len(chunks) - 1
                windows = set(self.windows)
                chunk = [
                    _make_batch(p, windows, self.float_mask, self.pad_id).to(self.device)
                    for p in planned
                ]
                states: list[dict[int, torch.Tensor]] = []
                first: dict[int, Answer] | None = None
                run.last = trunk[-1] if trunk else None
                with _installed(self.model, trunk_modules, trunk):
                    for batch in chunk:
                        run.record = {}
                        got = dict(self._forward(batch, run))
                        first = got if first is None else first
                        states.append(run.record or {})
                        run.record = None
                        if tuple(sorted(trunk_removed)) in answers:
                            for rid, ans in got.items():
                                answers[tuple(sorted(trunk_removed))][rid] = ans
                        bar.update(1)
                if not self.checked:
                    with layers_removed(self.model, trunk_removed):
                        self._self_check(chunk[0], requests, first)
                if last_chunk and tuple(sorted(trunk_removed)) in answers:
                    report(tuple(sorted(trunk_removed)))  # after the self-check vouched for it
                for cand, start in starts.items():
                    removed = set(cand)
                    if not self.reuse_states:  # run the candidate from the embeddings
                        start = -1
                    kept = [j for j in trunk if j > start and j not in removed]
                    head = [_Start(run)] if start >= 0 else []
                    modules = head + [m for m in trunk_modules if m.index in kept]
                    run.last = kept[-1] if kept else None
                    with _installed(self.model, modules, [start] * len(head) + kept):
                        for batch, state in zip(chunk, states, strict=True):
                            run.start = state.get(start)
                            for rid, ans in self._forward(batch, run):
                                answers[cand][rid] = ans
                            bar.update(1)
                    run.start = None
                    if last_chunk:  # outside `_installed`: the model has its own blocks back
                        report(cand)
                del states, chunk
        for cand in unique:  # no requests at all: nothing ran, every candidate is complete
            report(cand)
        return [answers[c] for c in normed]  # type: ignore[misc]


def _chunks(plans: list[list[list[_Tree]]], max_tokens: int) -> list[list[list[list[_Tree]]]]:
    """Split planned batches so the block inputs saved for one chunk stay within the budget."""
    chunks: list[list[list[list[_Tree]]]] = []
    current, used = [], 0
    for plan in plans:
        tokens = _plan_tokens(plan)
        if current and used + tokens > max_tokens:
            chunks.append(current)
            current, used = [], 0
        current.append(plan)
        used += tokens
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------- perplexity


def perplexities(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    candidates: Sequence[Sequence[int]],
    *,
    seq_len: int = CALIBRATION_SEQ_LEN,
    progress: bool = False,
) -> list[float]:
    """Token-level perplexity of `texts` under each candidate, as `prune.evaluate.perplexity.perplexity`
    computes it on the model with those blocks removed (same truncation, every token scored),
    sharing the blocks before each candidate's first removed one."""
    from prune.calibration import encode_texts

    encoded = encode_texts(
        tokenizer,
        texts,
        seq_len,
        min_tokens=2,
        empty_error="perplexity: every text is shorter than two tokens",
    )
    requests = [
        Request((str(i), ""), ("perplexity", i), ids[:-1], ids[1:]) for i, ids in enumerate(encoded)
    ]
    pad = getattr(tokenizer, "pad_token_id", None)
    engine = FastEngine(model, pad_id=pad if isinstance(pad, int) else 0, progress=progress)
    tokens = sum(len(r.targets) for r in requests)
    return [
        math.exp(-sum(ll for ll, _ in answers) / tokens)
        for answers in engine.run(requests, candidates)
    ]
