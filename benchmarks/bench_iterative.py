"""What the iterative schedule costs against one-shot, with and without `rescore`.

    python benchmarks/bench_iterative.py [--model smollm2-135m] [--measure kl]
        [--tasks local_arc_easy,local_winogrande] [--limit 100] [--remove 6]
        [--rescore 4] [--no-full] [--threads 2] [--out bench-out/iterative.json]
    make bench-iterative ITERATIVE_ARGS="--limit 50"

Ranks the model's blocks with one measured strategy three ways, each on a fresh result
cache (so nothing is reused between them) and with the first and last block protected:
- one-shot: rank every block once, remove the `--remove` least relevant;
- iterative with `rescore: m`: after each removal re-measure only the m candidates that
  looked least relevant when last measured (what a recipe's `rescore:` does);
- iterative, full: after each removal re-measure every remaining block (`--no-full` skips it).
Reports per schedule: wall time, model evaluations (candidates plus each round's baseline),
the blocks removed in order, and the Jaccard overlap of each removal set with the full
iterative one. Run it alone: other processes on the same cores distort the times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from prune.errors import PruneError  # noqa: E402
from prune.evaluate.cache import ResultCache  # noqa: E402
from prune.evaluate.settings import EvalSettings  # noqa: E402
from prune.measures import RankRequest, get_measure  # noqa: E402
from prune.models import load_model  # noqa: E402
from prune.surgery import count_layers  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def remove(loaded, settings, measure, k: int, rescore: int | None, schedule: str) -> dict:
    """Greedy removal of k blocks (first and last protected) on a fresh cache."""
    depth = count_layers(loaded.model)
    inner = set(range(1, depth - 1))
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as folder:
        cache = ResultCache(Path(folder))
        start = time.perf_counter()
        evaluations = 0
        latest: dict[int, float] = {}
        removed: list[int] = []
        while len(removed) < k:
            left = sorted(inner - set(removed))
            if schedule == "one-shot" and latest:
                starts = None  # rank once, then take the next least relevant
            elif rescore is not None and latest:
                starts = sorted(left, key=lambda i: (latest[i], i))[:rescore]
            else:
                starts = left
            if starts is not None:
                request = RankRequest(
                    loaded,
                    settings=settings,
                    layers=starts,
                    removed=tuple(sorted(removed)),
                    cache=cache,
                    progress=False,
                )
                latest.update({s.index: s.score for s in measure.rank(request).scores})
                evaluations += len(starts) + 1  # the candidates and this round's baseline
            removed.append(min(left, key=lambda i: (latest[i], i)))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "evaluations": evaluations, "removed": removed}


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--measure", default="kl")
    parser.add_argument("--tasks", default="local_arc_easy,local_winogrande")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--rescore", type=int, default=4)
    parser.add_argument("--no-full", action="store_true", help="skip the full iterative run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="bench-out/iterative.json")
    args = parser.parse_args()
    if min(args.limit, args.remove, args.rescore, args.threads) < 1:
        parser.error("--limit, --remove, --rescore and --threads take positive integers")
    measure = get_measure(args.measure)
    if not measure.needs_tasks:
        parser.error(f"--measure {args.measure}: accepted measures evaluate tasks (e.g. kl)")
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    settings = EvalSettings(tasks=tasks, limit=args.limit, data_dir=args.data_dir)
    runs = {}
    plans = [("one-shot", None), (f"iterative, rescore {args.rescore}", args.rescore)]
    if not args.no_full:
        plans.append(("iterative, full", None))
    for name, rescore in plans:
        log(f"{name} ...")
        schedule = "one-shot" if name == "one-shot" else "iterative"
        runs[name] = remove(loaded, settings, measure, args.remove, rescore, schedule)
        log(f"{name}: {runs[name]['seconds']:.0f} s, removed {runs[name]['removed']}")
    base = runs["one-shot"]["seconds"]
    reference = runs.get("iterative, full", {}).get("removed")
    for run in runs.values():
        run["x_one_shot_time"] = run["seconds"] / base
        run["jaccard_vs_full"] = jaccard(run["removed"], reference) if reference else None
    record = {"settings": vars(args), "threads": torch.get_num_threads(), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print("| schedule | seconds | x one-shot | evaluations | removed (in order) | J vs full |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        jac = "-" if run["jaccard_vs_full"] is None else f"{run['jaccard_vs_full']:.2f}"
        print(
            f"| {name} | {run['seconds']:.0f} | {run['x_one_shot_time']:.1f} | "
            f"{run['evaluations']} | {' '.join(map(str, run['removed']))} | {jac} |"
        )


if __name__ == "__main__":
    try:
        main()
    except PruneError as exc:
        sys.exit(f"Error: {exc}")
