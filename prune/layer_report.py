"""The per-layer relevance report: several measures' rankings of one model side by side.

`build_report` turns rankings (measure name -> `Ranking`) into a JSON-ready dict;
`render_table` renders it as markdown. Both are generic over the registry: a
measure's columns, label and digits come from its `Measure`, so a new measure
shows up here without edits.

Report keys: `model`, `num_layers`, `block_size`, `measures`, `baseline` (task
scores, from the first measure that evaluates tasks), `baseline_<measure>` (for
measures whose baseline is a number, e.g. `baseline_perplexity`), `layers` (one
row per block: `index`, every registered measure's columns (None where it did
not run), `rank_<measure>`), `correlations` and `overlaps` of the main pair (a
proxy against a task measure, e.g. cosine~accuracy; else the first pair), every
pair under `pairs`, `orders`, `settings` and `timings` (seconds per measure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from prune.errors import PruneError
from prune.measures import Measure, Ranking, get_measure, measure_names, registry
from prune.measures.base import summary_json

OVERLAP_FRACTIONS = (0.10, 0.25, 0.50)
# `prune rank/compare` report how stable the removal of this share of the blocks is.
STABILITY_FRACTION = 0.25


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def correlations(a: Sequence[float], b: Sequence[float]) -> dict[str, dict[str, float | None]]:
    """Spearman, Kendall and Pearson correlation (with p-values) of two score lists."""
    from scipy import stats

    pairs = [
        (x, y)
        for x, y in zip(a, b, strict=False)
        if _finite(x) is not None and _finite(y) is not None
    ]
    empty = {
        "spearman": {"rho": None, "p": None},
        "kendall": {"tau": None, "p": None},
        "pearson": {"r": None, "p": None},
    }
    if len(pairs) < 3:
        return empty
    xs, ys = zip(*pairs, strict=True)
    if len(set(xs)) < 2 or len(set(ys)) < 2:  # constant input: correlation undefined
        return empty
    sp, kd, pe = stats.spearmanr(xs, ys), stats.kendalltau(xs, ys), stats.pearsonr(xs, ys)
    return {
        "spearman": {"rho": _finite(float(sp.statistic)), "p": _finite(float(sp.pvalue))},
        "kendall": {"tau": _finite(float(kd.statistic)), "p": _finite(float(kd.pvalue))},
        "pearson": {"r": _finite(float(pe.statistic)), "p": _finite(float(pe.pvalue))},
    }


def overlaps(order_a: Sequence[int], order_b: Sequence[int], depth: int) -> list[dict[str, Any]]:
    """How many of the k least-relevant layers two orders share, for k = 10/25/50% of depth."""
    out = []
    for fraction in OVERLAP_FRACTIONS:
        k = max(1, round(fraction * depth))
        shared = sorted(set(order_a[:k]) & set(order_b[:k]))
        out.append(
            {
                "fraction": fraction,
                "k": k,
                "shared": len(shared),
                "ratio": len(shared) / k,
                "layers": shared,
            }
        )
    return out


def main_pair(names: Sequence[str]) -> tuple[str, str] | None:
    """The pair a comparison is about: the first measure that needs no tasks (a proxy, e.g.
    cosine) against the first that evaluates tasks (e.g. accuracy); None without such a pair."""
    measures = [get_measure(n) for n in names]
    proxy = next((m.name for m in measures if not m.needs_tasks), None)
    measured = next((m.name for m in measures if m.needs_tasks), None)
    return (proxy, measured) if proxy and measured else None


def _ranks(ranking: Ranking) -> dict[int, int]:
    """1 = least relevant."""
    return {index: pos + 1 for pos, index in enumerate(ranking.order())}


def _pairs(rankings: dict[str, Ranking], indices: list[int]) -> dict[str, dict[str, Any]]:
    """Correlations and overlaps of every pair of measures, over the layers both scored."""
    names = list(rankings)
    pairs = {}
    for x in range(len(names)):
        for y in range(x + 1, len(names)):
            ra, rb = rankings[names[x]].by_index(), rankings[names[y]].by_index()
            common = [i for i in indices if i in ra and i in rb]
            pairs[f"{names[x]}~{names[y]}"] = {
                **correlations([ra[i].score for i in common], [rb[i].score for i in common]),
                # Over the layers both measures scored (--layers may limit one of them).
                "overlaps": overlaps(
                    [i for i in rankings[names[x]].order() if i in rb],
                    [i for i in rankings[names[y]].order() if i in ra],
                    len(common),
                ),
            }
    return pairs


def ranking_stability(
    rankings: dict[str, Ranking],
    removals: dict[str, int],
    exclude: Sequence[int] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Per measure whose ranking kept per-document contributions for every block: how stable
    the removal of its `removals[name]` least relevant blocks (never those in `exclude`) is
    when the documents are resampled (`prune.stats.Stability.to_dict()`); others left out."""
    out = {}
    for name, ranking in rankings.items():
        found = ranking.stability(removals.get(name, 0), exclude=exclude, seed=seed)
        if found is not None:
            out[name] = found.to_dict()
    return out


def build_report(
    model_name: str,
    rankings: dict[str, Ranking],
    timings: dict[str, float],
    extra: dict | None = None,
) -> dict[str, Any]:
    """Combine rankings (registered measure name -> Ranking) into the report dict (see the
    module docstring); `extra` keys are added at the top level."""
    if not rankings:
        raise PruneError(f"no measure to compare (accepted: {', '.join(measure_names())})")
    measures = {name: get_measure(name) for name in rankings}
    depth = next(iter(rankings.values())).num_layers
    span = max(r.scores[0].span for r in rankings.values() if r.scores)
    indices = sorted({s.index for r in rankings.values() for s in r.scores})
    ranks = {name: _ranks(r) for name, r in rankings.items()}
    scored = {name: r.by_index() for name, r in rankings.items()}
    layers = []
    for i in indices:
        row: dict[str, Any] = {"index": i}
        for name, measure in registry().items():
            row |= measure.columns(scored[name].get(i) if name in scored else None)
        row |= {f"rank_{name}": ranks[name].get(i) for name in rankings}
        layers.append(row)
    k = max(1, round(STABILITY_FRACTION * depth))
    stable = ranking_stability(rankings, dict.fromkeys(rankings, k))
    for row in layers:
        row |= {f"p_removed_{name}": st["probability"][row["index"]] for name, st in stable.items()}
    pairs = _pairs(rankings, indices)
    chosen = main_pair(list(rankings))
    main = None
    if chosen:
        main = pairs.get("~".join(chosen)) or pairs.get("~".join(reversed(chosen)))
    elif pairs:
        main = next(iter(pairs.values()))
    baseline = next(
        (
            {task: summary_json(score.to_dict()) for task, score in r.baseline.items()}
            for name, r in rankings.items()
            if measures[name].needs_tasks and isinstance(r.baseline, dict)
        ),
        None,
    )
    report: dict[str, Any] = {
        "model": model_name,
        "num_layers": depth,
        "block_size": span,
        "measures": list(rankings),
        "baseline": baseline,
        **{
            f"baseline_{name}": _finite(float(r.baseline))
            for name, r in rankings.items()
            if isinstance(r.baseline, (int, float))
        },
        "layers": layers,
        "correlations": {k: v for k, v in main.items() if k != "overlaps"} if main else None,
        "overlaps": main["overlaps"] if main else None,
        "pairs": pairs,
        "orders": {name: r.order() for name, r in rankings.items()},
        "stability": {"k": k, **stable} if stable else None,
        "settings": {name: r.settings for name, r in rankings.items()},
        "timings": timings,
    }
    if extra:
        report.update(extra)
    return report


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(measure: Measure, row: dict[str, Any], with_stderr: bool) -> str:
    """One measure's value in one row: value, ± stderr, (n=documents) after early stopping."""
    text = _fmt(row.get(measure.column), measure.digits)
    if with_stderr:
        text += f" ± {_fmt(row.get(measure.stderr_column), measure.digits)}"
    documents = row.get(measure.documents_column) if measure.documents_column else None
    return text if documents is None else f"{text} (n={documents})"


def _adaptive_lines(report: dict[str, Any]) -> list[str]:
    """One line per measure ranked with adaptive sampling: K, its rounds and what it saved."""
    out = []
    for name, settings in (report.get("settings") or {}).items():
        used = (settings or {}).get("documents_used")
        if not used:
            continue
        rounds = ", ".join(
            f"{count} on {docs}"
            for docs, count in zip(settings["rounds"], settings["round_candidates"], strict=True)
        )
        share = used["used"] / used["exhaustive"] if used["exhaustive"] else 1.0
        out += [
            f"{name}: adaptive sampling for K = {settings['adaptive']}; candidates per round "
            f"(documents per task): {rounds}; {used['used']} of {used['exhaustive']} "
            f"candidate-documents per task ({share:.0%}).",
            "",
        ]
    return out


def render_table(report: dict[str, Any]) -> str:
    """The per-layer table, baselines and correlation summary as markdown."""
    names = report["measures"]
    measures = [get_measure(name) for name in names]
    rows = report["layers"]
    # "± se" only for measures that report a standard error in this run.
    with_stderr = {
        m.name: bool(m.stderr_column) and any(r.get(m.stderr_column) is not None for r in rows)
        for m in measures
    }
    with_ci = {m.name: any(r.get(f"{m.column}_ci95") for r in rows) for m in measures}
    stable = report.get("stability") or {}
    head = ["layer"]
    for m in measures:
        head += [m.label_for(report["block_size"]) + (" ± se" if with_stderr[m.name] else "")]
        head += ["95% CI"] if with_ci[m.name] else []
        head += ["rank"]
        head += [f"P(in {stable['k']} removed)"] if m.name in stable else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for row in rows:
        cells = [str(row["index"])]
        for m in measures:
            cells += [_cell(m, row, with_stderr[m.name])]
            if with_ci[m.name]:
                ci = row.get(f"{m.column}_ci95")
                cells += [f"[{ci[0]:+.{m.digits}f}, {ci[1]:+.{m.digits}f}]" if ci else "-"]
            cells += [str(row.get(f"rank_{m.name}") or "-")]
            if m.name in stable:
                cells += [_fmt(row.get(f"p_removed_{m.name}"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    out = [f"# Layer relevance: {report['model']} ({report['num_layers']} layers)", ""]
    if report.get("baseline"):
        out.append(
            "Baseline: "
            + ", ".join(
                f"{t} {s['metric']} {s['value']:.4f} ± {_fmt(s['stderr'])} (n={s['n']})"
                for t, s in report["baseline"].items()
            )
        )
    for name in names:
        if report.get(f"baseline_{name}") is not None:
            out.append(f"Baseline {name}: {report[f'baseline_{name}']:.3f}")
    out += ["", "Rank 1 = least relevant (removed first).", "", *lines, ""]
    early = [m for m in measures if m.documents_column]
    if any(row.get(m.documents_column) is not None for m in early for row in rows):
        out += [
            "Adaptive sampling: scores marked (n=N) come from the first N documents per task "
            "(their 95% interval already lay on one side of the cut, so they stopped early); the "
            "others use every document.",
            "",
        ]
    out += _adaptive_lines(report)
    if stable:
        out += [
            f"Stability: documents resampled with replacement; P = how often a block is among the "
            f"{stable['k']} least relevant; mean Jaccard overlap with the full-data set: "
            + ", ".join(f"{n} {st['jaccard']:.2f}" for n, st in stable.items() if n != "k"),
            "",
        ]
    if report["pairs"]:
        out += [
            "| measures | spearman rho (p) | kendall tau (p) | pearson r (p) | overlap 10% | 25% | 50% |",
            "|---|---|---|---|---|---|---|",
        ]
        for pair, c in report["pairs"].items():
            ov = " | ".join(f"{o['shared']}/{o['k']}" for o in c["overlaps"])
            out.append(
                f"| {pair} | {_fmt(c['spearman']['rho'], 3)} ({_fmt(c['spearman']['p'], 3)}) | "
                f"{_fmt(c['kendall']['tau'], 3)} ({_fmt(c['kendall']['p'], 3)}) | "
                f"{_fmt(c['pearson']['r'], 3)} ({_fmt(c['pearson']['p'], 3)}) | {ov} |"
            )
        out.append("")
    if report.get("timings"):
        out.append(
            "Time per measure: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings"].items())
        )
    return "\n".join(out) + "\n"
