"""Integration on the embedded real models (slow): GGUF -> cached checkpoint -> drop -> reload -> generate.

The first run converts each GGUF file (SmolLM2 ~5 s, Gemma 3 ~60 s) into the
prune cache; later runs reuse the cached copy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prune.cli import cli
from prune.defaults import EMBEDDED
from prune.models import file_sha256, gguf_checkpoint, resolve_source

pytestmark = pytest.mark.slow


def _cached_checkpoint(name: str) -> tuple[Path, str]:
    """The embedded model's GGUF file, converted (once) into the cache; returns (folder, sha256)."""
    source = resolve_source(name)
    assert source.kind == "embedded"
    assert source.path.endswith(".gguf") and Path(source.path).is_file()
    assert source.sha256 == file_sha256(Path(source.path))
    folder = gguf_checkpoint(Path(source.path), source.sha256)
    config = json.loads((folder / "config.json").read_text())
    # A leftover GGUF marker would make save_pretrained of the pruned model refuse.
    assert "quantization_config" not in config
    assert "quantization_config" not in config.get("text_config", {})
    return folder, source.sha256


def _drop(name: str, layers: str, out: Path) -> dict:
    result = CliRunner().invoke(cli, ["-q", "drop", name, "--layers", layers, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "prune.json").read_text())


def _load(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _greedy(model, ids: torch.Tensor, use_cache: bool, tokens: int) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        use_cache=use_cache,
    )


def _renumbered_reference(cached: Path, removed: list[int]):
    """The cached model's weights in a fresh, shallower model, kept blocks renumbered by hand."""
    original = AutoModelForCausalLM.from_pretrained(cached)
    config = AutoConfig.from_pretrained(cached)
    total = config.num_hidden_layers
    keep = [i for i in range(total) if i not in removed]
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    reference = AutoModelForCausalLM.from_config(config).eval()
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in original.state_dict().items():
        match = re.match(r"^model\.layers\.(\d+)\.(.*)$", key)
        if match is None:
            state[key] = value
        elif int(match[1]) in new_index:
            state[f"model.layers.{new_index[int(match[1])]}.{match[2]}"] = value
    reference.load_state_dict(state, strict=True)
    return reference


def test_smollm2_gguf_drop_reload_generate(tmp_path):
    cached, sha256 = _cached_checkpoint("smollm2-135m")
    out = tmp_path / "smollm2-pruned"
    record = _drop("smollm2-135m", "20,21", out)
    assert record["removed_layers"] == [20, 21]
    assert record["num_layers_before"] == 30 and record["num_layers_after"] == 28
    assert record["source"]["sha256"] == sha256
    assert record["source"]["hub_id"] == EMBEDDED["smollm2-135m"].hub_id
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as fh:
        assert json.loads(fh.metadata()["prune.source"])["sha256"] == sha256

    model = _load(out)
    assert model.config.num_hidden_layers == 28 and len(model.model.layers) == 28
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    cached_run = _greedy(model, ids, use_cache=True, tokens=5)
    assert cached_run.shape[1] == ids.shape[1] + 5
    assert torch.equal(cached_run, _greedy(model, ids, use_cache=False, tokens=5))

    reference = _renumbered_reference(cached, [20, 21])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_gemma3_layer_types_stay_consistent(tmp_path):
    cached, _ = _cached_checkpoint("gemma3-270m")
    types = AutoConfig.from_pretrained(cached).layer_types
    assert len(types) == 18
    sliding, full = types.index("sliding_attention"), types.index("full_attention")
    out = tmp_path / "gemma3-pruned"
    record = _drop("gemma3-270m", f"{sliding},{full}", out)
    assert record["removed_layers"] == sorted([sliding, full])

    model = _load(out)
    expected = [t for i, t in enumerate(types) if i not in (sliding, full)]
    assert model.config.num_hidden_layers == 16
    assert list(model.config.layer_types) == expected
    assert json.loads((out / "config.json").read_text())["layer_types"] == expected
    for i, block in enumerate(model.model.layers):
        attention = block.self_attn
        assert attention.layer_idx == i
        assert attention.layer_type == expected[i]
        assert (attention.sliding_window is not None) == (expected[i] == "sliding_attention")

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    cached_run = _greedy(model, ids, use_cache=True, tokens=5)
    assert torch.equal(cached_run, _greedy(model, ids, use_cache=False, tokens=5))

    # The real window (512) would need a long, slow uncached run: reload with a
    # 16-token window so a short prompt already crosses it on the sliding layers.
    windowed = AutoModelForCausalLM.from_pretrained(out, sliding_window=16).eval()
    ids = torch.randint(10, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    cached_run = _greedy(windowed, ids, use_cache=True, tokens=5)
    assert torch.equal(cached_run, _greedy(windowed, ids, use_cache=False, tokens=5))
