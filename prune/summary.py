"""Describe a loaded model: architecture, depth, parameters, dtype, where its blocks live."""

from __future__ import annotations

from typing import Any

from prune.models import LoadedModel
from prune.surgery import locate_layers, text_config


def count_parameters(module) -> int:
    """Parameters counted once even when tied (e.g. embeddings and LM head)."""
    seen: set[int] = set()
    total = 0
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def describe_model(loaded: LoadedModel) -> dict[str, Any]:
    """A JSON-ready summary used by `prune info`."""
    model = loaded.model
    stack = locate_layers(model)
    per_block = [count_parameters(block) for block in stack.layers]
    config = text_config(model)
    return {
        "model": loaded.source.spec,
        "source": loaded.source.to_dict(),
        "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(model.config, "model_type", None),
        "num_layers": len(stack),
        "layer_path": stack.path,
        "layer_types": list(getattr(config, "layer_types", None) or []) or None,
        "parameters": count_parameters(model),
        "parameters_per_block": per_block,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": _devices(model),
        # None for a weight-only checkpoint (drop works; rank, compare and run need one).
        "tokenizer": type(loaded.tokenizer).__name__ if loaded.tokenizer is not None else None,
    }


def _devices(model: Any) -> str:
    """The parameters' device, or for a model a device map spread out, every device it uses
    in block order ("cuda:0, cuda:1, cpu")."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return str(next(model.parameters()).device)
    names = (f"cuda:{where}" if isinstance(where, int) else str(where) for where in placed.values())
    return ", ".join(dict.fromkeys(names))
