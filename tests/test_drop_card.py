"""The model card and mergekit config of a `prune drop` folder (prune.drop_card)."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from prune.card import parse_front_matter
from prune.drop_card import drop_files, kept_ranges, layers_argument, mergekit_config

SOURCE = {
    "spec": "meta-llama/Llama-3.2-1B",
    "kind": "hub",
    "path": None,
    "hub_id": "meta-llama/Llama-3.2-1B",
    "revision": "4e20de362430cd3b72f300e6b0f18e50e7166e08",
    "sha256": None,
    "license": "llama3.2",
}


def record(removed=(3, 4, 9), depth=12, **extra):
    """A prune.json record of a first prune (the chain fields equal this prune's)."""
    base = {
        "prune_version": "0.1.0",
        "source": SOURCE,
        "removed_layers": list(removed),
        "num_layers_before": depth,
        "num_layers_after": depth - len(removed),
        "layer_path": "model.layers",
        "removed_layers_original": sorted(removed),
        "num_layers_original": depth,
        "original_source": SOURCE,
        "chain": [],
    }
    return {**base, **extra}


def slices(config_text: str) -> list[tuple[str, list[int]]]:
    config = yaml.safe_load(config_text)
    out = []
    for piece in config["slices"]:
        (source,) = piece["sources"]  # one model per slice: a passthrough cut
        out.append((source["model"], source["layer_range"]))
    return out


def test_drop_files_names_the_card_and_the_config():
    assert set(drop_files(record())) == {"README.md", "mergekit.yaml"}


def test_mergekit_slices_are_the_kept_runs_with_exclusive_ends():
    config = yaml.safe_load(drop_files(record(export_dtype="bfloat16"))["mergekit.yaml"])
    assert config == {
        "slices": [
            {"sources": [{"model": "meta-llama/Llama-3.2-1B", "layer_range": [0, 3]}]},
            {"sources": [{"model": "meta-llama/Llama-3.2-1B", "layer_range": [5, 9]}]},
            {"sources": [{"model": "meta-llama/Llama-3.2-1B", "layer_range": [10, 12]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }


def test_mergekit_config_without_known_dtype_has_none():
    assert "dtype" not in yaml.safe_load(drop_files(record())["mergekit.yaml"])


@pytest.mark.parametrize(
    ("removed", "depth", "ranges"),
    [
        ([3, 4, 9], 12, [(0, 3), (5, 9), (10, 12)]),
        ([0, 11], 12, [(1, 11)]),
        ([], 4, [(0, 4)]),
        ([1, 2, 3], 4, [(0, 1)]),
    ],
)
def test_kept_ranges(removed, depth, ranges):
    assert kept_ranges(removed, depth) == ranges
    kept = [i for a, b in ranges for i in range(a, b)]
    assert kept == [i for i in range(depth) if i not in removed]


def test_layers_argument_round_trips_through_the_cli_parser():
    from prune.surgery import parse_layer_list

    for layers in ([3, 4, 9], [20, 21, 22, 23], [0, 2, 3, 4, 5, 9, 10]):
        text = layers_argument(layers)
        assert parse_layer_list(text) == layers
    assert layers_argument([20, 21, 22, 23, 30]) == "20-23,30"


def test_card_metadata_parses_with_hub_client_and_ours(tmp_path):
    card_text = drop_files(record())["README.md"]
    meta = parse_front_matter(card_text)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert meta["license"] == "llama3.2"
    assert meta["tags"] == ["pruned", "layer-pruning", "prune"]
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"

    (tmp_path / "README.md").write_text(card_text)
    card = ModelCard.load(tmp_path / "README.md", ignore_metadata_errors=False)
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.license == "llama3.2"


def test_card_body_says_what_was_removed_how_to_reproduce_and_not_evaluated():
    card = drop_files(record())["README.md"]
    assert "3, 4, 9" in card
    assert "3 of its 12 transformer blocks" in card and "9 blocks left" in card
    assert "prune drop meta-llama/Llama-3.2-1B --layers 3,4,9 --out pruned/" in card
    assert "not been evaluated" in card and "prune run" in card
    assert "Weights stored in" not in card  # the record names no dtype


@pytest.mark.parametrize(
    ("compute", "said"),
    [
        (None, "`compute_dtype` is null: the model was not run."),
        ("torch.float32", "computed in float32 (`compute_dtype`)."),
    ],
)
def test_card_says_the_export_and_compute_dtypes(compute, said):
    card = drop_files(record(export_dtype="bfloat16", compute_dtype=compute))["README.md"]
    assert "Weights stored in bfloat16 (`export_dtype` in prune.json)" in card
    assert said in card


def test_unknown_base_and_license_are_left_out():
    local = {**SOURCE, "spec": "./my-model", "kind": "local", "path": "/m", "hub_id": None}
    local["license"] = None
    files = drop_files(record(source=local, original_source=local))
    meta = parse_front_matter(files["README.md"])
    assert "base_model" not in meta and "license" not in meta
    assert meta["tags"] == ["pruned", "layer-pruning", "prune"]
    assert {model for model, _ in slices(files["mergekit.yaml"])} == {"./my-model"}
    assert "prune drop ./my-model --layers 3,4,9" in files["README.md"]


def test_second_prune_describes_the_whole_chain_in_original_numbering():
    # The first prune removed 3 and 4 of 12; this one removes block 7 of the 10 left (= 9).
    folder = {**SOURCE, "spec": "pruned-1/", "kind": "local", "path": "/x/pruned-1"}
    first = record(removed=[3, 4])
    second = record(
        removed=[7],
        depth=10,
        source=folder,
        removed_layers_original=[3, 4, 9],
        num_layers_original=12,
        original_source=SOURCE,
        chain=[{k: v for k, v in first.items() if k != "chain"}],
    )
    files = drop_files(second)
    assert [r for _, r in slices(files["mergekit.yaml"])] == [[0, 3], [5, 9], [10, 12]]
    card = files["README.md"]
    assert parse_front_matter(card)["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "Removed blocks (0-based, numbered as in the base model): 3, 4, 9." in card
    assert "prune drop pruned-1/ --layers 7 --out pruned/" in card  # this step, exactly
    assert "prune drop meta-llama/Llama-3.2-1B --layers 3,4,9 --out pruned/" in card


def test_mergekit_config_of_a_run_variant_names_the_loaded_folder():
    # What `prune run` writes for a variant of a local folder: its own path and numbering,
    # never the hub_id that folder's prune.json carries over from an earlier prune.
    folder = {**SOURCE, "spec": "pruned-1/", "kind": "local", "path": "/x/pruned-1"}
    text = mergekit_config(folder, [0], 3, dtype="torch.float32")
    assert slices(text) == [("pruned-1/", [1, 3])]
    assert yaml.safe_load(text)["dtype"] == "float32"


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "in memory"])
def test_prune_drop_writes_the_card_and_the_mergekit_config(streamed, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from tiny import save_tiny_checkpoint

    import prune.streaming
    from prune.cli import cli

    if not streamed:  # force the in-memory path
        monkeypatch.setattr(prune.streaming, "stream_drop_source", lambda *a, **k: None)
    source = save_tiny_checkpoint(tmp_path / "src", "llama", num_layers=6)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["-q", "drop", str(source), "--layers", "1,2,4", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "not evaluated" in card.lower() and "--layers 1,2,4" in card
    # Both paths: the source's float32 on disk, nothing computed.
    record = json.loads((out / "prune.json").read_text())
    assert record["export_dtype"] == "float32" and record["compute_dtype"] is None
    assert "Weights stored in float32" in card and "`compute_dtype` is null" in card
    assert slices((out / "mergekit.yaml").read_text()) == [
        (str(source), [0, 1]),
        (str(source), [3, 4]),
        (str(source), [5, 6]),
    ]
