"""Adaptive sampling against the exhaustive ranking: time, documents used, same removal set?

    python benchmarks/bench_adaptive.py [--model smollm2-135m] [--measure kl] [--limit 200]
        [--keep 6] [--tasks local_arc_easy,local_winogrande] [--out bench-out/adaptive.json]

Both rankings use the fast engine on the same documents (the first `--limit` of each
task), without the result cache. The exhaustive one scores every block on every
document; adaptive sampling (`--adaptive K` of `prune rank`, K = `--keep`) scores every
block on limit/8 documents, then only the blocks whose paired 95% interval straddles
the cut between the K least relevant and the rest on limit/4, ..., up to `--limit`,
until none does. Prints both wall times, the candidate-documents each used, the rounds,
and whether the K least relevant blocks (the ones a pruning recipe would remove) agree
(Jaccard overlap of the two sets, and whether they come in the same order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from prune.evaluate.settings import EvalSettings  # noqa: E402
from prune.measures import RankRequest, adaptive_rounds, get_measure, registry  # noqa: E402
from prune.models import load_model  # noqa: E402
from prune.tasks import task_manager  # noqa: E402


def jaccard(a: list[int], b: list[int]) -> float:
    """|A & B| / |A | B| of two sets of blocks (1.0 for two empty sets)."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--measure",
        default="kl",
        choices=[m.name for m in registry().values() if m.adaptive],
        help="an accuracy-family measure",
    )
    parser.add_argument("--tasks", default="local_arc_easy,local_winogrande")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--keep", type=int, default=6, help="K: blocks the removal will take")
    parser.add_argument("--out", default="bench-out/adaptive.json")
    args = parser.parse_args()
    planned = adaptive_rounds(args.limit, args.keep)
    measure = get_measure(args.measure)
    loaded = load_model(args.model)
    settings = EvalSettings(tasks=tuple(args.tasks.split(",")), limit=args.limit)
    task_manager(settings.data_dir, settings.include_path, settings.tasks)  # untimed indexing
    with torch.inference_mode():  # first-call warm-up
        loaded.model(torch.ones((1, 8), dtype=torch.long))
    timed = {}
    rankings = {}
    for name, adaptive in (("exhaustive", None), ("adaptive", args.keep)):
        request = RankRequest(
            loaded, settings=settings, engine="fast", progress=False, adaptive=adaptive
        )
        start = time.perf_counter()
        rankings[name] = measure.rank(request)
        timed[name] = time.perf_counter() - start
        print(f"{name}: {timed[name]:.1f} s", file=sys.stderr)
    exact, fast = rankings["exhaustive"].order(), rankings["adaptive"].order()
    k = args.keep
    meta = rankings["adaptive"].settings
    used = meta["documents_used"]
    by_index = rankings["adaptive"].by_index()
    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "model": args.model,
        "measure": args.measure,
        "tasks": settings.tasks,
        "limit": args.limit,
        "keep": k,
        "planned_rounds": planned,
        "rounds": meta["rounds"],
        "round_candidates": meta["round_candidates"],
        "documents_used": used,
        "documents_per_layer": {i: s.documents or args.limit for i, s in sorted(by_index.items())},
        "torch_threads": torch.get_num_threads(),
        "exhaustive_seconds": timed["exhaustive"],
        "adaptive_seconds": timed["adaptive"],
        "speedup": timed["exhaustive"] / timed["adaptive"],
        "exhaustive_order": exact,
        "adaptive_order": fast,
        "jaccard": jaccard(exact[:k], fast[:k]),
        "same_least_relevant": sorted(exact[:k]) == sorted(fast[:k]),
        "same_least_relevant_order": exact[:k] == fast[:k],
        "shared_least_relevant": len(set(exact[:k]) & set(fast[:k])),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(
        f"model {args.model}, measure {args.measure}, tasks {', '.join(settings.tasks)}, "
        f"{args.limit} docs each, K {k}, {torch.get_num_threads()} torch threads"
    )
    print(
        "adaptive rounds (documents per task: candidates): "
        + ", ".join(
            f"{d}: {c}" for d, c in zip(meta["rounds"], meta["round_candidates"], strict=True)
        )
    )
    print(f"exhaustive ranking: {timed['exhaustive']:8.1f} s  least relevant {exact[:k]}")
    print(f"adaptive ranking  : {timed['adaptive']:8.1f} s  least relevant {fast[:k]}")
    print(
        f"speedup {record['speedup']:.2f}x; candidate-documents per task {used['used']} of "
        f"{used['exhaustive']} ({used['used'] / used['exhaustive']:.0%})"
    )
    print(
        f"K least relevant: Jaccard {record['jaccard']:.2f} (shared "
        f"{record['shared_least_relevant']}/{k}; same order: {record['same_least_relevant_order']})"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
