"""GPU benchmark: rank all 32 blocks of a Llama-3.1-8B-shaped model by accuracy drop.

    python benchmarks/bench_gpu.py [--limit 500] [--tasks local_arc_easy,local_piqa]
        [--peak-tflops 989] [--out bench-out/gpu.json]
    torchrun --nproc-per-node N benchmarks/bench_gpu.py ...   # N GPUs, process 0 reports
    python benchmarks/bench_gpu.py --tiny --limit 4           # CPU smoke test (seconds)

The model is randomly initialised from a config shaped like Llama-3.1-8B (hidden 4096,
32 layers, intermediate 14336, 32 heads, 8 KV heads, vocab 128256, rope theta 500000)
in bfloat16, directly on the GPU: nothing is downloaded. Random weights make the
scores meaningless but the work exactly that of the real model. The text goes through
the SmolLM2 tokenizer of the embedded default model (ids < 49152 < vocab), or a byte
tokenizer with `--tokenizer byte`.

Timed: `prune.evaluate.removals.evaluate_removals(..., engine="fast")` for the full
model and each single block removed (33 candidates) on `--limit` documents of each
task (2 x 500 = 1000 documents by default), from the model in memory to lm-eval's
scores; under torchrun prune shares the candidates between the processes.

Reported as JSON (stdout and `--out`): wall time, tokens/s, model FLOPs and the fraction
of the GPU's dense bfloat16 peak, peak GPU memory, and the goal: under 5 minutes on one
H100/H200-class GPU. Token and FLOP counts come from the engine's own batch plan: each
packed token runs through the trunk (all 32 blocks) once, and through blocks i+1..31
again for the candidate without block i (states entering block i are reused), so a
token costs 32 + 31*32/2 = 528 block passes; FLOPs ~ 2 x block parameters per block
pass (plus attention over the packed rows and the LM head at scored positions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GOAL_SECONDS = 300
# Dense bfloat16 tensor-core peaks (TFLOPS, no sparsity), matched in the device name.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM and NVL
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}
LLAMA_31_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    LLAMA_31_8B,
    hidden_size=64,
    num_hidden_layers=4,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def join_processes() -> None:
    """Under torchrun, join prune's process group (each process then uses its LOCAL_RANK GPU)."""
    if rank_and_size()[1] == 1:
        return
    try:
        from prune.distributed import init
    except ImportError:  # a prune without distributed support: every process runs everything
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local % torch.cuda.device_count())
        return
    init()


def peak_tflops(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return value
    return None


def tokenizer(kind: str):
    """The embedded SmolLM2 tokenizer (from its cached conversion), or a byte tokenizer."""
    if kind == "byte":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import byte_tokenizer

        return byte_tokenizer()
    from transformers import AutoTokenizer

    from prune.models import gguf_checkpoint, resolve_source

    source = resolve_source("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(gguf_checkpoint(Path(source.path), source.sha256)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(shape: dict, tok, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Llama of `shape`, created on `device` in `dtype` (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(**shape, **{k: v for k, v in ids.items() if v is not None})
    if len(tok) > config.vocab_size:
        raise SystemExit(
            f"tokenizer has {len(tok)} tokens, more than the vocab {config.vocab_size}"
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def plan_counts(model, tok, settings) -> dict:
    """Tokens, block passes and FLOPs of the fast engine's ranking, from its own batch plan."""
    from prune.evaluate.engine import _plan_tokens, _row_width, plan_batches
    from prune.evaluate.harness import FastEvaluator
    from prune.summary import count_parameters
    from prune.surgery import locate_layers

    evaluator = FastEvaluator(model, tok, settings)
    engine = evaluator.engine
    plans = plan_batches(
        evaluator.requests,
        row_tokens=engine.row_tokens,
        batch_tokens=engine.batch_tokens,
        across_documents=engine.share_across_documents,
    )
    blocks = list(locate_layers(model).layers)
    n = len(blocks)
    passes = n + sum(n - 1 - i for i in range(n))  # trunk, then blocks i+1.. per candidate
    packed = sum(_row_width(row) for plan in plans for row in plan)
    padded = sum(_plan_tokens(plan) for plan in plans)
    scored = sum(len(r.targets) for r in evaluator.requests)
    hidden = engine.hidden_size
    block_params = count_parameters(blocks[0])
    head_params = model.get_output_embeddings().weight.numel()
    # Per block pass: the matmuls (2 x params per token) and attention over each packed row
    # (QK^T and AV: 4 x width^2 x hidden per row, the tree mask does not skip work).
    attention = sum(4 * len(plan) * max(map(_row_width, plan)) ** 2 * hidden for plan in plans)
    flops = passes * (2 * block_params * padded + attention) + (n + 1) * 2 * head_params * scored
    return {
        "documents": len({r.group for r in evaluator.requests}),
        "requests": len(evaluator.requests),
        "request_tokens": sum(len(r.inputs) for r in evaluator.requests),
        "packed_tokens": packed,
        "padded_tokens": padded,
        "scored_tokens": scored,
        "batches": len(plans),
        "block_passes_per_token": passes,
        "block_parameters": block_params,
        "flops": flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="local_arc_easy,local_piqa")
    parser.add_argument("--limit", type=int, default=500, help="documents per task")
    parser.add_argument("--tiny", action="store_true", help="a 4-block toy config (CPU test)")
    parser.add_argument("--tokenizer", choices=("smollm2", "byte"), default="smollm2")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 peak")
    parser.add_argument("--data-dir", default=None, help="local_* task data (PRUNE_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/gpu.json"))
    args = parser.parse_args()

    from prune.evaluate.removals import evaluate_removals
    from prune.evaluate.settings import EvalSettings
    from prune.models import LoadedModel, ModelSource
    from prune.tasks import task_manager

    join_processes()
    rank, size = rank_and_size()
    main_process = rank == 0
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)

    def say(text: str) -> None:
        if main_process:
            print(text, file=sys.stderr, flush=True)

    tok = tokenizer(args.tokenizer)
    settings = EvalSettings(tasks=args.tasks, limit=args.limit, data_dir=args.data_dir)
    task_manager(settings.data_dir, settings.include_path, settings.tasks)  # index once, untimed
    start = time.perf_counter()
    model = build_model(TINY if args.tiny else LLAMA_31_8B, tok, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_seconds = time.perf_counter() - start
    num_layers = model.config.num_hidden_layers
    say(
        f"{'tiny' if args.tiny else 'Llama-3.1-8B-shaped'} random model ({args.dtype}) on "
        f"{device}: {num_layers} blocks, built in {build_seconds:.1f}s; {size} process(es)"
    )
    source = ModelSource("random-llama-3.1-8b", "random", None, None, None, None)
    loaded = LoadedModel(model, tok, source, None)
    candidates = [()] + [(i,) for i in range(num_layers)]
    with torch.inference_mode():  # first-call warm-up (kernels, allocator), untimed
        model(torch.ones((1, 8), dtype=torch.long, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    say(f"ranking {num_layers} blocks on {args.limit} documents of each of {args.tasks}")
    start = time.perf_counter()
    scores = evaluate_removals(
        loaded, settings, candidates, engine="fast", cache=None, progress=main_process
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if not main_process:
        return

    counts = plan_counts(model, tok, settings)  # untimed: the same plan the engine ran

    def mean(result: dict) -> float:
        return sum(s.value for s in result.values()) / len(result)

    drops = [mean(scores[0]) - mean(s) for s in scores[1:]]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak = peak_tflops(name, args.peak_tflops) if device.type == "cuda" else args.peak_tflops
    achieved = counts["flops"] / seconds / 1e12
    equivalent = counts["packed_tokens"] * counts["block_passes_per_token"] / num_layers
    report = {
        "benchmark": "accuracy-drop ranking of every block, fast engine",
        "model": "tiny Llama (CPU test)" if args.tiny else "Llama-3.1-8B shape, random bf16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "device": name or str(device),
        "processes": size,
        "tasks": settings.tasks,
        "limit_per_task": args.limit,
        "candidates": len(candidates),
        "wall_seconds": round(seconds, 2),
        "model_build_seconds": round(build_seconds, 2),
        **counts,
        # Tokens through the whole model (32 blocks) per second, counting each candidate's
        # partial passes; and the distinct packed tokens per second.
        "full_model_tokens_per_s": round(equivalent / seconds, 1),
        "packed_tokens_per_s": round(counts["packed_tokens"] / seconds, 1),
        "achieved_tflops": round(achieved, 2),
        "peak_tflops_bf16": peak,
        "fraction_of_peak": None if not peak else round(achieved / (peak * size), 4),
        "peak_gpu_memory_gib": None if peak_memory is None else round(peak_memory / 2**30, 2),
        "least_relevant_blocks": sorted(range(num_layers), key=lambda i: drops[i])[:8],
        "goal": f"under {GOAL_SECONDS // 60} minutes on one H100/H200-class GPU",
        "goal_met": None if args.tiny or device.type != "cuda" else seconds < GOAL_SECONDS,
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    say(f"{seconds:.1f}s (goal: under {GOAL_SECONDS}s on one H100/H200); wrote {args.out}")


if __name__ == "__main__":
    main()
