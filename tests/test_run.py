"""`prune run` end to end on a tiny model and a tiny local task: layout, variants, cards, reliability.

The runs take ~10 s of CPU each (lm-eval task setup dominates), so they are marked slow.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from prune.card import parse_front_matter
from prune.cli import cli

DEPTH = 6


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One prune cache for this module: rendered tasks and evaluation results are reused across tests."""
    return tmp_path_factory.mktemp("prune-cache")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("model") / "tiny", "llama", num_layers=DEPTH
    )


@pytest.fixture
def recipe(tmp_path, tiny_dir, data_dir, shared_cache, monkeypatch):
    monkeypatch.setenv("PRUNE_CACHE", str(shared_cache))
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "# a tiny recipe\n"
        f"model: {tiny_dir}\n"
        f"data_dir: {data_dir}\n"
        "calibration: {samples: 4, seq_len: 32, batch_size: 4}\n"
        "strategies:\n"
        "  - cosine\n"
        "  - {name: accuracy, tasks: [local_copa], limit: 6}\n"
        "evaluation: {tasks: [local_piqa], limit: 6}\n"
        "prune: {remove: 2, protect: [0]}\n"
        f"export: {{out: {tmp_path / 'unused'}}}\n"
    )
    return path


def _run(*args):
    return CliRunner().invoke(cli, ["-q", "run", *map(str, args)])


@pytest.mark.slow
def test_run_writes_the_whole_layout(recipe, tmp_path):
    out = tmp_path / "out"
    result = _run(recipe, "--out", out, "--limit", "5")
    assert result.exit_code == 0, result.output
    assert (out / "recipe.yaml").read_bytes() == recipe.read_bytes()
    assert (out / "relevance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["overrides"] == {"out": str(out), "limit": 5}
    assert comparison["evaluation"]["limit"] == 5
    assert set(comparison["strategies"]) == {"cosine", "accuracy"}
    assert comparison["model"]["num_layers"] == DEPTH
    # paired statistics: each variant against the base and the other, on the same documents
    for name, other in (("cosine", "accuracy"), ("accuracy", "cosine")):
        paired = comparison["paired"][name]
        lo, hi = paired["vs_base"]["ci95"]
        assert lo <= paired["vs_base"]["diff"] <= hi and paired["vs_base"]["documents"] == 5
        mean_diff = (
            comparison["strategies"][name]["final"]["mean"]
            - comparison["strategies"][other]["final"]["mean"]
        )
        assert paired["vs"][other]["diff"] == pytest.approx(mean_diff)
        history = comparison["strategies"][name]["history_vs_base"]
        assert len(history) == 3 and history[0]["diff"] == 0.0
    # a winner only when its interval excludes zero
    lead = comparison["paired"]["cosine"]["vs"]["accuracy"]
    if comparison["best"] is None:
        assert "not distinguishable" in comparison["verdict"]
    else:
        winner = comparison["paired"][comparison["best"]]["vs"]
        assert all(p["ci95"][0] > 0 for p in winner.values()), lead
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "comparison.md").read_text()
    assert "Paired differences" in report and "Verdict:" in report
    for name, data in comparison["strategies"].items():
        history = data["history"]
        assert [s["layers_left"] for s in history] == [DEPTH, DEPTH - 1, DEPTH - 2]
        assert 0 not in data["removed"]  # protected
        assert sorted(data["removed"]) == history[-1]["removed"]
        folder = out / "variants" / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert (
            model.config.num_hidden_layers == history[-1]["layers_left"] == data["final"]["layers"]
        )
        record = json.loads((folder / "prune.json").read_text())
        assert record["removed_layers"] == sorted(data["removed"])
        assert record["strategy"] == name
        # streamed from the float32 tiny source, computed in the recipe's float32
        assert record["export_dtype"] == "float32" and record["compute_dtype"] == "float32"
        assert "dtype: float32" in (folder / "mergekit.yaml").read_text()
        card = (folder / "README.md").read_text()
        assert "Weights stored in float32" in card and "computed in float32" in card
        meta = parse_front_matter(card)
        assert meta["library_name"] == "transformers" and "pruned" in meta["tags"]
        (entry,) = meta["model-index"]
        assert entry["results"][0]["metrics"][0]["value"] == round(
            data["final"]["scores"]["local_piqa"], 4
        )
        for other in ("cosine", "accuracy"):
            removed = ", ".join(map(str, comparison["strategies"][other]["removed"]))
            assert f"| {other} | one-shot | {removed} |" in card
        assert "![Mean reporting score against blocks removed" in card
        assert (folder / "tradeoff.png").exists()
        assert (folder / "relevance.png").exists() and (
            folder / "recipe.yaml"
        ).read_bytes() == recipe.read_bytes()
        assert f"| {name} | {data['final']['layers']} |" in report
    # the headline table and the paths are printed at the end
    assert "cosine" in result.output and str(out / "comparison.json") in result.output


@pytest.mark.slow
def test_existing_output_is_refused_then_resumed_from_the_cache(
    recipe, tmp_path, shared_cache, monkeypatch
):
    out = tmp_path / "out"
    assert _run(recipe, "--out", out).exit_code == 0
    before = json.loads((out / "comparison.json").read_text())

    result = _run(recipe, "--out", out)
    assert result.exit_code == 1
    assert "Error: output folder" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output

    # a resumed run evaluates nothing new: every score comes from the cache
    entries = sorted((shared_cache / "results").rglob("*.json"))
    import prune.evaluate.harness
    import prune.evaluate.removals

    def no_eval(*args, **kwargs):
        raise AssertionError("evaluated a model although every result is cached")

    monkeypatch.setattr(prune.evaluate.removals, "_fast_engine", lambda: no_eval)
    monkeypatch.setattr(prune.evaluate.harness, "LmEvalRunner", no_eval)
    result = _run(recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert sorted((shared_cache / "results").rglob("*.json")) == entries
    after = json.loads((out / "comparison.json").read_text())
    for name in ("cosine", "accuracy"):
        assert after["strategies"][name]["final"] == before["strategies"][name]["final"]


@pytest.mark.slow
def test_resume_rebuilds_the_variants_of_another_recipe_and_keeps_the_rest(recipe, tmp_path):
    out = tmp_path / "out"
    names = ("cosine", "accuracy")
    variants = {name: out / "variants" / name for name in names}

    def records() -> dict[str, dict]:
        return {n: json.loads((f / "prune.json").read_text()) for n, f in variants.items()}

    assert _run(recipe, "--out", out, "--limit", "5").exit_code == 0
    first = records()
    (fingerprint,) = {r["run_fingerprint"] for r in first.values()}  # one run, one fingerprint
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0

    # another evaluation limit: every variant is rebuilt, saying why, and describes this run
    result = CliRunner().invoke(
        cli, ["run", *map(str, (recipe, "--out", out, "--limit", 4, "--resume"))]
    )
    assert result.exit_code == 0, result.output
    for name in names:
        why = f"[{name}] rebuilding the variant: the recipe or prune's version changed"
        assert why in result.output
    second = records()
    assert len({r["run_fingerprint"] for r in second.values()}) == 1
    for name, folder in variants.items():
        assert second[name]["run_fingerprint"] != first[name]["run_fingerprint"]
        card = (folder / "README.md").read_text()
        assert "first 4 documents per task" in card and "first 5 documents" not in card
        assert (folder / "recipe.yaml").read_bytes() == recipe.read_bytes()
    assert json.loads((out / "comparison.json").read_text())["evaluation"]["limit"] == 4

    # the same settings (only a comment changed): the weights are kept, the small files rewritten
    weights = {n: (f / "model.safetensors").stat() for n, f in variants.items()}
    recipe.write_text(recipe.read_text().replace("# a tiny recipe", "# a tiny recipe, resumed"))
    result = CliRunner().invoke(
        cli, ["run", *map(str, (recipe, "--out", out, "--limit", 4, "--resume"))]
    )
    assert result.exit_code == 0, result.output
    assert (
        "rebuilding" not in result.output
        and "[cosine] keeping the exported weights" in result.output
    )
    assert records() == second
    for name, folder in variants.items():
        now = (folder / "model.safetensors").stat()
        assert (now.st_ino, now.st_mtime_ns) == (weights[name].st_ino, weights[name].st_mtime_ns)
        assert (folder / "recipe.yaml").read_text().startswith("# a tiny recipe, resumed\n")
        assert "# a tiny recipe, resumed" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_interrupted_export_leaves_no_half_written_variant(recipe, tmp_path, monkeypatch):
    import prune.export

    out = tmp_path / "out"
    real = prune.export._write_record
    calls = []

    def interrupt_second(folder, record):
        calls.append(folder)
        if len(calls) == 2:  # Ctrl-C while the second variant's weights are being written
            raise KeyboardInterrupt
        return real(folder, record)

    monkeypatch.setattr(prune.export, "_write_record", interrupt_second)
    result = _run(recipe, "--out", out)
    assert result.exit_code == 130
    assert (out / "variants" / "cosine" / "config.json").exists()
    assert not (out / "variants" / "accuracy").exists()
    assert not [
        p for p in (out / "variants").iterdir() if p.name.startswith(".")
    ]  # no temp folders
    assert not (out / "comparison.json").exists()  # the run is visibly unfinished

    monkeypatch.setattr(prune.export, "_write_record", real)
    result = _run(recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert (
        AutoModelForCausalLM.from_pretrained(out / "variants" / "accuracy").config.num_hidden_layers
        == DEPTH - 2
    )


def test_bad_recipe_fails_before_any_model_is_loaded(tmp_path, tiny_dir, monkeypatch):
    import prune.models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(prune.models, "load_model", no_load)
    cases = {
        "prune: {remove: 6}\n": "prune.remove: must be < 6, got 6",
        "prune: {remove: 2, protect: [0, 1, 2, 3, 4, 5]}\n": "protects 6 of 6 layers",
        "strategies: [cosine, magnitude]\nprune: {remove: 2}\n": "unknown strategy 'magnitude'",
    }
    for body, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(f"model: {tiny_dir}\n" + body)
        result = _run(path, "--out", tmp_path / "never")
        assert result.exit_code == 1, result.output
        assert message in result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_unknown_task_fails_before_any_model_is_loaded(tmp_path, tiny_dir, monkeypatch):
    """Non-local task names are checked against lm-eval's whole task index (seconds to build)."""
    import prune.models

    monkeypatch.setattr(
        prune.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded")
    )
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: {tiny_dir}\nevaluation: {{tasks: [arc_eazy]}}\nprune: {{remove: 2}}\n")
    result = _run(path, "--out", tmp_path / "never")
    assert result.exit_code == 1
    assert "unknown task 'arc_eazy'" in result.output and "arc_easy" in result.output
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_iterative_schedule_with_three_strategies(
    tmp_path, tiny_dir, data_dir, shared_cache, monkeypatch
):
    monkeypatch.setenv("PRUNE_CACHE", str(shared_cache))
    path = tmp_path / "iter.yaml"
    path.write_text(
        f"model: {tiny_dir}\ndata_dir: {data_dir}\n"
        "calibration: {samples: 4, seq_len: 32, batch_size: 4}\n"
        "strategies: [cosine, perplexity, {name: accuracy, tasks: [local_copa], limit: 4}]\n"
        "evaluation: {tasks: [local_piqa], limit: 4}\n"
        "prune: {schedule: iterative, keep: 3, protect: [-1]}\n"
    )
    out = tmp_path / "out"
    result = _run(path, "--out", out)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["correlations"]) == {
        "cosine~perplexity",
        "cosine~accuracy",
        "perplexity~accuracy",
    }
    for name, data in comparison["strategies"].items():
        assert (
            data["rankings"] == 3
        )  # ranked the full model, then after each of the first two removals
        assert len(set(data["removed"])) == 3 and DEPTH - 1 not in data["removed"]
        assert all(0 <= i < DEPTH for i in data["removed"])
        history = data["history"]
        assert [s["removed_layer"] for s in history[1:]] == data["removed"]
        model = AutoModelForCausalLM.from_pretrained(out / "variants" / name)
        assert model.config.num_hidden_layers == 3


@pytest.mark.slow
def test_spans_schedules_and_rescore_per_strategy(
    tmp_path, tiny_dir, data_dir, shared_cache, monkeypatch
):
    monkeypatch.setenv("PRUNE_CACHE", str(shared_cache))
    path = tmp_path / "spans.yaml"
    path.write_text(
        f"model: {tiny_dir}\ndata_dir: {data_dir}\n"
        "calibration: {samples: 4, seq_len: 32, batch_size: 4}\n"
        "strategies:\n"
        "  - cosine\n"
        "  - {name: angular, span: 2}\n"
        "  - {name: kl, tasks: [local_copa], limit: 4, span: 2}\n"
        "  - {name: kl, tasks: [local_copa], limit: 4, schedule: iterative, rescore: 2,\n"
        "     adaptive: true}\n"
        "evaluation: {tasks: [local_piqa], limit: 4}\n"
        "prune: {remove: 2, protect: [0]}\n"
    )
    out = tmp_path / "out"
    result = _run(path, "--out", out)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    strategies = comparison["strategies"]
    assert list(strategies) == ["cosine", "angular-span2", "kl-span2", "kl-iterative"]
    for name in ("angular-span2", "kl-span2"):
        data = strategies[name]
        first, second = sorted(data["removed"])
        assert second == first + 1 and first != 0  # one contiguous span, block 0 protected
        assert data["history"][1]["removed_span"] == data["removed"]
        assert data["strategy"]["span"] == 2
    iterative = strategies["kl-iterative"]
    assert iterative["schedule"] == "iterative" and iterative["rankings"] == 2
    assert iterative["strategy"] == {"measure": "kl", "span": 1, "rescore": 2, "adaptive": True}
    # The relevance table holds the single-block rankings only, one per measure.
    assert set(comparison["relevance"]["orders"]) == {"cosine", "kl"}
    # Adaptive sampling around the cut of the 2 blocks the removal takes.
    assert comparison["relevance"]["settings"]["kl"]["adaptive"] == 2
    card = (out / "variants" / "kl-span2" / "README.md").read_text()
    assert "in spans of 2 consecutive blocks" in card
    assert "re-measuring the 2 least relevant after each removal" in card
    model = AutoModelForCausalLM.from_pretrained(out / "variants" / "kl-span2")
    assert model.config.num_hidden_layers == DEPTH - 2


@pytest.mark.slow
def test_run_push_sends_every_variant_to_the_hub(recipe, tmp_path, hub, monkeypatch):
    from hub_server import USER, VALID_TOKEN

    recipe.write_text(
        recipe.read_text() + f"push: {{repo_id: '{USER}/tiny-{{strategy}}-{{layers}}L'}}\n"
    )
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    out = tmp_path / "out"
    result = _run(recipe, "--out", out, "--push")
    assert result.exit_code == 1
    assert "401" in result.output or "token" in result.output.lower()
    assert "retry with `prune push" in result.output
    assert (out / "comparison.json").exists()  # the local result is complete

    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    result = _run(recipe, "--out", out, "--push", "--resume")
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["pushed"]) == {"cosine", "accuracy"}
    assert comparison["overrides"]["push"] is True
    for name in ("cosine", "accuracy"):
        files = hub.files(f"{USER}/tiny-{name}-{DEPTH - 2}L")
        assert {"README.md", "config.json", "model.safetensors", "prune.json"} <= set(files)


def test_publish_best_refuses_when_no_variant_is_distinguishably_better(tmp_path):
    from prune.errors import PruneError
    from prune.pipeline import Run, publish
    from prune.recipe import parse_recipe

    run = Run(tmp_path / "r.yaml", {}, False, False, False, print)
    run.recipe = parse_recipe(
        "model: m\nprune: {remove: 2}\npush: {enabled: true, repo_id: me/tiny}\n", depth=6
    )
    run.out = tmp_path / "out"
    run.variants = {"cosine": tmp_path / "a", "accuracy": tmp_path / "b"}
    run.comparison = {
        "best": None,
        "verdict": "the variants are not distinguishable: cosine - accuracy = +0.0100 "
        "(95% CI -0.0300 to +0.0500, 200 documents)",
    }
    with pytest.raises(PruneError) as info:
        publish(run)
    message = str(info.value)
    assert "no variant is distinguishably better" in message and "-0.0300 to +0.0500" in message
    assert "push.publish" in message
