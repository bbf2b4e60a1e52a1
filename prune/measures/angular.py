"""Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers").

Score of the span i..i+n-1 (n = `block_size`, 1 by default): arccos(cos(h_in, h_out))/pi
between the input of block i and the output of block i+n-1, averaged over every
non-padding token of the calibration texts; 0 = the span leaves the hidden state's
direction unchanged, 1 = it reverses it. Same hooks and single forward pass as the
cosine measure (prune/measures/cosine.py), and the same order for one block
(arccos is monotone), on a scale that adds up meaningfully over spans.
"""

from __future__ import annotations

from prune.measures.base import Measure, Ranking, RankRequest
from prune.measures.cosine import rank_by_hooks


def rank(request: RankRequest) -> Ranking:
    """The angular distance across each span; `layers` is ignored: one pass scores every span."""
    return rank_by_hooks(request, angular=True)


MEASURE = Measure(
    name="angular",
    label="angular distance",
    column="angular",
    description="arccos(cos(input, output)) / pi across a span of blocks (Gromov et al.)",
    ranker=rank,
    needs_texts=True,
    color="tab:orange",
    order=40,
)
