"""Opt-in early stopping: the accuracy-drop ranking with successive halving against the exact one.

    python benchmarks/bench_halving.py [--model smollm2-135m] [--limit 200] [--keep 6]
        [--tasks local_arc_easy,local_winogrande] [--out bench-out/halving.json]

Both rankings use the fast engine on the same documents (the first `--limit` of
each task). The exact one scores every block on every document; successive
halving scores every block on limit/8 documents, the less relevant half on twice
as many, ..., and only the `--keep` least relevant on all of them. Prints both
wall times, their ratio, and whether the `--keep` least relevant blocks (the ones
a pruning recipe would remove) come out the same and in the same order.
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
from prune.measures.accuracy import accuracy_relevance, halving_rounds  # noqa: E402
from prune.models import load_model  # noqa: E402
from prune.tasks import task_manager  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="local_arc_easy,local_winogrande")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--keep", type=int, default=6)
    parser.add_argument("--out", default="bench-out/halving.json")
    args = parser.parse_args()
    rounds = halving_rounds(args.limit, args.keep)
    loaded = load_model(args.model)
    settings = EvalSettings(tasks=tuple(args.tasks.split(",")), limit=args.limit)
    task_manager(settings.data_dir, settings.include_path, settings.tasks)  # untimed indexing
    with torch.inference_mode():  # first-call warm-up
        loaded.model(torch.ones((1, 8), dtype=torch.long))
    timed = {}
    rankings = {}
    for name, halving in (("exact", None), ("halving", args.keep)):
        start = time.perf_counter()
        rankings[name] = accuracy_relevance(
            loaded, settings, engine="fast", halving=halving, progress=False
        )
        timed[name] = time.perf_counter() - start
        print(f"{name}: {timed[name]:.1f} s", file=sys.stderr)
    exact, fast = rankings["exact"].order(), rankings["halving"].order()
    k = args.keep
    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "model": args.model,
        "tasks": settings.tasks,
        "limit": args.limit,
        "rounds": rounds,
        "keep": k,
        "torch_threads": torch.get_num_threads(),
        "exact_seconds": timed["exact"],
        "halving_seconds": timed["halving"],
        "speedup": timed["exact"] / timed["halving"],
        "exact_order": exact,
        "halving_order": fast,
        "same_least_relevant": sorted(exact[:k]) == sorted(fast[:k]),
        "same_least_relevant_order": exact[:k] == fast[:k],
        "shared_least_relevant": len(set(exact[:k]) & set(fast[:k])),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(
        f"model {args.model}, tasks {', '.join(settings.tasks)}, {args.limit} docs each, "
        f"rounds {rounds}, keep {k}, {torch.get_num_threads()} torch threads"
    )
    print(f"exact ranking   : {timed['exact']:8.1f} s  least relevant {exact[:k]}")
    print(f"halving ranking : {timed['halving']:8.1f} s  least relevant {fast[:k]}")
    print(f"speedup         : {record['speedup']:8.2f}x")
    print(
        f"same {k} least relevant: {record['same_least_relevant']} "
        f"(in the same order: {record['same_least_relevant_order']}; shared {record['shared_least_relevant']}/{k})"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
