"""Per-document signals of the accuracy family, computed from an evaluation's `DocOutcomes`.

Removing a block changes, for every document, whether the model picks the gold
choice (`correct`, what acc counts), but most documents do not flip: the 0/1
signal is noisy at a few hundred documents. The same forward passes give softer
signals at no extra model cost, read from the log-likelihood of every choice:

- `probability`: the probability the model gives the gold choice, a softmax over
  the choices' log-likelihoods (per character of the choice when the task metric is acc_norm,
  as lm-eval normalises): the expected accuracy of sampling an answer.
- `margin`: the gold choice's (normalised) log-likelihood minus the best wrong one's;
  positive when the model is right, and by how much.
- `kl`: how far a candidate's decisions move from the base model's: the KL
  divergence KL(base || candidate) between the two choice distributions (no gold
  needed).

Documents with a single continuation (next-word tasks such as LAMBADA) have no
choices to compare: `probability` is the probability of the continuation
(exp(ll)), `margin` its log-likelihood, and `kl` the KL divergence between the two
Bernoulli distributions (continuation, anything else).

Not a measure (the leading underscore keeps it out of the registry).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SIGNALS = ("correct", "probability", "margin", "kl")


def _scores(lls: list[float], choice_lengths: list[int], metric: str) -> np.ndarray:
    """Choice scores as lm-eval compares them: log-likelihoods, per character for acc_norm.
    (Requests after the choices, such as acc_mutual_info's unconditional ones, are ignored.)"""
    values = np.asarray(lls[: len(choice_lengths)], dtype=np.float64)
    if metric == "acc_norm":
        values = values / np.maximum(np.asarray(choice_lengths, dtype=np.float64), 1.0)
    return values


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def _bernoulli(ll: float) -> np.ndarray:
    """(log p, log (1 - p)) of a single continuation with log-likelihood `ll`."""
    p = min(float(np.exp(ll)), 1.0 - 1e-12)
    return np.log(np.asarray([max(p, 1e-300), 1.0 - p]))


def _distribution(lls: list[float], choice_lengths: list[int], metric: str) -> np.ndarray:
    """Log-probabilities the model gives the choices (or the Bernoulli of a single one)."""
    if len(lls) == 1:
        return _bernoulli(lls[0])
    return _log_softmax(_scores(lls, choice_lengths, metric))


def per_document(
    signal: str, outcomes: Any, metric: str, reference: Any | None = None
) -> dict[int, float]:
    """doc_id -> the `signal` of each document of `outcomes` (a `DocOutcomes`).

    `metric` is the task's metric (acc or acc_norm: which scores are compared);
    `reference` is the base model's outcomes, needed by `kl` only.
    """
    if signal == "correct":
        return outcomes.metric(metric)
    if signal == "kl":
        if reference is None:
            raise ValueError("the kl signal needs the base model's outcomes")
        base = dict(zip(reference.doc_ids, range(len(reference.doc_ids)), strict=True))
        out = {}
        for i, doc in enumerate(outcomes.doc_ids):
            j = base[doc]
            p = _distribution(reference.lls[j], reference.choice_lengths[j], metric)
            q = _distribution(outcomes.lls[i], outcomes.choice_lengths[i], metric)
            out[doc] = float(np.sum(np.exp(p) * (p - q)))
        return out
    try:
        one = _PER_DOCUMENT[signal]
    except KeyError:
        raise ValueError(f"unknown signal '{signal}' (accepted: {', '.join(SIGNALS)})") from None
    return {
        doc: one(outcomes.lls[i], outcomes.choice_lengths[i], outcomes.gold[i], metric)
        for i, doc in enumerate(outcomes.doc_ids)
    }


def _gold_probability(lls: list[float], lengths: list[int], gold: int | None, metric: str) -> float:
    """The probability the model gives the gold choice (or the single continuation)."""
    return float(np.exp(_distribution(lls, lengths, metric)[0 if gold is None else gold]))


def _gold_margin(lls: list[float], lengths: list[int], gold: int | None, metric: str) -> float:
    """The gold choice's score minus the best wrong one's (a single continuation's own score)."""
    scores = _scores(lls, lengths, "acc" if len(lls) == 1 else metric)
    if gold is None or len(scores) == 1:
        return float(scores[0])
    return float(scores[gold] - np.delete(scores, gold).max())


_PER_DOCUMENT = {"probability": _gold_probability, "margin": _gold_margin}


def contributions(signal: str, base: Any, candidate: Any, metric: str) -> dict[int, float]:
    """doc_id -> how much removing the candidate's blocks costs on each document: the base's
    signal minus the candidate's (`kl`: the divergence itself; 0 for the base model)."""
    if signal == "kl":
        return per_document("kl", candidate, metric, reference=base)
    before = per_document(signal, base, metric)
    after = per_document(signal, candidate, metric)
    return {doc: before[doc] - after[doc] for doc in before}
