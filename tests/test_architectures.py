"""Every supported architecture: drop two blocks through the CLI, reload from disk, compare.

The reference is built without prune's surgery: a fresh model from a config with
fewer layers, loaded with the original weights whose kept blocks are renumbered
by hand. The exported checkpoint must load with plain transformers (no missing
or unexpected keys), match the reference's logits, and generate the same text
with and without the KV cache.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from tiny import save_tiny_checkpoint, tiny_config
from transformers import AutoModelForCausalLM

from prune.cli import cli
from prune.surgery import drop_layers

NUM_LAYERS = 6

# Where each architecture keeps its blocks in the state dict (written out here on
# purpose, independently of prune.architectures).
BLOCK_PREFIX = {
    "gpt2": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}

# (model_type, --layers): the Gemma ones drop one sliding and one full-attention layer.
CASES = [
    ("llama", "1,-2"),
    ("mistral", "1,-2"),
    ("qwen2", "1,-2"),
    ("qwen3", "1,-2"),
    ("gemma2", "1,-2"),
    ("gemma3_text", "1,-1"),
    ("phi3", "1,-2"),
    ("olmo2", "1,-2"),
    ("gpt2", "1,-2"),
    ("gpt_neox", "1,-2"),
    ("opt", "1,-2"),
    ("falcon", "1,-2"),
]


def _removed(spec: str) -> list[int]:
    return sorted(int(i) % NUM_LAYERS for i in spec.split(","))


def _reference_model(model_type: str, original, removed: list[int]):
    """A fresh smaller model holding the original weights of the kept blocks, renumbered."""
    keep = [i for i in range(NUM_LAYERS) if i not in removed]
    overrides = {}
    layer_types = getattr(original.config, "layer_types", None)
    if layer_types is not None:
        overrides["layer_types"] = [layer_types[i] for i in keep]
    reference = AutoModelForCausalLM.from_config(
        tiny_config(model_type, len(keep), **overrides)
    ).eval()

    prefix = re.escape(BLOCK_PREFIX.get(model_type, "model.layers"))
    pattern = re.compile(rf"^({prefix})\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in original.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match[2]) in new_index:
            state[f"{match[1]}.{new_index[int(match[2])]}.{match[3]}"] = value
    reference.load_state_dict(state, strict=True)
    return reference


def _greedy(model, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        use_cache=use_cache,
        pad_token_id=0,
    )


def _layer_indices(model) -> list[list[int]]:
    """The `layer_idx` values found inside each block, in block order."""
    blocks = model.get_submodule(BLOCK_PREFIX.get(model.config.model_type, "model.layers"))
    return [
        sorted(
            {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        )
        for block in blocks
    ]


@pytest.mark.parametrize(("model_type", "layers"), CASES, ids=[c[0] for c in CASES])
def test_drop_two_layers_through_cli(model_type, layers, tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src", model_type, num_layers=NUM_LAYERS, seed=1)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["drop", str(src), "--layers", layers, "--out", str(out)])
    assert result.exit_code == 0, result.output
    removed = _removed(layers)
    kept = NUM_LAYERS - len(removed)

    original = AutoModelForCausalLM.from_pretrained(src).eval()
    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    pruned.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys")
    assert pruned.config.num_hidden_layers == kept
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk.get("num_hidden_layers", on_disk.get("n_layer")) == kept
    assert len(pruned.get_submodule(BLOCK_PREFIX.get(model_type, "model.layers"))) == kept
    assert json.loads((out / "prune.json").read_text())["removed_layers"] == removed

    layer_types = getattr(original.config, "layer_types", None)
    if layer_types is not None:
        expected_types = [t for i, t in enumerate(layer_types) if i not in removed]
        assert list(pruned.config.layer_types) == expected_types
        assert on_disk["layer_types"] == expected_types
        if model_type.startswith("gemma"):
            assert {layer_types[i] for i in removed} == {"sliding_attention", "full_attention"}

    reference = _reference_model(model_type, original, removed)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(pruned(ids).logits, expected, rtol=1e-5, atol=1e-5)

    prompt = ids[:1]
    cached = _greedy(pruned, prompt, use_cache=True)
    assert cached.shape[1] == prompt.shape[1] + 8
    assert torch.equal(cached, _greedy(pruned, prompt, use_cache=False))
    assert torch.equal(cached, _greedy(reference, prompt, use_cache=True))

    # The same surgery in memory: layer_idx renumbered 0..n-1, same logits and generation.
    drop_layers(original, removed)
    assert _layer_indices(original) == [[i] for i in range(kept)]
    assert _layer_indices(pruned) == [[i] for i in range(kept)]
    with torch.no_grad():
        torch.testing.assert_close(original(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(_greedy(original, prompt, use_cache=True), cached)
