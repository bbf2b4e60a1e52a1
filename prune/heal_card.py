"""The model card of a `prune heal` folder: the variant's card plus a Healing section.

Pure functions of text and prune.json records. The variant's card (a `prune drop` or
`prune run` card) is kept, its metadata gains the `healed` tag, and its "Not evaluated"
section (if any) gives way to the Healing section, which says the model was healed and
shows the held-out KL to the teacher and perplexity before and after, with paired 95%
intervals. A variant without a card gets the drop card of its record, or a short one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prune.card import (
    base_metadata,
    dtype_sentence,
    model_index_results,
    parse_front_matter,
    render_front_matter,
    use_section,
)
from prune.drop_card import MERGEKIT_FILE, render_drop_card

HEALED_TAG = "healed"
REPLACED_SECTIONS = ("## Not evaluated", "## Healing", "## Use")
DTYPE_LINE = "Weights stored in "  # how `prune.card.dtype_sentence` begins


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def render_healing_section(healing: Mapping[str, Any], variant: str) -> str:
    """The "## Healing" section: what was trained, on what, and the before/after figures."""
    h = healing["heldout"]
    kl = h["kl_change"]
    lo, hi = kl["ci95"]
    r_lo, r_hi = h["perplexity_ratio_ci95"]
    what = {
        "lora": f"LoRA adapters (rank {healing.get('lora_rank')}, merged into the weights "
        "afterwards) on every linear layer of every block",
        "full": "every block's parameters",
        "adjacent": "the blocks beside each cut (blocks "
        + ", ".join(str(i) for i in healing.get("blocks") or [])
        + " as numbered here)",
    }[healing["method"]]
    lines = [
        "## Healing",
        "",
        f"This model was healed after pruning: `prune heal` trained {what} for "
        f"{healing['steps']} steps (learning rate {healing['lr']:g}, "
        f"{healing['batch_size'] * healing['grad_accum']} chunks of {healing['seq_len']} "
        f"tokens a step) to match the next-token distributions of `{healing['teacher']}` "
        f"(KL divergence{' plus ' + format(healing['lm_weight'], 'g') + ' x LM loss' if healing['lm_weight'] else ''}) "
        f"on {healing['train_texts']} texts of {healing['calibration']}.",
        "",
        f"Measured on {healing['heldout_texts']} held-out texts ({h['chunks']} chunks) it "
        "never trained on; intervals are paired over the held-out chunks:",
        "",
        "| held-out text | before healing | after healing | change (95% interval) |",
        "|---|---:|---:|---|",
        f"| KL to the teacher (nats/token) | {_fmt(h['kl_before'])} | {_fmt(h['kl_after'])} | "
        f"{kl['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] |",
        f"| perplexity | {_fmt(h['perplexity_before'], 2)} | {_fmt(h['perplexity_after'], 2)} | "
        f"x{h['perplexity_ratio']:.3f} [x{r_lo:.3f}, x{r_hi:.3f}] |",
        "",
        *_task_lines(healing.get("tasks")),
        f"The teacher's perplexity on the same text: {_fmt(h['teacher_perplexity'], 2)}. "
        f"Training loss {healing['loss']['first']:.4f} at the first step, "
        f"{healing['loss']['last']:.4f} at the last; {healing['seconds']:.0f} s in all.",
        "",
        "```bash",
        f"prune heal {variant} --method {healing['method']} --steps {healing['steps']} "
        f"--lr {healing['lr']:g} --seed {healing['seed']} --out healed/",
        "```",
        "",
    ]
    return "\n".join(lines)


def _task_lines(tasks: Mapping[str, Any] | None) -> list[str]:
    """Report-task scores before and after healing, with the paired interval of the mean."""
    if not tasks:
        return ["Report tasks were not scored (`prune heal --tasks none`).", ""]
    change = tasks["change"]
    lo, hi = change["ci95"]
    verdict = (
        "a distinguishable change"
        if tasks["distinguishable"]
        else "not distinguishable from no change"
    )
    limit = f"first {tasks['limit']} documents" if tasks.get("limit") else "all documents"
    lines = [
        f"Report tasks ({limit}, {tasks['num_fewshot']}-shot), before and after healing; the "
        "interval of the mean is paired over documents:",
        "",
        "| task | metric | before healing | after healing |",
        "|---|---|---:|---:|",
    ]
    for task, row in tasks["scores"].items():
        lines.append(f"| {task} | {row['metric']} | {row['before']:.3f} | {row['after']:.3f} |")
    lines += [
        f"| **mean** | | **{tasks['mean_before']:.3f}** | **{tasks['mean_after']:.3f}** |",
        "",
        f"Change of the mean: {change['diff']:+.3f} (95% interval {lo:+.3f} to {hi:+.3f}, "
        f"{change['documents']} documents): {verdict}.",
        "",
    ]
    return lines


def _healed_model_index(meta: dict[str, Any], healing: Mapping[str, Any]) -> None:
    """The variant's model-index scores are not the healed model's: replace them with the
    report-task scores measured after healing, or drop them when none were measured."""
    if "model-index" not in meta:
        return
    tasks = healing.get("tasks")
    if not tasks:
        del meta["model-index"]
        return
    results = model_index_results(
        {t: row["after"] for t, row in tasks["scores"].items()},
        {t: row["metric"] for t, row in tasks["scores"].items()},
        tasks.get("num_fewshot"),
    )
    name = (meta["model-index"][0] or {}).get("name", "healed") if meta["model-index"] else "healed"
    meta["model-index"] = [
        {"name": f"{name}-healed" if not name.endswith("-healed") else name, "results": results}
    ]


def _split_sections(body: str) -> list[str]:
    """`body` cut before each `## ` heading (the first piece is what precedes them)."""
    pieces: list[str] = []
    current: list[str] = []
    for line in body.split("\n"):
        if line.startswith("## ") and current:
            pieces.append("\n".join(current))
            current = []
        current.append(line)
    pieces.append("\n".join(current))
    return pieces


def healed_card(
    card: str | None,
    variant_record: Mapping[str, Any] | None,
    record: Mapping[str, Any],
    variant: str,
    repo_id: str | None = None,
) -> str:
    """README.md of a healed folder from the variant's card (None: none), the variant's
    prune.json record (None: none) and the healed folder's record (with `healing`); the
    Use section loads `repo_id` (default: a folder path), and the dtypes are the healed
    folder's."""
    if card is None:
        if variant_record is not None:
            card = render_drop_card(variant_record)
        else:
            source = record.get("original_source") or record["source"]
            card = (
                render_front_matter(base_metadata(source))
                + f"\n\n# {variant}, healed\n\n## Use\n\n```python\n"
                "from transformers import AutoModelForCausalLM\n\n"
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n```\n'
            )
    meta: dict[str, Any] = {}
    body = card
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        try:
            meta = dict(parse_front_matter(card))
        except Exception:  # a card whose metadata is not YAML: keep it as text
            meta = {}
        else:
            body = card[card.index("\n---\n", 4) + len("\n---\n") :]
    if meta:
        tags = list(meta.get("tags") or [])
        meta["tags"] = tags if HEALED_TAG in tags else [*tags, HEALED_TAG]
        _healed_model_index(meta, record["healing"])
    section = render_healing_section(record["healing"], variant)
    # mergekit reproduces the cut, not the healed weights, and the file stays behind.
    lines = [
        ln
        for ln in body.split("\n")
        if f"`{MERGEKIT_FILE}`" not in ln and not ln.startswith(DTYPE_LINE)
    ]
    title = next((i for i, ln in enumerate(lines) if ln.startswith("# ")), None)
    if title is not None and not lines[title].endswith(", healed"):
        lines[title] += ", healed"
    pieces = _split_sections("\n".join(lines).rstrip("\n") + "\n")
    kept = [p for p in pieces if not p.startswith(REPLACED_SECTIONS)]
    at = next((i for i, p in enumerate(kept) if p.startswith("## ")), len(kept))
    kept[at:at] = [section, "\n".join(use_section(repo_id or "path/to/this/folder"))]
    if at and (dtypes := dtype_sentence(record)):
        kept[at - 1] = kept[at - 1].rstrip("\n") + "\n\n" + dtypes + "\n"
    text = "\n".join(p.rstrip("\n") + "\n" for p in kept)
    return (render_front_matter(meta) + "\n" + text) if meta else text
