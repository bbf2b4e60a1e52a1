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


def _fake_rank(monkeypatch, error: Exception | None = None) -> list[dict]:
    """Replace the library behind `prune rank`; return the keyword arguments it gets."""
    import prune.compare

    calls: list[dict] = []

    def rank_model(model, metric, **options):
        calls.append({"model": model, "metric": metric, **options})
        if error is not None:
            raise error
        return {"rows": []}

    monkeypatch.setattr(prune.compare, "rank_model", rank_model)
    monkeypatch.setattr(prune.compare, "render_table", lambda report: "TABLE")
    return calls


def test_quiet_reaches_the_library_as_progress(monkeypatch):
    calls = _fake_rank(monkeypatch)
    loud = CliRunner().invoke(cli, ["rank", "m/x", "--metric", "cosine"])
    quiet = CliRunner().invoke(cli, ["-q", "rank", "m/x", "--metric", "cosine"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    assert [c["progress"] for c in calls] == [True, False]
    assert calls[0]["metric"] == "cosine" and calls[0]["engine"] == "auto"
    assert quiet.stdout == "TABLE\n"


def test_metric_outside_the_registry_is_a_usage_error(monkeypatch):
    calls = _fake_rank(monkeypatch)
    result = CliRunner().invoke(cli, ["rank", "m/x", "--metric", "magnitude"])
    assert result.exit_code == 2 and calls == []
    assert "Invalid value for '-m' / '--metric': 'magnitude' is not one of" in result.stderr
    assert "cosine" in result.stderr


def test_fast_engine_refusal_names_the_flag(monkeypatch):
    from prune.errors import FastEngineUnsupported

    reason = "the fast engine scores loglikelihood tasks only (this task generates text)"
    _fake_rank(monkeypatch, FastEngineUnsupported(reason))
    result = CliRunner().invoke(cli, ["rank", "m/x", "--metric", "accuracy", "--engine", "fast"])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {reason} (use --engine lm-eval)\n"
