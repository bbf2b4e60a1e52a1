"""The record of a `prune run` (comparison.json) and its readable report (comparison.md).

`build_comparison` turns what the pipeline produced (baseline scores, each
strategy's greedy result, the full-model rankings) into one JSON-ready mapping, and
`healed_record` adds a healed variant beside its raw one (`strategies[name]["healed"]`);
everything a card or the report shows is read from it, so every number printed
matches the JSON. `render_comparison` composes comparison.md from the same
section builders as the model cards (`prune.card`), plus the headline table and
the timings. Pure functions: no model, no disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from prune import __version__
from prune.card import comparison_sections
from prune.defaults import HEALED_SUFFIX


def _strategy_record(result: Any, baseline: Mapping[str, float]) -> dict[str, Any]:
    """One strategy's part of the record, from its `GreedyResult`."""
    final = result.final
    return {
        "schedule": result.schedule,
        "removed": list(result.removed),
        "removed_sorted": sorted(result.removed),
        "stop_reason": result.stop_reason,
        "ranking": {str(k): v for k, v in sorted(result.rankings[0].items())}
        if result.rankings
        else {},
        "rankings": len(result.rankings),
        "history": [s.to_dict() for s in result.history],
        "rejected": result.rejected.to_dict() if result.rejected else None,
        "final": {
            "layers": final.layers_left,
            "params": final.params,
            "scores": final.scores,
            "mean": final.mean_score,
            "drop": final.drop,
            "retained": _retained(final.scores, baseline),
        },
    }


def _retained(scores: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, Any]:
    """Per task, the share of the base model's score kept (None where the base scored 0)."""
    return {t: (scores[t] / baseline[t] if baseline.get(t) else None) for t in scores}


def _per_document(scores: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """task -> doc_id -> the task metric's value per document (from each TaskScore's outcomes)."""
    out = {}
    for task, score in scores.items():
        if score.outcomes is None:
            raise ValueError(f"task '{task}' was evaluated without per-document outcomes")
        out[task] = score.outcomes.metric(score.metric)
    return out


def paired_comparison(
    base_scores: Mapping[str, Any], finals: Mapping[str, Mapping[str, Any]], seed: int = 0
) -> dict[str, Any]:
    """Per strategy, its paired difference from the base model and from every other strategy
    on the reporting tasks (`prune.stats.Paired.to_dict()`: diff, stderr, ci95, documents).

    `finals` maps strategy -> task -> TaskScore of its final variant. Differences are
    variant minus the other side, mean over tasks of the per-document differences.
    """
    from prune.stats import paired_difference

    base = _per_document(base_scores)
    docs = {name: _per_document(scores) for name, scores in finals.items()}
    out: dict[str, Any] = {}
    for name, values in docs.items():
        out[name] = {
            "vs_base": paired_difference(values, base, seed=seed).to_dict(),
            "vs": {
                other: paired_difference(values, docs[other], seed=seed).to_dict()
                for other in docs
                if other != name
            },
        }
    return out


def step_intervals(
    base_scores: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], seed: int = 0
) -> list[dict[str, Any]]:
    """For each greedy step's reporting scores (task -> TaskScore), its paired difference from
    the base model (`Paired.to_dict()`): the uncertainty band of the tradeoff figure."""
    from prune.stats import paired_difference

    base = _per_document(base_scores)
    return [paired_difference(_per_document(s), base, seed=seed).to_dict() for s in steps]


def healed_record(
    base_scores: Mapping[str, Any],
    raw_scores: Mapping[str, Any],
    healed_scores: Mapping[str, Any],
    raw_final: Mapping[str, Any],
    healing: Mapping[str, Any],
    folder: str,
    seed: int = 0,
) -> dict[str, Any]:
    """A strategy's healed variant for the record: its scores (shaped as the raw variant's
    `final`), the paired differences from the base model and from the raw variant on the
    same documents (None where an evaluation kept no per-document outcomes), what the
    difference from the raw variant decides, and the heal's prune.json `healing` section
    (less its own report-task scores: these are the run's).

    `base_scores`, `raw_scores` and `healed_scores` map task -> TaskScore; `raw_final` is the
    raw variant's `final` record (layers and parameters carry over: healing removes nothing).
    """
    from prune.stats import paired_difference

    scores = {t: s.value for t, s in healed_scores.items()}
    baseline = {t: s.value for t, s in base_scores.items()}
    mean = sum(scores.values()) / len(scores)
    every = (*base_scores.values(), *raw_scores.values(), *healed_scores.values())
    vs_base = vs_raw = None
    if all(s.outcomes is not None for s in every):
        healed = _per_document(healed_scores)
        vs_base = paired_difference(healed, _per_document(base_scores), seed=seed).to_dict()
        vs_raw = paired_difference(healed, _per_document(raw_scores), seed=seed).to_dict()
    return {
        "folder": folder,
        "final": {
            "layers": raw_final["layers"],
            "params": raw_final["params"],
            "scores": scores,
            "mean": mean,
            "drop": sum(baseline.values()) / len(baseline) - mean,
            "retained": _retained(scores, baseline),
        },
        "stderr": {t: s.stderr for t, s in healed_scores.items()},
        "vs_base": vs_base,
        "vs_raw": vs_raw,
        "verdict": healing_verdict(vs_raw),
        "healing": {k: v for k, v in healing.items() if k != "tasks"},
    }


def healing_verdict(vs_raw: Mapping[str, Any] | None) -> str:
    """What healed minus raw decides: a change only when its paired 95% interval excludes zero."""
    if vs_raw is None:
        return "no paired statistics (evaluations without per-document outcomes)"
    lo, hi = vs_raw["ci95"]
    difference = (
        f"healed - raw = {vs_raw['diff']:+.4f} (95% CI {lo:+.4f} to {hi:+.4f}, "
        f"{vs_raw['documents']} documents)"
    )
    if lo > 0:
        return f"healing helped: {difference}"
    if hi < 0:
        return f"healing hurt: {difference}"
    return f"not distinguishable: {difference}"


def verdict(means: Mapping[str, float], paired: Mapping[str, Any]) -> tuple[str | None, str]:
    """The best strategy, only when its paired 95% interval against every other excludes zero
    in its favour, and a sentence saying what is decided (or that nothing is)."""
    if not means:
        return None, "no strategy ran"
    leader = max(means, key=lambda n: means[n])
    others = [n for n in means if n != leader]
    if not others:
        return leader, f"{leader} is the only strategy"
    against = {o: paired.get(leader, {}).get("vs", {}).get(o) for o in others}
    if all(p is not None and p["ci95"][0] > 0 for p in against.values()):
        parts = [
            f"{p['diff']:+.4f} over {o} (95% CI {p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f})"
            for o, p in against.items()
        ]
        return leader, f"{leader} is better: " + "; ".join(parts)
    parts = [
        f"{leader} - {o} = {p['diff']:+.4f} (95% CI {p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f}, "
        f"{p['documents']} documents)"
        for o, p in against.items()
        if p is not None
    ]
    return None, "the variants are not distinguishable: " + "; ".join(parts)


def build_comparison(
    *,
    recipe: Any,
    loaded: Any,
    depth: int,
    parameters: int,
    report_settings: Any,
    base_scores: Mapping[str, Any],
    results: Mapping[str, Any],
    relevance: Mapping[str, Any],
    overrides: Mapping[str, Any],
    engine: str,
    paired: Mapping[str, Any] | None = None,
    stable: Mapping[str, Any] | None = None,
    intervals: Mapping[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The JSON record of a run (see the module docstring).

    `base_scores` maps task -> TaskScore of the full model; `results` strategy ->
    GreedyResult; `relevance` is the per-layer report of the full-model rankings
    (`prune.layer_report.build_report`, empty when nothing was ranked).
    """
    baseline = {t: s.value for t, s in base_scores.items()}
    strategies = {name: _strategy_record(result, baseline) for name, result in results.items()}
    schedule = recipe.prune.schedule
    specs = {s.key(schedule): s for s in recipe.strategies}
    for name, record in strategies.items():
        spec = specs.get(name)
        if spec is not None:  # what ranked this variant: the measure, its spans, re-measuring
            record["strategy"] = {
                "measure": spec.name,
                "span": spec.span,
                "rescore": spec.rescore,
                "adaptive": spec.adaptive,
            }
    for name, steps in (intervals or {}).items():
        strategies[name]["history_vs_base"] = steps  # paired difference of each step
    names = list(results)
    pairs = relevance.get("pairs", {})
    overlap = None
    if len(names) == 2:
        sa, sb = set(results[names[0]].removed), set(results[names[1]].removed)
        overlap = len(sa & sb) / len(sa | sb) if sa | sb else 1.0
    paired = dict(paired or {})
    if paired:
        best, decided = verdict({n: strategies[n]["final"]["mean"] for n in names}, paired)
    else:  # evaluations without per-document outcomes: no verdict can be backed
        best, decided = None, "no paired statistics (evaluations without per-document outcomes)"
    source = loaded.source
    return {
        "prune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe_file": "recipe.yaml",
        "overrides": dict(overrides),
        "settings": recipe.to_dict(),
        "warnings": list(recipe.warnings),
        "engine": engine,
        "model": {
            "spec": source.spec,
            "hub_id": source.hub_id,
            "license": source.license,
            "source": source.to_dict(),
            "model_type": getattr(loaded.model.config, "model_type", None),
            "num_layers": depth,
            "parameters": parameters,
        },
        "evaluation": {
            "tasks": list(baseline),
            "limit": report_settings.limit,
            "num_fewshot": report_settings.num_fewshot,
            "metrics": {t: s.metric for t, s in base_scores.items()},
        },
        "baseline": {
            "scores": baseline,
            "stderr": {t: s.stderr for t, s in base_scores.items()},
            "n": {t: s.n for t, s in base_scores.items()},
            "mean": sum(baseline.values()) / len(baseline),
        },
        "strategies": strategies,
        "correlations": {
            pair: {k: v for k, v in stats.items() if k != "overlaps"}
            for pair, stats in pairs.items()
        },
        "overlap": overlap,
        "relevance": {
            "layers": relevance.get("layers", []),
            "orders": relevance.get("orders", {}),
            "settings": relevance.get("settings", {}),
            "overlaps": {pair: stats.get("overlaps") for pair, stats in pairs.items()},
        },
        "paired": paired,
        "stability": dict(stable or {}),
        "best": best,
        "verdict": decided,
    }


def headline_rows(comparison: Mapping[str, Any]) -> list[list[str]]:
    """The headline table: one row for the base model and one per variant (a strategy's
    healed variant, `<name>-healed`, right after its raw one)."""
    model = comparison["model"]
    base = comparison["baseline"]
    rows = [["model", "layers", "params kept", "mean score", "retained", "removed layers"]]
    rows.append(["base", str(model["num_layers"]), "100.0%", f"{base['mean']:.4f}", "100.0%", "-"])
    for name, data in comparison["strategies"].items():
        variants = [(name, data["final"])]
        if data.get("healed"):
            variants.append((f"{name}{HEALED_SUFFIX}", data["healed"]["final"]))
        for label, final in variants:
            share = final["params"] / model["parameters"]
            retained = final["mean"] / base["mean"] if base["mean"] else float("nan")
            rows.append(
                [
                    label,
                    str(final["layers"]),
                    f"{100 * share:.1f}%",
                    f"{final['mean']:.4f}",
                    f"{100 * retained:.1f}%",
                    ",".join(map(str, data["removed"])) or "-",
                ]
            )
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Plain aligned columns for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_comparison(comparison: Mapping[str, Any], figure: str | None = "relevance.png") -> str:
    """comparison.md: the headline table, then the same sections as every variant's card."""
    rows = headline_rows(comparison)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    overrides = comparison.get("overrides")
    timings = comparison.get("timings", {})
    lines = [
        f"# prune run: {comparison['model']['spec']}",
        "",
        *table,
        "",
        _verdict_line(comparison)
        + f" Engine: {comparison['engine']}."
        + (f" CLI overrides: {json.dumps(overrides)}." if overrides else ""),
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        "",
        *comparison_sections(comparison, list(comparison["strategies"]), figure),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _verdict_line(comparison: Mapping[str, Any]) -> str:
    best = comparison.get("best")
    text = comparison.get("verdict") or ""
    if best:
        return f"Best: **{best}** ({text})."
    return f"No winner: {text}." if text else "No winner."
