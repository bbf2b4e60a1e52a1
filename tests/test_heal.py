"""`prune heal` on tiny models: the loss falls, the export is plain and equals the merged
model, a resumed run equals an uninterrupted one, and bad input is one `Error:` line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny import save_tiny_checkpoint

from prune.card import parse_front_matter
from prune.cli import cli
from prune.errors import PruneError
from prune.heal import HealSettings, adjacent_blocks, heal_variant
from prune.heal_data import batch_rows
from prune.heal_state import state_dir_for

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wise owls watch from old trees".split()
)


@pytest.fixture
def calibration(tmp_path):
    """A .txt calibration file: 40 short paragraphs of varied word order."""
    import random

    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(40)]
    path = tmp_path / "calibration.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


@pytest.fixture
def variant(tmp_path):
    """A tiny 4-block teacher and a student with blocks 1 and 2 removed by `prune drop`."""
    teacher = save_tiny_checkpoint(tmp_path / "teacher", "llama", num_layers=4)
    out = tmp_path / "variant"
    result = CliRunner().invoke(cli, ["drop", str(teacher), "--layers", "1,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _settings(method: str, **kw) -> HealSettings:
    lr = {"lora": 1e-2, "full": 3e-3, "adjacent": 3e-3}[method]
    return HealSettings(
        **{
            "method": method,
            "steps": 20,
            "lr": lr,
            "batch_size": 4,
            "seq_len": 32,
            "samples": 40,
            **kw,
        }
    )


def _heal(variant, out, calibration, method="lora", **kw):
    extra = {k: kw.pop(k) for k in list(kw) if k in ("on_step", "resume", "checkpoint_every")}
    return heal_variant(
        variant,
        out,
        settings=_settings(method, calibration=str(calibration), **kw),
        device="cpu",
        progress=False,
        **extra,
    )


def _cli_args(variant, out, calibration, *extra):
    """`prune -q heal` of the tiny variant: 4 steps of 32-token chunks on the test text."""
    return [
        "-q", "heal", str(variant), "--out", str(out), "--steps", "4", "--seq-len", "32",
        "--calibration", str(calibration), "--samples", "40", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "full", "adjacent"])
def test_loss_falls_and_held_out_kl_drops(variant, calibration, tmp_path, method):
    result = _heal(variant, tmp_path / "healed", calibration, method)
    curve = result.healing["loss"]["curve"]
    assert curve[-1]["loss"] < 0.7 * curve[0]["loss"]
    held = result.healing["heldout"]
    assert held["kl_after"] < held["kl_before"]
    assert held["kl_change"]["ci95"][1] < 0  # the drop is clear of noise
    if method == "adjacent":
        assert result.healing["blocks"] == [0, 1]  # original 0 and 3, beside the cut 1-2


def test_export_loads_keeps_blocks_and_equals_merged_model(variant, calibration, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "healed"
    result = _heal(variant, out, calibration, "lora")
    healed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert healed.config.num_hidden_layers == 2
    assert len(healed.model.layers) == 2
    assert not any("lora" in name for name in healed.state_dict())
    # The exported weights give the held-out KL the run measured after merging.
    from transformers import AutoTokenizer

    from prune.calibration import load_calibration
    from prune.heal_data import chunk_tokens, split_texts
    from prune.heal_measure import heldout_scores

    texts = load_calibration(str(calibration), samples=40)
    _, held_texts = split_texts(texts, HealSettings().seed)
    chunks = chunk_tokens(AutoTokenizer.from_pretrained(out), held_texts, 32)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    scores = heldout_scores(healed, teacher, chunks, 4, torch.device("cpu"))
    mean_kl = sum(scores["kl"]) / len(scores["kl"])
    assert mean_kl == pytest.approx(result.healing["heldout"]["kl_after"], rel=1e-5)
    record = json.loads((out / "prune.json").read_text())
    assert record["healing"]["method"] == "lora"
    assert record["removed_layers_original"] == [1, 2]
    assert record["num_layers_after"] == 2
    card = (out / "README.md").read_text()
    assert "## Healing" in card and "This model was healed" in card
    assert "## Not evaluated" not in card
    assert "healed" in parse_front_matter(card)["tags"]


def test_export_logits_equal_the_merged_in_memory_model(
    variant, calibration, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    import prune.heal as heal

    captured = {}
    original = heal._export

    def spy(student, model, *args, **kwargs):
        captured["model"] = model
        return original(student, model, *args, **kwargs)

    monkeypatch.setattr(heal, "_export", spy)
    out = tmp_path / "healed"
    _heal(variant, out, calibration, "lora")
    ids = torch.tensor([[5, 17, 99, 3, 42, 200, 7, 8]])
    with torch.no_grad():
        expected = captured["model"](input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert type(captured["model"]).__module__.startswith("transformers")  # merged, not peft
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resumed_run_equals_uninterrupted_run(variant, calibration, tmp_path, method):
    from transformers import AutoModelForCausalLM

    _heal(variant, tmp_path / "straight", calibration, method, grad_accum=2)

    def stop_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        _heal(variant, out, calibration, method, grad_accum=2, on_step=stop_at_7)
    assert (state_dir_for(out) / "state.pt").is_file()
    assert not out.exists()
    result = _heal(variant, out, calibration, method, grad_accum=2, resume=True)
    assert len(result.healing["loss"]["curve"]) == 10 and result.healing["steps"] == 20
    assert not state_dir_for(out).exists()  # cleaned up after the export
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight = json.loads((tmp_path / "straight" / "prune.json").read_text())["healing"]
    assert straight["loss"] == result.healing["loss"]
    assert straight["heldout"] == result.healing["heldout"]


def test_periodic_checkpoint_resumes(variant, calibration, tmp_path):
    """A run killed between checkpoints resumes from the last one (step 10 of 20)."""

    def kill_at_13(step, loss):
        if step == 13:
            raise SystemExit  # no chance to save: as if the process died

    out = tmp_path / "healed"
    with pytest.raises(SystemExit):
        _heal(variant, out, calibration, "lora", on_step=kill_at_13, checkpoint_every=10)
    saved = torch.load(state_dir_for(out) / "state.pt", weights_only=True)
    assert saved["step"] == 10
    result = _heal(variant, out, calibration, "lora", resume=True)
    straight = _heal(variant, tmp_path / "straight", calibration, "lora")
    assert result.healing["loss"] == straight.healing["loss"]


def test_cli_heals_and_reports(variant, calibration, tmp_path):
    out = tmp_path / "healed"
    result = CliRunner().invoke(cli, _cli_args(variant, out, calibration, "--tasks", "none"))
    assert result.exit_code == 0, result.output
    assert "KL to teacher" in result.output and str(out) in result.output
    assert json.loads((out / "prune.json").read_text())["healing"]["steps"] == 4


def test_cli_interrupt_names_resume(variant, calibration, tmp_path, monkeypatch):
    import prune.heal as heal

    calls = {"n": 0}
    original = heal.distillation_loss

    def interrupt_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(heal, "distillation_loss", interrupt_third)
    out = tmp_path / "healed"
    args = _cli_args(variant, out, calibration, "--tasks", "none")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: healing interrupted at step 2 of 4")
    assert "--resume" in lines[0]
    again = CliRunner().invoke(cli, args)  # without --resume: refused, state kept
    assert again.exit_code == 1 and "--resume" in again.output
    monkeypatch.setattr(heal, "distillation_loss", original)
    done = CliRunner().invoke(cli, [*args, "--resume"])
    assert done.exit_code == 0, done.output


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_folder_without_prune_json_needs_a_teacher(calibration, tmp_path):
    plain = save_tiny_checkpoint(tmp_path / "plain", "llama", num_layers=2)
    result = CliRunner().invoke(
        cli,
        ["-q", "heal", str(plain), "--out", str(tmp_path / "o"), "--calibration", str(calibration)],
    )
    line = _one_error_line(result)
    assert "prune.json" in line and "--teacher" in line


def test_teacher_with_another_vocabulary_is_refused(variant, calibration, tmp_path):
    other = save_tiny_checkpoint(tmp_path / "other", "llama", num_layers=4, vocab_size=300)
    args = ["-q", "heal", str(variant), "--out", str(tmp_path / "o"), "--teacher", str(other)]
    result = CliRunner().invoke(cli, [*args, "--calibration", str(calibration), "--device", "cpu"])
    line = _one_error_line(result)
    assert "300" in line and "256" in line and "vocabulary" in line
    assert not (tmp_path / "o").exists()


def test_bad_settings_are_named_at_once(variant, calibration, tmp_path):
    args = ["-q", "heal", str(variant), "--out", str(tmp_path / "o"), "--steps", "0", "--lr", "-1"]
    line = _one_error_line(CliRunner().invoke(cli, args))
    assert "steps 0" in line and "lr -1" in line


def test_adjacent_blocks_are_beside_each_cut():
    # 8 blocks, 2-3 and 7 removed: kept 0,1,4,5,6 -> student 0..4; beside: 1, 4, 6.
    assert adjacent_blocks([2, 3, 7], 8, 5) == [1, 2, 4]
    assert adjacent_blocks([0], 4, 3) == [0]


def test_batches_are_a_pure_function_of_seed_and_index():
    first = [batch_rows(10, 4, 1, i) for i in range(5)]
    assert first == [batch_rows(10, 4, 1, i) for i in range(5)]
    flat = [r for rows in first for r in rows]
    assert sorted(flat[:10]) == list(range(10))  # each epoch reads every chunk once


def test_bfloat16_heals_and_exports_bfloat16(variant, calibration, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "healed"
    result = _heal(variant, out, calibration, "lora", dtype="bfloat16", steps=4)
    assert result.healing["compute_dtype"] == "bfloat16"
    record = json.loads((out / "prune.json").read_text())
    # written in the variant's float32 (training in another dtype does not change it)
    assert record["export_dtype"] == "float32" and record["compute_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
    card = (out / "README.md").read_text()
    assert "Weights stored in float32 (`export_dtype` in prune.json); computed in bfloat16" in card
    assert "the model was not run" not in card  # the variant's sentence is replaced


def test_finished_training_is_saved_before_export(variant, calibration, tmp_path, monkeypatch):
    """Ctrl-C during the export resumes without training again."""
    import prune.heal as heal

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "healed"
    with monkeypatch.context() as patch:
        patch.setattr(heal, "_export", interrupt)
        with pytest.raises(KeyboardInterrupt):
            _heal(variant, out, calibration, "lora", steps=6)
    steps = []
    result = _heal(
        variant,
        out,
        calibration,
        "lora",
        steps=6,
        resume=True,
        on_step=lambda s, _: steps.append(s),
    )
    assert steps == [] and len(result.healing["loss"]["curve"]) == 6


def test_report_tasks_scored_before_and_after(variant, calibration, tmp_path, data_dir):
    """The before/after report scores are those of the variant and of the healed folder,
    and their change is the paired difference over the same documents."""
    from prune.evaluate.removals import evaluate
    from prune.evaluate.settings import EvalSettings
    from prune.models import load_model

    report = EvalSettings(tasks=("local_copa",), limit=16, data_dir=str(data_dir))
    out = tmp_path / "healed"
    result = heal_variant(
        variant,
        out,
        settings=_settings("lora", calibration=str(calibration), steps=4),
        report=report,
        device="cpu",
        progress=False,
    )
    tasks = result.healing["tasks"]

    def score(folder):
        loaded = load_model(str(folder), device="cpu")
        return evaluate(loaded.model.eval(), loaded.tokenizer, report)["local_copa"]

    before, after = score(variant), score(out)
    row = tasks["scores"]["local_copa"]
    assert row["before"] == pytest.approx(before.value)
    assert row["after"] == pytest.approx(after.value)
    assert row["documents"] == 16
    per_doc = [
        after.outcomes.metric(after.metric)[d] - before.outcomes.metric(before.metric)[d]
        for d in before.outcomes.doc_ids
    ]
    assert tasks["change"]["diff"] == pytest.approx(sum(per_doc) / len(per_doc))
    lo, hi = tasks["change"]["ci95"]
    assert lo <= tasks["change"]["diff"] <= hi
    assert tasks["distinguishable"] == (lo > 0 or hi < 0)
    record = json.loads((out / "prune.json").read_text())
    assert record["healing"]["tasks"]["scores"]["local_copa"]["documents"] == 16
    card = (out / "README.md").read_text()
    assert "| local_copa | acc |" in card and "Change of the mean" in card


def test_resume_refuses_other_report_tasks(variant, calibration, tmp_path, data_dir):
    from prune.evaluate.settings import EvalSettings

    out = tmp_path / "healed"

    def stop_at_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    settings = _settings("lora", calibration=str(calibration), steps=4)
    report = EvalSettings(tasks=("local_copa",), limit=8, data_dir=str(data_dir))
    with pytest.raises(KeyboardInterrupt):
        heal_variant(
            variant, out, settings=settings, report=report, device="cpu", progress=False,
            on_step=stop_at_two,
        )  # fmt: skip
    other = EvalSettings(tasks=("local_copa",), limit=4, data_dir=str(data_dir))
    with pytest.raises(PruneError, match="report"):
        heal_variant(
            variant, out, settings=settings, report=other, device="cpu", progress=False,
            resume=True,
        )  # fmt: skip
    done = heal_variant(
        variant, out, settings=settings, report=report, device="cpu", progress=False, resume=True
    )
    assert done.healing["tasks"]["scores"]["local_copa"]["documents"] == 8


def test_export_dtype_is_separate_from_the_compute_dtype(variant, calibration, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "healed"
    args = _cli_args(variant, out, calibration, "--tasks", "none", "--export-dtype", "bfloat16")
    result = CliRunner().invoke(cli, [*args, "--steps", "2"])
    assert result.exit_code == 0, result.output
    healing = json.loads((out / "prune.json").read_text())["healing"]
    record = json.loads((out / "prune.json").read_text())
    assert healing["compute_dtype"] == "float32" and record["export_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_healed_card_replaces_the_variant_scores_in_its_metadata():
    from prune.heal_card import healed_card

    card = (
        "---\nlicense: apache-2.0\ntags: [pruned]\nmodel-index:\n- name: m-cosine\n"
        "  results:\n  - dataset: {name: PIQA, type: piqa}\n    metrics:\n"
        "    - {type: acc, value: 0.6}\n---\n\n# m-cosine\n\n## Use\n\ntext\n"
    )
    heldout = {
        "chunks": 3, "kl_before": 1.0, "kl_after": 0.5,
        "kl_change": {"diff": -0.5, "ci95": [-0.6, -0.4]},
        "perplexity_before": 20.0, "perplexity_after": 15.0, "perplexity_ratio": 0.75,
        "perplexity_ratio_ci95": [0.7, 0.8], "teacher_perplexity": 10.0,
    }  # fmt: skip
    healing = {
        "method": "full", "steps": 2, "lr": 1e-5, "batch_size": 1, "grad_accum": 1,
        "seq_len": 8, "teacher": "base", "lm_weight": 0.0, "train_texts": 9,
        "calibration": "x", "heldout_texts": 1, "heldout": heldout, "seed": 0,
        "loss": {"first": 1.0, "last": 0.5}, "seconds": 1.0,
    }  # fmt: skip
    tasks = {
        "tasks": ["local_piqa"], "limit": 10, "num_fewshot": 0,
        "scores": {"local_piqa": {"metric": "acc", "before": 0.6, "after": 0.7,
                                  "stderr_before": 0.1, "stderr_after": 0.1, "documents": 10}},
        "mean_before": 0.6, "mean_after": 0.7,
        "change": {"diff": 0.1, "ci95": [-0.1, 0.3], "documents": 10, "stderr": 0.1},
        "distinguishable": False,
    }  # fmt: skip
    scored = parse_front_matter(
        healed_card(card, None, {"healing": {**healing, "tasks": tasks}}, "v")
    )
    (entry,) = scored["model-index"]
    assert entry["name"] == "m-cosine-healed"
    assert [m["value"] for r in entry["results"] for m in r["metrics"]] == [0.7]
    text = healed_card(
        card,
        None,
        {"healing": healing, "export_dtype": "bfloat16", "compute_dtype": "float32"},
        "v",
        "me/m-cosine-healed",
    )
    assert 'from_pretrained("me/m-cosine-healed")' in text and "\ntext\n" not in text
    assert "Weights stored in bfloat16" in text and "computed in float32" in text
    unscored = parse_front_matter(healed_card(card, None, {"healing": healing}, "v"))
    assert "model-index" not in unscored and "healed" in unscored["tags"]


def test_healed_record_names_both_dtypes(variant, calibration, tmp_path):
    out = tmp_path / "healed"
    _heal(variant, out, calibration, "lora", steps=2)
    record = json.loads((out / "prune.json").read_text())
    assert record["compute_dtype"] == "float32" and record["export_dtype"] == "float32"


def test_settings_refuse_infinite_numbers():
    with pytest.raises(PruneError, match="lm_weight inf"):
        HealSettings(lm_weight=float("inf")).check()
    with pytest.raises(PruneError, match="lr inf"):
        HealSettings(lr=float("inf")).check()


def test_a_state_saved_without_what_this_version_saves_is_a_mismatch(tmp_path):
    from prune.heal_state import HealStateMismatch, load_state, save_state

    save_state(tmp_path, {"settings": {}, "step": 3})
    with pytest.raises(HealStateMismatch, match="--overwrite"):
        load_state(tmp_path, {})


def test_an_error_while_resuming_keeps_the_saved_state(variant, calibration, tmp_path):
    """Only a state that cannot continue is replaced: a missing teacher on resume leaves
    the saved steps for the next try."""
    out = tmp_path / "healed"

    def stop_at_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _heal(variant, out, calibration, "lora", steps=4, on_step=stop_at_two)
    state = state_dir_for(out) / "state.pt"
    saved = state.read_bytes()
    with pytest.raises(PruneError):
        heal_variant(
            variant, out, teacher=str(tmp_path / "missing"), resume=True, device="cpu",
            settings=_settings("lora", calibration=str(calibration), steps=4), progress=False,
        )  # fmt: skip
    assert state.read_bytes() == saved
