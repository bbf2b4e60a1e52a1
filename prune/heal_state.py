"""The resumable state of an unfinished heal: a work folder beside the output holding the
trainable weights, the optimizer, the RNG states and the progress, saved atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune.atomic import atomic_path
from prune.errors import PruneError

STATE_FILE = "state.pt"
SAVED_KEYS = frozenset(
    {
        "settings",
        "step",
        "losses",
        "seconds",
        "rng",
        "trainable",
        "optimizer",
        "before",
        "tasks_before",
    }
)


class HealStateMismatch(PruneError):
    """The saved state cannot continue this heal (damaged, older, or other settings); only
    starting again helps. Other errors while resuming leave the state as it is."""


@dataclass
class Progress:
    """The training state saved in checkpoints (besides weights and optimizer)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    rng: dict[str, Any] = field(default_factory=dict)


def state_dir_for(out: Path) -> Path:
    """The work folder beside `out` where checkpoints of an unfinished heal live."""
    out = Path(out)
    return out.absolute().parent / f".{out.name}.heal-state"


def trainable_state(model: Any) -> dict[str, Any]:
    """Copies of the parameters that train, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if (
        "cuda" in state
        and torch.cuda.is_available()
        and len(state["cuda"]) == len(torch.cuda.get_rng_state_all())
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_state_dir(state_dir: Path, resume: bool, overwrite: bool) -> None:
    state = state_dir / STATE_FILE
    if resume and not state.is_file():
        raise PruneError(f"nothing to resume: no saved healing state in '{state_dir}'")
    if not resume and state_dir.exists():
        if not overwrite:
            raise PruneError(
                f"an unfinished heal left its state in '{state_dir}' (pass --resume to "
                "continue it, or --overwrite to start again)"
            )
        shutil.rmtree(state_dir)


def load_state(state_dir: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    try:
        saved = torch.load(state_dir / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise HealStateMismatch(
            f"cannot read the saved healing state '{state_dir / STATE_FILE}': {exc} "
            "(pass --overwrite instead of --resume to start again)"
        ) from exc
    if not isinstance(saved, dict) or not SAVED_KEYS <= set(saved):
        raise HealStateMismatch(
            f"the saved healing state '{state_dir / STATE_FILE}' lacks what this version of "
            "prune saves (pass --overwrite instead of --resume to start again)"
        )
    differing = [
        f"{k} {saved['settings'].get(k)!r} -> {v!r}"
        for k, v in fingerprint.items()
        if saved["settings"].get(k) != v
    ]
    if differing:
        raise HealStateMismatch(
            "--resume needs the settings of the interrupted run; these differ: "
            + ", ".join(differing)
            + " (pass --overwrite instead of --resume to start again)"
        )
    return saved


def save_state(state_dir: Path, payload: Mapping[str, Any]) -> None:
    import torch

    state_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(state_dir / STATE_FILE) as tmp:
        torch.save(dict(payload), tmp)
