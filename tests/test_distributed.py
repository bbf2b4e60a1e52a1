"""`torchrun -m prune`: candidates split across processes, the same numbers as one process,
one copy of the output; and `prune.distributed.share_work`'s split and error passing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from prune import distributed
from prune.cli import cli
from prune.errors import FastEngineUnsupported, PruneError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timings"}


@pytest.mark.slow  # two processes that each import torch, transformers and lm-eval: ~30 s
def test_torchrun_two_processes_equal_one(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    args = [
        "compare",
        str(tiny_llama_dir),
        "--measures",
        "accuracy,kl,perplexity",  # kl and perplexity: floats that any change would show
        "--tasks",
        "local_copa,local_arc_easy",
        "--limit",
        "6",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--data-dir",
        str(data_dir),
        "--json",
    ]
    # One process, in this one (one thread, as the subprocesses below).
    import torch

    monkeypatch.setenv("PRUNE_CACHE", str(tmp_path / "cache-one"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output

    # Two processes with torchrun, an empty cache of their own (so they really evaluate).
    env = {
        **os.environ,
        "PRUNE_CACHE": str(tmp_path / "cache-two"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    two_out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "prune",
        *args,
        "--out",
        str(two_out),
    ]
    two = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    report_one = json.loads(one.stdout)
    report_two = json.loads(two.stdout)  # one JSON document: process 1 printed nothing
    assert _without_timings(report_two) == _without_timings(report_one)
    assert all(row["choice_kl"] > 0 for row in report_two["layers"])  # the numbers are real
    assert report_two["layers"][0]["perplexity_increase"] != 0
    # Process 0 wrote the files, once (no temporaries of a second writer left behind).
    assert sorted(p.name for p in two_out.iterdir()) == ["relevance.png", "report.json", "table.md"]
    saved = json.loads((two_out / "report.json").read_text())
    assert _without_timings(saved) == _without_timings(report_one)
    # Both processes cached their share: the cache holds what one process's run holds.
    entries = sorted(p.name for p in (tmp_path / "cache-two").rglob("*.json"))
    assert entries == sorted(p.name for p in (tmp_path / "cache-one").rglob("*.json"))
    assert "Error" not in two.stderr


def _as_rank(monkeypatch, rank: int, size: int, others: dict[int, tuple[str, object]]):
    """Make this process rank `rank` of `size`; `gather` returns `others` for the other ranks."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(size))

    def gather(local):
        return [local if r == rank else others[r] for r in range(size)]

    monkeypatch.setattr(distributed, "gather", gather)


def test_share_work_splits_round_robin_and_merges(monkeypatch):
    _as_rank(monkeypatch, 1, 3, {0: ("ok", {"a": 0, "d": 3}), 2: ("ok", {"c": 2})})
    seen = []

    def compute(share):
        seen.append(share)
        return {item: "abcd".index(item) for item in share}

    assert distributed.share_work(list("abcd"), compute) == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert seen == [["b"]]


def test_share_work_raises_another_process_error_everywhere(monkeypatch):
    # A PruneError elsewhere is raised here as it was (the "auto" engine's fallback sees it).
    _as_rank(monkeypatch, 0, 2, {1: ("error", FastEngineUnsupported("no sdpa"))})
    with pytest.raises(FastEngineUnsupported, match="no sdpa"):
        distributed.share_work([1, 2], lambda share: {i: i for i in share})
    # Any other exception arrives as text, in a PruneError naming the process.
    _as_rank(monkeypatch, 0, 2, {1: ("error", "RuntimeError: CUDA out of memory")})
    with pytest.raises(PruneError, match="process 1 of 2 failed: RuntimeError: CUDA out of"):
        distributed.share_work([1, 2], lambda share: {i: i for i in share})


def test_share_work_raises_its_own_error_after_the_exchange(monkeypatch):
    _as_rank(monkeypatch, 1, 2, {0: ("ok", {0: 0})})
    exchanged = []
    gather = distributed.gather
    monkeypatch.setattr(
        distributed, "gather", lambda local: exchanged.append(local) or gather(local)
    )

    def compute(share):
        raise ValueError("bad document")

    with pytest.raises(ValueError, match="bad document"):
        distributed.share_work([0, 1], compute)
    assert exchanged == [("error", "ValueError: bad document")]  # the others were told first


def test_world_reads_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.gather("x") == ["x"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.world() == (1, 2) and not distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(PruneError, match="WORLD_SIZE='two'"):
        distributed.world()


def test_only_process_zero_writes_the_compare_report(monkeypatch, tmp_path: Path):
    import prune.compare as compare

    monkeypatch.setattr(compare, "measure_model", lambda model, measures, **kw: {"layers": []})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report, paths = compare.compare_model("m", tmp_path / "out", measures=["cosine"])
    assert paths["json"] == tmp_path / "out" / "report.json"
    assert not (tmp_path / "out").exists()
