"""Pre-flight: what can be checked before a model is loaded is checked by `prune validate`
and at the start of `prune run`.

A fault table drives `prune validate` through the CLI on a recipe file with one mistake
each (a shard size of 0, an output folder that cannot be created, a missing, empty or
malformed calibration file, a metric a local task does not report, an out-of-range seed);
each row names the one problem line the user reads, with its path. `prune run` must refuse
the same mistakes (and an unusable `--out`, which the recipe does not see) before any model
is loaded. Nothing here loads a model: `load_model` raises if it is called.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import prune.models
from prune.cli import cli


@pytest.fixture(autouse=True)
def _no_model_is_loaded(tmp_path, monkeypatch):
    """Every test runs in its own folder, with a private cache and no model loading."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNE_CACHE", str(tmp_path / "cache"))

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(prune.models, "load_model", no_load)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A checkpoint folder as validation sees it: only the config (depth 4) is read."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}\n')
    return folder


def _recipe(tmp_path: Path, model_dir: Path, body: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {model_dir}\nprune: {{remove: 1}}\n" + body)
    return path


def _files(tmp_path: Path) -> dict[str, Path]:
    """Files the rows refer to: a regular file (no folder can be made below it), an empty
    text file, a JSONL file with a broken line, a folder, and a good text file."""
    files = {
        "plain": tmp_path / "plain.txt",
        "empty": tmp_path / "empty.txt",
        "broken": tmp_path / "broken.jsonl",
        "folder": tmp_path / "texts.jsonl",
        "good": tmp_path / "good.txt",
    }
    files["plain"].write_text("not a folder\n")
    files["empty"].write_text("\n\n")
    files["broken"].write_text('{"text": "fine"}\n{not json\n')
    files["folder"].mkdir()
    files["good"].write_text("a calibration text\n\nand another one\n")
    return files


# (recipe body, the one problem line); {name} is the path of file `name` from `_files`.
FAULTS = {
    "shard size of zero": (
        "export: {max_shard_size: 0GB}\n",
        "export.max_shard_size: must be a size like 2GB, 500MB or 1.5GiB",
    ),
    "output below a file": (
        "export: {out: '{plain}/sub'}\n",
        "export.out: output folder '{plain}/sub' cannot be created: '{plain}' is a file, "
        "not a folder",
    ),
    "output is a file": (
        "export: {out: '{plain}'}\n",
        "export.out: output '{plain}' exists and is not a folder",
    ),
    "missing calibration file": (
        "strategies: [cosine]\ncalibration: {source: missing.txt}\n",
        "calibration.source: calibration file 'missing.txt' does not exist (accepted: a .txt "
        "or .jsonl file, or a dataset name)",
    ),
    "empty calibration file": (
        "strategies: [perplexity]\ncalibration: {source: '{empty}'}\n",
        "calibration.source: calibration file '{empty}' has no text",
    ),
    "malformed calibration file": (
        "strategies: [cosine]\ncalibration: {source: '{broken}'}\n",
        "calibration.source: calibration file '{broken}' line 2 is not valid JSON",
    ),
    "calibration source is a folder": (
        "strategies: [cosine]\ncalibration: {source: '{folder}'}\n",
        "calibration.source: calibration source '{folder}' is not a file",
    ),
    "reporting metric a task lacks": (
        "strategies: [cosine]\nevaluation: {tasks: [local_piqa, local_copa], metric: acc_norm}\n",
        "evaluation.metric: task 'local_copa' has no metric 'acc_norm' (accepted for it: acc)",
    ),
    "strategy metric a task lacks": (
        "strategies: [{name: accuracy, tasks: [local_arc_easy, local_winogrande], "
        "metric: acc_norm}]\nevaluation: {tasks: [local_piqa]}\n",
        "strategies[0].metric: task 'local_winogrande' has no metric 'acc_norm' "
        "(accepted for it: acc)",
    ),
    "inherited metric a ranking task lacks": (
        "strategies: [accuracy]\nevaluation: {tasks: [local_piqa], metric: acc_norm}\n",
        "evaluation.metric: task 'local_winogrande' (ranked on by strategies[0]) has no "
        "metric 'acc_norm' (accepted for it: acc)",
    ),
    "seed out of range": (
        "seed: 4294967296\n",
        "seed: must be between 0 and 4294967295 (2**32 - 1), got 4294967296",
    ),
}


def _fill(text: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        text = text.replace(f"{{{name}}}", str(path))
    return text


@pytest.mark.parametrize("case", FAULTS, ids=list(FAULTS))
def test_validate_names_the_one_problem(case, tmp_path, model_dir):
    files = _files(tmp_path)
    body, line = (_fill(text, files) for text in FAULTS[case])
    result = CliRunner().invoke(cli, ["validate", str(_recipe(tmp_path, model_dir, body))])
    assert result.exit_code == 1, result.output
    assert "is invalid (1 problem):" in result.output, result.output
    assert f"\n  {line}" in result.output, result.output
    assert "Traceback" not in result.output


def test_what_the_checks_accept_still_validates(tmp_path, model_dir):
    """Existing text files, dataset names, metrics the tasks report, lm-eval's own tasks (not
    known offline), and an output folder to be made inside a writable one."""
    files = _files(tmp_path)
    body = (
        f"strategies: [cosine, {{name: accuracy, tasks: [local_arc_easy, arc_easy], "
        f"metric: acc_norm}}]\n"
        f"calibration: {{source: '{files['good']}'}}\n"
        "evaluation: {tasks: [local_copa, winogrande], metric: acc}\n"
        f"export: {{out: '{tmp_path}/new/deeper'}}\n"
    )
    result = CliRunner().invoke(cli, ["validate", str(_recipe(tmp_path, model_dir, body))])
    assert result.exit_code == 0, result.output
    dataset = "strategies: [cosine]\ncalibration: {source: 'wikitext:wikitext-2-raw-v1@train'}\n"
    result = CliRunner().invoke(cli, ["validate", str(_recipe(tmp_path, model_dir, dataset))])
    assert result.exit_code == 0, result.output
    # A calibration file no strategy reads is not read.
    unused = "strategies: [accuracy]\ncalibration: {source: missing.txt}\n"
    result = CliRunner().invoke(cli, ["validate", str(_recipe(tmp_path, model_dir, unused))])
    assert result.exit_code == 0, result.output


def test_all_preflight_problems_are_listed_together(tmp_path, model_dir):
    files = _files(tmp_path)
    body = _fill(
        "strategies: [cosine]\ncalibration: {source: missing.txt}\n"
        "evaluation: {tasks: [local_copa], metric: acc_norm}\n"
        "export: {out: '{plain}/sub'}\n",
        files,
    )
    result = CliRunner().invoke(cli, ["validate", str(_recipe(tmp_path, model_dir, body))])
    assert result.exit_code == 1
    assert "(3 problems)" in result.output
    for path in ("calibration.source:", "evaluation.metric:", "export.out:"):
        assert f"\n  {path}" in result.output


def test_run_refuses_an_unusable_out_before_loading(tmp_path, model_dir):
    """`run --out` overrides export.out after the recipe is checked: it is checked too."""
    files = _files(tmp_path)
    recipe = _recipe(tmp_path, model_dir, "strategies: [cosine]\n")
    out = files["plain"] / "sub"
    result = CliRunner().invoke(cli, ["-q", "run", str(recipe), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert (
        f"Error: output folder '{out}' cannot be created: '{files['plain']}' is a file, "
        "not a folder" in result.output
    )
    assert "Traceback" not in result.output


def test_run_refuses_a_missing_calibration_file_before_loading(tmp_path, model_dir):
    recipe = _recipe(tmp_path, model_dir, "strategies: [cosine]\ncalibration: {source: gone.txt}\n")
    result = CliRunner().invoke(cli, ["-q", "run", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "\n  calibration.source: calibration file 'gone.txt' does not exist" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
