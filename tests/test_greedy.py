"""Greedy removal with fake (dict-lookup) ranking and scoring: stopping rules, protection, numbering."""

from __future__ import annotations

import pytest

from prune.errors import PruneError
from prune.greedy import greedy_prune

DEPTH = 8
# Relevance of each original layer in the full model: layer 5 least relevant, then 2, 6, 1, ...
FULL = {0: 9.0, 1: 4.0, 2: 2.0, 3: 6.0, 4: 5.0, 5: 1.0, 6: 3.0, 7: 8.0}
# Each removed layer costs this much accuracy (additive), so the drop is known exactly.
COST = {0: 0.3, 1: 0.04, 2: 0.02, 3: 0.06, 4: 0.05, 5: 0.01, 6: 0.03, 7: 0.2}


class Fake:
    """Rank and score by dict lookup; records every call's argument."""

    def __init__(self, rerank=None):
        self.rank_calls: list[tuple[int, ...]] = []
        self.score_calls: list[tuple[int, ...]] = []
        self.rerank = rerank or {}

    def rank(self, removed):
        self.rank_calls.append(removed)
        table = self.rerank.get(removed, FULL)
        return {i: r for i, r in table.items() if i not in removed}

    def score(self, removed):
        self.score_calls.append(removed)
        acc = 0.8 - sum(COST[i] for i in removed)
        return {"task_a": acc, "task_b": acc / 2}


def test_stops_exactly_at_remove_target():
    fake = Fake()
    result = greedy_prune(DEPTH, fake.rank, fake.score, target=3)
    assert result.removed == [5, 2, 6]
    assert [s.layers_left for s in result.history] == [8, 7, 6, 5]
    assert result.final.removed == [2, 5, 6]
    assert fake.rank_calls == [()]  # one-shot ranks once
    assert result.final.scores["task_a"] == pytest.approx(0.8 - 0.06)
    assert "target" in result.stop_reason


def test_keep_is_a_target_too():
    fake = Fake()
    result = greedy_prune(DEPTH, fake.rank, fake.score, target=DEPTH - 6)
    assert result.final.layers_left == 6


def test_stops_at_max_drop_and_undoes_the_breaking_step():
    fake = Fake()
    # mean score = 0.75 * acc, so the mean drop is 0.75 * sum of costs:
    # after 5 -> 0.0075, 2 -> 0.0225, 6 -> 0.045, 1 -> 0.075
    result = greedy_prune(DEPTH, fake.rank, fake.score, max_drop=0.05)
    assert result.removed == [5, 2, 6]
    assert result.final.drop == pytest.approx(0.045)
    assert result.rejected is not None and result.rejected.removed_layer == 1
    assert result.rejected.drop == pytest.approx(0.075)
    assert "max_drop" in result.stop_reason


def test_target_comes_first_when_smaller():
    fake = Fake()
    result = greedy_prune(DEPTH, fake.rank, fake.score, target=1, max_drop=0.5)
    assert result.removed == [5]
    assert result.rejected is None


def test_protected_layers_are_never_removed():
    fake = Fake()
    result = greedy_prune(DEPTH, fake.rank, fake.score, target=4, protect=[5, -2])  # -2 is layer 6
    assert result.removed == [2, 1, 4, 3]
    assert not {5, 6} & set(result.removed)
    # with only max_drop=1 everything unprotected can go, but never the protected ones, and one block stays
    result = greedy_prune(DEPTH, Fake().rank, Fake().score, max_drop=1.0, protect=[0, 7])
    assert sorted(result.removed) == [1, 2, 3, 4, 5, 6]
    result = greedy_prune(DEPTH, Fake().rank, Fake().score, max_drop=1.0)
    assert len(result.removed) == DEPTH - 1


def test_iterative_reranks_and_reports_original_indices():
    # After removing 5, the slimmed model's ranking changes: layer 7 becomes the least relevant.
    # Rankings are keyed by original indices, so the loop must report 7, not its new position 6.
    rerank = {(5,): {0: 9.0, 1: 4.0, 2: 3.0, 3: 6.0, 4: 5.0, 6: 2.5, 7: 0.5}}
    fake = Fake(rerank)
    result = greedy_prune(DEPTH, fake.rank, fake.score, schedule="iterative", target=3)
    assert fake.rank_calls == [(), (5,), (5, 7)]
    assert result.removed == [5, 7, 2]
    assert result.final.removed == [2, 5, 7]
    assert len(result.rankings) == 3
    # one-shot with the same fake ignores the re-ranking
    assert greedy_prune(DEPTH, Fake(rerank).rank, Fake(rerank).score, target=3).removed == [5, 2, 6]


def test_history_records_params_scores_and_relevance():
    fake = Fake()
    per_block = 10
    result = greedy_prune(
        DEPTH,
        fake.rank,
        fake.score,
        target=2,
        count_params=lambda removed: 100 + per_block * (DEPTH - len(removed)),
    )
    assert [s.params for s in result.history] == [180, 170, 160]
    assert [s.removed_layer for s in result.history] == [None, 5, 2]
    assert [s.relevance for s in result.history] == [None, 1.0, 2.0]
    assert set(result.history[1].scores) == {"task_a", "task_b"}
    assert all(s.seconds >= 0 for s in result.history)
    assert result.to_dict()["history"][2]["removed"] == [2, 5]


def test_baseline_is_not_recomputed_when_given():
    fake = Fake()
    greedy_prune(DEPTH, fake.rank, fake.score, target=1, baseline={"task_a": 0.8, "task_b": 0.4})
    assert () not in fake.score_calls


def test_bad_arguments():
    fake = Fake()
    with pytest.raises(PruneError, match="stopping rule"):
        greedy_prune(DEPTH, fake.rank, fake.score)
    with pytest.raises(PruneError, match="at most 5"):
        greedy_prune(DEPTH, fake.rank, fake.score, target=7, protect=[0, 1, 2])
    with pytest.raises(PruneError, match="schedule"):
        greedy_prune(DEPTH, fake.rank, fake.score, target=1, schedule="twice")


def test_one_shot_prefetches_its_planned_steps_in_one_batch():
    fake = Fake()
    batches = []
    result = greedy_prune(
        DEPTH, fake.rank, fake.score, target=3, protect=[2], prefetch=batches.append
    )
    assert batches == [[(5,), (5, 6), (1, 5, 6)]]
    assert [tuple(s.removed) for s in result.history[1:]] == batches[0]
    iterative = []
    greedy_prune(
        DEPTH, Fake().rank, Fake().score, schedule="iterative", target=2, prefetch=iterative.append
    )
    assert iterative == []


def _span_rank(removed):
    """Spans of two consecutive remaining blocks, scored by the sum of their FULL relevance."""
    rest = [i for i in range(DEPTH) if i not in removed]
    return {(a, b): FULL[a] + FULL[b] for a, b in zip(rest, rest[1:], strict=False)}


def test_one_shot_spans_remove_whole_non_overlapping_spans_least_relevant_first():
    fake = Fake()
    planned = []
    # Spans by relevance: (5, 6) 4, (1, 2) 6, (2, 3) 8, (4, 5) 6 ... ties go to the lower start.
    result = greedy_prune(
        DEPTH,
        _span_rank,
        fake.score,
        target=4,
        protect=[0],
        prefetch=planned.extend,
    )
    assert result.removed == [5, 6, 1, 2]
    assert [s.removed_span for s in result.history[1:]] == [[5, 6], [1, 2]]
    assert [s.removed_layer for s in result.history[1:]] == [5, 1]
    assert [s.step for s in result.history] == [0, 1, 2]
    assert [s.layers_left for s in result.history] == [8, 6, 4]
    assert planned == [(5, 6), (1, 2, 5, 6)]  # the one-shot plan skips (4, 5) and (6, 7)
    assert fake.score_calls == [(), (5, 6), (1, 2, 5, 6)]
    assert result.final.scores["task_a"] == pytest.approx(0.8 - 0.01 - 0.03 - 0.04 - 0.02)


def test_spans_never_take_a_protected_block_nor_pass_the_target():
    fake = Fake()
    result = greedy_prune(DEPTH, _span_rank, fake.score, target=3, protect=[5])
    # (1, 2) first; then nothing of length 2 fits in the one block left of the target.
    assert result.removed == [1, 2]
    assert result.stop_reason == "no removable layer left"


def test_iterative_spans_rerank_the_slimmed_model_and_bridge_removed_blocks():
    calls = []

    def rank(removed):
        calls.append(removed)
        return _span_rank(removed)

    result = greedy_prune(
        DEPTH, rank, Fake().score, schedule="iterative", target=4, protect=[0, -1]
    )
    # After (5, 6): remaining 0 1 2 3 4 7, spans (1, 2) 6, (4, 7) 13: (1, 2) goes.
    assert result.removed == [5, 6, 1, 2]
    assert calls == [(), (5, 6)]
    assert result.rankings[1][4] == FULL[4] + FULL[7]  # a span across the removed blocks
