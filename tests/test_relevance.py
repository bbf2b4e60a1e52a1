"""Relevance measures on tiny models: cosine hooks, identity and destroying blocks, cache and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_tasks import _loglik
from tiny import byte_tokenizer, tiny_model

import prune.evaluate.removals as removals_mod
from prune.errors import PruneError
from prune.evaluate.cache import ResultCache, model_fingerprint
from prune.evaluate.perplexity import perplexity
from prune.evaluate.removals import evaluate_removals
from prune.evaluate.settings import DocOutcomes, EvalSettings, TaskScore
from prune.layer_report import build_report, render_table
from prune.measures.accuracy import accuracy_relevance
from prune.measures.base import LayerScore, adaptive_rounds, cut_value, settled
from prune.measures.cosine import cosine_relevance
from prune.measures.perplexity import perplexity_relevance
from prune.models import LoadedModel

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A stitch in time saves nine, as my grandmother used to say often.",
    "Short one.",
]


def _loaded(model) -> LoadedModel:
    return LoadedModel(model, byte_tokenizer(), None, None)


def _make_identity(model, index: int) -> None:
    """Zero the block's output projections: its output equals its input exactly."""
    block = model.model.layers[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def _last_block_output(model, ids):
    from prune.surgery import locate_layers

    captured = {}
    block = locate_layers(model).layers[-1]
    handle = block.register_forward_hook(
        lambda m, a, o: captured.setdefault("out", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(**ids)
    handle.remove()
    return captured["out"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_hook_cosine_matches_hidden_states_except_last(model_type):
    model, tok = tiny_model(model_type, 4, seed=1), byte_tokenizer()
    text = TEXTS[0][:50]  # shorter than seq_len and than GPT-2's 64 positions
    ranking = cosine_relevance(model, tok, [text], seq_len=60, batch_size=1)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states  # embeddings + one per block

    def one_minus_cos(a, b):
        return float((1 - torch.cosine_similarity(a, b, dim=-1)).mean())

    direct = [one_minus_cos(hs[i], hs[i + 1]) for i in range(4)]
    hooked = [s.score for s in ranking.scores]
    assert hooked[:3] == pytest.approx(direct[:3], abs=1e-5)
    # The last score uses the block's real output, read with a hook.
    raw_last = _last_block_output(model, ids)
    assert hooked[3] == pytest.approx(one_minus_cos(hs[3], raw_last), abs=1e-5)
    if model_type == "gpt2":
        # GPT-2 reports hidden_states[-1] after its final norm (ln_f): the naive reading is wrong.
        assert not torch.allclose(hs[-1], raw_last)
        assert abs(hooked[3] - direct[3]) > 1e-3


def test_cosine_ignores_padding_and_ranks_identity_block_least_relevant():
    model, tok = tiny_model("llama", 4, seed=2), byte_tokenizer()
    _make_identity(model, 2)
    ranking = cosine_relevance(model, tok, TEXTS, seq_len=64, batch_size=2)
    assert ranking.order()[0] == 2
    assert ranking.scores[2].score == pytest.approx(0.0, abs=1e-6)
    assert all(s.stderr is not None for s in ranking.scores)
    # One text alone gives the same per-text score as inside a padded batch.
    alone = cosine_relevance(model, tok, [TEXTS[2]], seq_len=64, batch_size=1)
    padded = cosine_relevance(model, tok, [TEXTS[0], TEXTS[2]], seq_len=64, batch_size=2)
    n0, n2 = len(TEXTS[0]), len(TEXTS[2])
    for a, p, first in zip(
        alone.scores,
        padded.scores,
        cosine_relevance(model, tok, [TEXTS[0]], seq_len=64).scores,
        strict=True,
    ):
        assert p.score == pytest.approx((first.score * n0 + a.score * n2) / (n0 + n2), abs=1e-5)


def test_angular_distance_for_spans():
    model, tok = tiny_model("llama", 4, seed=2), byte_tokenizer()
    ranking = cosine_relevance(model, tok, [TEXTS[0]], seq_len=64, block_size=2)
    assert ranking.measure == "angular" and len(ranking.scores) == 3
    assert all(0 <= s.score <= 1 and s.layers == (s.index, s.index + 1) for s in ranking.scores)


def _gold_task(tmp_path, model, n: int = 12) -> str:
    """A task folder whose gold answers are the model's own choices (baseline accuracy 1.0)."""
    gen = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for _ in range(n):
        query = (
            "Question: "
            + "".join(letters[i] for i in torch.randint(0, 26, (12,), generator=gen))
            + "\nAnswer:"
        )
        choices = [
            "".join(letters[i] for i in torch.randint(0, 26, (5,), generator=gen)) for _ in range(4)
        ]
        lls = [_loglik(model, query, " " + c) for c in choices]
        rows.append(
            {"query": query, "choices": choices, "gold": max(range(4), key=lambda i: lls[i])}
        )
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "mine.yaml").write_text(
        f"task: my_gold_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mine.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: query\ndoc_to_target: gold\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(folder)


def test_accuracy_identity_block_drops_exactly_zero_and_destroyer_is_most_relevant(tmp_path):
    model = tiny_model("llama", 4, seed=5)
    _make_identity(model, 1)
    # Block 2 swamps the residual stream with a huge constant: the model's answers become
    # input-independent, so removing any other block changes nothing, removing block 2 everything.
    direction = (
        torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 1e4
    )

    def destroy(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + direction
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[2].register_forward_hook(destroy)
    try:
        include = _gold_task(tmp_path, model)
        settings = EvalSettings(tasks=("my_gold_task",), include_path=include, batch_size=4)
        ranking = accuracy_relevance(_loaded(model), settings, progress=False)
    finally:
        handle.remove()
    assert ranking.baseline["my_gold_task"].value == 1.0
    drops = {s.index: s.score for s in ranking.scores}
    assert drops[1] == 0.0
    assert ranking.order()[-1] == 2 and drops[2] > 0.3
    assert (
        ranking.scores[2].stderr is not None
        and ranking.scores[2].per_task["my_gold_task"] == drops[2]
    )


class FakeEngine:
    """Stands in for the fast engine: score = number of layers left; records each call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, ...]]] = []
        self.fail_after: int | None = None

    @property
    def seen(self) -> list[tuple[int, ...]]:
        return [c for call in self.calls for c in call]

    def __call__(self, model, tokenizer, settings, candidates, progress=True, on_done=None):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append([tuple(c) for c in candidates])
        out = []
        for cand in candidates:
            left = len(model.model.layers) - len(cand)
            out.append({t: TaskScore(t, "acc", left / 10, 0.01, 10) for t in settings.tasks})
        return out


@pytest.fixture
def fake_engine(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(removals_mod, "_fast_engine", lambda: engine)
    monkeypatch.setattr(removals_mod, "_task_names", lambda s: list(s.tasks))
    return engine


def test_cache_resumes_after_interruption_and_survives_corruption(tmp_path, fake_engine):
    loaded = _loaded(tiny_model("llama", 4))
    settings = EvalSettings(tasks=("a", "b"), limit=5)
    cands = [(), (0,), (1,), (2,), (3,)]
    cache = ResultCache(tmp_path / "results")
    uncached = evaluate_removals(loaded, settings, cands, engine="fast", progress=False)
    assert fake_engine.calls == [cands]  # one shared call for all candidates
    assert uncached[1]["a"].value == pytest.approx(0.3)
    fake_engine.calls.clear()
    fake_engine.fail_after = 2
    run = dict(engine="fast", cache=cache, progress=False, chunk_size=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate_removals(loaded, settings, cands, **run)
    assert fake_engine.seen == [(), (0,)]
    fake_engine.calls.clear()
    fake_engine.fail_after = None
    resumed = evaluate_removals(loaded, settings, cands, **run)
    assert fake_engine.seen == [(1,), (2,), (3,)]  # only what was missing
    assert resumed == uncached
    # A corrupt entry is recomputed, never fatal.
    victim = next((tmp_path / "results").rglob("*.json"))
    victim.write_text("{not json")
    fake_engine.calls.clear()
    again = evaluate_removals(loaded, settings, cands, **run)
    assert again == uncached and len(fake_engine.seen) == 1
    # Different settings (limit) do not reuse entries.
    fake_engine.calls.clear()
    evaluate_removals(loaded, EvalSettings(tasks=("a",), limit=6), [()], **run)
    assert fake_engine.seen == [()]


# Adaptive sampling. Documents wrong per 16 when each of 8 blocks is removed alone (the base
# model gets every document right): 0 and 1 clearly irrelevant, 4-7 clearly relevant, and 2
# (0.25) and 3 (0.375) straddle the cut of a 3-block removal (their midpoint, 0.3125).
WRONG_PER_16 = [0, 1, 4, 6, 14, 16, 12, 15]


class OutcomeEngine:
    """Stands in for the fast engine with per-document outcomes: with block i removed,
    document d is answered wrong when d % 16 < wrong[i]. Records the candidates and the
    documents per task of every call."""

    def __init__(self, wrong: list[int] = WRONG_PER_16) -> None:
        self.wrong = wrong
        self.calls: list[list[tuple[int, ...]]] = []
        self.limits: list[int] = []

    def __call__(self, model, tokenizer, settings, candidates, progress=True, on_done=None):
        self.calls.append([tuple(c) for c in candidates])
        self.limits.append(settings.limit)
        docs = list(range(settings.limit))
        out = []
        for cand in candidates:
            right = [not any(d % 16 < self.wrong[i] for i in cand) for d in docs]
            outcomes = DocOutcomes(
                doc_ids=docs,
                values={"acc": [float(r) for r in right]},
                lls=[[0.0, -1.0] if r else [-1.0, 0.0] for r in right],
                gold=[0] * len(docs),
                choice_lengths=[[1, 1]] * len(docs),
            )
            value = sum(right) / len(docs)
            out.append(
                {
                    t: TaskScore(t, "acc", value, 0.01, len(docs), outcomes=outcomes)
                    for t in settings.tasks
                }
            )
        return out


@pytest.fixture
def outcome_engine(monkeypatch):
    engine = OutcomeEngine()
    monkeypatch.setattr(removals_mod, "_fast_engine", lambda: engine)
    monkeypatch.setattr(removals_mod, "_task_names", lambda s: list(s.tasks))
    return engine


def test_adaptive_sampling_spends_documents_only_on_candidates_straddling_the_cut(
    outcome_engine,
):
    loaded = _loaded(tiny_model("llama", 8))
    settings = EvalSettings(tasks=("a",), limit=64)
    ranking = accuracy_relevance(loaded, settings, engine="fast", progress=False, adaptive=3)
    assert outcome_engine.limits == [16, 32, 64]
    assert outcome_engine.calls == [
        [(), *[(i,) for i in range(8)]],  # round 1: every candidate
        [(), (2,), (3,)],  # the others' intervals lay on one side of 0.3125: settled
        [(), (2,), (3,)],  # still straddling on 32 documents: scored on all 64
    ]
    got = ranking.by_index()
    assert [got[i].documents for i in range(8)] == [16, 16, None, None, 16, 16, 16, 16]
    for i, wrong in enumerate(WRONG_PER_16):
        assert got[i].score == pytest.approx(wrong / 16)
    lo, hi = got[1].ci95
    assert hi < 0.3125 and got[6].ci95[0] > 0.3125 and got[2].ci95[1] > 0.3125
    assert ranking.settings["adaptive"] == 3
    assert ranking.settings["rounds"] == [16, 32, 64]
    assert ranking.settings["round_candidates"] == [8, 2, 2]
    assert ranking.settings["documents_used"] == {
        "used": 8 * 16 + 2 * 32 + 2 * 64,
        "exhaustive": 8 * 64,
    }
    assert ranking.baseline["a"].n == 64
    # Per-document contributions only for the blocks scored on every document: no stability.
    assert sorted(ranking.signals) == [2, 3] and ranking.stability(3) is None
    # The exhaustive ranking agrees on the 3 blocks the removal takes (and here on the order).
    outcome_engine.calls.clear()
    outcome_engine.limits.clear()
    full = accuracy_relevance(loaded, settings, engine="fast", progress=False)
    assert outcome_engine.limits == [64]
    assert all(s.documents is None for s in full.scores)
    assert full.order()[:3] == ranking.order()[:3] == [0, 1, 2]
    assert ranking.order() == full.order() == [0, 1, 2, 3, 6, 4, 7, 5]
    assert full.stability(3) is not None
    # The table marks the early scores and says what was saved; stability is left out.
    report = build_report("tiny", {"accuracy": ranking}, {})
    assert report["stability"] is None
    table = render_table(report)
    assert "| 0 | 0.0000 ± 0.0000 (n=16) |" in table and "| 2 | 0.2500 ± 0.0546 |" in table
    assert "candidates per round (documents per task): 8 on 16, 2 on 32, 2 on 64" in table
    assert "320 of 512 candidate-documents per task (62%)" in table


def test_adaptive_sampling_stops_once_the_removal_set_is_stable(monkeypatch):
    engine = OutcomeEngine([0, 0, 16, 16, 16, 16, 16, 16])
    monkeypatch.setattr(removals_mod, "_fast_engine", lambda: engine)
    monkeypatch.setattr(removals_mod, "_task_names", lambda s: list(s.tasks))
    loaded = _loaded(tiny_model("llama", 8))
    settings = EvalSettings(tasks=("a",), limit=64)
    ranking = accuracy_relevance(
        loaded, settings, engine="fast", progress=False, adaptive=2, signal="kl", measure="kl"
    )
    assert engine.limits == [16]  # every interval on its side of the cut after round 1
    assert [s.documents for s in ranking.scores] == [16] * 8
    assert ranking.order()[:2] == [0, 1] and ranking.signals is None
    assert ranking.settings["rounds"] == [16] and ranking.settings["round_candidates"] == [8]
    assert ranking.settings["documents_used"] == {"used": 128, "exhaustive": 512}
    engine.calls.clear()
    with pytest.raises(
        PruneError, match=r"--adaptive 8 is invalid for 8 candidate blocks \(accepted: 1 to 7"
    ):
        accuracy_relevance(loaded, settings, engine="fast", progress=False, adaptive=8)
    assert engine.calls == []  # refused before any evaluation


def test_adaptive_rounds_and_the_cut():
    assert adaptive_rounds(200, 3) == [25, 50, 100, 200]
    assert adaptive_rounds(33, 1) == [17, 33]
    assert adaptive_rounds(31, 1) == [31]  # too few documents to split: one exhaustive round
    assert adaptive_rounds(None, None) == [None] and adaptive_rounds(50, None) == [50]
    with pytest.raises(PruneError, match="needs a document limit"):
        adaptive_rounds(None, 2)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(PruneError, match="is invalid"):
            adaptive_rounds(100, bad)
    assert cut_value([0.4, 0.1, 0.3, 0.0], 2) == pytest.approx(0.2)
    # The paired interval decides; without one, score +- 1.96 stderr; without either, never.
    assert settled(LayerScore(0, 0.1, 0.5, ci95=(0.05, 0.15)), 0.2)
    assert not settled(LayerScore(0, 0.1, 0.01, ci95=(0.05, 0.25)), 0.2)
    assert settled(LayerScore(0, 0.5, 0.1), 0.2) and not settled(LayerScore(0, 0.3, 0.1), 0.2)
    assert not settled(LayerScore(0, 0.2, 0.0, ci95=(0.2, 0.2)), 0.2)  # on the cut: unsettled
    assert not settled(LayerScore(0, 0.9, None), 0.2)


def test_lm_eval_cached_and_uncached_agree(tmp_path, data_dir):
    loaded = _loaded(tiny_model("llama", 3, seed=4))
    settings = EvalSettings(tasks=("local_copa",), limit=4, data_dir=str(data_dir))
    cache = ResultCache(tmp_path / "results")
    first = evaluate_removals(loaded, settings, [(), (1,)], cache=cache, progress=False)
    assert len(list((tmp_path / "results").rglob("*.json"))) == 2
    cached = evaluate_removals(loaded, settings, [(), (1,)], cache=cache, progress=False)
    plain = evaluate_removals(loaded, settings, [(), (1,)], progress=False)
    assert first == cached == plain
    assert len(loaded.model.model.layers) == 3  # restored


def test_fingerprint_changes_with_weights_and_layers():
    model = tiny_model("llama", 3)
    before = model_fingerprint(_loaded(model))
    assert model_fingerprint(_loaded(model)) == before
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2)
    assert model_fingerprint(_loaded(model)) != before


def test_perplexity_matches_model_loss_and_relevance(tmp_path):
    model, tok = tiny_model("llama", 3, seed=6), byte_tokenizer()
    ids = tok(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert perplexity(model, tok, [TEXTS[0]], seq_len=512) == pytest.approx(
        math.exp(float(loss)), rel=1e-4
    )
    _make_identity(model, 0)
    ranking = perplexity_relevance(
        _loaded(model), TEXTS, seq_len=64, cache=ResultCache(tmp_path), progress=False
    )
    assert ranking.scores[0].score == pytest.approx(0.0, abs=1e-4)
    assert ranking.baseline > 1


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_fast_perplexity_equals_the_plain_forward(tmp_path, model_type):
    """The fast engine's perplexity of every candidate matches `perplexity` with the blocks
    really removed; the cache keeps the two paths' entries apart and serves a repeat."""
    import prune.evaluate.engine as engine_mod

    model, tok = tiny_model(model_type, 4, seed=7), byte_tokenizer()
    loaded, cache = _loaded(model), ResultCache(tmp_path)
    fast = perplexity_relevance(
        loaded, TEXTS, seq_len=48, cache=cache, progress=False, engine="fast"
    )
    plain = perplexity_relevance(
        loaded, TEXTS, seq_len=48, cache=cache, progress=False, engine="lm-eval"
    )
    assert fast.baseline == pytest.approx(plain.baseline, rel=1e-5)
    assert fast.baseline == pytest.approx(perplexity(model, tok, TEXTS, seq_len=48), rel=1e-5)
    for f, p in zip(fast.scores, plain.scores, strict=True):  # perplexities of ~250: compare them
        assert f.score + fast.baseline == pytest.approx(p.score + plain.baseline, rel=1e-5)
    calls = []
    original = engine_mod.perplexities
    engine_mod.perplexities = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        again = perplexity_relevance(loaded, TEXTS, seq_len=48, cache=cache, progress=False)
    finally:
        engine_mod.perplexities = original
    assert calls == [] and [s.score for s in again.scores] == [s.score for s in fast.scores]


def test_plain_perplexity_resumes_after_interruption(tmp_path, monkeypatch):
    """The per-candidate path caches each perplexity as it finishes: Ctrl-C loses only the
    candidate in flight."""
    import prune.evaluate.perplexity as ppl_mod

    loaded, cache = _loaded(tiny_model("llama", 3, seed=8)), ResultCache(tmp_path)
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(loaded.model.model.layers))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return perplexity(*args, **kwargs)

    monkeypatch.setattr(ppl_mod, "perplexity", counting)
    run = dict(seq_len=32, cache=cache, progress=False, engine="lm-eval")
    with pytest.raises(KeyboardInterrupt):
        perplexity_relevance(loaded, TEXTS, **run)
    assert len(loaded.model.model.layers) == 3  # the interrupted removal was undone
    calls.clear()
    perplexity_relevance(loaded, TEXTS, **run)
    assert calls == [2, 2]  # the full model and block 0 came from the cache


def test_cosine_ranking_is_cached(tmp_path, monkeypatch):
    import prune.measures.cosine as cosine_mod

    loaded = _loaded(tiny_model("llama", 3, seed=7))
    cache = ResultCache(tmp_path)
    first = cosine_mod.cached_cosine_relevance(loaded, TEXTS, seq_len=32, cache=cache)
    monkeypatch.setattr(cosine_mod, "cosine_relevance", lambda *a, **k: pytest.fail("not cached"))
    again = cosine_mod.cached_cosine_relevance(loaded, TEXTS, seq_len=32, cache=cache)
    assert again.order() == first.order()
    assert [s.score for s in again.scores] == [s.score for s in first.scores]
    # the per-text scores behind ranking stability survive the cache too
    assert again.signals == first.signals and len(again.signals[0]["calibration"]) == len(TEXTS)


def test_cosine_keeps_per_text_scores_for_stability():
    model, tok = tiny_model("llama", 4, seed=2), byte_tokenizer()
    _make_identity(model, 2)
    ranking = cosine_relevance(model, tok, TEXTS, seq_len=64, batch_size=2)
    alone = cosine_relevance(model, tok, [TEXTS[1]], seq_len=64, batch_size=1)
    for i in range(4):
        assert ranking.signals[i]["calibration"][1] == pytest.approx(
            alone.scores[i].score, abs=1e-5
        )
    stable = ranking.stability(1)
    # the identity block changes no text's hidden states: it is removed in every resample
    assert stable.removal_set == [2] and stable.probability[2] == 1.0 and stable.jaccard == 1.0
    assert ranking.stability(1, exclude=[2]).removal_set != [2]
