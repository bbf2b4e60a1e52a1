"""Streaming `prune drop`: a sharded bfloat16 checkpoint is pruned on disk, tensor by tensor.

For every tiny architecture: the kept tensors are bit-identical to the source's under their
renumbered names and stay bfloat16, the index lists every tensor, shards respect
--max-shard-size, config.json equals the one the in-memory path writes, and the result
loads with plain transformers and gives the in-memory pruned model's logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from test_architectures import BLOCK_PREFIX, CASES, NUM_LAYERS
from tiny import byte_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from prune.cli import cli
from prune.export import export_checkpoint
from prune.streaming import stream_drop
from prune.surgery import drop_layers

SHARD = 20_000  # bytes: every tiny model spans several shards


def save_sharded_bf16(folder: Path, model_type: str, num_layers: int = NUM_LAYERS) -> Path:
    """A tiny bfloat16 checkpoint in several shards, with the byte tokenizer."""
    model = tiny_model(model_type, num_layers, seed=1).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=SHARD)
    byte_tokenizer().save_pretrained(folder)
    return folder


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, as stored."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


def _drop(*args) -> object:
    return CliRunner().invoke(cli, ["-q", "drop", *map(str, args)])


@pytest.fixture(autouse=True)
def in_memory_load(monkeypatch):
    """Streaming never loads the model: loading fails loudly while a test runs. Returns the
    real loader, for the in-memory reference."""
    import prune.models

    real = prune.models.load_model

    def refuse(*args, **kwargs):
        raise AssertionError("streaming drop loaded the whole model")

    monkeypatch.setattr(prune.models, "load_model", refuse)
    return real


@pytest.mark.parametrize(("model_type", "layers"), CASES, ids=[c[0] for c in CASES])
def test_streaming_drop_matches_the_in_memory_path(model_type, layers, tmp_path, in_memory_load):
    src = save_sharded_bf16(tmp_path / "src", model_type)
    assert len(list(src.glob("*.safetensors"))) > 1
    out = tmp_path / "out"
    result = _drop(src, "--layers", layers, "--out", out, "--max-shard-size", SHARD)
    assert result.exit_code == 0, result.output
    removed = sorted(int(i) % NUM_LAYERS for i in layers.split(","))
    keep = [i for i in range(NUM_LAYERS) if i not in removed]

    # Kept tensors: bit-identical, bfloat16, under renumbered names; removed blocks gone.
    source, written = read_tensors(src), read_tensors(out)
    prefix = re.escape(BLOCK_PREFIX.get(model_type, "model.layers"))
    block = re.compile(rf"({prefix})\.(\d+)\.(.+)")
    expected = {}
    for name, tensor in source.items():
        match = block.fullmatch(name)
        if match is None:
            expected[name] = tensor
        elif int(match[2]) in keep:
            expected[f"{match[1]}.{keep.index(int(match[2]))}.{match[3]}"] = tensor
    assert sorted(written) == sorted(expected)
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, expected[name]), name

    # The index lists every tensor, in the file that holds it; shards respect the size.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(written)
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            names = list(fh.keys())
            sizes = [fh.get_tensor(k).nbytes for k in names]
        assert {index["weight_map"][k] for k in names} == {file.name}
        assert sum(sizes) <= SHARD or len(names) == 1, file.name
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in written.values())

    # The in-memory path, on the same checkpoint in the same dtype: the same config.json.
    loaded = in_memory_load(str(src), dtype="bfloat16", device="cpu")
    removal = drop_layers(loaded.model, removed)
    mem = export_checkpoint(loaded, tmp_path / "mem", removal.removed, NUM_LAYERS)
    streamed_config = json.loads((out / "config.json").read_text())
    assert streamed_config == json.loads((mem / "config.json").read_text())
    assert streamed_config["dtype"] == "bfloat16"
    record = json.loads((out / "prune.json").read_text())
    in_memory = json.loads((mem / "prune.json").read_text())
    for key in ("removed_layers", "num_layers_before", "num_layers_after", "layer_path"):
        assert record[key] == in_memory[key], key
    assert record["removed_layers_original"] == removed
    assert record["export_dtype"] == in_memory["export_dtype"] == "bfloat16"
    assert record["compute_dtype"] is None and in_memory["compute_dtype"] is None
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as fh:
        assert json.loads(fh.metadata()["prune.removed_layers"]) == removed
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()

    # It loads with plain transformers and computes what the in-memory pruned model does.
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = loaded.model.float().eval()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval()(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4
        )


def test_export_dtype_float32_converts(tmp_path):
    src = save_sharded_bf16(tmp_path / "src", "llama")
    out = tmp_path / "out"
    result = _drop(src, "--layers", "1", "--out", out, "--export-dtype", "float32")
    assert result.exit_code == 0, result.output
    source, written = read_tensors(src), read_tensors(out)
    assert {t.dtype for t in written.values()} == {torch.float32}
    assert torch.equal(
        written["model.layers.1.mlp.up_proj.weight"].bfloat16(),
        source["model.layers.2.mlp.up_proj.weight"],
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "prune.json").read_text())["export_dtype"] == "float32"


def test_stream_drop_writes_extra_files_and_record_fields(tmp_path):
    src = save_sharded_bf16(tmp_path / "src", "llama", num_layers=4)
    files = {"README.md": "# card\n", "mergekit.yaml": b"slices: []\n"}
    record = stream_drop(
        src, tmp_path / "out", [-1], max_shard_size="1GB", extra={"why": "test"}, files=files
    )
    out = tmp_path / "out"
    assert (out / "README.md").read_text() == "# card\n"
    assert (out / "mergekit.yaml").read_bytes() == b"slices: []\n"
    assert (out / "model.safetensors").exists() and not (
        out / "model.safetensors.index.json"
    ).exists()
    assert record == json.loads((out / "prune.json").read_text())
    assert record["removed_layers"] == [3] and record["why"] == "test"
    assert record["export_dtype"] == "bfloat16" and record["compute_dtype"] is None


def test_stream_drop_records_the_compute_dtype_it_is_given(tmp_path):
    # `prune run` evaluated the model in float32; the streamed weights stay bfloat16.
    src = save_sharded_bf16(tmp_path / "src", "llama", num_layers=4)
    record = stream_drop(src, tmp_path / "out", [0], compute_dtype=torch.float32)
    assert record["export_dtype"] == "bfloat16" and record["compute_dtype"] == "float32"
    assert {t.dtype for t in read_tensors(tmp_path / "out").values()} == {torch.bfloat16}


def test_damaged_shard_is_one_error_line(tmp_path):
    src = save_sharded_bf16(tmp_path / "src", "llama")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out"
    result = _drop(src, "--layers", "1", "--out", out)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert str(shard) in errors[0] and "damaged or truncated" in errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
