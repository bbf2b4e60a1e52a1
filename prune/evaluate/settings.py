"""What an evaluation is asked (`EvalSettings`) and what it answers per task (`TaskScore`).

Torch-free and lm-eval-free: the CLI, the recipe schema and the cache can build and
compare settings without loading any model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
class TaskScore:
    """The score of one task: `value` of `metric` over `n` documents, with lm-eval's stderr."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form the result cache stores)."""
        return asdict(self)

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
        )
