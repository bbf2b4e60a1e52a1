"""The model card and mergekit config of a `prune drop` folder, from its prune.json record.

`drop_files(record)` is a pure function: it reads only the record that the export
writes to prune.json (see `prune.export`), and returns the extra files both export
paths write beside the weights, so every folder `prune drop` writes is Hub-ready:

- README.md: Hub metadata (base model and license when known), which blocks were
  removed in the original model's numbering, depth before and after, the dtype of the
  weights (export dtype) and the dtype the model ran in (compute dtype: none for a drop),
  the exact `prune drop` command, and a plain "not evaluated" (`prune run` measures a cut);
- mergekit.yaml: the same cut as a mergekit passthrough merge, one slice per kept
  run of blocks (`layer_range` ends are exclusive), the format the ecosystem already
  uses to slice layers, so the cut can be reproduced or adjusted with mergekit.

For a folder pruned again (`chain` not empty) the card and the config describe the
whole chain, from the model the first prune loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from prune.card import base_metadata, dtype_sentence, export_dtype, render_front_matter

MERGEKIT_FILE = "mergekit.yaml"
CARD_FILE = "README.md"


def kept_ranges(removed: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """The kept blocks of a `num_layers` stack as [start, end) runs, in order.

    `kept_ranges([3, 4, 9], 12)` is `[(0, 3), (5, 9), (10, 12)]`.
    """
    gone = set(removed)
    ranges: list[tuple[int, int]] = []
    start = None
    for i in range(num_layers + 1):
        kept = i < num_layers and i not in gone
        if kept and start is None:
            start = i
        elif not kept and start is not None:
            ranges.append((start, i))
            start = None
    return ranges


def layers_argument(layers: Sequence[int]) -> str:
    """`--layers` text for `layers`: runs of three or more as inclusive ranges ("3-5,9")."""
    parts: list[str] = []
    ordered = sorted(set(layers))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ordered[i]}-{ordered[j]}")
        else:
            parts.extend(str(n) for n in ordered[i : j + 1])
        i = j + 1
    return ",".join(parts)


def model_reference(source: Mapping[str, Any]) -> str:
    """What mergekit should read for `source` (a prune.json source record): the Hub id for
    Hub and embedded models, else what the user typed (a local folder or a .gguf file).

    A local folder's `hub_id` may be the model an earlier prune started from, whose
    numbering differs, so a local folder is always named by its path.
    """
    if source.get("kind") in ("hub", "embedded") and source.get("hub_id"):
        return str(source["hub_id"])
    return str(source.get("spec") or source.get("path") or "BASE_MODEL")


def _whole_cut(record: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[int], int]:
    """(source, removed, depth) of the whole chain: the model the first prune loaded, every
    block removed so far in its numbering, and its depth (this prune's for old records)."""
    source = record.get("original_source") or record["source"]
    removed = record.get("removed_layers_original", record["removed_layers"])
    depth = record.get("num_layers_original", record["num_layers_before"])
    return source, sorted(removed), depth


def mergekit_config(
    source: Mapping[str, Any],
    removed: Sequence[int],
    num_layers: int,
    dtype: Any = None,
) -> str:
    """The cut of `removed` blocks from the `num_layers` stack of `source` (a prune.json
    source record) as mergekit passthrough YAML; `dtype` (e.g. "bfloat16" or a
    torch.dtype) is written when given."""
    model = model_reference(source)
    config: dict[str, Any] = {
        "slices": [
            {"sources": [{"model": model, "layer_range": [start, end]}]}
            for start, end in kept_ranges(removed, num_layers)
        ],
        "merge_method": "passthrough",
    }
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    header = [
        f"# Blocks {layers_argument(removed) or 'none'} of {num_layers} removed by prune, as a "
        "mergekit passthrough merge",
        "# (layer_range ends are exclusive). Reproduce: mergekit-yaml mergekit.yaml OUT_FOLDER",
    ]
    if source.get("kind") in ("gguf", "embedded"):
        header.append(
            "# prune read a GGUF file (dequantized); mergekit reads safetensors, so `model` "
            "names the unquantized model"
            if source.get("kind") == "embedded" and source.get("hub_id")
            else "# prune read a GGUF file; mergekit reads safetensors: point `model` at a "
            "safetensors copy"
        )
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    return "\n".join(header) + "\n" + body


def _short_name(source: Mapping[str, Any]) -> str:
    name = str(source.get("hub_id") or source.get("spec") or "model").rstrip("/")
    return name.split("/")[-1]


def render_drop_card(record: Mapping[str, Any]) -> str:
    """README.md of a `prune drop` folder: metadata, what was removed, how to reproduce it."""
    source = record["source"]
    original, removed, depth = _whole_cut(record)
    chain = record.get("chain") or []
    # A pruned folder carries its original's hub_id and license (prune.json), so either works.
    meta = base_metadata(
        {
            "hub_id": original.get("hub_id") or source.get("hub_id"),
            "license": source.get("license") or original.get("license"),
        }
    )
    hub_id = meta.get("base_model")
    base_ref = (
        f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{original.get('spec')}`"
    )
    after = record.get("num_layers_after", depth - len(removed))
    listed = ", ".join(str(i) for i in removed) or "none"
    dtypes = [sentence, ""] if (sentence := dtype_sentence(record)) else []
    out = [
        render_front_matter(meta),
        "",
        f"# {_short_name(original)}, {len(removed)} of {depth} blocks removed",
        "",
        f"{base_ref} with {len(removed)} of its {depth} transformer blocks removed by "
        f"`prune drop`: {after} blocks left.",
        "",
        f"Removed blocks (0-based, numbered as in the base model): {listed}.",
        "",
        *dtypes,
        "## Not evaluated",
        "",
        "`prune drop` removes the blocks it is given and measures nothing: this checkpoint "
        "has not been evaluated. Removing blocks without further training costs quality; "
        'fine-tuning ("healing") usually recovers part of it. To choose the blocks by '
        "measured relevance and compare the result with the base model on benchmark tasks, "
        "use `prune run` with a recipe (`prune rank` scores the blocks).",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"prune drop {source['spec']} --layers {layers_argument(record['removed_layers'])} "
        "--out pruned/",
        "```",
        "",
    ]
    if chain:
        out += [
            f"`{source['spec']}` was itself pruned ({len(chain)} earlier "
            f"`prune` step{'s' if len(chain) > 1 else ''}); from the original model in one step:",
            "",
            "```bash",
            f"prune drop {original.get('spec')} --layers {layers_argument(removed)} --out pruned/",
            "```",
            "",
        ]
    out += [
        f"The same cut as a mergekit passthrough merge is in `{MERGEKIT_FILE}` "
        f"(`mergekit-yaml {MERGEKIT_FILE} pruned/`).",
        "",
    ]
    return "\n".join(out)


def drop_files(record: Mapping[str, Any]) -> dict[str, str]:
    """The files a `prune drop` folder carries beside its weights and prune.json, from
    the prune.json `record`: {"README.md": model card, "mergekit.yaml": the cut}."""
    source, removed, depth = _whole_cut(record)
    return {
        CARD_FILE: render_drop_card(record),
        MERGEKIT_FILE: mergekit_config(source, removed, depth, export_dtype(record)),
    }
