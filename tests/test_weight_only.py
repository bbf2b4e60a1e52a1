"""Weight-only checkpoint folders (a plain `model.save_pretrained`, no tokenizer files).

`prune info` and `prune drop` need no tokenizer; commands that read text refuse such a
folder with one `Error:` line saying how to add the tokenizer files.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny import save_tiny_checkpoint, tiny_model
from transformers import AutoModelForCausalLM

from prune.cli import cli
from prune.errors import PruneError
from prune.models import has_tokenizer_files, load_model, require_tokenizer

# Some fail in transformers without tokenizer files (llama, mistral, phi3, falcon), others
# build an empty tokenizer that encodes every text to nothing (gpt2, qwen2).
ARCHITECTURES = ["llama", "mistral", "phi3", "falcon", "gpt2", "qwen2"]


def weights_only(folder, model_type: str = "llama", num_layers: int = 4):
    tiny_model(model_type, num_layers).save_pretrained(folder)
    assert not has_tokenizer_files(folder)
    return folder


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_info_and_drop_need_no_tokenizer(tmp_path, model_type):
    folder = weights_only(tmp_path / "weights", model_type)
    info = CliRunner().invoke(cli, ["-q", "info", str(folder), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.stdout)
    assert summary["num_layers"] == 4 and summary["tokenizer"] is None

    out = tmp_path / "pruned"
    drop = CliRunner().invoke(cli, ["-q", "drop", str(folder), "--layers", "1", "--out", str(out)])
    assert drop.exit_code == 0, drop.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    assert not has_tokenizer_files(out)  # nothing invented
    assert json.loads((out / "prune.json").read_text())["removed_layers"] == [1]


def test_info_text_says_there_is_no_tokenizer(tmp_path):
    folder = weights_only(tmp_path / "weights")
    result = CliRunner().invoke(cli, ["-q", "info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "tokenizer:     none" in result.output


def test_tokenizer_files_are_still_copied_when_present(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "full", "llama", num_layers=4)
    out = tmp_path / "pruned"
    drop = CliRunner().invoke(cli, ["-q", "drop", str(folder), "--layers", "1", "--out", str(out)])
    assert drop.exit_code == 0, drop.output
    assert (out / "tokenizer.json").exists()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rank_on_weights_only_is_one_error_line(tmp_path, model_type):
    folder = weights_only(tmp_path / "weights", model_type)
    result = CliRunner().invoke(cli, ["rank", str(folder), "--metric", "cosine"])
    line = one_error_line(result)
    assert "has no usable tokenizer (no tokenizer files in the folder)" in line
    assert "ranking layers by cosine needs one" in line
    assert f"into {folder}" in line  # what to do, and where


def test_loaded_model_without_tokenizer_and_require_tokenizer(tmp_path):
    folder = weights_only(tmp_path / "weights")
    loaded = load_model(str(folder), device="cpu")
    assert loaded.tokenizer is None
    with pytest.raises(PruneError, match="evaluating needs one: copy the tokenizer files"):
        require_tokenizer(loaded, "evaluating")
    # Asking for it up front refuses the folder before the weights are read.
    with pytest.raises(PruneError, match="no tokenizer files in the folder"):
        load_model(str(folder), device="cpu", tokenizer_for="evaluating")


def test_broken_tokenizer_files_count_as_no_tokenizer(tmp_path):
    folder = weights_only(tmp_path / "weights")
    (folder / "tokenizer.json").write_text("{not json")
    loaded = load_model(str(folder), device="cpu")
    assert loaded.tokenizer is None
    with pytest.raises(PruneError, match="the tokenizer does not load"):
        require_tokenizer(loaded, "evaluating")


def test_in_memory_export_of_weights_only_model(tmp_path):
    # The path `prune run` variants (and drop of a Hub id) take: load, drop, export.
    from prune.export import export_checkpoint
    from prune.surgery import drop_layers

    loaded = load_model(str(weights_only(tmp_path / "weights")), device="cpu")
    removal = drop_layers(loaded.model, [2])
    out = export_checkpoint(loaded, tmp_path / "out", removal.removed, 4)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    assert not has_tokenizer_files(out)
