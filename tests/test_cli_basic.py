"""The CLI group: version, help, and drop on a tiny checkpoint."""

from __future__ import annotations

import json

from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from prune import __version__
from prune.cli import cli


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_drop_tiny_roundtrip(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["drop", str(tiny_llama_dir), "--layers", "1,-1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "prune.json").read_text())
    assert record["removed_layers"] == [1, 3]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
