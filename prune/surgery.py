"""Find a model's decoder blocks and remove some of them, in place, without copying weights.

After `drop_layers` the model is a complete, smaller model: the block list is
shorter, `num_hidden_layers` (or its alias, e.g. GPT-2's `n_layer`) and every
per-block config list (`layer_types`, ...) match it, and each attention module's
`layer_idx` is renumbered so KV caches line up. `layers_removed` does the same
temporarily and restores the model afterwards (for ranking candidates).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prune.architectures import (
    LAYER_INDEX_FIELDS,
    PER_LAYER_FIELDS,
    find_layer_path,
    index_dependent_setting,
    supported_list,
)
from prune.errors import PruneError


def text_config(model: nn.Module) -> Any:
    """The config that describes the decoder stack (the text config of multimodal models)."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    if getter is not None:
        try:
            return getter(decoder=True)
        except TypeError:
            return getter()
    return config


def _config_layer_count(model: nn.Module) -> int | None:
    count = getattr(text_config(model), "num_hidden_layers", None)
    return count if isinstance(count, int) else None


@dataclass
class LayerStack:
    """Where a model keeps its decoder blocks."""

    path: str
    parent: nn.Module
    attr: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)


def locate_layers(model: nn.Module) -> LayerStack:
    """Find the decoder-block list of a causal LM, or raise PruneError naming the supported ones."""
    config = getattr(model, "config", None)
    if config is None:
        raise PruneError(
            f"unsupported model '{type(model).__name__}': not a transformers model (no config); "
            f"supported types include {supported_list()}"
        )
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise PruneError(
            f"unsupported architecture '{model_type}': encoder-decoder models are not "
            f"supported; supported decoder-only types include {supported_list()}"
        )
    num_layers = _config_layer_count(model)
    if num_layers is None:
        raise PruneError(
            f"unsupported architecture '{model_type}': its config has no num_hidden_layers; "
            f"supported types include {supported_list()}"
        )
    path = find_layer_path(model, num_layers)
    if path is None:
        raise PruneError(
            f"unsupported architecture '{model_type}': no decoder-block list found; "
            f"supported types include {supported_list()}"
        )
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return LayerStack(path=path, parent=parent, attr=attr, layers=getattr(parent, attr))


def normalize_indices(indices: Iterable[int], num_layers: int) -> list[int]:
    """Validate layer indices (negatives count from the end) and return them sorted.

    Raises PruneError for out-of-range or duplicate indices and for removing every layer.
    """
    seen: dict[int, int] = {}
    for raw in indices:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise PruneError(f"layer index {raw!r} is not an integer")
        if not -num_layers <= raw < num_layers:
            raise PruneError(
                f"layer index {raw} is out of range: the model has {num_layers} layers "
                f"(accepted: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)"
            )
        norm = raw % num_layers
        if norm in seen:
            raise PruneError(f"layer {norm} is given twice (as {seen[norm]} and {raw})")
        seen[norm] = raw
    result = sorted(seen)
    if len(result) >= num_layers:
        raise PruneError(
            f"cannot remove all {num_layers} layers: at least one must remain "
            f"(remove at most {num_layers - 1})"
        )
    return result


_LAYER_FORMS = "use e.g. 3,7,12 or 20-23; negatives count from the end, as in -1 or -3--1"


def parse_layer_list(text: str) -> list[int]:
    """Parse '3,7,12' or '20-23' (inclusive ranges) into integers; PruneError on bad text.

    A range's ends must both count from the start or both from the end (-3--1), smaller
    first: '-1-3' would wrap round the stack and '5-3' runs backwards, so both are refused.
    """
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise PruneError(f"bad --layers value {text!r}: empty item ({_LAYER_FORMS})")
        try:
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                first, last = int(lo), int(hi)
            else:
                out.append(int(part))
                continue
        except ValueError:
            raise PruneError(
                f"bad --layers value {text!r}: {part!r} is not an index or range ({_LAYER_FORMS})"
            ) from None
        if (first < 0) != (last < 0):
            raise PruneError(
                f"bad --layers value {text!r}: range {part!r} mixes an index from the start "
                f"with one from the end, which would wrap round the stack ({_LAYER_FORMS})"
            )
        if last < first:
            raise PruneError(
                f"bad --layers value {text!r}: {part!r} is not an index or range: it runs "
                f"backwards; put the smaller end first ({_LAYER_FORMS})"
            )
        out.extend(range(first, last + 1))
    return out


@dataclass
class Removal:
    """What `drop_layers` changed, so `restore_layers` can undo it exactly."""

    removed: list[int]
    old_layers: nn.ModuleList
    old_config: dict[str, Any] = field(default_factory=dict)
    old_layer_idx: list[tuple[nn.Module, int]] = field(default_factory=list)


def _renumber(layers: Sequence[nn.Module]) -> list[tuple[nn.Module, int]]:
    """Set every `layer_idx` inside block i to i; return the old values."""
    changed = []
    for new_idx, block in enumerate(layers):
        for module in block.modules():
            old = getattr(module, "layer_idx", None)
            if isinstance(old, int) and not isinstance(old, bool) and old != new_idx:
                changed.append((module, old))
                module.layer_idx = new_idx
    return changed


def retarget_config(config: Any, origin: list[int]) -> dict[str, Any]:
    """Make the config describe a block list whose block i is original block `origin[i]`.

    Sets the layer count, slices per-layer fields and renumbers layer-index fields
    (dropping indices no longer present); returns the old values for `restore_config`.
    """
    total = config.num_hidden_layers
    position = {orig: new for new, orig in enumerate(origin)}
    old: dict[str, Any] = {"num_hidden_layers": total}
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            old[name] = value
    for name in LAYER_INDEX_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            old[name] = value
    config.num_hidden_layers = len(origin)
    for name in PER_LAYER_FIELDS:
        if name in old:
            setattr(config, name, [old[name][i] for i in origin])
    for name in LAYER_INDEX_FIELDS:
        if name in old:
            setattr(config, name, [position[i] for i in old[name] if i in position])
    return old


def restore_config(config: Any, old: dict[str, Any]) -> None:
    """Undo `retarget_config`."""
    for name, value in old.items():
        setattr(config, name, value)


def drop_layers(model: nn.Module, indices: Iterable[int]) -> Removal:
    """Remove the given blocks from `model` in place (no weight copies) and return an undo record."""
    stack = locate_layers(model)
    removed = normalize_indices(list(indices), len(stack))
    setting = index_dependent_setting(text_config(model))
    if setting is not None:
        raise PruneError(
            f"cannot remove layers from this '{model.config.model_type}' model: with {setting} "
            "a block computes differently at another index, so the result would not match"
        )
    removed_set = set(removed)
    keep = [i for i in range(len(stack)) if i not in removed_set]
    new_layers = nn.ModuleList([stack.layers[i] for i in keep])
    setattr(stack.parent, stack.attr, new_layers)
    old_config = retarget_config(text_config(model), keep)
    old_idx = _renumber(new_layers)
    return Removal(removed, stack.layers, old_config, old_idx)


def restore_layers(model: nn.Module, removal: Removal) -> None:
    """Undo `drop_layers`: put the original block list, config and layer indices back."""
    stack = locate_layers_for_restore(model, len(removal.old_layers) - len(removal.removed))
    setattr(stack[0], stack[1], removal.old_layers)
    restore_config(text_config(model), removal.old_config)
    for module, old in removal.old_layer_idx:
        module.layer_idx = old


def locate_layers_for_restore(model: nn.Module, current: int) -> tuple[nn.Module, str]:
    stack = locate_layers(model)
    if len(stack) != current:
        raise PruneError(f"model changed since layers were removed ({len(stack)} != {current})")
    return stack.parent, stack.attr


@contextmanager
def layers_removed(model: nn.Module, indices: Iterable[int]) -> Iterator[list[int]]:
    """Temporarily remove blocks; yields the normalized removed indices, restores on exit."""
    removal = drop_layers(model, indices)
    try:
        yield removal.removed
    finally:
        restore_layers(model, removal)


def count_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(locate_layers(model))
