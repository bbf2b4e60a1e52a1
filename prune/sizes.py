"""Parse byte sizes such as `2GB`, `500MB`, `1.5GiB` or `2000000`: one parser for the recipe
schema, `prune drop --max-shard-size` and the export, so what validation accepts, the export
accepts (the export hands the byte count to transformers, never the text). `parse_max_memory`
reads `--max-memory` (and a recipe's `max_memory`) with it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from prune.errors import PruneError

UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
ACCEPTED = "a size like 2GB, 500MB or 1.5GiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) or a number of bytes, above 0"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes in `size`; PruneError naming the value and what is accepted on anything else."""
    if isinstance(size, bool):
        raise PruneError(f"bad size {size!r} (accepted: {ACCEPTED})")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(str(size).strip())
        unit = match.group(2).lower() if match else None
        if match is None or (unit and unit not in UNITS):
            raise PruneError(f"bad size {size!r} (accepted: {ACCEPTED})")
        value = int(float(match.group(1)) * UNITS[unit or "b"])
    if value <= 0:
        raise PruneError(f"bad size {size!r} (accepted: {ACCEPTED})")
    return value


MAX_MEMORY_ACCEPTED = (
    "DEVICE=SIZE pairs separated by commas, e.g. 0=20GiB,1=20GiB,cpu=64GiB: DEVICE a GPU "
    "index (0, 1, ...), cpu, mps or disk; SIZE like 20GiB, 500MB or a number of bytes"
)
_MEMORY_DEVICES = ("cpu", "mps", "disk")


def parse_max_memory(value: str | Mapping[Any, Any], name: str = "max_memory") -> dict:
    """The memory each device may hold, as accelerate's `max_memory` wants it: GPU indices as
    ints, "cpu"/"mps"/"disk" as text, sizes in bytes.

    `value` is the CLI's text (`0=20GiB,cpu=64GiB`) or a recipe's mapping (`{0: 20GiB}`; YAML
    keys may arrive as text). PruneError naming the bad entry and the accepted form.
    """
    if isinstance(value, Mapping):
        entries = [(str(key), raw, f"{key}: {raw}") for key, raw in value.items()]
    elif isinstance(value, str):
        entries = []
        for entry in value.split(","):
            key, sep, raw = entry.partition("=")
            entries.append((key, raw if sep else None, entry))
    else:
        raise PruneError(f"{name}: bad value {value!r} (accepted: {MAX_MEMORY_ACCEPTED})")
    parsed: dict[int | str, int] = {}
    for key, raw, entry in entries:
        device = key.strip().lower().removeprefix("cuda:")
        if device.isdigit():
            device = int(device)
        try:
            if raw is None or not (isinstance(device, int) or device in _MEMORY_DEVICES):
                raise PruneError(entry)
            size = parse_size(raw.strip() if isinstance(raw, str) else raw)
        except PruneError:
            raise PruneError(
                f"{name}: bad entry {entry.strip()!r} (accepted: {MAX_MEMORY_ACCEPTED})"
            ) from None
        if device in parsed:
            raise PruneError(f"{name}: device {key.strip()!r} is given twice")
        parsed[device] = size
    if not parsed:
        raise PruneError(f"{name}: bad value {value!r} (accepted: {MAX_MEMORY_ACCEPTED})")
    return parsed
