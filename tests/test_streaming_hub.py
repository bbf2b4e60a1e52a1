"""Streaming `prune drop` of a Hub id, against the local Hub server (tests/hub_server.py).

The repo holds a sharded bfloat16 checkpoint plus weights in other formats (a .gguf and a
pytorch_model.bin of junk). `prune drop <repo id>` must fetch only the small files and
the safetensors shards into the Hugging Face cache, prune them on disk (the model is never
loaded), and write what the in-memory path writes; offline it reads the cache; a repo that
does not exist or a failed download is one `Error:` line and no output folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from click.testing import CliRunner
from hub_server import USER, Blob
from test_streaming import read_tensors, save_sharded_bf16
from transformers import AutoModelForCausalLM

import prune.models
import prune.streaming
from prune.cli import cli

SHARD = 20_000  # bytes: the tiny model spans several shards
JUNK = {"model.gguf": 3 * 2**20, "pytorch_model.bin": 2**20}  # other formats, never fetched
CARD = "---\nlicense: apache-2.0\n---\n# tiny\n"
LFS = (".safetensors", ".gguf", ".bin")


def publish(hub, folder: Path, repo_id: str, extra: dict[str, bytes] | None = None) -> str:
    """Commit every file of `folder` (and `extra`) to `repo_id` on the server; the commit id."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    files.update(extra or {})
    state = hub.state
    with state.lock:
        if repo_id not in state.repos:
            state.create_repo(repo_id, USER)
        target = state.repos[repo_id]
        blobs = {**target.commit(target.branches["main"]).files}
        blobs.update({name: Blob(data, lfs=name.endswith(LFS)) for name, data in files.items()})
        commit = state.new_commit(target, target.branches["main"], blobs, "upload")
        target.branches["main"] = commit.oid
    return commit.oid


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """The server as the Hub of this test (HF_ENDPOINT), and a private Hugging Face cache."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        hub_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return hub


@pytest.fixture
def repo(request) -> str:
    """A repo id of this test's own: transformers remembers which commit a repo id's main
    was, process-wide, and each test has a new server."""
    return f"{USER}/" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:80]


@pytest.fixture
def source(online, repo, tmp_path):
    """A tiny sharded bfloat16 Llama with a card and junk weights, published as `repo`."""
    folder = save_sharded_bf16(tmp_path / "src", "llama", num_layers=4)
    assert len(list(folder.glob("*.safetensors"))) > 1
    junk = {name: bytes(size) for name, size in JUNK.items()}
    publish(online, folder, repo, extra={**junk, "README.md": CARD.encode()})
    return folder


def drop(*args) -> object:
    return CliRunner().invoke(cli, ["-q", "drop", *map(str, args)])


def error_line(result) -> str:
    """Exactly one `Error: ...` line, a non-zero exit code, no traceback."""
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def requested(hub, repo_id: str) -> list[str]:
    """The files of `repo_id` the client asked the server for (HEAD or GET of /resolve/)."""
    prefix = f"/{repo_id}/resolve/"
    return sorted(
        {
            path[len(prefix) :].split("/", 1)[1]
            for _, path in hub.requests
            if path.startswith(prefix)
        }
    )


def test_hub_id_streams_only_the_safetensors_files(online, repo, source, tmp_path, monkeypatch):
    monkeypatch.setattr(prune.models, "load_model", _refuse)
    out = tmp_path / "out"
    result = drop(repo, "--layers", "1,2", "--out", out, "--max-shard-size", SHARD)
    assert result.exit_code == 0, result.output

    # Only the small files and the shards were asked for; no other weights reached the cache.
    fetched = requested(online, repo)
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert set(shards) <= set(fetched)
    assert not set(JUNK) & set(fetched), fetched
    assert all(name.endswith((".json", ".safetensors", ".md")) for name in fetched), fetched
    cached = {p.name for p in (tmp_path / "hf-cache").rglob("*") if p.is_file()}
    assert not set(JUNK) & cached

    # Kept tensors bit-identical and bfloat16 under renumbered names; blocks 1 and 2 gone.
    src, written = read_tensors(source), read_tensors(out)
    renamed = {0: 0, 3: 1}
    expected = {}
    for name, tensor in src.items():
        if not name.startswith("model.layers."):
            expected[name] = tensor
        elif (i := int(name.split(".")[2])) in renamed:
            expected[name.replace(f"layers.{i}.", f"layers.{renamed[i]}.", 1)] = tensor
    assert sorted(written) == sorted(expected)
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, expected[name]), name

    # prune.json: the Hub source at the commit read, both dtypes; the card says them too.
    record = json.loads((out / "prune.json").read_text())
    assert record["source"] == {
        "spec": repo,
        "kind": "hub",
        "path": None,
        "hub_id": repo,
        "revision": online.head(repo),
        "sha256": None,
        "license": None,
    }
    assert record["removed_layers"] == [1, 2] and record["num_layers_after"] == 2
    assert record["export_dtype"] == "bfloat16" and record["compute_dtype"] is None
    card = (out / "README.md").read_text()
    assert "Weights stored in bfloat16" in card and "`compute_dtype` is null" in card
    assert (out / "tokenizer.json").is_file() and not (out / "model.gguf").exists()

    # It loads with plain transformers.
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.bfloat16


def test_config_equals_the_in_memory_path(online, repo, source, tmp_path, monkeypatch):
    streamed = tmp_path / "streamed"
    assert drop(repo, "--layers", "1", "--out", streamed).exit_code == 0
    calls = []
    real = prune.models.load_model

    def load(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(prune.models, "load_model", load)
    monkeypatch.setattr(prune.streaming, "stream_drop_source", lambda *a, **k: None)
    in_memory = tmp_path / "in-memory"
    result = drop(repo, "--layers", "1", "--out", in_memory)
    assert result.exit_code == 0, result.output
    assert calls  # the reference really loaded the model

    config = json.loads((streamed / "config.json").read_text())
    assert config == json.loads((in_memory / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == 3
    record = json.loads((streamed / "prune.json").read_text())
    reference = json.loads((in_memory / "prune.json").read_text())
    for key in ("source", "removed_layers", "layer_path", "export_dtype", "compute_dtype"):
        assert record[key] == reference[key], key
    written, loaded = read_tensors(streamed), read_tensors(in_memory)
    assert sorted(written) == sorted(loaded)
    assert all(torch.equal(written[name], loaded[name]) for name in written)


def test_offline_reads_the_cache(online, repo, source, tmp_path, monkeypatch):
    monkeypatch.setattr(prune.models, "load_model", _refuse)
    assert drop(repo, "--layers", "0", "--out", tmp_path / "first").exit_code == 0
    before = len(online.requests)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    result = drop(repo, "--layers", "0", "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert len(online.requests) == before  # not one request
    assert read_tensors(tmp_path / "again").keys() == read_tensors(tmp_path / "first").keys()


def test_offline_without_the_cache_is_one_error_line(online, repo, source, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    line = error_line(drop(repo, "--layers", "0", "--out", out))
    assert f"'{repo}'" in line
    assert online.requests == [] and not out.exists()


def test_missing_repo_is_one_error_line(online, tmp_path):
    out = tmp_path / "out"
    line = error_line(drop(f"{USER}/no-such-model", "--layers", "1", "--out", out))
    assert f"'{USER}/no-such-model'" in line
    assert not out.exists()


def test_failed_download_is_one_error_line_and_a_rerun_finishes(
    online, repo, source, tmp_path, monkeypatch
):
    monkeypatch.setattr(prune.models, "load_model", _refuse)
    shard = sorted(p.name for p in source.glob("*.safetensors"))[1]
    online.fail("GET", rf"/resolve/[^/]+/{shard}$", status=500, times=100)
    out = tmp_path / "out"
    line = error_line(drop(repo, "--layers", "1", "--out", out))
    assert line.startswith(
        f"Error: cannot download the weights of model '{repo}' from {online.url}"
    )
    assert "500" in line and "nothing was written" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    online.state.faults.clear()
    result = drop(repo, "--layers", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "prune.json").read_text())["removed_layers"] == [1]


def test_repo_without_safetensors_is_loaded_instead(online, repo, tmp_path):
    from tiny import byte_tokenizer, tiny_model

    folder = tmp_path / "bin"
    model = tiny_model("llama", 4)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the only weights
    byte_tokenizer().save_pretrained(folder)
    publish(online, folder, repo)
    out = tmp_path / "out"
    result = drop(repo, "--layers", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def _refuse(*args, **kwargs):
    raise AssertionError("streaming drop loaded the whole model")
