"""What healing optimises and what it is judged by: the distillation loss, the held-out
KL to the teacher and perplexity before and after (paired over held-out chunks), the loss
curve, and report-task scores before and after (paired over documents).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def distillation_loss(student_logits: Any, teacher_logits: Any, input_ids: Any, lm_weight: float):
    """KL(teacher || student) of the next-token distributions, mean over tokens (temperature
    1), plus `lm_weight` x the next-token cross-entropy. Logits are (B, T, V), ids (B, T)."""
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    loss = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(
            log_s[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()
        )
    return loss


def heldout_scores(
    student: Any, teacher: Any, chunks: Any, batch_size: int, device: Any
) -> dict[str, list[float]]:
    """Per held-out chunk: the mean KL(teacher || student) per token, and the mean
    next-token negative log-likelihood of the student and of the teacher."""
    import torch
    import torch.nn.functional as F

    scores: dict[str, list[float]] = {"kl": [], "nll": [], "teacher_nll": []}
    was_training = student.training
    student.eval()
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            ids = chunks[start : start + batch_size].to(device)  # (B, T)
            log_s = F.log_softmax(student(input_ids=ids).logits.float(), dim=-1)  # (B, T, V)
            log_t = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
            kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (B, T)
            target = ids[:, 1:].unsqueeze(-1)  # (B, T-1, 1)
            nll = -log_s[:, :-1].gather(-1, target).squeeze(-1)  # (B, T-1)
            teacher_nll = -log_t[:, :-1].gather(-1, target).squeeze(-1)
            scores["kl"] += kl.mean(-1).tolist()
            scores["nll"] += nll.mean(-1).tolist()
            scores["teacher_nll"] += teacher_nll.mean(-1).tolist()
    student.train(was_training)
    return scores


def compare_heldout(before: Mapping[str, list], after: Mapping[str, list], seed: int) -> dict:
    """Before/after held-out figures with paired 95% intervals over held-out chunks: the
    KL change, and the perplexity ratio after/before (exp of the mean NLL change)."""
    from prune.stats import paired_difference

    def paired(name: str):
        def side(values):
            return {"heldout": dict(enumerate(values))}

        return paired_difference(side(after[name]), side(before[name]), seed=seed)

    def mean(values):
        return sum(values) / len(values)

    kl, nll = paired("kl"), paired("nll")
    return {
        "chunks": len(before["kl"]),
        "kl_before": mean(before["kl"]),
        "kl_after": mean(after["kl"]),
        "kl_change": kl.to_dict(),
        "perplexity_before": math.exp(mean(before["nll"])),
        "perplexity_after": math.exp(mean(after["nll"])),
        "perplexity_ratio": math.exp(nll.diff),
        "perplexity_ratio_ci95": [math.exp(nll.ci95[0]), math.exp(nll.ci95[1])],
        "teacher_perplexity": math.exp(mean(before["teacher_nll"])),
    }


def loss_summary(losses: Sequence[float], points: int = 10) -> dict[str, Any]:
    """The loss curve in `points` windows of steps (mean loss of each), first and last."""
    size = max(1, math.ceil(len(losses) / points))
    curve = [
        {"steps": [start + 1, min(start + size, len(losses))], "loss": sum(w) / len(w)}
        for start in range(0, len(losses), size)
        if (w := losses[start : start + size])
    ]
    return {
        "first": losses[0] if losses else None,
        "last": losses[-1] if losses else None,
        "curve": curve,
    }


def task_outcomes(model: Any, tokenizer: Any, settings: Any, engine: str) -> dict[str, Any]:
    """The model's report-task scores as saved in a healing state: task -> {"metric",
    "value", "stderr", "documents": {doc_id: the metric's value}} (plain numbers only)."""
    from prune.evaluate.removals import evaluate

    return outcome_values(evaluate(model, tokenizer, settings, engine=engine))


def outcome_values(scores: Mapping[str, Any]) -> dict[str, Any]:
    """TaskScores (task -> TaskScore) in the form `task_outcomes` returns; scores without
    per-document outcomes (a group's aggregate row) are left out."""
    out = {}
    for task, score in scores.items():
        if score.outcomes is None:
            continue  # a group's aggregate row: its member tasks carry the documents
        out[task] = {
            "metric": score.metric,
            "value": float(score.value),
            "stderr": None if score.stderr is None else float(score.stderr),
            "documents": score.outcomes.metric(score.metric),
        }
    return out


def compare_tasks(
    before: Mapping[str, Any], after: Mapping[str, Any], settings: Any, seed: int
) -> dict[str, Any]:
    """Report-task scores before and after healing: per task its metric and the two values,
    the means over tasks, and the paired difference after - before over documents
    (`prune.stats.Paired.to_dict()`; "distinguishable" when its 95% interval excludes 0)."""
    from prune.stats import paired_difference

    paired = paired_difference(
        {t: v["documents"] for t, v in after.items()},
        {t: v["documents"] for t, v in before.items()},
        seed=seed,
    )
    return {
        "tasks": list(settings.tasks),
        "limit": settings.limit,
        "num_fewshot": settings.num_fewshot,
        "scores": {
            task: {
                "metric": before[task]["metric"],
                "before": before[task]["value"],
                "after": after[task]["value"],
                "stderr_before": before[task]["stderr"],
                "stderr_after": after[task]["stderr"],
                "documents": len(before[task]["documents"]),
            }
            for task in before
        },
        "mean_before": sum(v["value"] for v in before.values()) / len(before),
        "mean_after": sum(v["value"] for v in after.values()) / len(after),
        "change": paired.to_dict(),
        "distinguishable": paired.distinguishable,
    }
