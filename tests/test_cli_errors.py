"""Bad input through the CLI: one `Error:` line, non-zero exit, no traceback, nothing written.

Also checks that `-q` leaves only the result line (no transformers progress bars).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from tiny import save_tiny_checkpoint
from transformers import T5Config, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

from prune.cli import cli


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """A private prune cache; bars start on (conftest turns them back on after each test)."""
    monkeypatch.setenv("PRUNE_CACHE", str(tmp_path / "cache"))
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "llama", num_layers=4)


def _is_progress_bar(line: str) -> bool:
    return "it/s]" in line or "s/it]" in line


def _assert_one_error(result, must_contain: str) -> str:
    """Exit code 1, nothing on stdout, and stderr is progress bars plus one final `Error:` line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception), repr(result.exception)  # only SystemExit
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(_is_progress_bar(line) for line in lines[:-1]), result.stderr
    assert must_contain in errors[0], errors[0]
    return errors[0]


def _no_output_left(out) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (MODEL argument, expected text in the error)."""
    tmp_path = tmp_path_factory.mktemp("bad")
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"this is not a gguf file" * 50)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00junk")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    inconsistent = save_tiny_checkpoint(tmp_path / "inconsistent", "qwen2", num_layers=2)
    config = json.loads((inconsistent / "config.json").read_text())
    (inconsistent / "config.json").write_text(
        json.dumps({**config, "layer_types": ["full_attention"] * 3})
    )
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(
        T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    ).save_pretrained(t5)
    return {
        "missing-path": (str(tmp_path / "missing" / "model"), "not found"),
        "unknown-name": ("smollm9", "model 'smollm9' not found"),
        "malformed-gguf": (str(bad_gguf), "cannot read GGUF file"),
        "truncated-gguf": (str(truncated), "cannot read GGUF file"),
        "not-a-gguf-file": (str(not_gguf), "is not a .gguf file"),
        "folder-without-config": (str(no_config), "has no config.json"),
        "broken-config": (str(bad_config), "cannot load model"),
        "inconsistent-config": (str(inconsistent), "must be equal to the number of `layer_types`"),
        "encoder-decoder": (str(t5), "unsupported architecture"),
    }


BAD_MODEL_NAMES = [
    "missing-path",
    "unknown-name",
    "malformed-gguf",
    "truncated-gguf",
    "not-a-gguf-file",
    "folder-without-config",
    "broken-config",
    "inconsistent-config",
    "encoder-decoder",
]


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
@pytest.mark.parametrize("case", BAD_MODEL_NAMES)
def test_bad_model_argument(bad_models, case, quiet, tmp_path):
    model, expected = bad_models[case]
    out = tmp_path / "out"
    for args in (["drop", model, "--layers", "1", "--out", str(out)], ["info", model]):
        result = CliRunner().invoke(cli, (["-q"] if quiet else []) + args)
        _assert_one_error(result, expected)
        _no_output_left(out)
    # A failed GGUF conversion leaves nothing in the cache either.
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ("a,b", "bad --layers value 'a,b'"),
        ("", "bad --layers value ''"),
        ("1,,2", "empty item"),
        ("3-1", "'3-1' is not an index or range"),
        ("1,1", "layer 1 is given twice"),
        ("3,-1", "layer 3 is given twice (as 3 and -1)"),
        ("99", "layer index 99 is out of range: the model has 4 layers"),
        ("-5", "layer index -5 is out of range"),
        ("0-3", "cannot remove all 4 layers"),
        ("0,1,2,-1", "cannot remove all 4 layers"),
    ],
)
def test_bad_layers(tiny_dir, tmp_path, layers, expected):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["drop", str(tiny_dir), "--layers", layers, "--out", str(out)])
    _assert_one_error(result, expected)
    _no_output_left(out)


def test_bad_max_shard_size(tiny_dir, tmp_path):
    out = tmp_path / "out"
    for size in ("abc", "0", "2XB"):
        args = ["drop", str(tiny_dir), "--layers", "1", "--out", str(out), "--max-shard-size", size]
        _assert_one_error(CliRunner().invoke(cli, args), f"bad --max-shard-size value '{size}'")
        _no_output_left(out)


def test_existing_output_is_refused_and_kept(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["drop", str(tiny_dir), "--layers", "1", "--out", str(out)])
    _assert_one_error(result, "exists and is not empty (pass --overwrite to replace it)")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_is_a_file_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    result = CliRunner().invoke(cli, ["drop", str(tiny_dir), "--layers", "1", "--out", str(out)])
    _assert_one_error(result, "exists and is not a folder")
    assert out.read_text() == "a file"


def test_unwritable_output_is_an_error_not_a_traceback(tiny_dir, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    (parent / "file").write_text("x")
    out = parent / "file" / "out"  # a path below a regular file can never be created
    result = CliRunner().invoke(cli, ["drop", str(tiny_dir), "--layers", "1", "--out", str(out)])
    _assert_one_error(result, "cannot write output folder")


def test_quiet_drop_prints_only_the_result(tiny_dir, tmp_path):
    loud = CliRunner().invoke(
        cli, ["drop", str(tiny_dir), "--layers", "1", "--out", str(tmp_path / "a")]
    )
    assert loud.exit_code == 0, loud.output
    # The bar exists, so the quiet check below means something (a local safetensors folder
    # is pruned on disk: no "Loading weights" bar, only the shards being written).
    assert "Writing model shards" in loud.stderr

    out = tmp_path / "b"
    quiet = CliRunner().invoke(
        cli, ["-q", "drop", str(tiny_dir), "--layers", "1", "--out", str(out)]
    )
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    assert quiet.stdout == f"removed layers [1]: 4 -> 3 layers; wrote {out}\n"

    info = CliRunner().invoke(cli, ["-q", "info", str(tiny_dir), "--json"])
    assert info.exit_code == 0 and info.stderr == ""
    assert json.loads(info.stdout)["num_layers"] == 4


@pytest.mark.slow  # two fresh interpreters importing torch and transformers: ~10 s
def test_quiet_in_a_real_process(tiny_dir, tmp_path):
    """`python -m prune -q drop ...`: stdout is the result line, stderr is empty; errors exit 1."""
    env = {**os.environ, "PRUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "prune",
        "-q",
        "drop",
        str(tiny_dir),
        "--layers",
        "-1",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == f"removed layers [3]: 4 -> 3 layers; wrote {out}\n"

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr.strip().splitlines() == [
        f"Error: output folder '{out}' exists and is not empty (pass --overwrite to replace it)"
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metric", "accuracy", "--adaptive", "2"], "adaptive sampling needs a document limit"),
        (
            ["--metric", "kl", "--adaptive", "0", "--limit", "64"],
            "--adaptive 0 is invalid (accepted: K, the number of blocks the removal will take",
        ),
        (
            ["--metric", "cosine", "--adaptive", "2", "--limit", "64"],
            "--adaptive applies to the accuracy, probability, margin, kl measures only "
            "(this run measures: cosine)",
        ),
    ],
)
def test_bad_adaptive_fails_before_loading(tmp_path, args, expected):
    missing = tmp_path / "no-such-model"  # never loaded: the options fail first
    result = CliRunner().invoke(cli, ["rank", str(missing), "--tasks", "local_copa", *args])
    _assert_one_error(result, expected)


def test_adaptive_k_must_leave_candidates_beyond_the_cut(tiny_llama_dir, data_dir):
    args = ["--tasks", "local_copa", "--data-dir", str(data_dir), "--limit", "32"]
    result = CliRunner().invoke(
        cli, ["rank", str(tiny_llama_dir), "--metric", "kl", "--adaptive", "4", *args]
    )
    _assert_one_error(result, "--adaptive 4 is invalid for 4 candidate blocks (accepted: 1 to 3")
