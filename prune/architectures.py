"""Everything `prune` knows about model architectures, kept as data in one place.

Surgery asks this module where a model keeps its decoder blocks and which config
fields describe one entry per block; nothing else in the package looks at
architecture names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# Dotted attribute paths of the decoder-block list, tried in order. Covers the
# Llama family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, SmolLM, ...),
# multimodal wrappers, OPT, GPT-2/Falcon/BLOOM/GPT-J and GPT-NeoX.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "model.transformer.h",
)

# Config fields holding one entry per block (sliced with the blocks).
PER_LAYER_FIELDS: tuple[str, ...] = (
    "layer_types",
    "no_rope_layers",
    "block_configs",
    "intermediate_sizes",
)

# Config fields holding block *indices* (renumbered; removed ones dropped).
LAYER_INDEX_FIELDS: tuple[str, ...] = ("mlp_only_layers",)

# Attribute names of a block's position-wise feed-forward module (MLP or
# dropless mixture of experts), tried in order. OPT keeps fc1/fc2 inline in the
# block and has none; callers then simply skip what they wanted to do with it.
FEED_FORWARD_ATTRS: tuple[str, ...] = ("mlp", "feed_forward", "block_sparse_moe")

# Model types covered by the test suite (tiny models of each are pruned,
# reloaded and compared). Others work when their blocks sit on a known path.
TESTED_MODEL_TYPES: tuple[str, ...] = (
    "falcon",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "llama",
    "mistral",
    "olmo2",
    "opt",
    "phi3",
    "qwen2",
    "qwen3",
)


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layer_path(model: nn.Module, num_layers: int | None) -> str | None:
    """Return the dotted path of the model's decoder-block ModuleList, or None.

    Known paths come first; the fallback is the longest ModuleList whose length
    matches the config's layer count (the blocks are the only list that long).
    """
    for path in LAYER_PATHS:
        found = _resolve(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            if num_layers is None or len(found) == num_layers:
                return path
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
        if num_layers is None or len(mod) == num_layers
    ]
    if not candidates:
        return None
    # Prefer the shallowest list: nested per-block lists are deeper.
    candidates.sort(key=lambda item: item[0].count("."))
    return candidates[0][0]


# Config settings under which a block's weights or computation depend on its
# index, so a renumbered block would not compute what it did before once the
# checkpoint is reloaded (GPT-2's inverse-index attention scaling; MoE models
# that place sparse blocks every N-th index). Maps field -> "is it in effect?".
INDEX_DEPENDENT_SETTINGS: dict[str, Callable[[Any], bool]] = {
    "scale_attn_by_inverse_layer_idx": bool,
    "decoder_sparse_step": lambda value: isinstance(value, int) and value > 1,
}


def index_dependent_setting(config: Any) -> str | None:
    """The first setting that ties blocks to their index (e.g. 'decoder_sparse_step=2'), or None."""
    for name, in_effect in INDEX_DEPENDENT_SETTINGS.items():
        value = getattr(config, name, None)
        if value is not None and in_effect(value):
            return f"{name}={value!r}"
    return None


def feed_forward_attr(block: nn.Module) -> str | None:
    """The attribute holding `block`'s feed-forward module, or None when it has none we know."""
    for name in FEED_FORWARD_ATTRS:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def supported_list() -> str:
    """The model types to name in an 'unsupported architecture' error."""
    return ", ".join(TESTED_MODEL_TYPES)
