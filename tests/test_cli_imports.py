"""`prune --help` and `prune validate` start without torch: checked in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lm_eval")
# `-X importtime` writes one stderr line per module: "import time: self | cumulative | name".
IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s+(\S+)$")


def _imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "prune", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    names = {m.group(1) for line in done.stderr.splitlines() if (m := IMPORT_LINE.match(line))}
    assert "prune.cli" in names, done.stderr[-2000:]  # the importtime output was read
    return done, names


def _heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def test_help_imports_no_torch():
    done, names = _imported_modules("--help")
    assert done.returncode == 0
    assert "Usage: prune" in done.stdout
    assert _heavy(names) == []


def test_rank_help_lists_the_registered_measures_without_torch():
    from prune.measures import measure_names

    done, names = _imported_modules("rank", "--help")
    assert done.returncode == 0
    assert "[" + "|".join(measure_names()) + "]" in done.stdout
    assert _heavy(names) == []


def test_validate_imports_no_torch():
    done, names = _imported_modules("validate", "recipes/smollm2-135m.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "recipes/smollm2-135m.yaml: OK" in done.stdout
    assert _heavy(names) == []
