"""Choice KL: how far the model's decisions move when the block is removed.

Per document, the KL divergence KL(base || without the block) between the two
distributions over the answer choices (softmax of the choices' log-likelihoods,
per character for acc_norm tasks); a block's score is the mean over documents and
tasks. It needs no gold answer: it asks whether removing the block changes what
the model would answer, right or wrong. Same forward passes as the accuracy drop.
"""

from __future__ import annotations

from prune.measures.accuracy import family_ranker
from prune.measures.base import Measure

MEASURE = Measure(
    name="kl",
    label="choice KL",
    column="choice_kl",
    description="the KL divergence of its answer-choice distribution from the full model's "
    "when the block is removed (measured)",
    ranker=family_ranker("kl", "kl"),
    needs_tasks=True,
    per_layer=True,
    adaptive=True,
    documents_column="kl_documents",
    per_task_column="per_task_kl",
    color="tab:brown",
    order=52,
)
