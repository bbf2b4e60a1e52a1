"""Peak memory of a streaming `prune drop` against the size of the checkpoint it prunes.

Builds a Llama-shaped bfloat16 checkpoint with random weights from a config (defaults:
hidden 2048, 16 layers, intermediate 8192, vocab 32000, untied: 1.21B parameters, 2.4 GB),
written one tensor at a time into sharded safetensors files so building it needs about one
shard of memory, then runs `prune drop` on it under `/usr/bin/time -v` and reports the
maximum resident set size beside the checkpoint's size, as JSON under bench-out/.

    python benchmarks/bench_streaming_drop.py                       # build (once) and measure
    python benchmarks/bench_streaming_drop.py --hidden 64 --layers 2 --build-only   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def llama_shapes(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of the Llama checkpoint, in the order transformers writes them."""
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    shapes = [("model.embed_tokens.weight", (args.vocab, args.hidden))]
    for i in range(args.layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (args.hidden,)),
            (f"{p}.self_attn.q_proj.weight", (args.hidden, args.hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, args.hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, args.hidden)),
            (f"{p}.self_attn.o_proj.weight", (args.hidden, args.hidden)),
            (f"{p}.post_attention_layernorm.weight", (args.hidden,)),
            (f"{p}.mlp.gate_proj.weight", (args.intermediate, args.hidden)),
            (f"{p}.mlp.up_proj.weight", (args.intermediate, args.hidden)),
            (f"{p}.mlp.down_proj.weight", (args.hidden, args.intermediate)),
        ]
    shapes += [("model.norm.weight", (args.hidden,)), ("lm_head.weight", (args.vocab, args.hidden))]
    return shapes


def build_checkpoint(folder: Path, args: argparse.Namespace) -> dict:
    """Write config.json and sharded bfloat16 safetensors (one tensor generated at a time)."""
    import torch
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(folder)
    shapes = dict(llama_shapes(args))
    sizes = {name: 2 * _numel(shape) for name, shape in shapes.items()}  # bfloat16: 2 bytes
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda size: size,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=args.source_shard_size,
    )
    generator = torch.Generator().manual_seed(0)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                weight = torch.randn(shapes[name], generator=generator, dtype=torch.float32)
                shard[name] = weight.mul_(0.02).to(torch.bfloat16)
                del weight
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    parameters = sum(_numel(shape) for shape in shapes.values())
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {
        "parameters": parameters,
        "bytes": sum(sizes.values()),
        "shards": len(split.filename_to_tensors),
    }


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def measure_drop(source: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run `prune drop` under /usr/bin/time -v; its maximum RSS and wall time."""
    command = [
        "/usr/bin/time", "-v", sys.executable, "-m", "prune", "-q", "drop", str(source),
        "--layers", args.drop, "--out", str(out), "--overwrite",
        "--max-shard-size", args.max_shard_size,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"prune drop failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return {
        "max_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "wall_s": round(wall, 2),
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "stdout": done.stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden / 128, >= 1")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--source-shard-size", default="1GB", help="shards of the built source")
    parser.add_argument("--max-shard-size", default="500MB", help="passed to prune drop")
    parser.add_argument("--drop", default=None, help="layers to drop; default: the middle quarter")
    parser.add_argument("--work", type=Path, default=REPO / "bench-out" / "streaming-drop")
    parser.add_argument("--build-only", action="store_true", help="build the checkpoint and stop")
    parser.add_argument("--rebuild", action="store_true", help="rebuild an existing checkpoint")
    args = parser.parse_args()
    args.intermediate = args.intermediate or 4 * args.hidden
    args.heads = args.heads or max(1, args.hidden // 128)
    args.kv_heads = args.kv_heads or args.heads
    if args.drop is None:
        quarter = max(1, args.layers // 4)
        start = (args.layers - quarter) // 2
        args.drop = f"{start}-{start + quarter - 1}"

    tag = f"llama-h{args.hidden}-l{args.layers}-i{args.intermediate}-v{args.vocab}"
    source = args.work / tag
    stamp = args.work / f"{tag}.json"  # outside the folder: prune drop copies small files
    if args.rebuild or not stamp.exists():
        started = time.perf_counter()
        built = build_checkpoint(source, args)
        built["build_s"] = round(time.perf_counter() - started, 2)
        stamp.write_text(json.dumps(built) + "\n")
    built = json.loads(stamp.read_text())
    print(f"checkpoint {source}: {built['parameters']:,} parameters, {built['bytes'] / 1e9:.2f} GB")
    if args.build_only:
        return

    run = measure_drop(source, args.work / f"{tag}-dropped", args)
    report = {
        "checkpoint": str(source),
        "parameters": built["parameters"],
        "checkpoint_bytes": built["bytes"],
        "source_shards": built["shards"],
        "dropped_layers": args.drop,
        "max_shard_size": args.max_shard_size,
        **run,
        "rss_over_checkpoint": round(run["max_rss_bytes"] / built["bytes"], 3)
        if run["max_rss_bytes"]
        else None,
        "machine": platform.platform(),
    }
    target = REPO / "bench-out" / "streaming_drop.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
