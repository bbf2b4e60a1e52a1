"""Fault table for damaged inputs: each row damages a tiny checkpoint (or another input) in one
way and drives the real CLI; the run must end in one `Error:` line naming the offending thing,
without a traceback, and write nothing at --out (no folder, no hidden temporary beside it).

Also: a damaged cached GGUF conversion repairs itself, and says what to delete when it cannot.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import save_tiny_checkpoint

from prune.cli import cli

WEIGHTS = "model.safetensors"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A good 3-layer tiny llama (tied embeddings), copied by each row before damaging it."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "llama", num_layers=3)


def _edit_tensors(folder: Path, change: Callable[[dict], dict]) -> None:
    tensors = load_file(folder / WEIGHTS)
    save_file(change(tensors), folder / WEIGHTS, metadata={"format": "pt"})


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


def _without_block_1(folder: Path) -> None:
    _edit_tensors(folder, lambda t: {k: v for k, v in t.items() if ".layers.1." not in k})


def _with_extra_tensors(folder: Path) -> None:
    _edit_tensors(folder, lambda t: {**t, "model.extra_scale": torch.ones(4)})


def _with_wrong_shape(folder: Path) -> None:
    _edit_tensors(folder, lambda t: {**t, "model.layers.1.mlp.up_proj.weight": torch.zeros(60, 32)})


def _truncated(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _garbled_header(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:8] + b"{garbage!!" + data[18:])


# case -> (how to damage the copy, extra CLI options, texts the Error: line must contain)
FAULTS: dict[str, tuple[Callable[[Path], None], list[str], list[str]]] = {
    "missing-block-tensors": (
        _without_block_1,
        [],
        ["missing tensors model.layers.1.input_layernorm.weight", WEIGHTS],
    ),
    "unexpected-tensors": (
        _with_extra_tensors,
        [],
        ["unexpected tensors model.extra_scale", WEIGHTS],
    ),
    "wrong-shape-tensor": (
        _with_wrong_shape,
        [],
        ["model.layers.1.mlp.up_proj.weight (checkpoint [60, 32], config [64, 32])", WEIGHTS],
    ),
    "config-declares-more-layers": (
        lambda folder: _edit_config(folder, num_hidden_layers=5),
        [],
        ["config.json declares 5 layers but the weights in", "hold 3", "model.layers.3"],
    ),
    "config-declares-fewer-layers": (
        lambda folder: _edit_config(folder, num_hidden_layers=2),
        [],
        ["config.json declares 2 layers but the weights in", "hold 3", "model.layers.2"],
    ),
    "truncated-safetensors": (_truncated, [], [WEIGHTS, "damaged or truncated"]),
    "garbled-safetensors-header": (_garbled_header, [], [WEIGHTS, "damaged or truncated"]),
    "mps-without-mps": (
        lambda folder: None,
        ["--device", "mps"],
        ["device 'mps' requested but Apple MPS is not available", "accepted here: auto, cpu"],
    ),
}


def _assert_one_error(result, *expected: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception), repr(result.exception)  # only SystemExit
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", list(FAULTS))
def test_damaged_input_is_one_error_line(pristine, tmp_path, case):
    damage, options, expected = FAULTS[case]
    if case == "mps-without-mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    model = tmp_path / "model"
    shutil.copytree(pristine, model)
    damage(model)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["-q", "drop", str(model), "--layers", "1", "--out", str(out), *options]
    )
    error = _assert_one_error(result, *expected)
    if case != "mps-without-mps":
        assert str(model) in error
    _nothing_written(out)


def test_the_undamaged_copy_still_drops(pristine, tmp_path):
    """The table's baseline: the same checkpoint, undamaged, passes the strict checks."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["-q", "drop", str(pristine), "--layers", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / WEIGHTS).exists()
    # The exported (renumbered, tied) checkpoint loads strictly too.
    info = CliRunner().invoke(cli, ["-q", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["num_layers"] == 2


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "opt", "gemma3_text"])
def test_strict_loading_accepts_other_architectures(tmp_path, model_type):
    """Tied or renamed weights of other architectures are not reported as missing."""
    folder = save_tiny_checkpoint(tmp_path / model_type, model_type, num_layers=3)
    result = CliRunner().invoke(cli, ["-q", "info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_layers"] == 3


def test_gpt2_config_with_more_layers_names_the_blocks(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "gpt2", "gpt2", num_layers=3)
    _edit_config(folder, n_layer=4)
    result = CliRunner().invoke(cli, ["-q", "info", str(folder)])
    _assert_one_error(result, "declares 4 layers", "hold 3 (transformer.h.3 missing)")


# --- the GGUF conversion cache -------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, pristine):
    """A .gguf file whose 'conversion' copies the tiny checkpoint (counts the conversions)."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    calls = []

    def convert(path, folder):
        calls.append(path)
        for entry in pristine.iterdir():
            shutil.copy(entry, folder / entry.name)

    monkeypatch.setattr("prune.models.convert_gguf", convert)
    return gguf, calls


def _cached(gguf: Path) -> Path:
    from prune.models import file_sha256, gguf_cache_dir

    return gguf_cache_dir(gguf, file_sha256(gguf))


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "config.json").unlink(),
        lambda folder: (folder / "config.json").write_text("{not json"),
        _truncated,
        _without_block_1,
    ],
    ids=["no-config", "garbled-config", "truncated-weights", "missing-tensors"],
)
def test_damaged_conversion_cache_repairs_itself(fake_gguf, damage):
    gguf, calls = fake_gguf
    first = CliRunner().invoke(cli, ["-q", "info", str(gguf), "--json"])
    assert first.exit_code == 0, first.output
    assert len(calls) == 1
    damage(_cached(gguf))

    repaired = CliRunner().invoke(cli, ["-q", "info", str(gguf), "--json"])
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["num_layers"] == 3
    assert len(calls) == 2  # converted again, once

    again = CliRunner().invoke(cli, ["-q", "info", str(gguf), "--json"])
    assert again.exit_code == 0 and len(calls) == 2  # and the repair holds


def test_conversion_that_stays_damaged_says_what_to_delete(fake_gguf, monkeypatch, tmp_path):
    import prune.models

    gguf, calls = fake_gguf
    good = prune.models.convert_gguf  # the fake conversion above

    def convert_badly(path, folder):
        good(path, folder)
        _truncated(folder)

    monkeypatch.setattr("prune.models.convert_gguf", convert_badly)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "drop", str(gguf), "--layers", "1", "--out", str(out)])
    _assert_one_error(
        result,
        "damaged or truncated",
        f"delete the cached conversion at {_cached(gguf)} and re-run",
    )
    assert len(calls) == 2  # the first conversion, and one repair
    _nothing_written(out)


# --- benchmark data --------------------------------------------------------------------------


def test_benchmark_row_without_label_names_file_and_row(pristine, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"query": "The man broke his toe because", "choices": ["he fell", "he sang"], "gold": 0},
        {"query": "The sun rose so", "choices": ["it got light", "it got dark"]},  # no label
    ]
    (data / "copa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(
        cli,
        ["-q", "rank", str(pristine), "--metric", "accuracy", "--tasks", "local_copa"]
        + ["--data-dir", str(data), "--limit", "2", "--engine", "fast", "--no-cache"],
    )
    _assert_one_error(result, f"row 2 of {data / 'copa.jsonl'} has no gold")
