"""The measure registry: discovery, declarations, a new measure without other edits, and ranking
what is left after blocks were removed (the iterative schedule) under original indices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import byte_tokenizer, tiny_model

import prune.evaluate.removals as removals_mod
import prune.measures as measures_pkg
from prune.errors import PruneError
from prune.evaluate.cache import ResultCache
from prune.evaluate.settings import EvalSettings, TaskScore
from prune.measures import RankRequest, get_measure, measure_names, rank_layers, registry
from prune.measures.cosine import cosine_relevance
from prune.measures.perplexity import perplexity_relevance
from prune.models import LoadedModel
from prune.surgery import layers_removed

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A stitch in time saves nine, as my grandmother used to say often.",
]
ROOT = Path(__file__).resolve().parents[1]


def _loaded(model) -> LoadedModel:
    return LoadedModel(model, byte_tokenizer(), None, None)


def test_every_measure_is_registered_with_its_declarations():
    names = measure_names()
    assert names[:3] == ("cosine", "accuracy", "perplexity") and "angular" in names
    assert tuple(registry()) == names
    columns = [m.column for m in registry().values()]
    assert len(set(columns)) == len(columns)  # report rows keep measures apart
    for name, measure in registry().items():
        assert measure.name == name and measure.label and measure.column and measure.description
        assert measure.needs_texts or measure.needs_tasks  # each reads something
        assert get_measure(name) is measure
    # The keys reports have always used.
    # (plus the paired 95% interval of measures with a standard error)
    assert get_measure("cosine").columns(None) == {
        "cosine": None,
        "cosine_stderr": None,
        "cosine_ci95": None,
    }
    assert set(get_measure("accuracy").columns(None)) == {
        "accuracy_drop",
        "accuracy_drop_stderr",
        "accuracy_drop_ci95",
        "accuracy_documents",
        "per_task_drop",
    }
    assert get_measure("perplexity").columns(None) == {"perplexity_increase": None}
    assert get_measure("cosine").label_for(2) == "angular"


def test_unknown_measure_names_the_accepted_ones():
    with pytest.raises(PruneError, match=r"unknown measure 'cosin' \(accepted: cosine, accuracy"):
        get_measure("cosin")


def test_registry_imports_no_torch():
    code = (
        "import sys, prune.measures as m; m.registry(); "
        "heavy = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'lm_eval')]; "
        "print(heavy)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_request_without_what_the_measure_needs_fails_clearly():
    loaded = _loaded(tiny_model("llama", 3))
    with pytest.raises(PruneError, match="the cosine measure needs calibration texts"):
        rank_layers("cosine", RankRequest(loaded))
    with pytest.raises(PruneError, match="the accuracy measure needs evaluation tasks"):
        rank_layers("accuracy", RankRequest(loaded))
    with pytest.raises(
        PruneError,
        match=r"adaptive sampling does not apply to the perplexity measure \(accepted: "
        "measures that score each block on documents",
    ):
        rank_layers("perplexity", RankRequest(loaded, texts=TEXTS, adaptive=2))
    with pytest.raises(PruneError, match="block size 2 is invalid for 2 layers"):
        rank_layers("cosine", RankRequest(loaded, texts=TEXTS, block_size=2, removed=(1,)))


# --------------------------------------------------------------------------- a new measure

PROBE = '''
"""A throwaway measure for the registry test: deeper blocks matter more."""

from prune.measures.base import LayerScore, Measure, Ranking


def rank(request):
    from prune.surgery import count_layers

    n = count_layers(request.loaded.model)
    scores = [LayerScore(i, float(i), 0.5) for i in range(n) if i not in request.removed]
    return Ranking("depth", scores, n)


MEASURE = Measure(
    name="depth",
    label="depth probe",
    column="depth_score",
    description="the block index",
    ranker=rank,
    needs_texts=False,
    order=999,
)
'''


@pytest.fixture
def probe_measure(tmp_path, monkeypatch):
    """A measure module in a folder of its own, added to the package's search path."""
    folder = tmp_path / "more_measures"
    folder.mkdir()
    (folder / "depth_probe.py").write_text(textwrap.dedent(PROBE))
    monkeypatch.setattr(measures_pkg, "__path__", [*measures_pkg.__path__, str(folder)])
    registry.cache_clear()
    yield
    sys.modules.pop("prune.measures.depth_probe", None)
    registry.cache_clear()


def test_a_new_module_is_a_new_measure_everywhere(probe_measure, tiny_llama_dir, tmp_path):
    from prune.cli import cli

    assert measure_names()[-1] == "depth" and get_measure("depth").label == "depth probe"
    result = CliRunner().invoke(cli, ["rank", "--help"])
    assert "depth" in result.output  # the CLI's choices come from the registry
    result = CliRunner().invoke(cli, ["rank", str(tiny_llama_dir), "--metric", "depth", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["measures"] == ["depth"] and report["orders"]["depth"] == [0, 1, 2, 3]
    assert [
        (r["depth_score"], r["depth_score_stderr"], r["rank_depth"]) for r in report["layers"]
    ] == [
        (0.0, 0.5, 1),
        (1.0, 0.5, 2),
        (2.0, 0.5, 3),
        (3.0, 0.5, 4),
    ]
    out = tmp_path / "report"
    result = CliRunner().invoke(
        cli, ["compare", str(tiny_llama_dir), "--measures", "depth", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "| layer | depth probe ± se | rank |" in (out / "table.md").read_text()
    assert (out / "relevance.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- blocks already removed

# Drop in score of removing each block on its own; removals add up.
DROP = [0.5, 0.05, 0.3, 0.01, 0.2]


class AdditiveEngine:
    """Stands in for the fast engine: a removed set scores 1 - the sum of its blocks' drops."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, ...]]] = []

    def __call__(self, model, tokenizer, settings, candidates, progress=True, on_done=None):
        assert len(model.model.layers) == len(DROP)  # always the full model, original indices
        self.calls.append([tuple(c) for c in candidates])
        return [
            {
                t: TaskScore(t, "acc", 1.0 - sum(DROP[i] for i in c), 0.01, 10)
                for t in settings.tasks
            }
            for c in candidates
        ]


def test_accuracy_after_removals_evaluates_the_full_model_and_shares_the_cache(
    tmp_path, monkeypatch
):
    engine = AdditiveEngine()
    monkeypatch.setattr(removals_mod, "_fast_engine", lambda: engine)
    monkeypatch.setattr(removals_mod, "_task_names", lambda s: list(s.tasks))
    loaded = _loaded(tiny_model("llama", len(DROP)))
    cache = ResultCache(tmp_path)
    request = RankRequest(
        loaded,
        settings=EvalSettings(tasks=("a",), limit=10),
        engine="fast",
        cache=cache,
        progress=False,
    )
    full = rank_layers("accuracy", request)
    assert full.order() == [3, 1, 4, 2, 0]
    engine.calls.clear()
    step = rank_layers("accuracy", replace(request, removed=(3, 1)))
    # One call: the model without 1 and 3 (the base), then without one more block each.
    assert engine.calls == [[(1, 3), (0, 1, 3), (1, 2, 3), (1, 3, 4)]]
    assert [s.index for s in step.scores] == [0, 2, 4]
    for s in step.scores:
        assert s.score == pytest.approx(DROP[s.index])
    assert step.num_layers == len(DROP) and step.settings["removed"] == [1, 3]
    assert step.baseline["a"].value == pytest.approx(1.0 - DROP[1] - DROP[3])
    engine.calls.clear()
    again = rank_layers("accuracy", replace(request, removed=(1, 3)))
    assert engine.calls == [] and again.order() == step.order()  # all from the cache
    with pytest.raises(PruneError, match="layer 3 was already removed"):
        rank_layers("accuracy", replace(request, removed=(3,), layers=[3]))


def test_spans_after_removals_are_consecutive_remaining_blocks(tmp_path, monkeypatch):
    engine = AdditiveEngine()
    monkeypatch.setattr(removals_mod, "_fast_engine", lambda: engine)
    monkeypatch.setattr(removals_mod, "_task_names", lambda s: list(s.tasks))
    loaded = _loaded(tiny_model("llama", len(DROP)))
    request = RankRequest(
        loaded,
        settings=EvalSettings(tasks=("a",), limit=10),
        engine="fast",
        progress=False,
        block_size=2,
        removed=(1,),
    )
    ranking = rank_layers("accuracy", request)
    # Remaining 0, 2, 3, 4: spans (0, 2), (2, 3), (3, 4); the first bridges the removed block.
    assert engine.calls == [[(1,), (0, 1, 2), (1, 2, 3), (1, 3, 4)]]
    assert [s.layers for s in ranking.scores] == [(0, 2), (2, 3), (3, 4)]
    assert [s.score for s in ranking.scores] == pytest.approx(
        [DROP[0] + DROP[2], DROP[2] + DROP[3], DROP[3] + DROP[4]]
    )
    assert list(ranking.to_dict()["layers"][0]["blocks"]) == [0, 2]
    with pytest.raises(PruneError, match="layer 4 starts no span of 2 remaining blocks"):
        rank_layers("accuracy", replace(request, layers=[4]))

    model = tiny_model("llama", 5, seed=3)
    texts = RankRequest(_loaded(model), texts=TEXTS, seq_len=48, batch_size=2, progress=False)
    angular = rank_layers("angular", replace(texts, block_size=2, removed=(2,)))
    with layers_removed(model, [2]):
        direct = cosine_relevance(
            model, byte_tokenizer(), TEXTS, seq_len=48, batch_size=2, block_size=2
        )
    assert [s.layers for s in angular.scores] == [(0, 1), (1, 3), (3, 4)]
    assert [s.score for s in angular.scores] == pytest.approx([s.score for s in direct.scores])


def test_cosine_after_removals_ranks_the_smaller_model_under_original_indices():
    model = tiny_model("llama", 5, seed=3)
    loaded = _loaded(model)
    request = RankRequest(loaded, texts=TEXTS, seq_len=48, batch_size=2, progress=False)
    ranking = rank_layers("cosine", replace(request, removed=(1, 3)))
    assert len(model.model.layers) == 5  # restored
    with layers_removed(model, [1, 3]):
        direct = cosine_relevance(model, byte_tokenizer(), TEXTS, seq_len=48, batch_size=2)
    assert [s.index for s in ranking.scores] == [0, 2, 4]
    assert [s.score for s in ranking.scores] == pytest.approx([s.score for s in direct.scores])
    assert ranking.num_layers == 5 and ranking.settings["removed"] == [1, 3]


def test_perplexity_after_removals_maps_indices_back(tmp_path):
    model = tiny_model("llama", 4, seed=4)
    loaded = _loaded(model)
    request = RankRequest(
        loaded,
        texts=TEXTS,
        seq_len=32,
        engine="lm-eval",
        cache=ResultCache(tmp_path),
        progress=False,
        layers=[0, -1],  # original indices, also after removals
        removed=(2,),
    )
    ranking = rank_layers("perplexity", request)
    assert len(model.model.layers) == 4
    with layers_removed(model, [2]):
        direct = perplexity_relevance(
            loaded, TEXTS, seq_len=32, engine="lm-eval", layers=[0, 2], progress=False
        )
    assert [s.index for s in ranking.scores] == [0, 3]
    assert [s.score for s in ranking.scores] == pytest.approx([s.score for s in direct.scores])
    assert ranking.baseline == pytest.approx(direct.baseline)


def test_angular_is_the_angular_distance_per_block():
    """arccos(cos(h_in, h_out)) / pi per token, averaged, for one block and for spans."""
    model, tok = tiny_model("llama", 3, seed=2), byte_tokenizer()
    text = TEXTS[0]
    request = RankRequest(_loaded(model), texts=[text], seq_len=96, progress=False)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states  # embeddings + one per block

    def angle(a, b):
        cos = torch.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
        return float((torch.arccos(cos) / torch.pi).mean())

    angular = rank_layers("angular", request)
    assert angular.measure == "angular"
    assert [s.score for s in angular.scores[:2]] == pytest.approx(
        [angle(hs[0], hs[1]), angle(hs[1], hs[2])], abs=1e-5
    )
    spans = rank_layers("angular", replace(request, block_size=2))
    assert [s.layers for s in spans.scores] == [(0, 1), (1, 2)]
    assert spans.scores[0].score == pytest.approx(angle(hs[0], hs[2]), abs=1e-5)
