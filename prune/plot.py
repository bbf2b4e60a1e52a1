"""The comparison figure: per-layer relevance under each measure, and a proxy vs a measurement.

Left: every measure as a normalised rank over the layers (0 = least relevant,
1 = most), so measures with very different scales and outliers share one axis.
Right, when the report has a proxy and a task measure (e.g. cosine and accuracy,
see `prune.layer_report.main_pair`): a scatter of the proxy (log scale when all
values are positive and spread) against the measured drop with standard-error
bars, each point labelled with its layer index, and the Spearman correlation in
the title. Labels, columns and colours come from the measure registry.
"""

from __future__ import annotations

import io
from typing import Any

# For measures that declare no colour of their own.
PALETTE = ("tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def _rank_normalise(values: list[float | None]) -> list[float | None]:
    """Rank of each value scaled to 0..1 (0 = least relevant); ties share their mean rank.

    Ranks, not min-max values: one outlier (the first block's cosine, a perplexity
    that explodes) would otherwise flatten every other layer onto zero.
    """
    finite = sorted(v for v in values if v is not None)
    if len(finite) < 2:
        return [None if v is None else 0.5 for v in values]
    positions: dict[float, list[int]] = {}
    for pos, v in enumerate(finite):
        positions.setdefault(v, []).append(pos)
    top = len(finite) - 1
    return [None if v is None else sum(positions[v]) / len(positions[v]) / top for v in values]


def plot_relevance(report: dict[str, Any]) -> bytes:
    """Render the figure for a comparison report (prune.layer_report); returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prune.layer_report import main_pair
    from prune.measures import get_measure

    layers = report["layers"]
    index = [row["index"] for row in layers]
    block_size = report.get("block_size", 1)
    pair = main_pair(report["measures"])
    fig, axes = plt.subplots(
        1,
        2 if pair else 1,
        figsize=(13 if pair else 8, 4.8),
        gridspec_kw={"width_ratios": [1.6, 1]} if pair else None,
    )
    ax = axes[0] if pair else axes
    spare = iter(PALETTE)
    for name in report["measures"]:
        measure = get_measure(name)
        values = _rank_normalise([row.get(measure.column) for row in layers])
        pts = [(i, v) for i, v in zip(index, values, strict=True) if v is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            color = measure.color or next(spare, None)
            label = measure.label_for(block_size)
            ax.plot(xs, ys, marker="o", ms=4, lw=1.6, color=color, label=label, alpha=0.85)
    ax.set_xlabel("layer index")
    ax.set_ylabel("relevance rank (0 = least, 1 = most relevant)")
    ax.set_title(f"{report['model']}: per-layer relevance")
    ax.set_xticks(index if len(index) <= 32 else index[::2])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    if pair:
        _scatter(axes[1], report, get_measure(pair[0]), get_measure(pair[1]))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _scatter(sc: Any, report: dict[str, Any], x: Any, y: Any) -> None:
    """The proxy measure `x` against the measured `y`, one labelled point per layer, with
    y's paired 95% intervals (else its standard errors) as bars and the report's Spearman
    correlation in the title."""
    block_size = report.get("block_size", 1)
    rows = [
        r for r in report["layers"] if r.get(x.column) is not None and r.get(y.column) is not None
    ]
    xs = [r[x.column] for r in rows]
    if rows:
        ys = [r[y.column] for r in rows]
        sc.errorbar(
            xs, ys, yerr=_error_bars(rows, y), fmt="o", color="tab:purple", ecolor="0.75", ms=5
        )
        for px, py, r in zip(xs, ys, rows, strict=True):
            sc.annotate(
                str(r["index"]), (px, py), textcoords="offset points", xytext=(3, 3), fontsize=7
            )
    rho = (report.get("correlations") or {}).get("spearman", {}).get("rho")
    sc.set_title(
        f"{x.label_for(block_size)} vs {y.label}"
        + (f" (Spearman rho = {rho:.2f})" if rho is not None else "")
    )
    sc.set_xlabel(x.label_for(block_size))
    sc.set_ylabel(y.label + (" (mean over tasks)" if y.needs_tasks else ""))
    sc.axhline(0, color="0.5", lw=0.8)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        sc.set_xscale("log")
    sc.grid(alpha=0.3)


def _error_bars(rows: list[dict[str, Any]], measure: Any) -> list[list[float]]:
    """Asymmetric bars (below, above) per point: the paired 95% interval where the report has
    one, else +-1 standard error, else none."""
    below, above = [], []
    for r in rows:
        value, ci = r[measure.column], r.get(f"{measure.column}_ci95")
        if ci:
            below.append(max(0.0, value - ci[0]))
            above.append(max(0.0, ci[1] - value))
        else:
            err = (r.get(measure.stderr_column) if measure.stderr_column else None) or 0.0
            below.append(err)
            above.append(err)
    return [below, above]


def plot_tradeoff(comparison: dict[str, Any]) -> bytes:
    """The run's tradeoff: mean reporting score against blocks removed, a line per strategy
    (its greedy history), with a band showing the paired 95% interval of each step's
    difference from the base model where the comparison has one. Returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prune.measures import registry

    measures = registry()
    base = comparison["baseline"]["mean"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    spare = iter(PALETTE)
    for name, data in comparison["strategies"].items():
        measure = measures.get(name)
        color = (measure.color if measure else None) or next(spare, None)
        removed = [len(step["removed"]) for step in data["history"]]
        means = [step["mean_score"] for step in data["history"]]
        ax.plot(removed, means, marker="o", ms=4, lw=1.6, color=color, label=name)
        bands = data.get("history_vs_base")
        if bands and len(bands) == len(removed):
            lo = [base + b["ci95"][0] for b in bands]
            hi = [base + b["ci95"][1] for b in bands]
            ax.fill_between(removed, lo, hi, color=color, alpha=0.15, lw=0)
    ax.axhline(base, color="0.4", lw=0.8, ls="--", label="base model")
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("mean reporting score")
    ax.set_title(f"{comparison['model']['spec']}: score against blocks removed")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
