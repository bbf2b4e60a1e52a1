"""The contract between the measures and their callers.

What a relevance measure declares (`Measure`), what it is asked (`RankRequest`),
what it returns (`Ranking` of `LayerScore`s), and the document schedule of adaptive
sampling that per-layer measures may follow (`adaptive_rounds`, `settled`). Torch-free:
the registry, the CLI and the recipe checks import this.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prune.defaults import CALIBRATION_BATCH_SIZE, CALIBRATION_SEQ_LEN
from prune.errors import PruneError


@dataclass
class LayerScore:
    """The relevance of one block (or of the span `index .. index+span-1`); higher = matters more."""

    index: int
    score: float
    stderr: float | None = None
    span: int = 1
    per_task: dict[str, float] = field(default_factory=dict)
    per_task_stderr: dict[str, float | None] = field(default_factory=dict)
    # Documents per task behind the score when adaptive sampling settled this block on
    # fewer documents than the limit; None = every document the settings name.
    documents: int | None = None
    # Paired 95% interval of `score` (measures scored per document against a baseline).
    ci95: tuple[float, float] | None = None
    # The span's blocks (original indices) when they are not `index .. index+span-1`: a span
    # of consecutive *remaining* blocks after others were removed.
    blocks: tuple[int, ...] | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks this score is about."""
        if self.blocks is not None:
            return tuple(self.blocks)
        return tuple(range(self.index, self.index + self.span))


@dataclass
class Ranking:
    """Scores of one measure for the blocks of a model, under the model's original indices.

    `baseline` is what the scores are measured against: task scores (a dict of
    `TaskScore`), a number (the base perplexity) or None.
    """

    measure: str  # the measure that produced it ("angular" for cosine over spans)
    scores: list[LayerScore]
    num_layers: int
    baseline: dict[str, Any] | float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # Per-document contributions behind each score, for ranking stability: block index ->
    # task -> doc_id -> value (the score is the mean over tasks of the mean over documents).
    # Not part of the JSON form.
    signals: dict[int, dict[str, dict[int, float]]] | None = field(default=None, repr=False)

    def order(self) -> list[int]:
        """Block (span start) indices, least relevant first; ties keep the lower index first.
        Purely by score, whatever the documents behind it: after adaptive sampling a block
        settled on fewer documents carries an unbiased (if wider) estimate, and its interval
        already lay on its side of the cut."""
        return [s.index for s in sorted(self.scores, key=lambda s: (s.score, s.index))]

    def by_index(self) -> dict[int, LayerScore]:
        """Scores keyed by block (span start) index."""
        return {s.index: s for s in self.scores}

    def stability(self, k: int, *, exclude: Sequence[int] = (), seed: int = 0) -> Any:
        """How stable the removal of the k least relevant blocks (never those in `exclude`,
        negatives counting from the end) is when the documents are resampled: a
        `prune.stats.Stability`, or None without per-document contributions for every block."""
        if not self.signals or len(self.signals) != self.num_layers or k < 1:
            return None
        import numpy as np

        from prune.stats import removal_stability

        layers = sorted(self.signals)
        first = self.signals[layers[0]]
        docs = {task: sorted(values) for task, values in first.items()}
        matrix = {
            task: np.asarray([[self.signals[i][task][d] for d in ids] for i in layers])
            for task, ids in docs.items()
        }
        depth = self.num_layers
        skip = [i % depth for i in exclude if -depth <= i < depth]
        if k > depth - len(set(skip)):
            return None
        return removal_stability(matrix, k, exclude=skip, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (also the cached form of a cosine ranking)."""
        base = self.baseline
        if isinstance(base, dict):
            base = {k: summary_json(v.to_dict()) for k, v in base.items()}
        return {
            "measure": self.measure,
            "num_layers": self.num_layers,
            "baseline": base,
            "settings": self.settings,
            "order": self.order(),
            "layers": [asdict(s) for s in self.scores],
        }


@dataclass(frozen=True)
class RankRequest:
    """Everything a measure may need to rank the blocks of one loaded model.

    `texts` are calibration texts (measures that `needs_texts`), `settings` the
    evaluation settings (measures that `needs_tasks`, an `EvalSettings`). `layers`
    limits the per-layer measures to these block (span start) indices, given as
    original indices. `removed` lists original block indices already taken out
    (the iterative schedule): the measure ranks the remaining blocks and returns
    their scores under original indices. `adaptive` (K, the number of blocks or spans
    the removal will take) turns on adaptive sampling (measures that accept it):
    more documents only for candidates whose interval straddles the cut between the
    K least relevant and the rest.
    """

    loaded: Any
    texts: Sequence[str] | None = None
    settings: Any = None  # EvalSettings | None (prune.evaluate.settings)
    seq_len: int = CALIBRATION_SEQ_LEN
    batch_size: int = CALIBRATION_BATCH_SIZE
    block_size: int = 1
    layers: Sequence[int] | None = None
    engine: str = "auto"
    cache: Any = None  # ResultCache | None (prune.evaluate.cache)
    progress: bool = True
    adaptive: int | None = None
    removed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "removed", tuple(sorted({int(i) for i in self.removed})))


@dataclass(frozen=True)
class Measure:
    """One relevance measure, as the registry knows it.

    `ranker(request)` returns a `Ranking`; call `rank(request)`, which first checks
    that the request carries what the measure needs. In report rows the measure's
    score is `column` and its standard error `<column>_stderr` (unless `stderr` is
    False); `documents_column` and `per_task_column` name optional extra columns
    (documents behind a score settled early by adaptive sampling, per-task scores). `digits` is how many
    decimals tables show. `needs_texts` / `needs_tasks` say what the caller must
    supply; `per_layer` measures cost one evaluation per block (so `layers` and
    `engine` apply to them); `adaptive` measures accept adaptive sampling.
    `span_label` replaces `label` when blocks are scored in spans (block_size > 1).
    """

    name: str
    label: str
    column: str
    description: str
    ranker: Callable[[RankRequest], Ranking]
    needs_texts: bool = False
    needs_tasks: bool = False
    per_layer: bool = False
    adaptive: bool = False
    stderr: bool = True
    documents_column: str | None = None
    per_task_column: str | None = None
    digits: int = 4
    span_label: str | None = None
    color: str | None = None
    order: int = 100

    @property
    def stderr_column(self) -> str | None:
        """The report key of the score's standard error, if the measure has one."""
        return f"{self.column}_stderr" if self.stderr else None

    def label_for(self, block_size: int = 1) -> str:
        """The label of tables and figures for blocks scored in spans of `block_size`."""
        return self.span_label if block_size > 1 and self.span_label else self.label

    def columns(self, score: LayerScore | None) -> dict[str, Any]:
        """This measure's cells of one report row (None everywhere when `score` is None)."""
        row: dict[str, Any] = {self.column: None if score is None else _finite(score.score)}
        if self.stderr_column:
            row[self.stderr_column] = None if score is None else score.stderr
            ci95 = None if score is None else score.ci95
            row[f"{self.column}_ci95"] = None if ci95 is None else [float(x) for x in ci95]
        if self.documents_column:
            row[self.documents_column] = None if score is None else score.documents
        if self.per_task_column:
            row[self.per_task_column] = None if score is None else score.per_task
        return row

    def check(self, request: RankRequest) -> None:
        """PruneError when `request` lacks what this measure needs or asks what it cannot do."""
        if self.needs_texts and not request.texts:
            raise PruneError(f"the {self.name} measure needs calibration texts")
        if self.needs_tasks and request.settings is None:
            raise PruneError(
                f"the {self.name} measure needs evaluation tasks (e.g. local_arc_easy)"
            )
        if request.adaptive is not None and not self.adaptive:
            raise PruneError(
                f"adaptive sampling does not apply to the {self.name} measure (accepted: "
                "measures that score each block on documents, such as accuracy and kl)"
            )

    def rank(self, request: RankRequest) -> Ranking:
        """Check `request`, then rank the blocks (see `RankRequest`)."""
        self.check(request)
        return self.ranker(request)


def summary_json(score: dict[str, Any]) -> dict[str, Any]:
    """A TaskScore's JSON form without its per-document outcomes (reports stay small)."""
    return {k: v for k, v in score.items() if k != "outcomes"}


def _finite(x: float | None) -> float | None:
    """None for NaN and infinities (JSON has neither)."""
    return x if x is not None and math.isfinite(x) else None


# Documents per task in the first round of adaptive sampling (fewer make drops too noisy).
ADAPTIVE_MIN_DOCUMENTS = 16


def adaptive_rounds(limit: int | None, adaptive: int | None) -> list[int]:
    """Documents per task in each round of adaptive sampling: `limit` halved until one more
    halving would go below ADAPTIVE_MIN_DOCUMENTS, smallest first (e.g. 200 -> [25, 50,
    100, 200]); `[limit]` without adaptive sampling. PruneError for a bad K or no limit."""
    if adaptive is None:
        return [limit]  # type: ignore[list-item]
    if isinstance(adaptive, bool) or not isinstance(adaptive, int) or adaptive < 1:
        raise PruneError(
            f"--adaptive {adaptive!r} is invalid (accepted: K, the number of blocks the removal "
            "will take, an integer >= 1 and below the number of candidates)"
        )
    if limit is None:
        raise PruneError(
            "adaptive sampling needs a document limit (--limit N): the last round uses N "
            "documents per task, earlier rounds N/2, N/4, ..."
        )
    rounds = [limit]
    while rounds[0] // 2 >= ADAPTIVE_MIN_DOCUMENTS:
        rounds.insert(0, math.ceil(rounds[0] / 2))
    return rounds


def check_adaptive(adaptive: int, candidates: int) -> None:
    """PruneError unless 1 <= K < `candidates` (a cut needs candidates on both sides)."""
    if not 1 <= adaptive < candidates:
        raise PruneError(
            f"--adaptive {adaptive} is invalid for {candidates} candidate blocks (accepted: "
            f"1 to {candidates - 1}, the number the removal will take)"
        )


def interval(score: LayerScore) -> tuple[float, float] | None:
    """The 95% interval of a score: its paired `ci95`, else score +- 1.96 stderr, else None."""
    if score.ci95 is not None:
        return (float(score.ci95[0]), float(score.ci95[1]))
    if score.stderr is not None and math.isfinite(score.stderr):
        return (score.score - 1.96 * score.stderr, score.score + 1.96 * score.stderr)
    return None


def cut_value(scores: Sequence[float], adaptive: int) -> float:
    """The cut between the K = `adaptive` smallest scores and the rest: the midpoint of the
    K-th and (K+1)-th smallest."""
    ranked = sorted(scores)
    return (ranked[adaptive - 1] + ranked[adaptive]) / 2


def settled(score: LayerScore, cut: float) -> bool:
    """Whether the score's 95% interval lies entirely on one side of `cut` (more documents
    would not move it across); a score without an interval never settles."""
    bounds = interval(score)
    return bounds is not None and (bounds[1] < cut or bounds[0] > cut)
