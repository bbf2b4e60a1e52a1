"""What an evaluation is asked (`EvalSettings`) and what it answers per task (`TaskScore`,
with its per-document `DocOutcomes`).

Torch-free and lm-eval-free: the CLI, the recipe schema and the cache can build and
compare settings without loading any model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from prune.defaults import EVAL_BATCH_SIZE, SEED
from prune.errors import PruneError


@dataclass(frozen=True)
class EvalSettings:
    """The tasks to score and how; every field that can change a score is part of the cache key.

    `limit` keeps the first N documents of each task (in lm-eval's order). `task_metric`
    chooses the score reported per task ("acc", "acc_norm", ...); None means the task's
    headline metric, i.e. the first higher-is-better metric lm-eval lists for it.
    """

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int = 0
    batch_size: int = EVAL_BATCH_SIZE
    task_metric: str | None = None
    data_dir: str | None = None
    include_path: str | None = None
    seed: int = SEED

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t for t in self.tasks.split(",") if t.strip()))
        else:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise PruneError("no task given (accepted: lm-eval task names, e.g. local_arc_easy)")
        if self.limit is not None and (isinstance(self.limit, bool) or int(self.limit) < 1):
            raise PruneError(
                f"limit {self.limit} is invalid (accepted: an integer >= 1, or no limit)"
            )
        if self.num_fewshot < 0:
            raise PruneError(
                f"num_fewshot {self.num_fewshot} is invalid (accepted: an integer >= 0)"
            )
        if self.batch_size < 1:
            raise PruneError(f"batch size {self.batch_size} is invalid (accepted: an integer >= 1)")


@dataclass
class DocOutcomes:
    """Per-document outcomes of one task evaluation, in lm-eval's document order (parallel lists).

    Two evaluations of the same documents (e.g. the full model and a pruned one) compare
    pairwise through `metric`. Only numbers are kept: no documents or prompts.

    - `values`: each per-document metric value lm-eval logged that is a plain number
      (acc, acc_norm, exact_match, ...; a loglikelihood task's `perplexity` is the
      document's log-likelihood). Metrics logged as tuples (word_perplexity, f1) are left out.
    - `lls`: the log-likelihood of every request of the document, in lm-eval's request
      order: one per choice for multiple choice (then one per unconditional choice for
      acc_mutual_info), one for a loglikelihood task such as LAMBADA.
    - `gold`: the gold choice's index as lm-eval's multiple-choice scoring reads it
      (None for other output types, several gold choices, or an out-of-range label).
    - `choice_lengths`: the divisor acc_norm uses per choice. lm-eval 0.4 divides by
      `len(choice)`, i.e. characters of the choice text without the target delimiter
      (equal to its UTF-8 length for ASCII text; acc_bytes is the one that counts
      bytes), so `argmax(lls / choice_lengths) == gold` reproduces acc_norm. Tasks that
      are not multiple choice get the length of each request's continuation.
    """

    doc_ids: list[int]
    values: dict[str, list[float]]
    lls: list[list[float]]
    gold: list[int | None]
    choice_lengths: list[list[int]]

    def __post_init__(self) -> None:
        n = len(self.doc_ids)
        lengths = {
            "lls": len(self.lls),
            "gold": len(self.gold),
            "choice_lengths": len(self.choice_lengths),
            **{f"values[{k}]": len(v) for k, v in self.values.items()},
        }
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"outcomes of {n} documents have lists of other lengths: {wrong}")

    def metric(self, name: str) -> dict[int, float]:
        """doc_id -> value of the metric `name`; KeyError naming the metrics there are."""
        if name not in self.values:
            raise KeyError(
                f"no per-document values of '{name}' (there are: {', '.join(self.values) or 'none'})"
            )
        return dict(zip(self.doc_ids, self.values[name], strict=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form the result cache stores)."""
        return {
            "doc_ids": list(self.doc_ids),
            "values": {k: list(v) for k, v in self.values.items()},
            "lls": [list(row) for row in self.lls],
            "gold": list(self.gold),
            "choice_lengths": [list(row) for row in self.choice_lengths],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocOutcomes:
        """The outcomes `to_dict` wrote; raises KeyError/ValueError/TypeError on malformed data."""
        return cls(
            doc_ids=[int(i) for i in data["doc_ids"]],
            values={str(k): [float(x) for x in v] for k, v in data["values"].items()},
            lls=[[float(x) for x in row] for row in data["lls"]],
            gold=[None if g is None else int(g) for g in data["gold"]],
            choice_lengths=[[int(x) for x in row] for row in data["choice_lengths"]],
        )


@dataclass
class TaskScore:
    """The score of one task: `value` of `metric` over `n` documents, with lm-eval's stderr.

    `outcomes` holds the per-document results behind the score when an evaluation
    produced them (every lm-eval and fast-engine evaluation of a single task does;
    a group's aggregate row and plain numbers such as a perplexity do not).
    """

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    higher_is_better: bool = True
    outcomes: DocOutcomes | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form the result cache stores)."""
        data = asdict(replace(self, outcomes=None))
        data["outcomes"] = None if self.outcomes is None else self.outcomes.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskScore:
        """The score `to_dict` wrote; raises KeyError/ValueError/TypeError on malformed data."""
        return cls(
            task=str(data["task"]),
            metric=str(data["metric"]),
            value=float(data["value"]),
            stderr=None if data.get("stderr") is None else float(data["stderr"]),
            n=int(data["n"]),
            higher_is_better=bool(data.get("higher_is_better", True)),
            outcomes=(
                None if data.get("outcomes") is None else DocOutcomes.from_dict(data["outcomes"])
            ),
        )
