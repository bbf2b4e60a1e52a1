"""Export: sharding, provenance (safetensors metadata and prune.json), atomic writes, `prune info`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from tiny import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

import prune.atomic
import prune.export
from prune import __version__
from prune.cli import cli
from prune.drop import drop_and_export
from prune.errors import PruneError
from prune.export import export_checkpoint
from prune.models import load_model
from prune.sizes import parse_size
from prune.surgery import drop_layers

IDS = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "llama", num_layers=4)


def _drop(*args: str):
    return CliRunner().invoke(cli, ["-q", "drop", *args])


def _leftovers(parent, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_sharded_export_loads_and_matches_the_in_memory_model(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = _drop(str(tiny_dir), "--layers", "0,2", "--out", str(out), "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output

    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            assert json.loads(fh.metadata()["prune.removed_layers"]) == [0, 2]
            sizes = [fh.get_tensor(k).nbytes for k in fh.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1  # a tensor larger than a shard gets its own

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert set(index["weight_map"]) == set(reloaded.state_dict())
    loaded = load_model(str(tiny_dir))
    drop_layers(loaded.model, [0, 2])
    torch.testing.assert_close(_logits(reloaded.eval()), _logits(loaded.model), rtol=0, atol=0)


def test_provenance_in_metadata_and_prune_json(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert _drop(str(tiny_dir), "--layers", "1,-1", "--out", str(out)).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "mergekit.yaml",
        "model.safetensors",
        "prune.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt"  # transformers' own marker is kept
    assert json.loads(meta["prune.removed_layers"]) == [1, 3]
    assert meta["prune.version"] == __version__
    assert json.loads(meta["prune.source"]) == {
        "spec": str(tiny_dir),
        "hub_id": None,
        "revision": None,
        "sha256": None,
    }

    record = json.loads((out / "prune.json").read_text())
    assert record["removed_layers"] == [1, 3]
    assert record["num_layers_before"] == 4
    assert record["num_layers_after"] == 2
    assert record["layer_path"] == "model.layers"
    assert record["prune_version"] == __version__
    assert record["source"]["kind"] == "local"
    assert record["source"]["path"] == str(tiny_dir.resolve())
    # Streamed in the source's dtype; a drop runs nothing, so there is no compute dtype.
    assert record["export_dtype"] == "float32" and record["compute_dtype"] is None
    assert datetime.fromisoformat(record["created"]).tzinfo is not None
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_export_checkpoint_writes_extra_record_fields_and_files(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    removal = drop_layers(loaded.model, [2])
    out = tmp_path / "nested" / "out"
    export_checkpoint(
        loaded,
        out,
        removal.removed,
        4,
        extra={"method": "test"},
        files={"README.md": "# card\n", "extra/data.bin": b"\x00\x01"},
    )
    assert (out / "README.md").read_text() == "# card\n"
    assert (out / "extra" / "data.bin").read_bytes() == b"\x00\x01"
    record = json.loads((out / "prune.json").read_text())
    assert record["method"] == "test" and record["removed_layers"] == [2]
    assert record["export_dtype"] == "float32" and record["compute_dtype"] is None
    assert _leftovers(out.parent, "out") == []


def test_export_records_the_compute_dtype_beside_the_export_dtype(tiny_dir, tmp_path):
    # What `prune run` does when it cannot stream: evaluated in float32, written in bfloat16.
    loaded = load_model(str(tiny_dir), dtype="float32")
    removal = drop_layers(loaded.model, [1])
    loaded.model.to(torch.bfloat16)
    out = export_checkpoint(
        loaded, tmp_path / "out", removal.removed, 4, compute_dtype=torch.float32
    )
    record = json.loads((out / "prune.json").read_text())
    assert record["export_dtype"] == "bfloat16" and record["compute_dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "failure", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_failed_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch, failure):
    def explode(folder, record):  # called after the weights are already in the temp folder
        assert (folder / "config.json").exists()
        raise failure

    monkeypatch.setattr(prune.export, "_write_record", explode)
    out = tmp_path / "out"
    with pytest.raises(type(failure)):
        drop_and_export(str(tiny_dir), [1], out)
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []


def test_ctrl_c_through_the_cli(tiny_dir, tmp_path, monkeypatch):
    def interrupt(folder, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune.export, "_write_record", interrupt)
    out = tmp_path / "out"
    result = _drop(str(tiny_dir), "--layers", "1", "--out", str(out))
    assert result.exit_code == 130
    assert result.output.strip() == "Error: interrupted"
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def test_failed_overwrite_keeps_the_old_folder(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def explode(folder, record):
        raise RuntimeError("boom")

    monkeypatch.setattr(prune.export, "_write_record", explode)
    with pytest.raises(RuntimeError):
        drop_and_export(str(tiny_dir), [1], out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_final_rename_puts_the_old_folder_back(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = prune.atomic.os.replace

    def flaky_replace(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".out.tmp-"):  # the final move
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(prune.atomic.os, "replace", flaky_replace)
    with pytest.raises(PruneError, match="cannot write output folder .*No space left on device"):
        drop_and_export(str(tiny_dir), [1], out, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_the_folder(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("stale")
    refused = _drop(str(tiny_dir), "--layers", "1", "--out", str(out))
    assert refused.exit_code == 1 and (out / "stale.txt").exists()

    result = _drop(str(tiny_dir), "--layers", "1", "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "prune.json").read_text())["removed_layers"] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-* / .out.tmp-*


def test_empty_existing_folder_is_reused(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert _drop(str(tiny_dir), "--layers", "1", "--out", str(out)).exit_code == 0
    assert (out / "prune.json").exists()


def test_dtype_option_sets_the_saved_dtype(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = _drop(str(tiny_dir), "--layers", "1", "--out", str(out), "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2 * 10**9),
        ("20KB", 20_000),
        ("5MiB", 5 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("2TB", 2 * 10**12),
        ("1234", 1234),
        (64, 64),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-1KB", "2XB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(PruneError, match=r"bad size .*accepted: a size like 2GB"):
        parse_size(text)


def _record_shard_size(loaded, monkeypatch) -> list:
    """Record the `max_shard_size` that transformers' save_pretrained receives."""
    seen = []
    real = loaded.model.save_pretrained

    def save_pretrained(folder, **kwargs):
        seen.append(kwargs.get("max_shard_size"))
        return real(folder, **kwargs)

    monkeypatch.setattr(loaded.model, "save_pretrained", save_pretrained)
    return seen


def test_fractional_shard_size_exports_one_file(tiny_dir, tmp_path, monkeypatch):
    """transformers cannot parse "1.5GB" itself: it gets the byte count."""
    loaded = load_model(str(tiny_dir))
    seen = _record_shard_size(loaded, monkeypatch)
    removal = drop_layers(loaded.model, [1])
    out = export_checkpoint(loaded, tmp_path / "out", removal.removed, 4, max_shard_size="1.5GB")
    assert seen == [1_500_000_000]
    assert (out / "model.safetensors").exists()
    assert not list(out.glob("model-*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)


def test_byte_count_shard_size_shards(tiny_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_dir))
    seen = _record_shard_size(loaded, monkeypatch)
    removal = drop_layers(loaded.model, [1])
    out = export_checkpoint(loaded, tmp_path / "out", removal.removed, 4, max_shard_size=20_000)
    assert seen == [20_000]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)


def test_drop_accepts_fractional_and_terabyte_shard_sizes(tiny_dir, tmp_path):
    for size in ("1.5GB", "2TB"):
        out = tmp_path / size
        result = _drop(str(tiny_dir), "--layers", "1", "--out", str(out), "--max-shard-size", size)
        assert result.exit_code == 0, result.output
        assert (out / "model.safetensors").exists()


# --- prune info ---------------------------------------------------------------------


def test_info_json_values(tiny_dir):
    result = CliRunner().invoke(cli, ["-q", "info", str(tiny_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert summary["architecture"] == "LlamaForCausalLM"
    assert summary["model_type"] == "llama"
    assert summary["num_layers"] == 4
    assert summary["layer_path"] == "model.layers"
    assert summary["layer_types"] is None
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["parameters_per_block"] == [per_block] * 4
    assert summary["dtype"] == "float32"
    assert summary["device"] == "cpu"
    assert summary["source"]["kind"] == "local"


def test_info_counts_tied_weights_once_and_lists_layer_types(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "gemma", "gemma3_text", num_layers=6)
    result = CliRunner().invoke(cli, ["-q", "info", str(src), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(src)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())  # counts tied once
    pattern = ["sliding_attention", "sliding_attention", "full_attention"]
    assert summary["layer_types"] == pattern * 2

    text = CliRunner().invoke(cli, ["-q", "info", str(src)])
    assert text.exit_code == 0
    assert "layers:        6 at `model.layers`" in text.stdout
    assert "layer types:   full_attention x2, sliding_attention x4" in text.stdout


def test_export_has_ordinary_permissions(tiny_llama_dir, tmp_path):
    """The temp folder is private while written; the published one follows the umask."""
    import os
    import stat

    from click.testing import CliRunner

    from prune.cli import cli

    out = tmp_path / "perm"
    assert (
        CliRunner()
        .invoke(cli, ["drop", str(tiny_llama_dir), "--layers", "1", "--out", str(out)])
        .exit_code
        == 0
    )
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
