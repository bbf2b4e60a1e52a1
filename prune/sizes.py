"""Parse byte sizes such as `2GB`, `500MB`, `1.5GiB` or `2000000`: one parser for the recipe
schema, `prune drop --max-shard-size` and the export, so what validation accepts, the export
accepts (the export hands the byte count to transformers, never the text)."""

from __future__ import annotations

import re

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
