"""Which ranking signal to trust: stability on ranking tasks, evidence on held-out tasks.

    python benchmarks/study_signals.py [--model smollm2-135m] [--rank-limit 300]
        [--report-limit 300] [--resamples 200] [--depths 2,4,6,8] [--remove 8]
        [--signal kl] [--rescore 4] [--threads 2] [--data-dir DIR]
        [--out bench-out/study-<model>]
    make study STUDY_ARGS="--model gemma3-270m"

Part A (ranking tasks, default local_arc_easy + local_winogrande, first `--rank-limit`
documents each): the full model and every single-block removal are scored in one
`evaluate_removals` call (cached). For each signal of `prune.measures._signals`
(correct, probability, margin, kl) a block's relevance is the mean over tasks of its
mean per-document contribution; its removal set is the k least relevant blocks (never
the first or last, ties to the lower index; k = `--remove`, default the largest depth).
Stability against the number of documents: for n in `--sizes` (default 25,50,100,200;
sizes not below every task's count are skipped), `--resamples` seeded subsamples of n
documents per task, drawn without replacement and shared by all signals, each
recomputing the removal set; reported is its mean Jaccard overlap with the full-data
set. On all documents, `prune.stats.removal_stability` (bootstrap, same resamples).
Cosine (64 calibration texts) has no document dimension, and `cosine_relevance` does
not expose per-text scores, so only its ranking is reported. Its default calibration
texts are LAMBADA passages after the first `--report-limit` ones, which Part B scores.

Part B (report tasks, default local_piqa, local_copa, local_openbookqa, local_lambada,
first `--report-limit` documents each, disjoint from the ranking tasks): each strategy
(cosine and the four signals, one-shot: its full-data order with the first and last
block protected) removes its first d blocks for each d in `--depths`. All removal sets
(deduplicated) and the full model are scored in one `evaluate_removals` call. Per
strategy and depth: the mean report score (mean over tasks of each task's metric), its
paired difference (`prune.stats.paired_difference`, seeded) with the base model and
with cosine at the same depth, and the same for the multiple-choice tasks and the
next-word task (LAMBADA) on their own.

Part C (interactions, on the same ranking documents, signal `--signal`, default kl):
- `<signal>-span2`: every span of two consecutive blocks (first and last excluded) is
  removed and scored; spans are taken least relevant first, never overlapping (what
  `span: 2` does in a recipe, one-shot);
- `angular-span2`: the same with the angular distance over the calibration texts;
- `angular-gromov`: for each depth d, the one span of d blocks with the smallest
  angular distance (Gromov et al.);
- `<signal>-iterative`: greedy, re-measuring after each removal the `--rescore` blocks
  that looked least relevant when last measured (what `schedule: iterative` with
  `rescore:` does); its wall time beside part A's one-shot evaluation.
Their removal sets join part B.

Outputs under `--out`:
- study.json: settings, timings, part_a (per signal: relevance per block, order,
  removal set, subsample Jaccard per n, bootstrap stability; cosine's order), part_b
  (one row per strategy and depth: removed blocks, scores, and every paired
  difference as {diff, stderr, ci95, documents});
- stability.png: mean Jaccard overlap vs documents per task, one line per signal
  (open markers: the bootstrap on all documents);
- tradeoff.png: mean report score vs blocks removed, one line per strategy; the band
  is the paired 95% interval of the difference with the base, added to the base score.
stdout gets two markdown tables for the README; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from prune.atomic import write_file  # noqa: E402
from prune.calibration import load_calibration  # noqa: E402
from prune.defaults import SEED  # noqa: E402
from prune.errors import PruneError  # noqa: E402
from prune.evaluate.cache import ResultCache  # noqa: E402
from prune.evaluate.removals import evaluate_removals  # noqa: E402
from prune.evaluate.settings import EvalSettings  # noqa: E402
from prune.measures._signals import SIGNALS, contributions  # noqa: E402
from prune.measures.cosine import cached_cosine_relevance  # noqa: E402
from prune.models import load_model  # noqa: E402
from prune.stats import paired_difference, removal_stability  # noqa: E402
from prune.surgery import count_layers  # noqa: E402

RANK_TASKS = "local_arc_easy,local_winogrande"
REPORT_TASKS = "local_piqa,local_copa,local_openbookqa,local_lambada"
DEPTHS = {"gemma3-270m": "2,4,6"}  # per model; others get "2,4,6,8"
CALIBRATION_TEXTS = 64


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def least_relevant(relevance: np.ndarray, k: int, layers: int) -> np.ndarray:
    """Per row of relevance (R, L): the k least relevant blocks, never the first or last,
    ties to the lower index: (R, k)."""
    inner = np.arange(1, layers - 1)
    order = np.argsort(relevance[:, inner], axis=1, kind="stable")[:, :k]
    return inner[order]


def jaccard(sets: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Jaccard overlap of each row of `sets` (R, k) with `reference` (k,): (R,)."""
    k = reference.size
    overlap = np.isin(sets, reference).sum(axis=1)
    return overlap / (2 * k - overlap)


def signal_matrices(base: dict, results: list[dict], signal: str) -> dict[str, np.ndarray]:
    """task -> (layers, documents) per-document cost of removing each block (docs sorted)."""
    out = {}
    for task, b in base.items():
        docs = sorted(b.outcomes.doc_ids)
        flip = -1.0 if signal == "correct" and not b.higher_is_better else 1.0
        rows = []
        for result in results:
            cost = contributions(signal, b.outcomes, result[task].outcomes, b.metric)
            rows.append([flip * cost[d] for d in docs])
        out[task] = np.asarray(rows)
    return out


def subsample_weights(counts: dict[str, int], n: int, resamples: int, seed: int) -> dict:
    """task -> (R, D) weights averaging n documents drawn without replacement per row."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = {}
    for task in sorted(counts):
        chosen = np.argsort(rng.random((resamples, counts[task])), axis=1)[:, :n]
        w = np.zeros((resamples, counts[task]))
        np.put_along_axis(w, chosen, 1.0 / n, axis=1)
        out[task] = w
    return out


def part_a(loaded, settings, args, k: int, cache) -> dict:
    """Relevance, removal sets and their stability per signal; cosine's order."""
    layers = count_layers(loaded.model)
    candidates = [()] + [(i,) for i in range(layers)]
    start = time.perf_counter()
    results = evaluate_removals(loaded, settings, candidates, cache=cache, progress=True)
    evaluated = time.perf_counter() - start
    base, removed = results[0], results[1:]
    missing = [t for t, s in base.items() if s.outcomes is None]
    if missing:
        raise PruneError(f"no per-document outcomes for {missing}: the signals need them")
    counts = {t: len(s.outcomes.doc_ids) for t, s in base.items()}
    sizes = [n for n in args.sizes if n < min(counts.values())]
    draws = {n: subsample_weights(counts, n, args.resamples, SEED + n) for n in sizes}
    table = {}
    for signal in SIGNALS:
        log(f"part A: {signal}")
        matrices = signal_matrices(base, removed, signal)
        relevance = sum(m.mean(axis=1) for m in matrices.values()) / len(matrices)  # (L,)
        full = least_relevant(relevance[None, :], k, layers)[0]
        order = least_relevant(relevance[None, :], layers - 2, layers)[0]
        stability = {}
        for n, weights in draws.items():
            sub = sum(weights[t] @ matrices[t].T for t in weights) / len(weights)  # (R, L)
            overlap = jaccard(least_relevant(sub, k, layers), full)
            stability[n] = {"mean": float(overlap.mean()), "std": float(overlap.std())}
        boot = removal_stability(
            matrices, k, exclude=[0, layers - 1], seed=SEED, resamples=args.resamples
        )
        table[signal] = {
            "relevance": [float(x) for x in relevance],
            "order": [int(i) for i in order],
            "removal_set": [int(i) for i in full],
            "subsample_jaccard": stability,
            "bootstrap": boot.to_dict(),
        }
    start = time.perf_counter()
    texts = calibration(args)
    ranking = cached_cosine_relevance(loaded, texts, cache=cache, progress=True)
    cosine_seconds = time.perf_counter() - start
    order = [i for i in ranking.order() if i not in (0, layers - 1)]
    table["cosine"] = {
        "relevance": [s.score for s in sorted(ranking.scores, key=lambda s: s.index)],
        "order": order,
        "removal_set": order[:k],
        "texts": len(texts),
        "stability": "not available: cosine_relevance exposes no per-text scores",
    }
    return {
        "documents": counts,
        "sizes": sizes,
        "signals": table,
        "seconds": {"evaluate": evaluated, "cosine": cosine_seconds},
    }


def signal_relevance(base: dict, results: list[dict], signal: str) -> np.ndarray:
    """Mean over tasks of the mean per-document cost of each candidate removal: (C,)."""
    matrices = signal_matrices(base, results, signal)
    return sum(m.mean(axis=1) for m in matrices.values()) / len(matrices)


def take_spans(scores: dict[tuple[int, ...], float], blocks: int) -> list[int]:
    """Blocks in removal order: spans least relevant first (ties to the lower start), each
    skipped when it overlaps one already taken, until `blocks` blocks."""
    taken: list[int] = []
    for span in sorted(scores, key=lambda sp: (scores[sp], sp)):
        if len(taken) + len(span) > blocks:
            break
        if not set(span) & set(taken):
            taken.extend(span)
    return taken


def part_c(loaded, settings, args, a: dict, cache) -> dict:
    """The span and iterative strategies: removal orders (or per-depth sets) and timings."""
    from prune.measures import RankRequest, get_measure

    layers = count_layers(loaded.model)
    inner = range(1, layers - 1)
    deepest = max(args.depths)
    out: dict = {"orders": {}, "sets": {}, "seconds": {}}

    log(f"part C: {args.signal} on spans of 2 blocks")
    start = time.perf_counter()
    pairs = [(i, i + 1) for i in inner if i + 1 in inner]
    results = evaluate_removals(loaded, settings, [(), *pairs], cache=cache, progress=True)
    relevance = signal_relevance(results[0], results[1:], args.signal)
    out["orders"][f"{args.signal}-span2"] = take_spans(
        dict(zip(pairs, relevance.tolist(), strict=True)), deepest
    )
    out["seconds"][f"{args.signal}-span2"] = time.perf_counter() - start

    texts = calibration(args)
    log("part C: angular distance over spans")
    start = time.perf_counter()
    two = cached_cosine_relevance(loaded, texts, block_size=2, angular=True, cache=cache)
    spans2 = {s.layers: s.score for s in two.scores if set(s.layers) <= set(inner)}
    out["orders"]["angular-span2"] = take_spans(spans2, deepest)
    for depth in args.depths:
        ranking = cached_cosine_relevance(
            loaded, texts, block_size=depth, angular=True, cache=cache
        )
        best = min(
            (s for s in ranking.scores if set(s.layers) <= set(inner)),
            key=lambda s: (s.score, s.index),
        )
        out["sets"][("angular-gromov", depth)] = list(best.layers)
    out["seconds"]["angular"] = time.perf_counter() - start

    log(f"part C: {args.signal}, iterative, re-measuring {args.rescore} per round")
    start = time.perf_counter()
    latest = dict(enumerate(a["signals"][args.signal]["relevance"]))
    measure = get_measure("accuracy" if args.signal == "correct" else args.signal)
    removed: list[int] = []
    rounds = []
    while len(removed) < deepest:
        if removed:
            usable = [i for i in inner if i not in removed]
            starts = sorted(usable, key=lambda i: (latest[i], i))[: args.rescore]
            request = RankRequest(
                loaded, settings=settings, layers=starts, removed=tuple(removed), cache=cache
            )
            latest.update({sc.index: sc.score for sc in measure.rank(request).scores})
            rounds.append(starts)
        pick = min((i for i in inner if i not in removed), key=lambda i: (latest[i], i))
        removed.append(pick)
    out["orders"][f"{args.signal}-iterative"] = removed
    out["seconds"][f"{args.signal}-iterative"] = time.perf_counter() - start
    out["iterative_rounds"] = rounds
    return out


def calibration(args) -> list[str]:
    """The cosine texts; by default LAMBADA passages the report does not score."""
    skip = 0
    if args.calibration is None and "local_lambada" in args.report_tasks:
        skip = args.report_limit
    texts = load_calibration(
        args.calibration, samples=skip + CALIBRATION_TEXTS, data_dir=args.data_dir
    )[skip:]
    if not texts:
        raise PruneError(f"no calibration text left after skipping the {skip} report passages")
    return texts


def part_b(loaded, settings, strategies: dict[str, list[int]], depths, cache, fixed=None) -> dict:
    """Score every strategy's first-d removal sets (and the `fixed` (strategy, d) -> set ones)
    on the report tasks, with paired stats."""
    sets = {(s, d): tuple(sorted(order[:d])) for s, order in strategies.items() for d in depths}
    sets |= {key: tuple(sorted(removed)) for key, removed in (fixed or {}).items()}
    unique = [()] + list(dict.fromkeys(sets.values()))
    start = time.perf_counter()
    results = evaluate_removals(loaded, settings, unique, cache=cache, progress=True)
    evaluated = time.perf_counter() - start
    for task, score in results[0].items():
        if score.outcomes is None or not score.higher_is_better:
            raise PruneError(f"report task '{task}' needs per-document, higher-is-better scores")
    values = {
        removed: {t: s.outcomes.metric(s.metric) for t, s in result.items()}
        for removed, result in zip(unique, results, strict=True)
    }
    base = values[()]
    next_word = sorted(t for t, s in results[0].items() if all(len(x) == 1 for x in s.outcomes.lls))
    groups = {"all": sorted(base), "mc": sorted(set(base) - set(next_word)), "next_word": next_word}

    def mean(v: dict, tasks: list[str]) -> float:
        return float(np.mean([np.mean(list(v[t].values())) for t in tasks]))

    def paired(a: dict, b: dict, tasks: list[str]) -> dict:
        pick = lambda v: {t: v[t] for t in tasks}  # noqa: E731
        return paired_difference(pick(a), pick(b), seed=SEED).to_dict()

    rows = []
    for (strategy, depth), removed in sets.items():
        v = values[removed]
        row = {"strategy": strategy, "depth": depth, "removed": list(removed)}
        for group, tasks in groups.items():
            row[f"{group}_score"] = mean(v, tasks) if tasks else None
            row[f"{group}_vs_base"] = paired(v, base, tasks) if tasks else None
        cosine = values.get(sets.get(("cosine", depth)))
        row["vs_cosine"] = paired(v, cosine, groups["all"]) if strategy != "cosine" else None
        rows.append(row)
    return {
        "groups": groups,
        "base": {g: mean(base, t) if t else None for g, t in groups.items()},
        "documents": {t: len(d) for t, d in base.items()},
        "rows": rows,
        "evaluated_sets": len(unique),
        "seconds": {"evaluate": evaluated},
    }


MARKERS = {"cosine": "s", "correct": "o", "probability": "^", "margin": "v", "kl": "D"}
MARKERS |= {"angular": "P"}
DASHES = {"span2": "--", "gromov": ":", "iterative": "-."}
BANDS = ("cosine", "kl")  # the strategies whose interval bands the tradeoff figure shows


def style(strategy: str) -> dict:
    """Colour from the measure registry (the correct signal is the accuracy measure); spans
    and the iterative schedule are dashed."""
    from prune.measures import get_measure

    measure, _, kind = strategy.partition("-")
    color = get_measure("accuracy" if measure == "correct" else measure).color
    return {"color": color, "marker": MARKERS[measure], "linestyle": DASHES.get(kind, "-")}


def render(draw, title: str, xlabel: str, ylabel: str, ticks: list[int]) -> bytes:
    """A one-axes figure: `draw(ax)` plots, the rest is shared; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    draw(ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.minorticks_off()
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_stability(a: dict, model: str, k: int) -> bytes:
    full, sizes = min(a["documents"].values()), a["sizes"]

    def draw(ax) -> None:
        for signal in SIGNALS:
            entry = a["signals"][signal]
            ys = [entry["subsample_jaccard"][n]["mean"] for n in sizes]
            ax.plot(sizes, ys, label=signal, **style(signal))
            ax.plot(
                [full],
                [entry["bootstrap"]["jaccard"]],
                mfc="none",
                **style(signal) | {"linestyle": ""},
            )
        ax.plot([], [], "ko", mfc="none", label=f"bootstrap, all {full} documents")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)

    ylabel = f"mean Jaccard overlap with the full-data set (k={k})"
    title = f"{model}: removal-set stability per signal"
    return render(draw, title, "documents per ranking task", ylabel, sizes + [full])


def plot_tradeoff(b: dict, model: str, depths: list[int]) -> bytes:
    base = b["base"]["all"]

    def draw(ax) -> None:
        for strategy in dict.fromkeys(r["strategy"] for r in b["rows"]):
            rows = sorted(
                (r for r in b["rows"] if r["strategy"] == strategy), key=lambda r: r["depth"]
            )
            xs = [0] + [r["depth"] for r in rows]
            band = [(0.0, 0.0)] + [r["all_vs_base"]["ci95"] for r in rows]
            ax.plot(xs, [base] + [r["all_score"] for r in rows], label=strategy, **style(strategy))
            if strategy in BANDS:  # a band for every line would hide the lines
                lo, hi = (base + np.asarray(side) for side in zip(*band, strict=True))
                ax.fill_between(xs, lo, hi, color=style(strategy)["color"], alpha=0.12)
        ax.axhline(base, color="gray", lw=0.8, ls="--")

    ylabel = "mean report score (bands: paired 95% CI vs base)"
    title = f"{model}: held-out score per strategy"
    return render(draw, title, "blocks removed", ylabel, [0] + depths)


def delta(p: dict | None) -> str:
    if p is None:
        return "-"
    mark = "*" if p["ci95"][0] > 0 or p["ci95"][1] < 0 else ""
    return f"{p['diff']:+.3f}{mark} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"


def markdown(a: dict, b: dict, k: int) -> str:
    sizes, full = a["sizes"], min(a["documents"].values())
    head = ["signal", f"removal set (k={k})"] + [f"J@{n}" for n in sizes] + [f"bootstrap J@{full}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in a["signals"].items():
        cells = [name, " ".join(map(str, sorted(entry["removal_set"])))]
        jac = entry.get("subsample_jaccard")
        cells += [f"{jac[n]['mean']:.2f} ± {jac[n]['std']:.2f}" if jac else "-" for n in sizes]
        cells.append(f"{entry['bootstrap']['jaccard']:.2f}" if jac else "-")
        lines.append("| " + " | ".join(cells) + " |")
    nw = ", ".join(b["groups"]["next_word"]) or "next-word"
    head = ["strategy", "removed", "mean score", "Δ vs base [95% CI]", "Δ vs cosine [95% CI]"]
    head += ["multiple choice Δ vs base", f"{nw} Δ vs base"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    base = b["base"]
    table.append(
        f"| base | - | {fmt(base['all'])} | - | - | {fmt(base['mc'])} | {fmt(base['next_word'])} |"
    )
    for r in sorted(b["rows"], key=lambda r: (r["depth"], r["strategy"] != "cosine")):
        table.append(
            f"| {r['strategy']} | {' '.join(map(str, r['removed']))} | {fmt(r['all_score'])} "
            f"| {delta(r['all_vs_base'])} | {delta(r['vs_cosine'])} "
            f"| {fmt(r['mc_score'])} ({delta(r['mc_vs_base'])}) "
            f"| {fmt(r['next_word_score'])} ({delta(r['next_word_vs_base'])}) |"
        )
    docs = ", ".join(f"{t} {n}" for t, n in b["documents"].items())
    note = f"\nDocuments per report task: {docs}. * = the 95% interval excludes zero.\n"
    return "\n".join(lines) + "\n\n" + "\n".join(table) + "\n" + note


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank-tasks", default=RANK_TASKS)
    parser.add_argument("--report-tasks", default=REPORT_TASKS)
    parser.add_argument("--rank-limit", type=int, default=300)
    parser.add_argument("--report-limit", type=int, default=300)
    parser.add_argument("--resamples", type=int, default=200, help="subsamples per size")
    parser.add_argument("--sizes", type=ints, default=[25, 50, 100, 200], help="documents per task")
    parser.add_argument("--depths", type=ints, default=None, help="default: per model")
    parser.add_argument("--remove", type=int, default=None, help="k of part A (default: max depth)")
    parser.add_argument("--calibration", default=None, help="cosine texts (default: LAMBADA)")
    parser.add_argument("--signal", default="kl", help="the signal of part C's strategies")
    parser.add_argument("--rescore", type=int, default=4, help="part C iterative: per round")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: bench-out/study-<model>")
    args = parser.parse_args()
    args.rank_tasks = tuple(t.strip() for t in args.rank_tasks.split(",") if t.strip())
    args.report_tasks = tuple(t.strip() for t in args.report_tasks.split(",") if t.strip())
    shared = sorted(set(args.rank_tasks) & set(args.report_tasks))
    if shared:
        parser.error(f"ranking and report tasks must be disjoint; both list {', '.join(shared)}")
    args.depths = sorted(set(args.depths or ints(DEPTHS.get(args.model, "2,4,6,8"))))
    args.remove = args.remove or max(args.depths)
    if args.signal not in SIGNALS:
        parser.error(f"--signal {args.signal!r}: accepted {', '.join(SIGNALS)}")
    if (
        min(args.depths + args.sizes + [args.resamples, args.remove, args.threads, args.rescore])
        < 1
    ):
        parser.error(
            "--depths, --sizes, --resamples, --remove, --threads, --rescore take positive integers"
        )
    name = re.sub(r"[^\w.-]+", "_", Path(args.model).name)
    args.out = Path(args.out or f"bench-out/study-{name}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model)
    layers = count_layers(loaded.model)
    loaded_seconds = time.perf_counter() - started
    if max(args.depths + [args.remove]) > layers - 2:
        raise PruneError(
            f"{args.model} has {layers} blocks: --depths and --remove must be at most "
            f"{layers - 2} (first and last are protected)"
        )
    log(f"{args.model}: {layers} blocks, {torch.get_num_threads()} threads, out {args.out}")
    cache = ResultCache()
    rank = EvalSettings(tasks=args.rank_tasks, limit=args.rank_limit, data_dir=args.data_dir)
    report = EvalSettings(tasks=args.report_tasks, limit=args.report_limit, data_dir=args.data_dir)
    a = part_a(loaded, rank, args, args.remove, cache)
    c = part_c(loaded, rank, args, a, cache)
    strategies = {"cosine": a["signals"]["cosine"]["order"]}
    strategies |= {s: a["signals"][s]["order"] for s in SIGNALS}
    strategies |= c["orders"]
    log("part B: scoring the removal sets on the report tasks")
    b = part_b(loaded, report, strategies, args.depths, cache, c.pop("sets"))
    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        # vars(args): model, tasks, limits, remove (= k), depths, sizes, resamples, ...
        "settings": {**vars(args), "out": str(args.out), "blocks": layers, "seed": SEED},
        "timings": {
            "load_seconds": loaded_seconds,
            "part_a_seconds": a.pop("seconds"),
            "part_b_seconds": b.pop("seconds"),
            "part_c_seconds": c.pop("seconds"),
            "total_seconds": time.perf_counter() - started,
        },
        "part_a": a,
        "part_b": b,
        "part_c": c,
    }
    write_file(args.out / "study.json", json.dumps(record, indent=2))
    write_file(args.out / "stability.png", plot_stability(a, args.model, args.remove))
    write_file(args.out / "tradeoff.png", plot_tradeoff(b, args.model, args.depths))
    print(markdown(a, b, args.remove))
    seconds = record["timings"]["total_seconds"]
    log(f"wrote study.json, stability.png, tradeoff.png to {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except PruneError as exc:
        sys.exit(f"Error: {exc}")
