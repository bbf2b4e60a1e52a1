"""The comparison figure: per-layer relevance under each measure, and cosine vs accuracy drop.

Left: every measure as a normalised rank over the layers (0 = least relevant,
1 = most), so measures with very different scales and outliers share one axis.
Right: a scatter of cosine relevance (log scale when all values are positive)
against accuracy drop with standard-error bars, each point labelled with its
layer index, and the Spearman correlation in the title.
"""

from __future__ import annotations

import io
from typing import Any

COLORS = {"cosine": "tab:blue", "accuracy": "tab:red", "perplexity": "tab:green"}
FIELDS = {"cosine": "cosine", "accuracy": "accuracy_drop", "perplexity": "perplexity_increase"}


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
    """Render the figure for a comparison report; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    index = [row["index"] for row in layers]
    has_scatter = "cosine" in report["measures"] and "accuracy" in report["measures"]
    fig, axes = plt.subplots(
        1,
        2 if has_scatter else 1,
        figsize=(13 if has_scatter else 8, 4.8),
        gridspec_kw={"width_ratios": [1.6, 1]} if has_scatter else None,
    )
    ax = axes[0] if has_scatter else axes
    for measure in report["measures"]:
        values = _rank_normalise([row[FIELDS[measure]] for row in layers])
        label = {
            "cosine": "cosine (1 - cos)"
            if report.get("block_size", 1) == 1
            else "angular distance",
            "accuracy": "accuracy drop",
            "perplexity": "perplexity increase",
        }[measure]
        pts = [(i, v) for i, v in zip(index, values, strict=True) if v is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs, ys, marker="o", ms=4, lw=1.6, color=COLORS[measure], label=label, alpha=0.85
            )
    ax.set_xlabel("layer index")
    ax.set_ylabel("relevance rank (0 = least, 1 = most relevant)")
    ax.set_title(f"{report['model']}: per-layer relevance")
    ax.set_xticks(index if len(index) <= 32 else index[::2])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    if has_scatter:
        sc = axes[1]
        pts = [
            (r["cosine"], r["accuracy_drop"], r["index"])
            for r in layers
            if r["cosine"] is not None and r["accuracy_drop"] is not None
        ]
        if pts:
            xs, ys, ids = zip(*pts, strict=False)
            errs = [
                r["accuracy_drop_stderr"] or 0.0
                for r in layers
                if r["cosine"] is not None and r["accuracy_drop"] is not None
            ]
            sc.errorbar(
                xs, ys, yerr=errs, fmt="o", color="tab:purple", ecolor="0.75", ms=5, capsize=0
            )
            for x, y, i in zip(xs, ys, ids, strict=False):
                sc.annotate(str(i), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        rho = (report.get("correlations") or {}).get("spearman", {}).get("rho")
        sc.set_title(
            "cosine vs accuracy drop" + (f" (Spearman rho = {rho:.2f})" if rho is not None else "")
        )
        sc.set_xlabel(
            "cosine relevance (1 - cos)" if report.get("block_size", 1) == 1 else "angular distance"
        )
        sc.set_ylabel("accuracy drop (mean over tasks)")
        sc.axhline(0, color="0.5", lw=0.8)
        if pts and min(xs) > 0 and max(xs) / min(xs) > 20:
            sc.set_xscale("log")
        sc.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
