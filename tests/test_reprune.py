"""Pruning an already pruned model keeps the chain: original numbering, original source, license."""

from __future__ import annotations

import json

from click.testing import CliRunner
from tiny import save_tiny_checkpoint

from prune.cli import cli
from prune.models import resolve_source


def _drop(*args: str):
    return CliRunner().invoke(cli, ["-q", "drop", *map(str, args)])


def test_a_pruned_model_pruned_again_keeps_the_chain_and_the_license(tmp_path):
    original = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=6)
    (original / "README.md").write_text(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny\n"
    )
    once, twice = tmp_path / "once", tmp_path / "twice"

    assert _drop(original, "--layers", "1", "--out", once).exit_code == 0
    first = json.loads((once / "prune.json").read_text())
    assert first["source"]["license"] == "apache-2.0"  # from the original's card
    assert first["removed_layers_original"] == [1] and first["chain"] == []
    assert first["original_source"] == first["source"]

    result = _drop(once, "--layers", "2", "--out", twice)  # layer 2 of 5 is the original's 3
    assert result.exit_code == 0, result.output
    second = json.loads((twice / "prune.json").read_text())
    assert second["removed_layers"] == [2]
    assert second["num_layers_before"] == 5 and second["num_layers_after"] == 4
    assert second["removed_layers_original"] == [1, 3]
    assert second["num_layers_original"] == 6
    assert second["original_source"] == first["source"]
    assert second["original_source"]["spec"] == str(original)
    assert second["source"]["path"] == str(once.resolve())
    assert second["source"]["license"] == "apache-2.0"  # carried by once/prune.json (no card)
    assert [r["removed_layers"] for r in second["chain"]] == [[1]]
    assert second["chain"][0]["created"] == first["created"]
    assert resolve_source(str(twice)).license == "apache-2.0"

    # a third prune continues the chain in original numbering (the 4 left are 0, 2, 4, 5)
    thrice = tmp_path / "thrice"
    assert _drop(twice, "--layers", "3", "--out", thrice).exit_code == 0
    third = json.loads((thrice / "prune.json").read_text())
    assert third["removed_layers_original"] == [1, 3, 5]
    assert [r["removed_layers"] for r in third["chain"]] == [[1], [2]]
    assert third["original_source"] == first["source"]


def test_a_prune_json_that_does_not_fit_the_weights_is_not_chained(tmp_path, caplog):
    folder = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=4)
    # claims 6 -> 5 layers, but the weights hold 4
    (folder / "prune.json").write_text(
        json.dumps({"removed_layers": [0], "num_layers_before": 6, "source": {"spec": "x"}})
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["drop", str(folder), "--layers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "prune.json").read_text())
    assert record["removed_layers_original"] == [1] and record["chain"] == []
    assert record["original_source"]["path"] == str(folder.resolve())
    assert "does not describe this checkpoint" in caplog.text
