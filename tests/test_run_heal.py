"""`prune run` with a `heal:` section on a tiny model: healed variants beside the raw ones,
in the comparison and the cards, with paired intervals; resuming keeps or re-heals them.

Each run takes ~10 s of CPU (task setup dominates; the heal is 2-3 LoRA steps), so the
runs are marked slow.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from prune.cli import cli
from prune.errors import PruneError

DEPTH = 6
NAMES = ("cosine", "angular")
HEAL = "heal: {steps: STEPS, samples: 8, seq_len: 32, batch_size: 2, lora_rank: 2}\n"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
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
    path = tmp_path / "heal.yaml"
    path.write_text(
        f"model: {tiny_dir}\n"
        f"data_dir: {data_dir}\n"
        "calibration: {samples: 4, seq_len: 32, batch_size: 4}\n"
        "strategies: [cosine, angular]\n"
        "evaluation: {tasks: [local_piqa], limit: 6}\n"
        "prune: {remove: 2, protect: [0]}\n" + HEAL.replace("STEPS", "2")
    )
    return path


def _run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def _healed(out, name):
    return out / "variants" / f"{name}-healed"


@pytest.mark.slow
def test_run_heals_every_variant_and_compares_raw_and_healed(recipe, tmp_path, tiny_dir):
    out = tmp_path / "out"
    result = _run(recipe, "--out", out)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    report = (out / "comparison.md").read_text()
    assert "## Healed variants" in report
    for name in NAMES:
        raw = comparison["strategies"][name]
        folder = _healed(out, name)
        # a plain transformers checkpoint with the raw variant's blocks, healed
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_hidden_layers == DEPTH - 2 == raw["final"]["layers"]
        record = json.loads((folder / "prune.json").read_text())
        assert record["healing"]["steps"] == 2 and record["healing"]["method"] == "lora"
        assert record["healing"]["teacher"] == str(tiny_dir)  # the recipe's model
        assert record["chain"][-1]["strategy"] == name  # healed from this run's variant
        assert record["removed_layers_original"] == sorted(raw["removed"])
        assert len(record["run_fingerprint"]) == 64
        # the comparison: healed scores with paired intervals against base and raw
        healed = raw["healed"]
        assert healed["folder"] == f"variants/{name}-healed"
        assert set(healed["final"]["scores"]) == {"local_piqa"}
        assert healed["final"]["layers"] == raw["final"]["layers"]
        for side in ("vs_base", "vs_raw"):
            lo, hi = healed[side]["ci95"]
            assert lo <= healed[side]["diff"] <= hi and healed[side]["documents"] == 6
        assert healed["vs_raw"]["diff"] == pytest.approx(
            healed["final"]["mean"] - raw["final"]["mean"]
        )
        assert healed["vs_base"]["diff"] == pytest.approx(
            healed["final"]["mean"] - comparison["baseline"]["mean"]
        )
        lo, hi = healed["vs_raw"]["ci95"]
        expected = "healing helped" if lo > 0 else "healing hurt" if hi < 0 else "not distinguish"
        assert healed["verdict"].startswith(expected)
        assert healed["healing"]["heldout"]["chunks"] >= 1
        assert comparison["variants"][f"{name}-healed"] == f"variants/{name}-healed"
        # comparison.md and the raw card show raw and healed side by side
        mean = f"{healed['final']['mean']:.4f}"
        assert f"| {name}-healed | {DEPTH - 2} |" in report and mean in report
        card = (out / "variants" / name / "README.md").read_text()
        assert "## Healed variants" in card and f"| {name} healed |" in card
        assert f"{healed['vs_raw']['diff']:+.4f}" in card
        # the healed folder's own card is the heal's
        assert "## Healing" in (folder / "README.md").read_text()
        assert str(folder) in result.output  # listed with the outputs
    # the raw variants' verdict is unchanged by healing: only raw variants compete
    assert set(comparison["paired"]) == set(NAMES)


@pytest.mark.slow
def test_resume_keeps_healed_variants_and_heals_again_when_the_heal_section_changes(
    recipe, tmp_path, monkeypatch
):
    import prune.heal

    out = tmp_path / "out"
    assert _run(recipe, "--out", out).exit_code == 0
    weights = {n: (_healed(out, n) / "model.safetensors").stat() for n in NAMES}
    before = json.loads((out / "comparison.json").read_text())

    real = prune.heal.heal_variant
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(prune.heal, "heal_variant", counting)
    result = _run(recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert calls == []  # nothing healed again
    for name in NAMES:
        assert f"[{name}-healed] keeping the healed weights" in result.output
        now = (_healed(out, name) / "model.safetensors").stat()
        assert (now.st_ino, now.st_mtime_ns) == (weights[name].st_ino, weights[name].st_mtime_ns)
    after = json.loads((out / "comparison.json").read_text())
    for name in NAMES:
        assert after["strategies"][name]["healed"] == before["strategies"][name]["healed"]

    # another heal section: the raw variants are kept, the healed ones healed again
    recipe.write_text(recipe.read_text().replace("steps: 2", "steps: 3"))
    result = _run(recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in calls) == sorted(f"{n}-healed" for n in NAMES)
    for name in NAMES:
        assert f"[{name}] keeping the exported weights" in result.output
        assert f"[{name}-healed] healing again: the recipe" in result.output
        record = json.loads((_healed(out, name) / "prune.json").read_text())
        assert record["healing"]["steps"] == 3


@pytest.mark.slow
def test_an_interrupted_heal_resumes_from_its_saved_state(recipe, tmp_path, monkeypatch):
    import prune.heal

    recipe.write_text(recipe.read_text().replace("steps: 2", "steps: 3"))
    out = tmp_path / "out"
    real = prune.heal.distillation_loss
    losses = []
    interrupt = [True]

    def interrupt_third(*args, **kwargs):
        losses.append(1)
        if interrupt[0] and len(losses) == 3:  # Ctrl-C in the first heal's third step
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prune.heal, "distillation_loss", interrupt_third)
    result = _run(recipe, "--out", out)
    assert result.exit_code == 130
    state = out / "variants" / ".cosine-healed.heal-state" / "state.pt"
    assert state.is_file() and not (out / "comparison.json").exists()
    assert "interrupted at step 2 of 3" in result.output

    # A failure while resuming that is not about the state (here the export) keeps it.
    saved = state.read_bytes()
    real_export = prune.heal._export

    def full_disk(*args, **kwargs):
        raise PruneError("cannot write output folder: disk full")

    losses.clear()
    interrupt[0] = False
    monkeypatch.setattr(prune.heal, "_export", full_disk)
    result = _run(recipe, "--out", out, "--resume")
    assert result.exit_code == 1 and "disk full" in result.output
    assert len(losses) == 1  # the saved steps were continued, not started again
    assert state.is_file() and state.read_bytes() != saved  # the final state, kept
    monkeypatch.setattr(prune.heal, "_export", real_export)

    losses.clear()
    result = _run(recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    # the cosine heal resumed after its last step (exporting only), the angular heal ran all three
    assert len(losses) == 0 + 3
    assert not state.parent.exists()
    record = json.loads((_healed(out, "cosine") / "prune.json").read_text())
    assert record["healing"]["steps"] == 3 and len(record["healing"]["loss"]["curve"]) == 3


def test_a_heal_section_is_refused_under_torchrun(tmp_path, tiny_dir, monkeypatch):
    import prune.models

    monkeypatch.setattr(prune.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny_dir}\nprune: {{remove: 2}}\nheal: {{steps: 2}}\n")
    from prune.pipeline import run_recipe

    with pytest.raises(PruneError, match="heal: healing trains in one process"):
        run_recipe(path, out=tmp_path / "out", progress=False)


def test_publish_all_pushes_the_healed_variants_too(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import prune.hub
    from prune.pipeline import Run, publish
    from prune.recipe import parse_recipe

    pushed = []

    def push_many(pushes, private=False):
        pushed.extend((folder.name, repo) for folder, repo in pushes)
        return [SimpleNamespace(url=f"https://hub/{repo}") for _, repo in pushes]

    monkeypatch.setattr(prune.hub, "push_many", push_many)
    run = Run(tmp_path / "r.yaml", {}, False, False, False, print)
    run.recipe = parse_recipe(
        "model: m\nstrategies: [cosine]\nprune: {remove: 2}\nheal: {steps: 2}\n"
        "push: {enabled: true, repo_id: 'me/m-{strategy}-{layers}L', publish: all}\n",
        depth=6,
    )
    run.out = tmp_path / "out"
    run.variants = {"cosine": run.out / "variants" / "cosine"}
    run.healed = {"cosine": run.out / "variants" / "cosine-healed"}
    run.comparison = {"strategies": {"cosine": {"final": {"layers": 4}}}, "best": "cosine"}
    monkeypatch.setattr("prune.pipeline._write_comparison", lambda run: None)
    publish(run)
    assert pushed == [("cosine", "me/m-cosine-4L"), ("cosine-healed", "me/m-cosine-healed-4L")]
    assert run.pushed == {
        "cosine": "https://hub/me/m-cosine-4L",
        "cosine-healed": "https://hub/me/m-cosine-healed-4L",
    }
