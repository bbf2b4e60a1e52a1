"""Shared fixtures: offline Hub settings, a private prune cache, tiny checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path / "tiny-llama", "llama", num_layers=4)


@pytest.fixture
def data_dir():
    """The shared benchmark data, or skip when this checkout has none beside it."""
    if not (SHARED_DATA / "arc_easy.jsonl").exists():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA
