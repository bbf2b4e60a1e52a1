"""The on-disk result cache: one small JSON file per (model, removed blocks, task, settings, engine).

Interrupted runs resume from it and repeated runs are instant. `model_fingerprint`
identifies the weights a score belongs to; `ResultCache.key` folds everything that
can change a score into a file name. Writes go through `prune.atomic.write_file`, so
a reader never sees half an entry; an unreadable entry counts as missing, and a cache
that cannot be written (full disk, no permission) is a warning, never a lost result.

Importing this module loads no torch (only `model_fingerprint` needs it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prune import __version__
from prune.atomic import write_file
from prune.defaults import cache_root
from prune.errors import PruneError
from prune.evaluate.settings import EvalSettings, TaskScore

log = logging.getLogger(__name__)

# Bump when a change alters scores or what a score entry holds, so old entries are not
# reused: the version is part of every key, and score entries also carry it and are read
# only when it matches. 2: scores carry per-document outcomes (`TaskScore.outcomes`).
CACHE_VERSION = 2


def model_fingerprint(loaded: Any) -> str:
    """A stable id of the weights as they are now (source, dtype, block list).

    With a known source: its fingerprint, the dtype, the layer count and a small
    sample of every block's weights (so two models pruned differently from the same
    source differ). Without one (tests, in-memory models): a hash of all parameters.
    """
    import torch

    from prune.surgery import count_layers, locate_layers

    model = getattr(loaded, "model", loaded)
    source = getattr(loaded, "source", None)
    digest = hashlib.sha256()
    dtype = next(model.parameters()).dtype
    digest.update(f"{dtype}|{count_layers(model)}".encode())
    if source is not None and getattr(source, "fingerprint", None):
        digest.update(source.fingerprint.encode())
        for block in locate_layers(model).layers:
            for name, param in block.named_parameters():
                flat = param.detach().reshape(-1)
                sample = torch.cat([flat[:8], flat[-8:], flat[:: max(1, flat.numel() // 16)][:16]])
                digest.update(name.encode() + sample.float().cpu().numpy().tobytes())
    else:
        for name, param in model.named_parameters():
            digest.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


class ResultCache:
    """Scores and other JSON values under `root` (default: `cache_root()/results`), by key.

    Entries are written atomically; an unreadable or malformed entry reads as missing
    (with a warning) and the next write replaces it. A score entry written by another
    `CACHE_VERSION` (e.g. one from before scores carried per-document outcomes) reads as
    missing too, so it is recomputed rather than misread. A write that fails (full disk, no
    permission) is skipped with one warning per cache folder: the caller keeps its result.
    """

    # The cache folders a write already failed in (warned about once per process).
    _unwritable: set[Path] = set()

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "results"

    @staticmethod
    def key(
        fingerprint: str, removed: Sequence[int], task: str, settings: EvalSettings, engine: str
    ) -> str:
        """The entry name of one task's score for the model `fingerprint` minus `removed`."""
        payload = {
            "model": fingerprint,
            "removed": sorted(int(i) for i in removed),
            "task": task,
            "limit": settings.limit,
            "num_fewshot": settings.num_fewshot,
            "seed": settings.seed,
            "metric": settings.task_metric,
            "engine": engine,
            "data_dir": settings.data_dir,
            "include_path": settings.include_path,
            "code": f"{__version__}/{CACHE_VERSION}",
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        """Where the entry `key` lives (entries are spread over 256 folders)."""
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> TaskScore | None:
        """The score stored under `key` with `put`; None when missing or corrupt."""
        data = self._read(key)
        if data is None:
            return None
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            log.debug("ignoring cache entry %s of another format version", self.path(key))
            return None
        try:
            return TaskScore.from_dict(data["score"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring corrupt cache entry %s (%s)", self.path(key), exc)
            return None

    def put(self, key: str, score: TaskScore, meta: dict[str, Any] | None = None) -> None:
        """Store `score` under `key`, with `meta` (what produced it) for people reading the file."""
        entry = {"version": CACHE_VERSION, "score": score.to_dict(), "meta": meta or {}}
        self._write(key, json.dumps(entry, separators=(",", ":")))

    def get_json(self, key: str) -> Any | None:
        """Any JSON value stored with `put_json` (None when missing or corrupt)."""
        data = self._read(key)
        if data is None:
            return None
        try:
            return data["value"]
        except (KeyError, TypeError) as exc:
            log.warning("ignoring corrupt cache entry %s (%s)", self.path(key), exc)
            return None

    def put_json(self, key: str, value: Any) -> None:
        """Store any JSON value under `key`."""
        self._write(key, json.dumps({"value": value}))

    def get_value(self, key: str) -> float | None:
        """A cached plain number (e.g. a perplexity), stored as a TaskScore."""
        score = self.get(key)
        return None if score is None else score.value

    def _write(self, key: str, text: str) -> None:
        """Write one entry; a failure is a warning (once per cache folder), not an error."""
        try:
            write_file(self.path(key), text)
        except (PruneError, OSError) as exc:
            root = self.root.absolute()
            if root not in ResultCache._unwritable:
                ResultCache._unwritable.add(root)
                log.warning(
                    "cannot write the result cache at %s (%s): results are kept for this run "
                    "but not cached (an interrupted run will recompute them)",
                    self.root,
                    _reason(exc),
                )

    def _read(self, key: str) -> Any | None:
        """The parsed entry; None when it does not exist or is not JSON (the latter with a warning)."""
        path = self.path(key)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring corrupt cache entry %s (%s)", path, exc)
            return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).rsplit(": ", 1)[-1]  # write_error's "cannot write file '...': REASON"
