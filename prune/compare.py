"""Put relevance measures side by side: per-layer table, correlations, overlaps, JSON, figure.

`compare_measures` runs the chosen measures on one model and returns a report
dict (the JSON written by `prune compare`): `model`, `baseline` (score per
task), `layers` [{index, cosine, cosine_stderr, accuracy_drop,
accuracy_drop_stderr, perplexity_increase, per_task_drop, rank_*}],
`correlations` (cosine vs accuracy drop: spearman/kendall/pearson with
p-values, plus every other pair under `pairs`), `overlaps` of the k least
relevant layers for k = 10/25/50% of depth, and `timings` (seconds per
measure). `write_report` writes `report.json`, `table.md` and `relevance.png`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prune.errors import PruneError
from prune.evaluate import EvalSettings, ResultCache
from prune.relevance import MEASURES, Ranking, halving_rounds, rank_layers

OVERLAP_FRACTIONS = (0.10, 0.25, 0.50)


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
    xs, ys = zip(*pairs, strict=False)
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


def _ranks(ranking: Ranking) -> dict[int, int]:
    """1 = least relevant."""
    return {index: pos + 1 for pos, index in enumerate(ranking.order())}


def build_report(
    model_name: str,
    rankings: dict[str, Ranking],
    timings: dict[str, float],
    extra: dict | None = None,
) -> dict[str, Any]:
    """Combine rankings into the report dict (see the module docstring)."""
    if not rankings:
        raise PruneError("no measure to compare (accepted: cosine, accuracy, perplexity)")
    depth = next(iter(rankings.values())).num_layers
    cos = rankings.get("cosine")
    acc = rankings.get("accuracy")
    ppl = rankings.get("perplexity")
    span = max(r.scores[0].span for r in rankings.values())
    indices = sorted({s.index for r in rankings.values() for s in r.scores})
    layers = []
    ranks = {name: _ranks(r) for name, r in rankings.items()}
    for i in indices:
        c = cos.by_index().get(i) if cos else None
        a = acc.by_index().get(i) if acc else None
        p = ppl.by_index().get(i) if ppl else None
        layers.append(
            {
                "index": i,
                "cosine": c.score if c else None,
                "cosine_stderr": c.stderr if c else None,
                "accuracy_drop": a.score if a else None,
                "accuracy_drop_stderr": a.stderr if a else None,
                "accuracy_documents": a.documents if a else None,
                "perplexity_increase": _finite(p.score) if p else None,
                "per_task_drop": a.per_task if a else None,
                **{f"rank_{name}": ranks[name].get(i) for name in rankings},
            }
        )
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
    main = pairs.get("cosine~accuracy") or (next(iter(pairs.values())) if pairs else None)
    baseline = None
    if acc is not None and isinstance(acc.baseline, dict):
        baseline = {task: score.to_dict() for task, score in acc.baseline.items()}
    report = {
        "model": model_name,
        "num_layers": depth,
        "block_size": span,
        "measures": names,
        "baseline": baseline,
        "baseline_perplexity": ppl.baseline if ppl else None,
        "layers": layers,
        "correlations": {k: v for k, v in main.items() if k != "overlaps"} if main else None,
        "overlaps": main["overlaps"] if main else None,
        "pairs": pairs,
        "orders": {name: r.order() for name, r in rankings.items()},
        "settings": {name: r.settings for name, r in rankings.items()},
        "timings": timings,
    }
    if extra:
        report.update(extra)
    return report


def compare_measures(
    loaded: Any,
    settings: EvalSettings | None,
    *,
    texts: Sequence[str] | None,
    model_name: str,
    measures: Sequence[str] = ("cosine", "accuracy"),
    seq_len: int = 256,
    batch_size: int = 8,
    block_size: int = 1,
    engine: str = "auto",
    cache: ResultCache | None = None,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    halving: int | None = None,
) -> dict[str, Any]:
    """Run the chosen measures on one model and return the comparison report.

    `layers` limits the accuracy and perplexity measures (one evaluation per
    layer) to those blocks; cosine, one forward pass, always scores every block.
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise PruneError(f"unknown measure '{unknown[0]}' (accepted: {', '.join(MEASURES)})")
    rankings: dict[str, Ranking] = {}
    timings: dict[str, float] = {}
    for measure in measures:
        start = time.perf_counter()
        rankings[measure] = rank_layers(
            measure,
            loaded,
            texts=texts,
            settings=settings,
            seq_len=seq_len,
            batch_size=batch_size,
            block_size=block_size,
            layers=layers,
            engine=engine,
            cache=cache,
            progress=progress,
            halving=halving,
        )
        timings[measure] = round(time.perf_counter() - start, 2)
    return build_report(model_name, rankings, timings)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_table(report: dict[str, Any]) -> str:
    """The per-layer table and correlation summary as markdown."""
    names = report["measures"]
    head = ["layer"]
    if "cosine" in names:
        head += ["cosine (1-cos)" if report["block_size"] == 1 else "angular", "rank"]
    if "accuracy" in names:
        head += ["acc drop ± se", "rank"]
    if "perplexity" in names:
        head += ["ppl increase", "rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for row in report["layers"]:
        cells = [str(row["index"])]
        if "cosine" in names:
            cells += [_fmt(row["cosine"]), str(row["rank_cosine"] or "-")]
        if "accuracy" in names:
            early = row.get("accuracy_documents")
            cells += [
                f"{_fmt(row['accuracy_drop'])} ± {_fmt(row['accuracy_drop_stderr'])}"
                + ("" if early is None else f" (n={early})"),
                str(row["rank_accuracy"] or "-"),
            ]
        if "perplexity" in names:
            cells += [_fmt(row["perplexity_increase"], 2), str(row["rank_perplexity"] or "-")]
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
    if report.get("baseline_perplexity") is not None:
        out.append(f"Baseline perplexity: {report['baseline_perplexity']:.3f}")
    out += ["", "Rank 1 = least relevant (removed first).", "", *lines, ""]
    if any(row.get("accuracy_documents") is not None for row in report["layers"]):
        out += [
            "Successive halving: drops marked (n=N) are estimates from the first N documents per "
            "task (those blocks looked more relevant and were dropped early); the others use every "
            "document.",
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
                f"{_fmt(c['kendall']['tau'], 3)} ({_fmt(c['kendall']['p'], 3)}) | {_fmt(c['pearson']['r'], 3)} ({_fmt(c['pearson']['p'], 3)}) | {ov} |"
            )
        out.append("")
    out.append(
        "Time per measure: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings"].items())
    )
    return "\n".join(out) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, table.md and relevance.png into `out_dir` (each atomically)."""
    from prune.plot import plot_relevance

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "table": out / "table.md",
        "figure": out / "relevance.png",
    }
    _atomic_write(paths["json"], (json.dumps(report, indent=2) + "\n").encode())
    _atomic_write(paths["table"], render_table(report).encode())
    _atomic_write(paths["figure"], plot_relevance(report))
    return paths


# --------------------------------------------------------------------------- command entry points


def _prepare(
    model: str,
    measures: Sequence[str],
    *,
    tasks: str | Sequence[str] | None,
    limit: int | None,
    num_fewshot: int,
    batch_size: int,
    task_metric: str | None,
    include_path: str | None,
    data_dir: str | None,
    calibration: str | None,
    samples: int,
    use_cache: bool,
) -> tuple[EvalSettings | None, list[str] | None, ResultCache | None]:
    """Validate everything cheap (settings, task names, calibration) before loading a model."""
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise PruneError(
            f"unknown measure '{unknown[0] if unknown else ''}' (accepted: {', '.join(MEASURES)})"
        )
    settings = None
    if "accuracy" in measures:
        if not tasks:
            raise PruneError("the accuracy measure needs --tasks (e.g. local_arc_easy,local_piqa)")
        from prune.tasks import resolve_task_names, split_task_names, task_manager

        settings = EvalSettings(
            tasks=tuple(split_task_names(tasks)),
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            task_metric=task_metric,
            data_dir=data_dir,
            include_path=include_path,
        )
        resolve_task_names(settings.tasks, task_manager(data_dir, include_path, settings.tasks))
    texts = None
    if "cosine" in measures or "perplexity" in measures:
        from prune.calibration import load_calibration

        texts = load_calibration(calibration, samples=samples, data_dir=data_dir)
    return settings, texts, ResultCache() if use_cache else None


def _parse_layers(layers: str | Sequence[int] | None) -> list[int] | None:
    if layers is None or layers == "":
        return None
    if isinstance(layers, str):
        from prune.surgery import parse_layer_list

        return parse_layer_list(layers)
    return list(layers)


def measure_model(
    model: str,
    measures: Sequence[str],
    *,
    tasks: str | Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    task_metric: str | None = None,
    include_path: str | None = None,
    data_dir: str | None = None,
    calibration: str | None = None,
    samples: int = 64,
    seq_len: int = 256,
    block_size: int = 1,
    layers: str | Sequence[int] | None = None,
    engine: str = "auto",
    use_cache: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    halving: int | None = None,
) -> dict[str, Any]:
    """Validate the options (before any model is loaded), load MODEL and run `measures` on it.

    Returns the report dict that `rank` prints and `compare` writes.
    """
    from prune.models import load_model

    if halving is not None:
        if "accuracy" not in measures:
            raise PruneError(
                f"--halving applies to the accuracy measure only (this run measures: {', '.join(measures)})"
            )
        halving_rounds(limit, halving)  # a bad value or a missing --limit fails before loading

    settings, texts, cache = _prepare(
        model,
        measures,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        task_metric=task_metric,
        include_path=include_path,
        data_dir=data_dir,
        calibration=calibration,
        samples=samples,
        use_cache=use_cache,
    )
    loaded = load_model(model, dtype=dtype, device=device)
    report = compare_measures(
        loaded,
        settings,
        texts=texts,
        model_name=model,
        measures=measures,
        seq_len=seq_len,
        batch_size=batch_size,
        block_size=block_size,
        engine=engine,
        cache=cache,
        progress=progress,
        layers=_parse_layers(layers),
        halving=halving,
    )
    report["source"] = loaded.source.to_dict()
    return report


def compare_model(
    model: str,
    out: str | os.PathLike,
    *,
    measures: Sequence[str] = ("cosine", "accuracy"),
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """`prune compare`: run the measures (options as in `measure_model`) and write
    report.json/table.md/relevance.png to `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out '{out}' exists and is not a folder")
    report = measure_model(model, measures, **options)
    return report, write_report(report, out)


def rank_model(model: str, metric: str, **options: Any) -> dict[str, Any]:
    """`prune rank`: one measure on MODEL (options as in `measure_model`), as a report dict
    (same layout as `compare`)."""
    if metric not in MEASURES:
        raise PruneError(f"unknown metric '{metric}' (accepted: {', '.join(MEASURES)})")
    return measure_model(model, [metric], **options)
