"""The accuracy family's per-document signals, checked against direct computations from
per-document log-likelihoods, and the paired verdict that names a winner only when it may."""

from __future__ import annotations

import math

import pytest

from prune.evaluate.settings import DocOutcomes, TaskScore
from prune.measures._signals import contributions, per_document
from prune.measures.accuracy import accuracy_drop
from prune.report import paired_comparison, verdict

# Three documents with three choices each; the gold choice is 0, 2 and 1.
BASE = DocOutcomes(
    doc_ids=[10, 11, 12],
    values={"acc": [1.0, 1.0, 0.0], "acc_norm": [1.0, 0.0, 0.0]},
    lls=[[-1.0, -2.0, -3.0], [-4.0, -5.0, -2.0], [-1.0, -3.0, -0.5]],
    gold=[0, 2, 1],
    choice_lengths=[[2, 4, 1], [1, 1, 10], [5, 5, 5]],
)
# The same documents after removing a block: document 10 flips to wrong.
CANDIDATE = DocOutcomes(
    doc_ids=[10, 11, 12],
    values={"acc": [0.0, 1.0, 0.0], "acc_norm": [0.0, 0.0, 0.0]},
    lls=[[-2.0, -1.5, -3.0], [-4.0, -5.0, -3.0], [-1.0, -3.0, -0.5]],
    gold=[0, 2, 1],
    choice_lengths=[[2, 4, 1], [1, 1, 10], [5, 5, 5]],
)


def _softmax(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def test_correct_is_the_task_metric_per_document():
    assert per_document("correct", BASE, "acc") == {10: 1.0, 11: 1.0, 12: 0.0}
    assert per_document("correct", BASE, "acc_norm") == {10: 1.0, 11: 0.0, 12: 0.0}


def test_probability_is_the_softmax_of_the_gold_choice():
    got = per_document("probability", BASE, "acc")
    for i, doc in enumerate(BASE.doc_ids):
        expected = _softmax(BASE.lls[i])[BASE.gold[i]]
        assert got[doc] == pytest.approx(expected, rel=1e-12)
    # acc_norm compares log-likelihoods per byte, as lm-eval does
    normed = per_document("probability", BASE, "acc_norm")
    scores = [ll / n for ll, n in zip(BASE.lls[1], BASE.choice_lengths[1], strict=True)]
    assert normed[11] == pytest.approx(_softmax(scores)[2], rel=1e-12)


def test_margin_is_gold_minus_the_best_wrong_choice():
    got = per_document("margin", BASE, "acc")
    assert got == pytest.approx({10: -1.0 - -2.0, 11: -2.0 - -4.0, 12: -3.0 - -0.5})
    normed = per_document("margin", BASE, "acc_norm")
    # document 11 per byte: [-4, -5, -0.2]; gold 2; best wrong -4
    assert normed[11] == pytest.approx(-0.2 - -4.0)


def test_kl_is_zero_for_the_base_and_matches_a_direct_sum():
    assert per_document("kl", BASE, "acc", reference=BASE) == pytest.approx(
        dict.fromkeys(BASE.doc_ids, 0.0), abs=1e-12
    )
    got = per_document("kl", CANDIDATE, "acc", reference=BASE)
    for i, doc in enumerate(BASE.doc_ids):
        p, q = _softmax(BASE.lls[i]), _softmax(CANDIDATE.lls[i])
        expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        assert got[doc] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert got[12] == pytest.approx(0.0, abs=1e-12)  # unchanged document


def test_single_continuation_documents_use_the_continuation_itself():
    one = DocOutcomes([0], {"acc": [1.0]}, [[math.log(0.25)]], [None], [[3]])
    assert per_document("probability", one, "acc") == pytest.approx({0: 0.25})
    assert per_document("margin", one, "acc") == pytest.approx({0: math.log(0.25)})
    other = DocOutcomes([0], {"acc": [0.0]}, [[math.log(0.5)]], [None], [[3]])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert per_document("kl", other, "acc", reference=one) == pytest.approx({0: kl})


def test_contributions_are_base_minus_candidate():
    assert contributions("correct", BASE, CANDIDATE, "acc") == {10: 1.0, 11: 0.0, 12: 0.0}
    base = per_document("probability", BASE, "acc")
    cand = per_document("probability", CANDIDATE, "acc")
    got = contributions("probability", BASE, CANDIDATE, "acc")
    assert got == pytest.approx({d: base[d] - cand[d] for d in base})


def _score(outcomes: DocOutcomes, task: str = "t") -> TaskScore:
    values = outcomes.values["acc"]
    return TaskScore(task, "acc", sum(values) / len(values), 0.3, len(values), True, outcomes)


def test_accuracy_drop_is_paired_and_keeps_the_task_score_difference():
    kept: dict = {}
    score = accuracy_drop(4, {"t": _score(BASE)}, {"t": _score(CANDIDATE)}, keep=kept)
    assert score.score == pytest.approx(1 / 3)  # = base score 2/3 minus candidate 1/3
    # paired standard error of the differences (1, 0, 0): sd = sqrt(1/3), / sqrt(3) = 1/3
    assert score.stderr == pytest.approx(1 / 3)
    lo, hi = score.ci95
    assert lo <= score.score <= hi
    assert kept[4] == {"t": {10: 1.0, 11: 0.0, 12: 0.0}}


def test_paired_comparison_and_the_verdict():
    base = {"t": _score(BASE)}
    finals = {"a": {"t": _score(BASE)}, "b": {"t": _score(CANDIDATE)}}
    paired = paired_comparison(base, finals)
    assert paired["a"]["vs_base"]["diff"] == 0.0
    assert paired["b"]["vs_base"]["diff"] == pytest.approx(-1 / 3)
    assert paired["a"]["vs"]["b"]["diff"] == pytest.approx(1 / 3)
    # three documents, one differing: the interval reaches zero, so no winner is named
    best, text = verdict({"a": 2 / 3, "b": 1 / 3}, paired)
    assert best is None and "not distinguishable" in text and "3 documents" in text
    # a clear, consistent difference is a verdict
    clear = {"a": {"vs": {"b": {"diff": 0.1, "ci95": [0.05, 0.15], "documents": 400}}}}
    best, text = verdict({"a": 0.6, "b": 0.5}, clear)
    assert best == "a" and "+0.1000 over b" in text
