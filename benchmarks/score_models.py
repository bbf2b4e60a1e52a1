"""Score models on report tasks, each against the first, with paired 95% intervals.

    python benchmarks/score_models.py BASE MODEL [MODEL ...] [--tasks a,b] [--limit 500]
        [--seed 1234] [--out bench-out/scores.json]

`make bench-heal` uses it to put the pruned and the healed folders beside the base model
they came from: what pruning cost on the report tasks and how much healing gave back. Each
model is any `prune` model spec (embedded name, folder, Hub id, .gguf), scored on the same
first `--limit` documents of each task; differences are paired over those documents.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from prune.defaults import REPORT_TASKS, SEED  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="the base model first, then the others")
    parser.add_argument("--tasks", default=",".join(REPORT_TASKS))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path("bench-out/scores.json"))
    args = parser.parse_args()

    from prune.evaluate.removals import evaluate
    from prune.evaluate.settings import EvalSettings
    from prune.models import load_model
    from prune.stats import paired_difference

    settings = EvalSettings(tasks=args.tasks, limit=args.limit)
    documents, report = {}, {}
    for spec in args.models:
        loaded = load_model(spec, device="cpu")
        scores = evaluate(loaded.model.eval(), loaded.tokenizer, settings)
        documents[spec] = {t: s.outcomes.metric(s.metric) for t, s in scores.items()}
        mean = sum(s.value for s in scores.values()) / len(scores)
        report[spec] = {"scores": {t: s.value for t, s in scores.items()}, "mean": mean}
        line = ", ".join(f"{t} {s.value:.3f}" for t, s in scores.items())
        print(f"{spec}: mean {mean:.3f} ({line})")
        del loaded
    base = args.models[0]
    for spec in args.models[1:]:
        paired = paired_difference(documents[spec], documents[base], seed=args.seed)
        report[spec]["vs_base"] = paired.to_dict()
        lo, hi = paired.ci95
        verdict = "distinguishable" if paired.distinguishable else "not distinguishable"
        print(f"{spec} - {base}: {paired.diff:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}, {verdict})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tasks": args.tasks, "limit": args.limit, **report}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
