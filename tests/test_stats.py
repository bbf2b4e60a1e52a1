"""prune.stats: paired differences with exact stderr and bootstrap intervals; removal-set stability."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from prune.errors import PruneError
from prune.stats import Paired, Stability, paired_difference, removal_stability


def _as_docs(values) -> dict[int, float]:
    return {i: float(v) for i, v in enumerate(values)}


def _one_task(d: np.ndarray) -> tuple[dict, dict]:
    """Evaluations whose per-document differences are exactly `d` (B scores 0 everywhere)."""
    return {"t": _as_docs(d)}, {"t": _as_docs(np.zeros_like(d))}


# --- paired_difference: the point estimate and its analytic stderr ---------------------------


def test_hand_computed_two_tasks():
    # arc, 4 documents (ids deliberately sparse and listed in another order in B):
    #   a = 1 1 0 1, b = 0 1 0 0 -> d = 1 0 0 1, mean 1/2,
    #   squared deviations 4 x 1/4 = 1, sample variance 1/3, variance of the mean 1/12.
    # piqa, 3 documents:
    #   a = 1 0 1, b = 1 1 0 -> d = 0 -1 1, mean 0,
    #   squared deviations 0 + 1 + 1 = 2, sample variance 1, variance of the mean 1/3.
    # diff = (1/2 + 0) / 2 = 1/4
    # stderr = sqrt(1/12 + 1/3) / 2 = sqrt(5/12) / 2 = 0.645497... / 2 = 0.322749...
    a = {"arc": {10: 1, 11: 1, 30: 0, 42: 1}, "piqa": {0: 1, 1: 0, 2: 1}}
    b = {"arc": {42: 0, 30: 0, 11: 1, 10: 0}, "piqa": {2: 0, 1: 1, 0: 1}}
    result = paired_difference(a, b)
    assert result.diff == pytest.approx(0.25)
    assert result.stderr == pytest.approx(0.3227486, abs=1e-6)
    assert result.documents == 7
    lo, hi = result.ci95
    assert lo <= result.diff <= hi


def test_tasks_weigh_equally_not_documents():
    # one task of 1 document with d = 1 and one of 3 documents with d = 0:
    # equal task weights give (1 + 0) / 2 = 0.5; pooling documents would give 1/4.
    a = {"small": {0: 1.0}, "large": {0: 1.0, 1: 0.0, 2: 1.0}}
    b = {"small": {0: 0.0}, "large": {0: 1.0, 1: 0.0, 2: 1.0}}
    result = paired_difference(a, b)
    assert result.diff == pytest.approx(0.5)
    # the one-document task contributes 0 variance; the other's differences are all 0
    assert result.stderr == 0.0
    assert result.ci95 == (result.diff, result.diff)


def test_one_task_stderr_is_the_standard_error_of_the_mean():
    d = np.random.default_rng(3).normal(0.2, 1.0, 57)
    assert paired_difference(*_one_task(d)).stderr == pytest.approx(scipy_stats.sem(d))


def test_pairing_uses_the_per_document_differences():
    # A = B + 0.01 on every document, while both vary widely: the unpaired stderr would be
    # ~0.07, the paired one is 0 and the tiny difference is distinguishable.
    b_values = np.random.default_rng(0).uniform(0, 1, 200)
    a = {"t": _as_docs(b_values + 0.01)}
    b = {"t": _as_docs(b_values)}
    result = paired_difference(a, b)
    assert result.diff == pytest.approx(0.01)
    assert result.stderr == pytest.approx(0.0, abs=1e-12)
    assert result.distinguishable


def test_single_document_has_zero_stderr():
    result = paired_difference({"t": {5: 0.75}}, {"t": {5: 0.25}})
    assert result == Paired(0.5, 0.0, (0.5, 0.5), 1)


# --- the bootstrap interval -------------------------------------------------------------------


def test_identical_differences_give_a_degenerate_interval():
    same = paired_difference(*_one_task(np.full(50, 0.3)))
    assert same.ci95 == (same.diff, same.diff)
    assert same.diff == pytest.approx(0.3)
    assert same.distinguishable  # a constant, nonzero advantage
    zero = paired_difference({"t": _as_docs([1, 0, 1])}, {"t": _as_docs([1, 0, 1])})
    assert zero.ci95 == (0.0, 0.0)
    assert not zero.distinguishable


def test_bootstrap_is_seeded():
    d = np.random.default_rng(7).normal(0.05, 1.0, 300)
    first = paired_difference(*_one_task(d), seed=11)
    assert paired_difference(*_one_task(d), seed=11) == first
    other = paired_difference(*_one_task(d), seed=12)
    assert other.ci95 != first.ci95
    # Monte Carlo noise of a 2000-resample endpoint is ~0.06 stderr; allow 0.35 stderr.
    assert other.ci95 == pytest.approx(first.ci95, abs=0.35 * first.stderr)
    assert (other.diff, other.stderr) == (first.diff, first.stderr)


def test_bootstrap_agrees_with_scipy_for_one_task():
    d = np.random.default_rng(5).binomial(1, 0.55, 400) - np.random.default_rng(6).binomial(
        1, 0.5, 400
    )
    ours = paired_difference(*_one_task(d.astype(float)), seed=1, resamples=20_000)
    theirs = scipy_stats.bootstrap(
        (d,), np.mean, method="percentile", n_resamples=20_000, rng=np.random.default_rng(99)
    ).confidence_interval
    # different seeds, so agreement is distributional: endpoints within 0.1 stderr
    # (each endpoint's Monte Carlo noise at 20,000 resamples is ~0.02 stderr)
    assert ours.ci95[0] == pytest.approx(theirs.low, abs=0.1 * ours.stderr)
    assert ours.ci95[1] == pytest.approx(theirs.high, abs=0.1 * ours.stderr)


def test_bootstrap_width_matches_the_analytic_stderr():
    # two tasks, so the stratified bootstrap combines them; for a mean of many documents the
    # percentile interval is close to diff +- 1.96 stderr
    rng = np.random.default_rng(2)
    a = {"x": _as_docs(rng.normal(0.1, 1, 800)), "y": _as_docs(rng.normal(0, 2, 300))}
    b = {"x": _as_docs(np.zeros(800)), "y": _as_docs(np.zeros(300))}
    result = paired_difference(a, b, resamples=20_000)
    lo, hi = result.ci95
    assert hi - lo == pytest.approx(2 * 1.96 * result.stderr, rel=0.05)
    assert (lo + hi) / 2 == pytest.approx(result.diff, abs=0.1 * result.stderr)


def test_interval_covers_the_true_difference_most_of_the_time():
    # per-document difference d in {-1, 0, 1}: task "x" has P = (0.15, 0.60, 0.25), mean 0.10;
    # task "y" has P = (0.10, 0.80, 0.10), mean 0. True statistic: (0.10 + 0) / 2 = 0.05.
    def outcomes(rng, probs, n):
        d = rng.choice([-1, 0, 1], size=n, p=probs)
        tie = rng.integers(0, 2, n)  # when d = 0 both evaluations agree, on 0 or 1
        a = np.where(d == 0, tie, d == 1)
        b = np.where(d == 0, tie, d == -1)
        return _as_docs(a), _as_docs(b)

    covered = 0
    for sim in range(100):
        rng = np.random.default_rng(1000 + sim)
        ax, bx = outcomes(rng, [0.15, 0.60, 0.25], 200)
        ay, by = outcomes(rng, [0.10, 0.80, 0.10], 150)
        lo, hi = paired_difference({"x": ax, "y": ay}, {"x": bx, "y": by}, resamples=1000).ci95
        covered += lo <= 0.05 <= hi
    assert covered >= 90


def test_distinguishable_only_when_the_interval_excludes_zero():
    assert Paired(0.1, 0.01, (0.05, 0.15), 10).distinguishable
    assert Paired(-0.1, 0.01, (-0.15, -0.05), 10).distinguishable
    assert not Paired(0.1, 0.1, (-0.05, 0.25), 10).distinguishable
    assert not Paired(0.1, 0.05, (0.0, 0.2), 10).distinguishable


def test_to_dict_is_json_ready():
    result = paired_difference(*_one_task(np.random.default_rng(0).normal(size=30)))
    data = json.loads(json.dumps(result.to_dict()))
    assert data == {
        "diff": result.diff,
        "stderr": result.stderr,
        "ci95": list(result.ci95),
        "documents": 30,
    }


def test_thousand_documents_two_thousand_resamples_is_fast():
    d = np.random.default_rng(0).integers(-1, 2, 1000).astype(float)
    a, b = _one_task(d)
    start = time.perf_counter()
    paired_difference(a, b, resamples=2000)
    assert time.perf_counter() - start < 1.0


# --- paired_difference: refusing to compare what does not pair --------------------------------


def test_tasks_present_on_one_side_only_are_an_error():
    with pytest.raises(PruneError, match=r"only in A: \['piqa'\]; only in B: none"):
        paired_difference({"arc": {0: 1}, "piqa": {0: 1}}, {"arc": {0: 1}})


def test_documents_present_on_one_side_only_are_an_error():
    a = {"arc": {0: 1, 1: 0, 2: 1, 3: 1}}
    b = {"arc": {0: 1, 1: 0, 7: 1}}
    with pytest.raises(PruneError) as caught:
        paired_difference(a, b)
    message = str(caught.value)
    assert "task 'arc'" in message
    assert "3 documents differ" in message
    assert "2 only in A, 1 only in B" in message


def test_empty_inputs_and_bad_values_are_errors():
    with pytest.raises(PruneError, match="no tasks"):
        paired_difference({}, {})
    with pytest.raises(PruneError, match="task 'arc' has no documents"):
        paired_difference({"arc": {}}, {"arc": {}})
    with pytest.raises(PruneError, match="doc_id 1: the values are not finite"):
        paired_difference({"arc": {0: 1.0, 1: math.nan}}, {"arc": {0: 1.0, 1: 0.0}})
    with pytest.raises(PruneError, match="resamples must be a positive integer, got 0"):
        paired_difference({"arc": {0: 1.0}}, {"arc": {0: 0.0}}, resamples=0)


# --- removal_stability ---------------------------------------------------------------------------


def _clear_signal(seed: int = 0) -> dict[str, np.ndarray]:
    """Six layers; layers 4 (mean 0.0) and 2 (mean 0.1) are far below the rest (mean 1.0)."""
    rng = np.random.default_rng(seed)
    means = np.array([1.0, 1.0, 0.1, 1.0, 0.0, 1.0])[:, None]
    return {
        "arc": means + rng.normal(0, 0.2, (6, 300)),
        "piqa": means + rng.normal(0, 0.2, (6, 200)),
    }


def test_clearly_least_relevant_layers_are_stable():
    result = removal_stability(_clear_signal(), 2)
    assert result.removal_set == [4, 2]
    assert result.probability[4] == pytest.approx(1.0)
    assert result.probability[2] == pytest.approx(1.0)
    assert max(result.probability[i] for i in (0, 1, 3, 5)) == pytest.approx(0.0)
    assert result.jaccard == pytest.approx(1.0)


def test_pure_noise_is_unstable():
    signal = {"t": np.random.default_rng(4).normal(size=(20, 100))}
    result = removal_stability(signal, 5, resamples=500)
    assert result.jaccard < 0.6
    assert sum(result.probability) == pytest.approx(5)  # every resample removes 5 layers
    assert sum(0 < p < 1 for p in result.probability) > 5


def test_exclude_is_honoured():
    result = removal_stability(_clear_signal(), 2, exclude=[4])
    assert 4 not in result.removal_set
    assert result.removal_set[0] == 2
    assert result.probability[4] == 0.0
    assert result.probability[2] == pytest.approx(1.0)
    # negative indices count from the end, as everywhere in prune
    assert removal_stability(_clear_signal(), 2, exclude=[-2]) == result


def test_tasks_weigh_equally_and_ties_go_to_the_lower_index():
    # layer 0: task a = 0, task b = 1, 1, 1 -> (0 + 1) / 2 = 0.5 (pooled: 3/4)
    # layer 1: task a = 1, task b = 0.4 x 3 -> (1 + 0.4) / 2 = 0.7 (pooled: 2.2/4 = 0.55)
    signal = {"a": np.array([[0.0], [1.0]]), "b": np.array([[1.0, 1, 1], [0.4, 0.4, 0.4]])}
    assert removal_stability(signal, 1).removal_set == [0]
    flat = {"t": np.ones((5, 40))}
    tied = removal_stability(flat, 3)
    assert tied.removal_set == [0, 1, 2]
    assert tied.probability == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_removal_stability_is_deterministic_for_a_seed():
    signal = {"t": np.random.default_rng(8).normal(size=(12, 80))}
    first = removal_stability(signal, 4, seed=3)
    assert removal_stability(signal, 4, seed=3) == first
    assert removal_stability(signal, 4, seed=4).probability != first.probability
    data = json.loads(json.dumps(first.to_dict()))
    assert data == {
        "probability": first.probability,
        "jaccard": first.jaccard,
        "removal_set": first.removal_set,
    }
    assert isinstance(first, Stability)


def test_removal_stability_rejects_bad_input():
    signal = _clear_signal()
    with pytest.raises(PruneError, match="k must be between 1 and 5"):
        removal_stability(signal, 6, exclude=[0])
    with pytest.raises(PruneError, match="k must be between 1 and 6"):
        removal_stability(signal, 0)
    with pytest.raises(PruneError, match="exclude index 6 is out of range for 6 layers"):
        removal_stability(signal, 1, exclude=[6])
    with pytest.raises(PruneError, match="disagree on the number of layers"):
        removal_stability({"a": np.zeros((6, 3)), "b": np.zeros((5, 3))}, 1)
    with pytest.raises(PruneError, match=r"task 'a'.*got shape \(6,\)"):
        removal_stability({"a": np.zeros(6)}, 1)
    with pytest.raises(PruneError, match="no tasks"):
        removal_stability({}, 1)


def test_removal_stability_on_realistic_sizes_is_fast():
    rng = np.random.default_rng(0)
    signal = {t: rng.integers(0, 2, (30, 400)).astype(float) for t in ("arc", "piqa")}
    start = time.perf_counter()
    removal_stability(signal, 8)
    assert time.perf_counter() - start < 1.0
