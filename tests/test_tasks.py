"""The local lm-eval tasks: every template loads, prompts match lm-eval's, scores match a plain computation."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from prune.errors import PruneError
from prune.evaluate.removals import evaluate
from prune.evaluate.settings import EvalSettings
from prune.tasks import LOCAL_TASKS, TEMPLATES, resolve_task_names, task_manager


def test_every_template_has_a_data_file_entry():
    names = {p.stem for p in TEMPLATES.glob("*.yaml")}
    assert names == set(LOCAL_TASKS)


def test_local_tasks_load_with_lm_eval_prompts(data_dir):
    from lm_eval.tasks import get_task_dict

    manager = task_manager(data_dir, names=list(LOCAL_TASKS))
    tasks = get_task_dict(list(LOCAL_TASKS), manager)
    first = {}
    for name, task in tasks.items():
        doc = task.test_docs()[0]
        reqs = task.construct_requests(doc, task.fewshot_context(doc, 0), metadata=(name, 0, 1))
        first[name] = [r.args for r in (reqs if isinstance(reqs, list) else [reqs])]
    arc = first["local_arc_easy"][0]
    assert (
        arc[0].startswith("Question: ") and arc[0].endswith("\nAnswer:") and arc[1].startswith(" ")
    )
    assert first["local_piqa"][0][0].endswith("?\nAnswer:")
    assert not first["local_openbookqa"][0][0].startswith("Question:")  # lm-eval uses the bare stem
    wino = first["local_winogrande"]  # partial scoring: contexts differ, continuation shared
    assert wino[0][1] == wino[1][1] and wino[0][0] != wino[1][0]
    assert first["local_copa"][0][0].endswith(", therefore")
    assert first["local_lambada"][0][1] == " signs"


def test_unknown_task_suggests_close_match(data_dir):
    manager = task_manager(data_dir, names=["local_arc_easy"])
    with pytest.raises(PruneError, match="did you mean local_arc_easy"):
        resolve_task_names("local_arc_esy", manager)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(PruneError, match="does not exist"):
        task_manager(tmp_path / "nope")
    with pytest.raises(PruneError, match="holds none of the benchmark files"):
        task_manager(tmp_path)


def _loglik(model, ctx: str, cont: str) -> float:
    """Sum of log p(continuation bytes | context) with the byte tokenizer (one token per byte)."""
    ids = list(ctx.encode()) + list(cont.encode())
    n_ctx = len(ctx.encode())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(n_ctx, len(ids))))


def plain_accuracy(model, records, prompt, choices_of, partial=False):
    """lm-eval's `acc` and `acc_norm` written out: argmax log-likelihood (per character of the choice for norm)."""
    acc = acc_norm = 0
    for rec in records:
        if partial:
            lls = [_loglik(model, c, " " + rec["continuation"]) for c in rec["context_options"]]
            lens = [1] * len(lls)
        else:
            conts = [" " + c for c in choices_of(rec)]
            lls = [_loglik(model, prompt(rec), c) for c in conts]
            lens = [len(c) for c in choices_of(rec)]  # lm-eval divides by len(choice), no delimiter
        acc += int(max(range(len(lls)), key=lambda i: lls[i]) == rec["gold"])
        acc_norm += int(max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == rec["gold"])
    return acc / len(records), acc_norm / len(records)


@pytest.mark.parametrize(
    "task,file,prompt,partial",
    [
        ("local_arc_easy", "arc_easy.jsonl", lambda r: r["query"] + "\nAnswer:", False),
        ("local_piqa", "piqa.jsonl", lambda r: r["query"] + "Answer:", False),
        ("local_winogrande", "winogrande.jsonl", None, True),
    ],
)
def test_local_task_matches_plain_loglikelihood(data_dir, task, file, prompt, partial):
    n = 6
    records = [json.loads(line) for line in (data_dir / file).read_text().splitlines()[:n]]
    model, tok = tiny_model("llama", 2, seed=3), byte_tokenizer()
    acc, acc_norm = plain_accuracy(model, records, prompt, lambda r: r["choices"], partial)
    scores = evaluate(
        model, tok, EvalSettings(tasks=(task,), limit=n, data_dir=str(data_dir), task_metric="acc")
    )
    assert scores[task].n == n
    assert scores[task].value == pytest.approx(acc)
    if not partial:
        norm = evaluate(
            model,
            tok,
            EvalSettings(tasks=(task,), limit=n, data_dir=str(data_dir), task_metric="acc_norm"),
        )
        assert norm[task].value == pytest.approx(acc_norm)
