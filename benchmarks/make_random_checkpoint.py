"""A randomly initialised copy of a checkpoint (same config and tokenizer), for timing runs on
machines the real weights cannot reach (the GPU figures in the README were measured on one).

    python benchmarks/make_random_checkpoint.py SOURCE_FOLDER OUT_FOLDER [--seed 0]

SOURCE_FOLDER needs config.json and the tokenizer files (e.g. the cached conversion of the
embedded SmolLM2 under ~/.cache/prune/gguf/); the weights are drawn with the config's
`initializer_range`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.source)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.source / name).is_file():
            shutil.copy(args.source / name, args.out / name)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
