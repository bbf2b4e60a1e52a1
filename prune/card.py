"""Model cards for pruned variants: a pure function from the run's comparison record to markdown.

`render_card` reads only the `comparison` mapping (the same data written to
comparison.json), so every number in a card matches the JSON. The YAML front
matter follows the Hub's model card conventions (`base_model`, `library_name`,
`pipeline_tag`, `tags`, `license`, `model-index`) so the Hub shows the scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

# How the Hub should name the datasets behind known tasks (local copies included).
DATASETS: dict[str, dict[str, str]] = {
    "arc_easy": {
        "name": "ARC-Easy",
        "type": "allenai/ai2_arc",
        "config": "ARC-Easy",
        "split": "test",
    },
    "arc_challenge": {
        "name": "ARC-Challenge",
        "type": "allenai/ai2_arc",
        "config": "ARC-Challenge",
        "split": "test",
    },
    "piqa": {"name": "PIQA", "type": "ybisk/piqa", "split": "validation"},
    "winogrande": {
        "name": "WinoGrande",
        "type": "allenai/winogrande",
        "config": "winogrande_xl",
        "split": "validation",
    },
    "copa": {"name": "COPA", "type": "aps/super_glue", "config": "copa", "split": "validation"},
    "openbookqa": {
        "name": "OpenBookQA",
        "type": "allenai/openbookqa",
        "config": "main",
        "split": "test",
    },
    "lambada": {"name": "LAMBADA (OpenAI)", "type": "EleutherAI/lambada_openai", "split": "test"},
    "lambada_openai": {
        "name": "LAMBADA (OpenAI)",
        "type": "EleutherAI/lambada_openai",
        "split": "test",
    },
    "hellaswag": {"name": "HellaSwag", "type": "Rowan/hellaswag", "split": "validation"},
    "mmlu": {"name": "MMLU", "type": "cais/mmlu", "config": "all", "split": "test"},
}
METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy"}


def _dataset(task: str) -> dict[str, str]:
    base = task.removeprefix("local_")
    entry = dict(DATASETS.get(base, {"name": task, "type": task}))
    if task.startswith("local_"):
        entry["name"] += " (local copy)"
    return entry


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


TAGS = ("pruned", "layer-pruning", "prune")


def base_metadata(model: Mapping[str, Any], tags: Sequence[str] = ()) -> dict[str, Any]:
    """The metadata every card `prune` writes starts with: `base_model` and `license` when
    `model` (a source record: hub_id, license) knows them, then library, pipeline and tags."""
    meta: dict[str, Any] = {}
    if model.get("hub_id"):
        meta["base_model"] = model["hub_id"]
    if model.get("license"):
        meta["license"] = model["license"]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = [*TAGS, *tags]
    return meta


def render_front_matter(meta: Mapping[str, Any]) -> str:
    """`meta` as a card's YAML front matter block, `---` lines included."""
    return "---\n" + yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True) + "---"


def front_matter(comparison: Mapping[str, Any], strategy: str, name: str) -> dict[str, Any]:
    """The card's YAML metadata as a dict (model-index from the variant's final scores)."""
    variant = comparison["strategies"][strategy]
    evaluation = comparison["evaluation"]
    meta = base_metadata(comparison["model"], [f"{_measure_of(comparison, strategy)}-ranking"])
    results = model_index_results(
        variant["final"]["scores"], evaluation.get("metrics", {}), evaluation.get("num_fewshot")
    )
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


def model_index_results(
    scores: Mapping[str, float], metrics: Mapping[str, str], num_fewshot: int | None
) -> list[dict[str, Any]]:
    """The Hub's model-index `results`: one per task, its score under its metric."""
    results = []
    for task, value in scores.items():
        metric = metrics.get(task, "acc")
        dataset = _dataset(task)
        if num_fewshot is not None:
            dataset["args"] = {"num_few_shot": num_fewshot}
        results.append(
            {
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": dataset,
                "metrics": [
                    {
                        "type": metric,
                        "value": round(float(value), 4),
                        "name": METRIC_NAMES.get(metric, metric),
                        "verified": False,
                    }
                ],
                "source": {
                    "name": "prune (lm-evaluation-harness tasks)",
                    "url": "https://github.com/EleutherAI/lm-evaluation-harness",
                },
            }
        )
    return results


def _removed_table(comparison: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    model = comparison["model"]
    lines = [
        "| strategy | schedule | removed layers (original numbering, in removal order) | layers | parameters | share kept |",
        "|---|---|---|---|---|---|",
        f"| base model | - | - | {model['num_layers']} | {_count(model.get('parameters'))} | 100.0% |",
    ]
    for name in order:
        v = comparison["strategies"][name]
        final = v["final"]
        share = (
            final["params"] / model["parameters"]
            if final.get("params") and model.get("parameters")
            else None
        )
        removed = ", ".join(map(str, v["removed"])) or "none"
        lines.append(
            f"| {name} | {v['schedule']} | {removed} | {final['layers']} | "
            f"{_count(final.get('params'))} | {_pct(share)} |"
        )
    return lines


def _ranking_lines(comparison: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """How each strategy ranked the layers and why its removal loop stopped."""
    from prune.measures import registry

    measures = registry()
    settings = comparison.get("settings") or {}
    listed = [s for s in settings.get("strategies", []) if isinstance(s, Mapping)]
    evaluation = settings.get("evaluation") or {}
    calibration = settings.get("calibration") or {}
    lines = []
    for name in order:
        spec = comparison["strategies"][name].get("strategy") or {}
        measure_name = spec.get("measure", name)
        span = spec.get("span") or 1
        strat = next(
            (s for s in listed if s.get("name") == measure_name and (s.get("span") or 1) == span),
            {},
        )
        measure = measures.get(measure_name)
        label = measure.label_for(span) if measure is not None else measure_name
        if measure is not None and measure.needs_tasks:
            tasks = ", ".join(strat.get("tasks") or evaluation.get("tasks") or [])
            limit = strat.get("limit") or evaluation.get("limit")
            how = f"{label} on {tasks}" + (f" (first {limit} documents)" if limit else "")
        elif calibration:
            how = f"{label} on {calibration.get('samples')} calibration texts of up to {calibration.get('seq_len')} tokens"
        else:
            how = label
        if span > 1:
            how += f", in spans of {span} consecutive blocks"
        if spec.get("adaptive"):
            how += ", documents sampled adaptively around the cut"
        if spec.get("rescore"):
            how += f", re-measuring the {spec['rescore']} least relevant after each removal"
        stop = comparison["strategies"][name].get("stop_reason")
        lines.append(
            f"- **{name}**: ranked by {how}; stopped: {stop}."
            if stop
            else f"- **{name}**: ranked by {how}."
        )
    return lines


def _score_table(comparison: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    base = comparison["baseline"]["scores"]
    header = "| task | metric | base |" + "".join(f" {n} | {n} retained |" for n in order)
    lines = [header, "|---|---|---|" + "---|---|" * len(order)]
    metrics = comparison["evaluation"].get("metrics", {})
    tasks = list(base) + ["mean"]
    for task in tasks:
        if task == "mean":
            b = comparison["baseline"]["mean"]
            label, metric = "**mean**", ""
        else:
            b = base[task]
            label, metric = task, metrics.get(task, "acc")
        row = f"| {label} | {metric} | {_num(b)} |"
        for name in order:
            final = comparison["strategies"][name]["final"]
            value = final["mean"] if task == "mean" else final["scores"].get(task)
            retained = value / b if value is not None and b else None
            row += f" {_num(value)} | {_pct(retained)} |"
        lines.append(row)
    return lines


def _depth_table(comparison: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """Mean score after each removal, per strategy: the fair comparison at equal depth."""
    by_depth: dict[int, dict[str, float]] = {}
    for name in order:
        for step in comparison["strategies"][name]["history"]:
            by_depth.setdefault(step["layers_left"], {})[name] = step["mean_score"]
    lines = ["| layers left |" + "".join(f" {n} |" for n in order), "|---|" + "---|" * len(order)]
    for depth in sorted(by_depth, reverse=True):
        lines.append(f"| {depth} |" + "".join(f" {_num(by_depth[depth].get(n))} |" for n in order))
    return lines


def _interval(p: Mapping[str, Any] | None) -> str:
    if not p:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{p['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _paired_lines(comparison: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """Each variant against the base and against each other: paired differences with their
    95% intervals, and the verdict (a winner only when the interval excludes zero)."""
    paired = comparison.get("paired") or {}
    if not paired:
        return []
    names = [n for n in order if n in paired]
    lines = [
        "Paired differences on the same documents (row minus column; mean over tasks of the "
        "per-document differences, 95% bootstrap interval):",
        "",
        "| variant | vs base |" + "".join(f" vs {n} |" for n in names),
        "|---|---|" + "---|" * len(names),
    ]
    for name in names:
        row = f"| {name} | {_interval(paired[name].get('vs_base'))} |"
        row += "".join(
            " - |" if other == name else f" {_interval(paired[name]['vs'].get(other))} |"
            for other in names
        )
        lines.append(row)
    verdict = comparison.get("verdict")
    best = comparison.get("best")
    if verdict:
        lines += ["", f"Verdict: **{best}** ({verdict})." if best else f"Verdict: {verdict}."]
    return lines + [""]


def _healing_what(healing: Mapping[str, Any]) -> str:
    """What a heal trained, in a few words (from prune.json's `healing`)."""
    method = healing.get("method")
    if method == "lora":
        return f"LoRA adapters of rank {healing.get('lora_rank')} (merged into the weights)"
    if method == "adjacent":
        return "the blocks beside each cut"
    return "every block" if method == "full" else str(method)


def _healing_lines(comparison: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """Raw and healed variants side by side: scores, paired differences (healing decides
    nothing unless the healed - raw interval excludes zero) and the held-out figures."""
    strategies = comparison["strategies"]
    names = [n for n in order if strategies[n].get("healed")]
    if not names:
        return []
    healing = strategies[names[0]]["healed"]["healing"]
    base = comparison["baseline"]
    metrics = comparison["evaluation"].get("metrics", {})
    lines = [
        "## Healed variants",  # not "## Healing": a healed folder's card has its own (heal_card)
        "",
        f"The recipe's `heal:` section healed every variant after pruning, as `prune heal` "
        f"does: {_healing_what(healing)} trained for {healing.get('steps')} steps (learning "
        f"rate {healing.get('lr', 0):g}) to match the next-token distributions of "
        f"`{healing.get('teacher')}` on {healing.get('train_texts')} texts of "
        f"{healing.get('calibration')}. The healed checkpoints are `variants/<name>-healed`, "
        "scored on the same reporting tasks and documents as the raw variants:",
        "",
        "| task | metric | base |" + "".join(f" {n} | {n} healed |" for n in names),
        "|---|---|---|" + "---|---|" * len(names),
    ]
    for task in [*base["scores"], "mean"]:
        if task == "mean":
            row = f"| **mean** | | {_num(base['mean'])} |"
        else:
            row = f"| {task} | {metrics.get(task, 'acc')} | {_num(base['scores'][task])} |"
        for name in names:
            raw, healed = strategies[name]["final"], strategies[name]["healed"]["final"]
            if task == "mean":
                row += f" {_num(raw['mean'])} | {_num(healed['mean'])} |"
            else:
                row += f" {_num(raw['scores'].get(task))} | {_num(healed['scores'].get(task))} |"
        lines.append(row)
    paired = comparison.get("paired") or {}
    lines += [
        "",
        "Paired differences on the same documents (mean over tasks of the per-document "
        "differences, 95% bootstrap interval); a change within its interval is not "
        "distinguishable from none:",
        "",
        "| variant | raw vs base | healed vs base | healed vs raw | healing |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        healed = strategies[name]["healed"]
        decided = healed.get("verdict", "").split(":", 1)[0]
        lines.append(
            f"| {name} | {_interval((paired.get(name) or {}).get('vs_base'))} | "
            f"{_interval(healed.get('vs_base'))} | {_interval(healed.get('vs_raw'))} | "
            f"{decided} |"
        )
    lines += [
        "",
        "On held-out calibration text the heal never trained on (paired over held-out chunks):",
        "",
        "| variant | KL to the teacher before | after | change (95% interval) | perplexity before | after | ratio (95% interval) |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for name in names:
        h = strategies[name]["healed"]["healing"].get("heldout") or {}
        if not h:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        r_lo, r_hi = h["perplexity_ratio_ci95"]
        lines.append(
            f"| {name} | {_num(h['kl_before'])} | {_num(h['kl_after'])} | "
            f"{_interval(h['kl_change'])} | {_num(h['perplexity_before'], 2)} | "
            f"{_num(h['perplexity_after'], 2)} | x{h['perplexity_ratio']:.3f} "
            f"[x{r_lo:.3f}, x{r_hi:.3f}] |"
        )
    return lines + [""]


def _stability_lines(comparison: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """How stable each ranking's removal set is when the documents are resampled."""
    stable = comparison.get("stability") or {}
    names = [n for n in order if n in stable]
    if not names:
        return []
    lines = [
        "Ranking stability (documents resampled with replacement): the mean Jaccard overlap of "
        "the resampled removal set with the one used, and how often each removed layer is chosen:",
        "",
    ]
    for name in names:
        st = stable[name]
        chosen = ", ".join(f"{i} ({st['probability'][i]:.2f})" for i in st["removal_set"])
        lines.append(f"- **{name}**: Jaccard {st['jaccard']:.2f}; layers {chosen}.")
    return lines + [""]


def _correlation_lines(comparison: Mapping[str, Any]) -> list[str]:
    lines = []
    for pair, stats in (comparison.get("correlations") or {}).items():
        if not stats:
            continue
        parts = []
        for key, label in (("spearman", "rho"), ("kendall", "tau"), ("pearson", "r")):
            if stats.get(key) and stats[key].get(label) is not None:
                parts.append(f"{key} {label} = {stats[key][label]:.3f} (p = {stats[key]['p']:.2g})")
        if parts:
            lines.append(f"- {pair.replace('~', ' vs ')}: " + "; ".join(parts))
    return lines


def _measure_of(comparison: Mapping[str, Any], name: str) -> str:
    """The registered measure behind the variant `name` (its name when not recorded)."""
    return (comparison["strategies"][name].get("strategy") or {}).get("measure", name)


def _strategy_notes(order: Sequence[str]) -> str:
    """One sentence per strategy saying what its measure ranks by (from the measure registry)."""
    from prune.measures import registry

    measures = registry()
    parts = [
        f"`{name}` ranks a block by {measures[name].description}"
        for name in dict.fromkeys(order)
        if name in measures
    ]
    return "; ".join(parts) + "." if parts else ""


def comparison_sections(
    comparison: Mapping[str, Any], order: Sequence[str], figure: str | None
) -> list[str]:
    """The sections every card and comparison.md share: removed layers, scores, scores by depth,
    paired differences, stability, healing (when the recipe heals), warnings, agreement between
    the rankings and the figure (lines, ending with a blank one)."""
    ev = comparison["evaluation"]
    limit = f", first {ev['limit']} documents per task" if ev.get("limit") else ""
    out = [
        "## Removed layers",
        "",
        *_removed_table(comparison, order),
        "",
        *_ranking_lines(comparison, order),
        "",
        "## Scores",
        "",
        f"Tasks: {', '.join(comparison['baseline']['scores'])} ({ev.get('num_fewshot', 0)}-shot{limit}); "
        "\"retained\" is the variant's score as a share of the base model's.",
        "",
        *_score_table(comparison, order),
        "",
        "Mean score by depth (after each greedy step):",
        "",
        *_depth_table(comparison, order),
        "",
    ]
    out += _paired_lines(comparison, order)
    out += _stability_lines(comparison, order)
    out += _healing_lines(comparison, order)
    if comparison.get("warnings"):
        out += ["> " + w for w in comparison["warnings"]] + [""]
    corr = _correlation_lines(comparison)
    if corr:
        out += [
            "## Agreement between the rankings",
            "",
            "Correlation of the per-layer relevance of the full model:",
            "",
            *corr,
            "",
        ]
    if comparison.get("overlap") is not None:
        out += [
            f"Removed-layer overlap (Jaccard) between the variants: {comparison['overlap']:.2f}.",
            "",
        ]
    if figure:
        out += [f"![Per-layer relevance under each strategy]({figure})", ""]
    out += [
        "![Mean reporting score against blocks removed, per strategy; bands: paired 95% "
        "interval of the difference from the base model](tradeoff.png)",
        "",
    ]
    return out


def use_section(where: str) -> list[str]:
    """The "## Use" section's lines: load the model and tokenizer from `where`."""
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
    ]


def _usage_section(
    comparison: Mapping[str, Any], repo_id: str | None, recipe_text: str
) -> list[str]:
    """How to load the variant and how to reproduce it."""
    where = repo_id or "path/to/this/folder"
    flags = "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in (comparison.get("overrides") or {}).items()
        if k in ("limit", "device")
    )
    return [
        *use_section(where),
        'Removing blocks without further training costs quality; fine-tuning ("healing") usually recovers part of it.',
        "",
        "## Reproduce",
        "",
        "```bash",
        "prune run recipe.yaml" + flags,
        "```",
        "",
        "with this `recipe.yaml`:",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]


def export_dtype(record: Mapping[str, Any]) -> str | None:
    """The dtype the weights were written in, when the record says."""
    value = record.get("export_dtype")
    return str(value).removeprefix("torch.") if value else None


def dtype_sentence(record: Mapping[str, Any]) -> str | None:
    """What the card says about the two dtypes of prune.json: `export_dtype` (the tensors on
    disk) and `compute_dtype` (what the model ran in; null for a drop, which runs nothing).
    None when the record names no export dtype."""
    stored = export_dtype(record)
    if stored is None:
        return None
    computed = record.get("compute_dtype")
    if computed:
        return (
            f"Weights stored in {stored} (`export_dtype` in prune.json); computed in "
            f"{str(computed).removeprefix('torch.')} (`compute_dtype`)."
        )
    return (
        f"Weights stored in {stored} (`export_dtype` in prune.json); `compute_dtype` is null: "
        "the model was not run."
    )


def render_card(
    comparison: Mapping[str, Any],
    strategy: str,
    *,
    recipe_text: str,
    figure: str | None = "relevance.png",
    repo_id: str | None = None,
    record: Mapping[str, Any] | None = None,
) -> str:
    """Markdown model card (with YAML front matter) for the `strategy` variant, comparing all
    strategies; `record` (the variant's prune.json) adds what its two dtypes are."""

    model = comparison["model"]
    order = [strategy] + [n for n in comparison["strategies"] if n != strategy]
    variant = comparison["strategies"][strategy]
    name = repo_id or f"{model.get('hub_id') or model['spec']}-{strategy}-pruned"
    meta = front_matter(comparison, strategy, name.split("/")[-1])
    base_ref = (
        f"[{model['hub_id']}](https://huggingface.co/{model['hub_id']})"
        if model.get("hub_id")
        else f"`{model['spec']}`"
    )
    final = variant["final"]
    out = [
        render_front_matter(meta),
        "",
        f"# {name.split('/')[-1]}",
        "",
        f"{base_ref} with {len(variant['removed'])} of its {model['num_layers']} transformer blocks removed "
        f"by `prune` ({strategy} ranking, {variant['schedule']} schedule): "
        f"{final['layers']} blocks, {_count(final.get('params'))} parameters.",
        "",
        "Blocks were removed one at a time, least relevant first. "
        + _strategy_notes([_measure_of(comparison, n) for n in order])
        + " This card compares the strategies run by the same recipe.",
        "",
        *([dtypes, ""] if record and (dtypes := dtype_sentence(record)) else []),
        *comparison_sections(comparison, order, figure),
        *_usage_section(comparison, repo_id, recipe_text),
    ]
    return "\n".join(out)


def parse_front_matter(card: str) -> dict[str, Any]:
    """The YAML metadata of a card (for tests and pre-push checks)."""
    if not card.startswith("---\n"):
        raise ValueError("card has no YAML front matter")
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end]) or {}
