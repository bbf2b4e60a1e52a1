"""The model card: valid Hub front matter, and every number taken from the comparison record."""

from __future__ import annotations

import copy

import pytest

from prune.card import parse_front_matter, render_card


def _step(step, layer, removed, mean, scores):
    return {
        "step": step,
        "removed_layer": layer,
        "removed": removed,
        "layers_left": 6 - len(removed),
        "params": 1000 - 100 * len(removed),
        "scores": scores,
        "mean_score": mean,
        "drop": 0.6 - mean,
        "relevance": None,
        "seconds": 0.1,
    }


COMPARISON = {
    "model": {
        "spec": "smollm2-135m",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "num_layers": 6,
        "parameters": 1000,
    },
    "evaluation": {
        "tasks": ["local_arc_easy", "local_piqa"],
        "limit": 50,
        "num_fewshot": 0,
        "metrics": {"local_arc_easy": "acc", "local_piqa": "acc_norm"},
    },
    "baseline": {"scores": {"local_arc_easy": 0.5, "local_piqa": 0.7}, "mean": 0.6},
    "strategies": {
        "cosine": {
            "schedule": "one-shot",
            "removed": [4, 2],
            "stop_reason": "removed 2 layers (target)",
            "final": {
                "layers": 4,
                "params": 800,
                "scores": {"local_arc_easy": 0.25, "local_piqa": 0.6},
                "mean": 0.425,
            },
            "history": [
                _step(0, None, [], 0.6, {}),
                _step(1, 4, [4], 0.5, {}),
                _step(2, 2, [2, 4], 0.425, {}),
            ],
        },
        "accuracy": {
            "schedule": "one-shot",
            "removed": [3, 1],
            "stop_reason": "removed 2 layers (target)",
            "final": {
                "layers": 4,
                "params": 800,
                "scores": {"local_arc_easy": 0.45, "local_piqa": 0.65},
                "mean": 0.55,
            },
            "history": [
                _step(0, None, [], 0.6, {}),
                _step(1, 3, [3], 0.58, {}),
                _step(2, 1, [1, 3], 0.55, {}),
            ],
        },
    },
    "correlations": {
        "cosine~accuracy": {
            "spearman": {"rho": 0.4286, "p": 0.397},
            "kendall": {"tau": 0.3333, "p": 0.47},
            "pearson": {"r": 0.51, "p": 0.3},
        }
    },
    "overlap": 0.0,
    "overrides": {"limit": 50},
}
RECIPE = "model: smollm2-135m\nprune: {remove: 2}\n"


def test_front_matter_follows_hub_conventions():
    card = render_card(COMPARISON, "accuracy", recipe_text=RECIPE, repo_id="me/smol-accuracy")
    meta = parse_front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"pruned", "layer-pruning"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "smol-accuracy"
    values = {
        r["dataset"]["type"]: (r["metrics"][0]["type"], r["metrics"][0]["value"])
        for r in entry["results"]
    }
    assert values == {"allenai/ai2_arc": ("acc", 0.45), "ybisk/piqa": ("acc_norm", 0.65)}


def test_card_numbers_match_the_comparison():
    card = render_card(COMPARISON, "cosine", recipe_text=RECIPE)
    # removed-layers table: both strategies, original numbering, params and share kept
    assert "| cosine | one-shot | 4, 2 | 4 | 800 | 80.0% |" in card
    assert "| accuracy | one-shot | 3, 1 | 4 | 800 | 80.0% |" in card
    assert "| base model | - | - | 6 | 1,000 | 100.0% |" in card
    # scores: base and each variant with retained share; the card's own strategy first
    assert "| local_arc_easy | acc | 0.5000 | 0.2500 | 50.0% | 0.4500 | 90.0% |" in card
    assert "| local_piqa | acc_norm | 0.7000 | 0.6000 | 85.7% | 0.6500 | 92.9% |" in card
    assert "| 4 | 0.4250 | 0.5500 |" in card  # equal-depth table
    assert "spearman rho = 0.429" in card
    assert "![Per-layer relevance under each strategy](relevance.png)" in card
    assert RECIPE.strip() in card
    assert "--limit 50" in card
    assert parse_front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.25


def test_card_without_hub_id_or_license_still_parses():
    comparison = copy.deepcopy(COMPARISON)
    comparison["model"].update(hub_id=None, license=None, spec="/tmp/tiny")
    card = render_card(comparison, "accuracy", recipe_text=RECIPE, figure=None)
    meta = parse_front_matter(card)
    assert "base_model" not in meta and "license" not in meta
    assert "relevance.png" not in card


def test_parse_front_matter_rejects_cards_without_it():
    with pytest.raises(ValueError):
        parse_front_matter("# no metadata\n")
