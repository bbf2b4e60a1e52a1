"""Faults while writing, kills, and small input mistakes: one `Error:` line, nothing left behind.

A fault table drives `prune drop` through the CLI with a write that fails the way a full,
read-only, unwritable or failing disk fails (OSError, and safetensors' SafetensorError,
which is not an OSError); each row names the one line the user reads. The other tests
cover what a killed export leaves (swept by the next `drop`/`run`), SIGTERM (handled like
Ctrl-C, in a real subprocess), a result cache that cannot be written (a warning, not a
lost result), metadata written in the same pass as the tensors, and recipe/--layers checks.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers.modeling_utils
import yaml
from click.testing import CliRunner
from safetensors import SafetensorError, safe_open
from tiny import save_tiny_checkpoint

import prune.export
import prune.pipeline
from prune.atomic import sweep_temporaries, write_error, write_file
from prune.cli import cli
from prune.errors import PruneError
from prune.evaluate.cache import ResultCache
from prune.evaluate.settings import TaskScore
from prune.recipe import RecipeError, _UniqueKeyLoader, parse_recipe
from prune.surgery import parse_layer_list

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "llama", num_layers=4)


def _drop(*args: str):
    return CliRunner().invoke(cli, ["-q", "drop", *map(str, args)])


def _temporaries(folder: Path) -> list[str]:
    """Every leftover of a write under `folder` (temporaries and moved-aside folders)."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if ".tmp-" in p.name or ".old-" in p.name
    )


def _error_line(result) -> str:
    """The one line the user reads: exit 1, nothing on stdout, stderr a single `Error:` line."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# --- the fault table: a write that fails during `prune drop` ------------------------------

SAFETENSORS_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
    'left on device" })'
)


def _fail_shard_write(exc: BaseException):
    """Make the safetensors shard write fail (inside transformers' save_pretrained)."""

    def save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a shard")  # what a full disk leaves
        raise exc

    return "shard", save


def _fail_record_write(exc: BaseException):
    """Make the last file of the export (prune.json) fail, after the weights are written."""

    def write(folder, record):
        raise exc

    return "record", write


FAULTS = [
    ("disk full, safetensors", _fail_shard_write(SafetensorError(SAFETENSORS_FULL)),
     "No space left on device"),
    ("disk full, OSError", _fail_shard_write(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
     "No space left on device"),
    ("quota exceeded", _fail_record_write(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))),
     os.strerror(errno.EDQUOT)),
    ("permission denied", _fail_record_write(OSError(errno.EACCES, os.strerror(errno.EACCES))),
     "Permission denied"),
    ("read-only disk", _fail_record_write(OSError(errno.EROFS, os.strerror(errno.EROFS))),
     "Read-only file system"),
    ("I/O error", _fail_shard_write(OSError(errno.EIO, os.strerror(errno.EIO))),
     "Input/output error"),
]  # fmt: skip


@pytest.mark.parametrize(
    "where, fault, reason", [(*f[1], f[2]) for f in FAULTS], ids=[f[0] for f in FAULTS]
)
def test_write_fault_is_one_line_and_leaves_nothing(
    tiny_dir, tmp_path, monkeypatch, where, fault, reason
):
    if where == "shard":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fault)
    else:
        monkeypatch.setattr(prune.export, "_write_record", fault)
    out = tmp_path / "out"
    line = _error_line(_drop(tiny_dir, "--layers", "1", "--out", out))
    assert line == f"Error: cannot write output folder '{out}': {reason}"
    assert not out.exists()
    assert _temporaries(tmp_path) == []


def test_write_fault_keeps_the_folder_being_overwritten(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _, fault = _fail_shard_write(SafetensorError(SAFETENSORS_FULL))
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fault)
    line = _error_line(_drop(tiny_dir, "--layers", "1", "--out", out, "--overwrite"))
    assert line.endswith("No space left on device")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _temporaries(tmp_path) == []


def test_write_file_names_the_file_and_the_reason(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.fh = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", FullDisk)
    target = tmp_path / "comparison.json"
    with pytest.raises(PruneError) as info:
        write_file(target, "x" * 100_000)
    monkeypatch.undo()
    assert str(info.value) == f"cannot write file '{target}': No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_other_errors_are_not_called_write_errors(tmp_path):
    assert write_error(OSError(errno.ENAMETOOLONG, "File name too long"), tmp_path) is None
    assert write_error(ValueError("no"), tmp_path) is None
    assert str(write_error(SafetensorError(SAFETENSORS_FULL), tmp_path / "x", "folder")) == (
        f"cannot write folder '{tmp_path / 'x'}': No space left on device"
    )


# --- what killed exports leave is swept by the next drop / run -----------------------------


def _plant(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True)
            (path / "model.safetensors").write_bytes(b"\0" * 64)  # a half-written shard
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("partial")


def test_drop_sweeps_what_a_killed_export_left(tiny_dir, tmp_path):
    out = tmp_path / "out"
    _plant(
        tmp_path,
        ".out.tmp-abc12345/",  # a killed export's temporary folder
        ".out.old-xyz_0987/",  # a replaced folder moved aside (out exists: superseded)
        ".other.tmp-abc12345/",  # another output's: not ours to remove
        ".out.tmpnotours",  # not a temporary's name
    )
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = _drop(tiny_dir, "--layers", "1", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.tmp-abc12345",
        ".out.tmpnotours",
        "out",
    ]
    assert json.loads((out / "prune.json").read_text())["removed_layers"] == [1]


def test_a_moved_aside_folder_is_kept_while_the_output_is_missing(tmp_path):
    # Killed between moving the old folder aside and moving the new one in: the old copy
    # is the only one left, so it is not swept.
    _plant(tmp_path, ".out.old-abc12345/x/", ".out.tmp-abc12345/")
    assert sweep_temporaries(tmp_path / "out") == [tmp_path / ".out.tmp-abc12345"]
    assert (tmp_path / ".out.old-abc12345" / "x" / "model.safetensors").exists()


def test_sweep_inside_a_run_folder(tmp_path):
    out = tmp_path / "run"
    _plant(
        out,
        "comparison.json",
        ".comparison.json.tmp-k2j3h4g5",  # a killed write_file
        "variants/cosine/config.json",
        "variants/.kl.tmp-abc12345/",  # a killed variant export
        "variants/cosine/.model.safetensors.tmp-zz/",  # deeper than asked: left alone
    )
    _plant(tmp_path, ".run.tmp-abc12345/")
    removed = sweep_temporaries(out, depth=2)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        ".run.tmp-abc12345",
        "run/.comparison.json.tmp-k2j3h4g5",
        "run/variants/.kl.tmp-abc12345",
    ]
    assert _temporaries(tmp_path) == ["run/variants/cosine/.model.safetensors.tmp-zz"]
    assert (out / "variants" / "cosine" / "config.json").exists()


def test_run_sweeps_its_folder_before_anything_else(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _plant(out, "variants/.kl.tmp-abc12345/", ".recipe.yaml.tmp-abc12345")
    _plant(tmp_path, ".out.tmp-abc12345/")
    seen = []

    def stop(out, overwrite, resume):  # the output-folder check that follows the sweep
        seen.append(_temporaries(tmp_path))
        raise PruneError("stopped after the sweep")

    monkeypatch.setattr(prune.pipeline, "_check_out", stop)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: smollm2-135m\nprune: {remove: 6}\n")
    result = CliRunner().invoke(cli, ["-q", "run", str(recipe), "--out", str(out)])
    assert _error_line(result) == "Error: stopped after the sweep"
    assert seen == [[]]
    assert sorted(p.name for p in out.iterdir()) == ["variants"]


# --- SIGTERM is Ctrl-C: cleanup runs, one line, non-zero exit -------------------------------

SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import prune.export
    from prune.cli import main

    def slow_record(folder, record):  # the weights are in the temporary folder by now
        print("writing", flush=True)
        time.sleep(60)

    prune.export._write_record = slow_record
    sys.argv = ["prune", "-q", "drop", sys.argv[1], "--layers", "1", "--out", sys.argv[2]]
    main()
    """
)


def test_sigterm_during_export_cleans_up_and_exits_like_ctrl_c(tiny_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(tiny_dir), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # mid-export
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert stderr.strip() == "Error: interrupted"
    assert not out.exists()
    assert _temporaries(tmp_path) == []


# --- a result cache that cannot be written --------------------------------------------------


def _score(value: float = 0.5) -> TaskScore:
    return TaskScore(task="local_piqa", metric="acc", value=value, stderr=0.1, n=10)


def _cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_cache_warns_once_and_carries_on(tmp_path, caplog):
    root = tmp_path / "results"
    root.mkdir()
    root.chmod(0o500)
    try:
        cache = ResultCache(root)
        with caplog.at_level(logging.WARNING, logger="prune"):
            cache.put("ab" + "0" * 30, _score())
            cache.put("cd" + "0" * 30, _score())
            cache.put_json("ef" + "0" * 30, {"x": 1})
        assert cache.get("ab" + "0" * 30) is None  # not cached, but no error
    finally:
        root.chmod(0o700)
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1
    assert f"cannot write the result cache at {root}" in warnings[0]
    assert "Permission denied" in warnings[0]
    assert _temporaries(tmp_path) == []


def test_full_disk_cache_warns_once_and_keeps_working_for_reads(tmp_path, monkeypatch, caplog):
    import prune.evaluate.cache as cache_module

    cache = ResultCache(tmp_path / "results")
    key = "ab" + "1" * 30
    cache.put(key, _score(0.25))  # written before the disk filled up

    def full(path, content):
        raise PruneError(f"cannot write file '{path}': No space left on device")

    monkeypatch.setattr(cache_module, "write_file", full)
    with caplog.at_level(logging.WARNING, logger="prune"):
        for i in range(3):
            cache.put(f"cd{i}" + "1" * 29, _score())
    assert len(_cache_warnings(caplog)) == 1
    assert "No space left on device" in _cache_warnings(caplog)[0]
    assert cache.get(key).value == 0.25


# --- metadata in the same pass as the tensors ------------------------------------------------


def test_metadata_is_written_with_the_tensors_not_after(tiny_dir, tmp_path, monkeypatch):
    real = transformers.modeling_utils.safe_save_file
    writes = []

    def record(tensors, filename, metadata=None):
        writes.append((Path(filename).name, dict(metadata or {})))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", record)
    out = tmp_path / "out"
    result = _drop(tiny_dir, "--layers", "0,2", "--out", out, "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(name for name, _ in writes) == shards  # each shard written once
    for name, metadata in writes:
        assert metadata["format"] == "pt"
        assert json.loads(metadata["prune.removed_layers"]) == [0, 2]
        with safe_open(str(out / name), framework="pt") as fh:
            assert fh.metadata() == metadata
    assert transformers.modeling_utils.safe_save_file is record  # put back after the export


# --- small input checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("-1-3", "range '-1-3' mixes an index from the start with one from the end"),
        ("0--1", "range '0--1' mixes an index from the start with one from the end"),
        ("-1--3", "'-1--3' is not an index or range: it runs backwards; put the smaller end"),
        ("5-3", "'5-3' is not an index or range: it runs backwards"),
    ],
)
def test_layer_ranges_that_wrap_or_run_backwards_are_refused(text, message):
    with pytest.raises(PruneError) as info:
        parse_layer_list(text)
    assert str(info.value).startswith(f"bad --layers value {text!r}: {message}")
    assert "e.g. 3,7,12 or 20-23" in str(info.value) and "-3--1" in str(info.value)


def test_wrapping_layer_range_through_the_cli(tiny_dir, tmp_path):
    out = tmp_path / "out"
    line = _error_line(_drop(tiny_dir, "--layers", "-1-3", "--out", out))
    assert line.startswith("Error: bad --layers value '-1-3': range '-1-3' mixes")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_layer_ranges_still_accepted():
    assert parse_layer_list("-3--1,0-1") == [-3, -2, -1, 0, 1]


def _problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml", resolve_depth=False)
    return info.value.problems


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "model: smollm2-135m\nseed: 1\nprune: {remove: 6}\nseed: 2\n",
            "not valid YAML at line 4, column 1: key 'seed' is given twice (first at line 2)",
        ),
        (
            "model: smollm2-135m\nprune:\n  remove: 6\n  keep: 3\n  remove: 5\n",
            "not valid YAML at line 5, column 3: key 'remove' is given twice (first at line 3)",
        ),
        (
            "model: smollm2-135m\nprune: {remove: 6}\nseed: -1\n",
            "seed: must be between 0 and 4294967295 (2**32 - 1), got -1",
        ),
        (
            "model: smollm2-135m\nprune: {remove: 6}\nseed: 4294967296\n",
            "seed: must be between 0 and 4294967295 (2**32 - 1), got 4294967296",
        ),
        (
            "model: " + "[" * 5000 + "]" * 5000 + "\n",
            "not a usable recipe: nested too deeply (a recipe is a few levels deep)",
        ),
    ],
    ids=[
        "duplicate top-level key",
        "duplicate nested key",
        "negative seed",
        "seed too large",
        "nested thousands deep",
    ],
)
def test_recipe_input_checks(text, problem):
    assert problem in _problems(text)


def test_recipe_checks_through_validate(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: smollm2-135m\nprune: {remove: 6}\nseed: 1\nseed: 2\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 1
    assert "key 'seed' is given twice (first at line 3)" in result.stderr
    assert "Traceback" not in result.stderr


def test_largest_seed_and_merge_keys_are_accepted():
    recipe = parse_recipe(
        "model: smollm2-135m\nprune: {remove: 6}\nseed: 4294967295\n", "r.yaml", resolve_depth=False
    )
    assert recipe.seed == 2**32 - 1
    # `<<: *base` then overriding one of its keys is not a duplicate
    text = "base: &b {samples: 4, seq_len: 8}\nother: {<<: *b, samples: 8}\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader)["other"] == {"samples": 8, "seq_len": 8}
