"""Margin drop: how much the right answer's lead over the best wrong one shrinks without the block.

Per document, the gold choice's log-likelihood (per character for acc_norm tasks) minus
the best wrong choice's: positive when the model is right, and by how much. A
block's score is the mean drop of that margin over documents and tasks. Same
forward passes as the accuracy drop; a continuous signal on every document.
"""

from __future__ import annotations

from prune.measures.accuracy import family_ranker
from prune.measures.base import Measure

MEASURE = Measure(
    name="margin",
    label="margin drop",
    column="margin_drop",
    description="the drop in the log-likelihood margin of the right answer over the best wrong "
    "one when the block is removed (measured)",
    ranker=family_ranker("margin", "margin"),
    needs_tasks=True,
    per_layer=True,
    adaptive=True,
    documents_column="margin_documents",
    per_task_column="per_task_margin_drop",
    color="tab:purple",
    order=51,
)
