"""`prune compare` / `prune rank`: report layout, files, correlations and one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from prune.cli import cli
from prune.layer_report import correlations, overlaps


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_CACHE", str(tmp_path / "cache"))


def test_correlations_and_overlaps():
    c = correlations([1, 2, 3, 4, 5], [2, 4, 6, 8, 11])
    assert c["spearman"]["rho"] == pytest.approx(1.0) and c["kendall"]["tau"] == pytest.approx(1.0)
    assert c["pearson"]["r"] > 0.99 and c["spearman"]["p"] < 0.05
    assert correlations([1, 2, 3], [0, 0, 0])["spearman"]["rho"] is None  # undefined, not NaN
    ov = overlaps([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 0, 9, 8, 7, 2, 3, 4, 5, 6], 10)
    assert [(o["k"], o["shared"]) for o in ov] == [(1, 0), (2, 2), (5, 2)]


def test_compare_tiny_writes_table_json_png(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "report"
    args = [
        "compare",
        str(tiny_llama_dir),
        "--tasks",
        "local_copa",
        "--limit",
        "4",
        "--perplexity",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--json",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    saved = json.loads((out / "report.json").read_text())
    assert saved["layers"] == report["layers"]
    assert [row["index"] for row in report["layers"]] == [0, 1, 2, 3]
    for row in report["layers"]:
        assert {"cosine", "accuracy_drop", "accuracy_drop_stderr", "perplexity_increase"} <= set(
            row
        )
        assert row["cosine"] is not None and row["accuracy_drop"] is not None
    assert set(report["correlations"]) == {"spearman", "kendall", "pearson"}
    assert report["baseline"]["local_copa"]["n"] == 4
    assert [o["k"] for o in report["overlaps"]] == [1, 1, 2]
    assert (out / "relevance.png").read_bytes()[:4] == b"\x89PNG"
    assert "| layer |" in (out / "table.md").read_text()


def test_rank_cosine_prints_table(tiny_llama_dir, data_dir):
    result = CliRunner().invoke(
        cli,
        [
            "rank",
            str(tiny_llama_dir),
            "--metric",
            "cosine",
            "--samples",
            "3",
            "--seq-len",
            "32",
            "--data-dir",
            str(data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "cosine (1-cos)" in result.output and "| 3 |" in result.output


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tasks", "local_arc_esy"], "unknown task 'local_arc_esy' (did you mean local_arc_easy"),
        (["--tasks", "local_arc_easy", "--limit", "0"], "limit 0 is invalid"),
        (
            ["--tasks", "local_arc_easy", "--data-dir", "/nonexistent/data"],
            "data folder '/nonexistent/data'",
        ),
        (
            ["--tasks", "local_arc_easy", "--calibration", "missing.txt"],
            "calibration file 'missing.txt' does not exist",
        ),
        (["--tasks", "local_arc_easy", "--calibration", "EMPTY"], "has no text"),
        (["--measures", "cosine,bogus"], "unknown measure 'bogus'"),
    ],
)
def test_bad_input_is_one_error_line(tiny_llama_dir, data_dir, tmp_path, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compare", str(tiny_llama_dir), "--out", str(out), *extra])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.slow
def test_compare_smollm2_end_to_end(tmp_path, data_dir):
    out = tmp_path / "smol"
    # --layers keeps the accuracy measure to three evaluations (plus the baseline).
    args = [
        "compare",
        "smollm2-135m",
        "--tasks",
        "local_arc_easy",
        "--limit",
        "20",
        "--layers",
        "0,15,-1",
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 30 and report["baseline"]["local_arc_easy"]["n"] == 20
    measured = [row["index"] for row in report["layers"] if row["accuracy_drop"] is not None]
    assert measured == [0, 15, 29]
    assert all(row["cosine"] is not None for row in report["layers"])
    assert (out / "relevance.png").stat().st_size > 10_000
    assert "| 29 |" in (out / "table.md").read_text()
