"""Gold-probability drop: how much less likely the model makes the right answer without the block.

Per document, the probability the model gives the gold choice (a softmax over the
choices' log-likelihoods, per character for acc_norm tasks), i.e. its expected accuracy
when it samples an answer; a block's score is the mean drop over documents and
tasks. It comes from the same forward passes as the accuracy drop, but moves on
every document instead of only on those whose answer flips, so it needs fewer
documents for a stable ranking.
"""

from __future__ import annotations

from prune.measures.accuracy import family_ranker
from prune.measures.base import Measure

MEASURE = Measure(
    name="probability",
    label="gold-probability drop",
    column="probability_drop",
    description="the drop in the probability of the right answer when the block is removed "
    "(expected accuracy, measured)",
    ranker=family_ranker("probability", "probability"),
    needs_tasks=True,
    per_layer=True,
    adaptive=True,
    documents_column="probability_documents",
    per_task_column="per_task_probability_drop",
    color="tab:orange",
    order=50,
)
