"""Paired statistics for comparing two evaluations of the same documents, and ranking stability.

When two evaluations score the same documents (the base model and a pruned variant,
or the model with and without block 7), their per-document scores are correlated,
so the uncertainty of their difference must be computed from the per-document
differences, not from two independent standard errors. `paired_difference` does
that: the statistic is the mean over tasks of each task's mean per-document
difference a - b (tasks weigh equally, as prune's mean score does), reported with
its exact analytic standard error and a stratified paired bootstrap interval. A
winner may only be named when that interval excludes zero (`Paired.distinguishable`).

`removal_stability` asks the same question of a ranking: if the documents had been
drawn again, would the same k layers be removed? It bootstraps documents and
reports how often each layer lands in the removal set.

Both bootstraps resample documents with replacement *within each task*, draw from
`numpy.random.Generator(PCG64(seed))` in sorted task order (so results do not depend
on dict order), and are vectorised: each resample is a row of document counts, and
the resampled means are one matrix product.

Torch-free: numpy only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from prune.errors import PruneError

# Largest (resamples x documents) count matrix built at once; bigger bootstraps go in chunks
# of resamples, so memory stays bounded (~32 MiB of int64) whatever the document count.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Paired:
    """The mean paired difference a - b over documents, with its uncertainty."""

    diff: float  # mean over tasks of each task's mean per-document difference a - b
    stderr: float  # analytic paired standard error of `diff`
    ci95: tuple[float, float]  # stratified paired bootstrap percentile interval, seeded
    documents: int  # documents per task summed over tasks

    @property
    def distinguishable(self) -> bool:
        """Whether the 95% interval excludes zero, i.e. a winner may be named."""
        lo, hi = self.ci95
        return lo > 0 or hi < 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"diff", "stderr", "ci95": [lo, hi], "documents"}."""
        return {
            "diff": float(self.diff),
            "stderr": float(self.stderr),
            "ci95": [float(self.ci95[0]), float(self.ci95[1])],
            "documents": int(self.documents),
        }


@dataclass(frozen=True)
class Stability:
    """How stable a k-layer removal set is when the documents are resampled."""

    probability: list[float]  # per layer: share of resamples whose removal set contains it
    jaccard: float  # mean Jaccard overlap of each resample's removal set with `removal_set`
    removal_set: list[int]  # the full-data removal set, least relevant first

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"probability", "jaccard", "removal_set"}."""
        return {
            "probability": [float(p) for p in self.probability],
            "jaccard": float(self.jaccard),
            "removal_set": [int(i) for i in self.removal_set],
        }


def paired_difference(
    a: Mapping[str, Mapping[int, float]],
    b: Mapping[str, Mapping[int, float]],
    *,
    seed: int = 0,
    resamples: int = 2000,
) -> Paired:
    """Compare evaluations A and B of the same documents: mean difference a - b and its uncertainty.

    Args:
        a: task -> doc_id -> per-document value of evaluation A (e.g. 0/1 accuracy).
        b: the same for evaluation B; it must hold exactly the same tasks and doc_ids.
        seed: seed of the bootstrap's `Generator(PCG64(seed))`.
        resamples: number of bootstrap resamples.

    Returns:
        `Paired` with `diff` = mean over tasks t of mean_i (a[t][i] - b[t][i]);
        `stderr` = sqrt(sum_t var_t(d) / n_t) / T (sample variance, ddof=1; a task
        with one document contributes 0), exact for that statistic given the
        documents; `ci95` = 2.5 and 97.5 percentiles of the statistic over paired
        bootstrap resamples (documents drawn with replacement within each task, the
        same draw for a and b); `documents` = sum_t n_t.

    Raises:
        PruneError: the two sides disagree on tasks or documents (nothing is
            silently dropped), there are no tasks, a task has no documents, a value
            is not finite, or `resamples` < 1.
    """
    _check_resamples(resamples)
    differences = _paired_differences(a, b)  # task -> (n_t,), in sorted task order
    tasks = len(differences)

    diff = float(sum(d.mean() for d in differences.values()) / tasks)
    variance_of_sum = sum(float(d.var(ddof=1)) / d.size for d in differences.values() if d.size > 1)
    stderr = float(np.sqrt(variance_of_sum) / tasks)

    if all(np.ptp(d) == 0 for d in differences.values()):
        # Every resample reproduces the statistic exactly; skip the floating-point jitter.
        return Paired(diff, stderr, (diff, diff), sum(d.size for d in differences.values()))

    rng = np.random.Generator(np.random.PCG64(seed))
    statistic = np.zeros(resamples)  # (R,)
    for d in differences.values():
        statistic += _resampled_means(rng, d[:, None], resamples)[:, 0]
    statistic /= tasks
    lo, hi = np.percentile(statistic, [2.5, 97.5])
    return Paired(diff, stderr, (float(lo), float(hi)), sum(d.size for d in differences.values()))


def removal_stability(
    signal: Mapping[str, np.ndarray],
    k: int,
    *,
    exclude: Collection[int] = (),
    seed: int = 0,
    resamples: int = 1000,
) -> Stability:
    """How often each layer falls in the k-least-relevant removal set when documents are resampled.

    Args:
        signal: task -> array (layers, documents) of per-document relevance
            contributions (e.g. the accuracy drop on each document when the layer is
            removed; higher = the layer matters more). Every task has the same
            number of layers; document counts may differ between tasks.
        k: size of the removal set.
        exclude: layer indices never removed (protected layers).
        seed: seed of the bootstrap's `Generator(PCG64(seed))`.
        resamples: number of bootstrap resamples.

    Returns:
        `Stability`. A layer's relevance is the mean over tasks of its mean over
        documents; the removal set is the k least relevant layers not in `exclude`,
        ties going to the lower index (as prune's greedy loop breaks them). Each
        resample draws documents with replacement within each task, the same
        documents for every layer, and recomputes the set.

    Raises:
        PruneError: no tasks, a signal that is not a finite 2-D array with at least
            one layer and one document, tasks disagreeing on the number of layers,
            an `exclude` index out of range, k outside 1..(removable layers), or
            `resamples` < 1.
    """
    _check_resamples(resamples)
    matrices = _signal_matrices(signal)  # task -> (documents, layers), sorted task order
    layers = next(iter(matrices.values())).shape[1]
    excluded = set()
    for i in exclude:
        if not -layers <= i < layers:
            raise PruneError(f"exclude index {i} is out of range for {layers} layers")
        excluded.add(i % layers)
    candidates = np.array([i for i in range(layers) if i not in excluded], dtype=np.int64)
    if not 1 <= k <= candidates.size:
        raise PruneError(
            f"cannot choose {k} layers to remove: {candidates.size} of {layers} are removable "
            f"({len(excluded)} excluded), so k must be between 1 and {candidates.size}"
        )

    relevance = sum(m.mean(axis=0) for m in matrices.values()) / len(matrices)  # (L,)
    full_set = _least_relevant(relevance[None, :], candidates, k)[0]  # (k,)

    rng = np.random.Generator(np.random.PCG64(seed))
    resampled = np.zeros((resamples, layers))  # (R, L)
    for m in matrices.values():
        resampled += _resampled_means(rng, m, resamples)
    resampled /= len(matrices)
    chosen = _least_relevant(resampled, candidates, k)  # (R, k)

    in_set = np.zeros((resamples, layers), dtype=bool)  # (R, L)
    np.put_along_axis(in_set, chosen, True, axis=1)
    overlap = in_set[:, full_set].sum(axis=1)  # (R,) |resample set ∩ full set|
    jaccard = overlap / (2 * k - overlap)  # both sets hold k layers
    return Stability(
        probability=[float(p) for p in in_set.mean(axis=0)],
        jaccard=float(jaccard.mean()),
        removal_set=[int(i) for i in full_set],
    )


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise PruneError(f"resamples must be a positive integer, got {resamples}")


def _paired_differences(
    a: Mapping[str, Mapping[int, float]], b: Mapping[str, Mapping[int, float]]
) -> dict[str, np.ndarray]:
    """Per task (sorted), the per-document differences a - b matched by doc_id (sorted)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise PruneError(
            "the two evaluations cover different tasks: "
            f"only in A: {only_a or 'none'}; only in B: {only_b or 'none'}"
        )
    if not a:
        raise PruneError("no tasks to compare: both evaluations are empty")
    out = {}
    for task in sorted(a):
        docs_a, docs_b = set(a[task]), set(b[task])
        if docs_a != docs_b:
            missing_b, missing_a = sorted(docs_a - docs_b), sorted(docs_b - docs_a)
            example = (missing_b or missing_a)[0]
            raise PruneError(
                f"task '{task}': {len(missing_b) + len(missing_a)} documents differ between the "
                f"evaluations ({len(missing_b)} only in A, {len(missing_a)} only in B; "
                f"e.g. doc_id {example}); pairing needs the same documents on both sides"
            )
        if not docs_a:
            raise PruneError(f"task '{task}' has no documents to compare")
        ids = sorted(docs_a)
        d = np.array([float(a[task][i]) - float(b[task][i]) for i in ids])  # (n_t,)
        if not np.isfinite(d).all():
            bad = ids[int(np.flatnonzero(~np.isfinite(d))[0])]
            raise PruneError(f"task '{task}', doc_id {bad}: the values are not finite numbers")
        out[task] = d
    return out


def _signal_matrices(signal: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per task (sorted), the signal transposed to (documents, layers), validated."""
    if not signal:
        raise PruneError("no tasks in the relevance signal")
    out = {}
    for task in sorted(signal):
        m = np.asarray(signal[task], dtype=float)
        if m.ndim != 2 or 0 in m.shape:
            raise PruneError(
                f"task '{task}': the signal must be a (layers, documents) array with at least "
                f"one of each, got shape {m.shape}"
            )
        if not np.isfinite(m).all():
            raise PruneError(f"task '{task}': the signal holds values that are not finite")
        out[task] = m.T
    shapes = {task: m.shape[1] for task, m in out.items()}
    if len(set(shapes.values())) > 1:
        raise PruneError(f"tasks disagree on the number of layers: {shapes}")
    return out


def _count_chunks(rng: np.random.Generator, n: int, resamples: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n documents as rows of counts (how often each is drawn), in chunks."""
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        r = min(rows, resamples - start)
        draws = rng.integers(0, n, size=(r, n))  # (r, n) document indices
        flat = (draws + n * np.arange(r)[:, None]).ravel()
        yield np.bincount(flat, minlength=r * n).reshape(r, n)  # (r, n)


def _resampled_means(rng: np.random.Generator, values: np.ndarray, resamples: int) -> np.ndarray:
    """Column means of `values` (n, c) over `resamples` bootstrap draws of its rows: (resamples, c)."""
    n = values.shape[0]
    return np.concatenate([counts @ values for counts in _count_chunks(rng, n, resamples)]) / n


def _least_relevant(relevance: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Per row of `relevance` (R, L), the k least relevant candidates, ties to the lower index: (R, k)."""
    # candidates are ascending, so a stable sort breaks ties by the lower layer index
    order = np.argsort(relevance[:, candidates], axis=1, kind="stable")[:, :k]
    return candidates[order]
