"""One prune command as several processes (`torchrun -m prune ...`): who we are, and sharing work.

torchrun starts the same command in every process with RANK, WORLD_SIZE and LOCAL_RANK
set. Every process runs the same code on the same inputs, so they take the same
decisions in the same order; only the expensive part, scoring the model with each
candidate set of blocks removed, is split: `share_work` gives candidate i to process
i % size and hands every process all the results, so the greedy loop, adaptive
sampling and the report go on identically everywhere. Process 0 alone prints and
writes files (`is_main`); the others run quietly.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op that imports
nothing, so a plain `prune` never loads torch.distributed. Only Python objects are
exchanged (scores, a few MB at most), over gloo on the CPU; on CUDA the group also
gets NCCL for tensors, and each process uses the GPU of its LOCAL_RANK.
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from prune.errors import PruneError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise PruneError(f"{name}={raw!r} is not a whole number >= {minimum} (torchrun sets it)")
    return value


def world() -> tuple[int, int]:
    """(rank, size) of this process: from torchrun's RANK and WORLD_SIZE, (0, 1) without them."""
    size = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    if rank >= size:
        raise PruneError(f"RANK={rank} is not below WORLD_SIZE={size}")
    return rank, size


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0, or the only process)."""
    return world()[0] == 0


def init() -> bool:
    """Join the process group once (idempotent); False when this is the only process.

    On a machine with CUDA this process takes the GPU of its LOCAL_RANK first, so a model
    loaded on "cuda" afterwards lands on its own GPU.
    """
    rank, size = world()
    if size == 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0, 0) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"  # objects go over gloo (`_get_object_coll_device`)
    dist.init_process_group(backend=backend, rank=rank, world_size=size)
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group (at exit; harmless when never joined)."""
    if world()[1] == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather(local: Any) -> list[Any]:
    """Every process's `local` (any picklable object), in rank order, on every process."""
    rank, size = world()
    if size == 1:
        return [local]
    import torch.distributed as dist

    init()
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, local)
    return gathered


def share_work(items: Sequence[K], compute: Callable[[list[K]], dict[K, V]]) -> dict[K, V]:
    """`compute(items)` with the items split across the processes; every process gets all results.

    Item i goes to process i % size (neighbouring candidates cost about the same, so the
    shares are balanced); `compute` returns item -> result for its share. An exception in
    any process's share is raised in every process (its own where it happened, a copy or
    a PruneError naming the process elsewhere), so no process is left waiting for the
    others and the "auto" engine falls back to lm-eval everywhere at once.
    """
    rank, size = world()
    if size == 1:
        return compute(list(items))
    try:
        outcome: tuple[str, Any] = ("ok", compute(list(items[rank::size])))
        failure: BaseException | None = None
    except Exception as exc:  # noqa: BLE001 - passed on to the other processes, then re-raised
        outcome, failure = ("error", _portable(exc)), exc
    results: dict[K, V] = {}
    raised: list[tuple[int, Any]] = []
    for other, (status, value) in enumerate(gather(outcome)):
        if status == "ok":
            results.update(value)
        else:
            raised.append((other, value))
    if failure is not None:
        raise failure
    if raised:
        other, error = raised[0]
        if isinstance(error, BaseException):
            raise error
        raise PruneError(f"process {other} of {size} failed: {error}")
    return results


def _portable(exc: Exception) -> Any:
    """`exc` itself when it is a PruneError that survives pickling, else its one-line text."""
    if isinstance(exc, PruneError):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001 - a subclass with an unusual constructor
            pass
    return f"{type(exc).__name__}: {exc}"
