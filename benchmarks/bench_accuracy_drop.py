"""Accuracy-drop ranking of every layer: the lm-eval path against the fast engine, in one run.

    python benchmarks/bench_accuracy_drop.py [--model smollm2-135m] [--limit 25]
        [--tasks local_arc_easy,local_winogrande] [--out bench-out/accuracy_drop.json]
        [--threads N] [--ablations] [--perplexity] [--device cuda --dtype float32]

Both paths score the full model and the model minus each single block on the
same fixed slice (the first `--limit` documents of each task):

- lm-eval path: `prune.evaluate.removals.evaluate_removals(..., engine="lm-eval")`, i.e.
  remove the block, `lm_eval.simple_evaluate` with HFLM, restore (the naive way);
- fast engine: `prune.evaluate.harness.FastEvaluator` over `prune.evaluate.engine`
  (token trees, prefix reuse, scored logits only),
  timed end to end from the model in memory to lm-eval's scores.

Prints both wall times and their ratio, peak memory (RSS sampled during each
phase), the largest difference between the two paths in any task score (acc,
acc_norm) of any candidate, per-request log-likelihood differences, documents
whose prediction differs, and ties (best two choices within 1e-3); writes all of
it as JSON. It also measures the cosine measure's throughput next to a plain
forward pass over the same calibration batches, and with `--ablations` times the
fast engine with each idea switched off on a subset of the candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import prune.evaluate.harness as harness_mod  # noqa: E402
from prune.evaluate.engine import FastEngine  # noqa: E402
from prune.evaluate.harness import FastEvaluator, close_calls  # noqa: E402
from prune.evaluate.removals import evaluate_removals  # noqa: E402
from prune.evaluate.settings import EvalSettings  # noqa: E402
from prune.models import load_model  # noqa: E402
from prune.surgery import count_layers  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every 20 ms; `peak` is the maximum since `reset`."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def reset(self) -> None:
        self.peak = self.now()

    def stop(self) -> None:
        self._stop.set()


@contextmanager
def capture_results(sink: list):
    """Keep every raw lm-eval results dict that `prune.evaluate.harness` turns into scores."""
    original = harness_mod.scores_from_results

    def spy(results, wanted, task_metric):
        sink.append(results["results"])
        return original(results, wanted, task_metric)

    harness_mod.scores_from_results = spy
    try:
        yield
    finally:
        harness_mod.scores_from_results = original


@contextmanager
def capture_answers(sink: list):
    """Keep HFLM's (log-likelihood, is greedy) per request, one dict per loglikelihood call."""
    from lm_eval.models.huggingface import HFLM

    original = HFLM.loglikelihood

    def spy(self, requests, disable_tqdm=False):
        out = original(self, requests, disable_tqdm=disable_tqdm)
        sink.append(
            ({tuple(r.args): a for r, a in zip(requests, out, strict=True)}, list(requests))
        )
        return out

    HFLM.loglikelihood = spy
    try:
        yield
    finally:
        HFLM.loglikelihood = original


def metric_values(raw: dict) -> dict[str, float]:
    """{'task/acc': value, 'task/acc_norm': value, ...} from one raw results dict."""
    out = {}
    for task, entry in raw.items():
        for key, value in entry.items():
            metric = key.split(",")[0]
            if "," in key and metric in ("acc", "acc_norm") and isinstance(value, (int, float)):
                out[f"{task}/{metric}"] = float(value)
    return out


def predictions(answers: dict, instances: list) -> dict:
    """Per document: index of the best choice by log-likelihood and by byte-normalised score,
    or the greedy flag for single-request (last-word) documents."""
    docs: dict = {}
    for inst in instances:
        docs.setdefault((inst.task_name, inst.doc_id), []).append(inst)
    out = {}
    for key, insts in docs.items():
        insts = sorted(insts, key=lambda i: i.idx)
        lls = [answers[tuple(i.args)][0] for i in insts]
        if len(insts) == 1:
            out[key] = (answers[tuple(insts[0].args)][1],)
            continue
        norm = [ll / max(1, len(i.args[1])) for ll, i in zip(lls, insts, strict=True)]
        out[key] = (
            max(range(len(lls)), key=lls.__getitem__),
            max(range(len(norm)), key=norm.__getitem__),
        )
    return out


def drops(scores: list[dict]) -> list[float]:
    """Accuracy drop per layer (mean over tasks of baseline minus score), candidates 1..L."""
    base = scores[0]
    return [sum(base[t].value - s[t].value for t in base) / len(base) for s in scores[1:]]


def env_report_seconds(calls: int = 3) -> float:
    """Mean wall time of lm-eval's `add_env_info`, which every `simple_evaluate` call runs."""
    from lm_eval.evaluator import add_env_info

    start = time.perf_counter()
    for _ in range(calls):
        add_env_info({})
    return (time.perf_counter() - start) / calls


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak(device: torch.device) -> int | None:
    """Peak GPU memory allocated since `gpu_peak_reset` (None off the GPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def cosine_throughput(loaded, samples: int, seq_len: int) -> dict:
    from prune.calibration import load_calibration
    from prune.measures.cosine import cosine_relevance

    texts = load_calibration(None, samples=samples)
    model, tok = loaded.model, loaded.tokenizer
    # The same batches the cosine measure builds: 8 texts, truncated, right-padded.
    encoded = [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
    batches = []
    for start in range(0, len(encoded), 8):
        chunk = encoded[start : start + 8]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, item in enumerate(chunk):
            ids[row, : len(item)], mask[row, : len(item)] = torch.tensor(item), 1
        batches.append((ids.to(model.device), mask.to(model.device)))
    tokens = sum(int(mask.sum()) for _, mask in batches)
    backbone_model = getattr(
        model, model.base_model_prefix
    )  # the blocks and final norm, no LM head
    with torch.inference_mode():
        model(*batches[0])  # warm-up
        sync(model.device)
        start = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
        sync(model.device)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        for ids, mask in batches:
            backbone_model(input_ids=ids, attention_mask=mask)
        sync(model.device)
        backbone = time.perf_counter() - start
    start = time.perf_counter()
    cosine_relevance(model, tok, texts, seq_len=seq_len, batch_size=8)
    sync(model.device)
    cosine = time.perf_counter() - start
    return {
        "texts": len(texts),
        "seq_len": seq_len,
        "tokens": tokens,
        "cosine_seconds": cosine,
        "cosine_tokens_per_s": tokens / cosine,
        "forward_seconds": plain,
        "forward_tokens_per_s": tokens / plain,
        "backbone_seconds": backbone,
        "backbone_tokens_per_s": tokens / backbone,
    }


def perplexity_paths(loaded, samples: int, seq_len: int) -> dict:
    """The perplexity measure of every layer, per-candidate forward passes vs the fast engine."""
    from prune.calibration import load_calibration
    from prune.measures.perplexity import perplexity_relevance

    texts = load_calibration(None, samples=samples)
    out, rankings = {"texts": len(texts), "seq_len": seq_len}, {}
    for engine in ("lm-eval", "fast"):
        start = time.perf_counter()
        rankings[engine] = perplexity_relevance(
            loaded, texts, seq_len=seq_len, progress=False, engine=engine
        )
        out[f"{engine}_seconds"] = time.perf_counter() - start
    plain, fast = rankings["lm-eval"], rankings["fast"]
    out["speedup"] = out["lm-eval_seconds"] / out["fast_seconds"]
    out["max_relative_difference"] = max(
        abs((a.score + plain.baseline) - (b.score + fast.baseline)) / (a.score + plain.baseline)
        for a, b in zip(plain.scores, fast.scores, strict=True)
    )
    out["ranking_identical"] = plain.order() == fast.order()
    return out


def ablations(model, evaluator: FastEvaluator, candidates: list[tuple[int, ...]]) -> dict:
    timings = {}
    saved = evaluator.engine
    for name, switch in [
        ("all ideas", {}),
        ("no token trees", {"share_prefixes": False}),
        ("trees per document", {"share_across_documents": False}),
        ("no prefix reuse", {"reuse_states": False}),
        ("logits everywhere", {"scored_logits_only": False}),
        ("last MLP everywhere", {"scored_last_feed_forward": False}),
    ]:
        evaluator.engine = FastEngine(model, pad_id=saved.pad_id, **switch)
        start = time.perf_counter()
        evaluator.answers(candidates)
        timings[name] = time.perf_counter() - start
        print(f"  ablation {name:<19} {timings[name]:7.1f} s", file=sys.stderr)
    evaluator.engine = saved
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="local_arc_easy,local_winogrande")
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument("--out", default="bench-out/accuracy_drop.json")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--ablations", action="store_true", help="also time the fast engine with each idea off"
    )
    parser.add_argument("--cosine-samples", type=int, default=32)
    parser.add_argument(
        "--perplexity",
        action="store_true",
        help="also time the perplexity measure both ways (16 texts of 128 tokens)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), ..."
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rss = PeakRSS()

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    num_layers = count_layers(model)
    settings = EvalSettings(tasks=tuple(args.tasks.split(",")), limit=args.limit)
    candidates = [()] + [(i,) for i in range(num_layers)]
    with torch.inference_mode():  # first-call warm-up, so neither path pays it
        model(torch.ones((1, 8), dtype=torch.long, device=model.device))
    from prune.tasks import task_manager

    task_manager(
        settings.data_dir, settings.include_path, settings.tasks
    )  # indexing lm-eval: once, untimed
    print(
        f"{args.model}: {num_layers} layers, tasks {args.tasks}, limit {args.limit}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )

    # ---- lm-eval path: remove, simple_evaluate, restore (one full evaluation per candidate)
    lm_raw: list = []
    lm_answers: list = []
    rss.reset()
    gpu_peak_reset(model.device)
    start = time.perf_counter()
    with capture_results(lm_raw), capture_answers(lm_answers):
        lm_scores = evaluate_removals(
            loaded, settings, candidates, engine="lm-eval", cache=None, progress=True
        )
    lm_seconds = time.perf_counter() - start
    lm_peak, lm_gpu_peak = rss.peak, gpu_peak(model.device)
    print(f"lm-eval path: {lm_seconds:.1f} s", file=sys.stderr)

    # ---- fast engine: everything from the in-memory model to lm-eval's scores
    fast_raw: list = []
    getattr(harness_mod, "_LAST_RUNNER", []).clear()  # the fast path builds its own lm-eval runner
    rss.reset()
    gpu_peak_reset(model.device)
    start = time.perf_counter()
    with capture_results(fast_raw):
        evaluator = FastEvaluator(model, tok, settings, progress=True)
        fast_answers = evaluator.answers(candidates)
        fast_raw.clear()  # drop the recording run's dummy results
        fast_scores = [evaluator.scores(a) for a in fast_answers]
    fast_seconds = time.perf_counter() - start
    fast_peak, fast_gpu_peak = rss.peak, gpu_peak(model.device)
    print(f"fast engine: {fast_seconds:.1f} s", file=sys.stderr)

    # ---- compare
    instances = evaluator.recorded
    worst_score, worst_where = 0.0, None
    worst_ll, differing_docs, ties = 0.0, 0, []
    per_layer = []
    for k, cand in enumerate(candidates):
        want, have = metric_values(lm_raw[k]), metric_values(fast_raw[k])
        assert want.keys() == have.keys(), (want.keys(), have.keys())
        for name in want:
            diff = abs(want[name] - have[name])
            if diff > worst_score or worst_where is None:
                worst_score, worst_where = max(worst_score, diff), (list(cand), name)
        ref = lm_answers[k][0]
        worst_ll = max([worst_ll] + [abs(ref[key][0] - fast_answers[k][key][0]) for key in ref])
        p_ref, p_fast = predictions(ref, instances), predictions(fast_answers[k], instances)
        differing_docs += sum(p_ref[d] != p_fast[d] for d in p_ref)
        ties.append(close_calls(fast_answers[k], instances))
        per_layer.append({"removed": list(cand), "lm_eval": want, "fast": have})
    lm_drop, fast_drop = drops(lm_scores), drops(fast_scores)
    order = lambda d: sorted(range(len(d)), key=lambda i: (d[i], i))  # noqa: E731
    ratio = lm_seconds / fast_seconds
    # simple_evaluate ends each call with an environment report (pip, git, torch build info)
    # that changes no score; the fast path skips it. Disclose its share of the lm-eval path.
    env_seconds = env_report_seconds()
    trimmed = lm_seconds - env_seconds * len(candidates)

    cosine = cosine_throughput(loaded, args.cosine_samples, 128)
    ppl = perplexity_paths(loaded, 16, 128) if args.perplexity else None
    ablation = (
        ablations(model, evaluator, [()] + [(i,) for i in range(0, num_layers, 5)])
        if args.ablations
        else None
    )

    tokens_naive = sum(len(r.inputs) for r in evaluator.requests)
    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "model": args.model,
        "num_layers": num_layers,
        "tasks": settings.tasks,
        "limit": args.limit,
        "requests": len(evaluator.requests),
        "request_tokens": tokens_naive,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "device": str(model.device),
            "device_name": torch.cuda.get_device_name(model.device)
            if model.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "dtype": str(next(model.parameters()).dtype),
        },
        "lm_eval_seconds": lm_seconds,
        "fast_seconds": fast_seconds,
        "speedup": ratio,
        "lm_eval_env_report_seconds_per_call": env_seconds,
        "speedup_without_env_report": trimmed / fast_seconds,
        "peak_rss_bytes": {"lm_eval": lm_peak, "fast": fast_peak},
        "peak_gpu_bytes": {"lm_eval": lm_gpu_peak, "fast": fast_gpu_peak},
        "max_score_difference": worst_score,
        "max_score_difference_at": worst_where,
        "max_loglikelihood_difference": worst_ll,
        "documents_with_different_prediction": differing_docs,
        "ties_per_candidate": ties,
        "ranking_identical": order(lm_drop) == order(fast_drop),
        "accuracy_drop": {"lm_eval": lm_drop, "fast": fast_drop},
        "per_candidate": per_layer,
        "cosine_throughput": cosine,
        "ablations_seconds": ablation,
        "perplexity_measure": ppl,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    rss.stop()

    gib = 1 << 30
    print(
        f"model {args.model} ({num_layers} layers), tasks {', '.join(settings.tasks)}, first {args.limit} docs each, "
        f"{len(candidates)} candidates, {torch.get_num_threads()} torch threads, "
        f"{record['machine']['dtype']} on {record['machine']['device_name']}"
    )
    on_gpu = lambda peak: "" if peak is None else f", GPU {peak / gib:.2f} GiB"  # noqa: E731
    print(
        f"lm-eval path : {lm_seconds:8.1f} s   peak RSS {lm_peak / gib:.2f} GiB{on_gpu(lm_gpu_peak)}"
    )
    print(
        f"fast engine  : {fast_seconds:8.1f} s   peak RSS {fast_peak / gib:.2f} GiB{on_gpu(fast_gpu_peak)}"
    )
    print(f"speedup      : {ratio:8.2f}x")
    print(
        f"  of which lm-eval's environment report: {env_seconds:.2f} s per simple_evaluate call "
        f"({env_seconds * len(candidates):.1f} s); speedup without it: {trimmed / fast_seconds:.2f}x"
    )
    print(f"largest task-score difference (acc, acc_norm, any candidate): {worst_score:.6f}")
    print(
        f"largest log-likelihood difference: {worst_ll:.2e}; documents predicted differently: {differing_docs}; "
        f"ties within 1e-3: {sum(ties)}"
    )
    print(f"ranking by accuracy drop identical: {record['ranking_identical']}")
    print(
        f"cosine measure: {cosine['cosine_tokens_per_s']:.0f} tokens/s; plain forward: "
        f"{cosine['forward_tokens_per_s']:.0f} tokens/s; forward without LM head: "
        f"{cosine['backbone_tokens_per_s']:.0f} tokens/s ({cosine['tokens']} tokens)"
    )
    if ppl:
        print(
            f"perplexity measure ({ppl['texts']} texts of {ppl['seq_len']} tokens): forward per "
            f"candidate {ppl['lm-eval_seconds']:.1f} s, fast engine {ppl['fast_seconds']:.1f} s "
            f"({ppl['speedup']:.2f}x), largest relative difference {ppl['max_relative_difference']:.1e}, "
            f"ranking identical: {ppl['ranking_identical']}"
        )
    if ablation:
        for name, seconds in ablation.items():
            print(
                f"ablation {name:<19}: {seconds:7.1f} s ({seconds / ablation['all ideas']:.2f}x of all ideas)"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
