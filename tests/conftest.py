"""Shared fixtures: offline Hub settings, a private prune cache, tiny checkpoints, a local Hub."""

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


@pytest.fixture(autouse=True)
def _restore_progress_bars():
    """`prune -q` turns library progress bars off process-wide; turn them back on after each test."""
    yield
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    enable_progress_bars()
    if "datasets" in sys.modules:  # only a command that may read a dataset turned its bars off
        from datasets.utils.logging import enable_progress_bar

        enable_progress_bar()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path / "tiny-llama", "llama", num_layers=4)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh in-memory Hub (tests/hub_server.py) and a client set up to reach it.

    Online for this test, Xet off, no ambient token or endpoint; pass
    `endpoint=hub.url` and `token=hub_server.VALID_TOKEN` to the code under test.
    """
    import huggingface_hub.constants as hub_constants
    from hub_server import HubServer

    # The client reads these at import (HF_HUB_OFFLINE=1 is set above): patch the constants.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "stored-token"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def data_dir():
    """The shared benchmark data, or skip when this checkout has none beside it."""
    if not (SHARED_DATA / "arc_easy.jsonl").exists():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models spend their time in thread synchronisation: one thread is faster.

    Slow tests (real models) keep torch's default.
    """
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
