"""prune: remove whole transformer blocks from Hugging Face causal language models.

Layers are ranked by cosine similarity of a block's input and output (ShortGPT's
block influence) or by the measured accuracy drop when the block is removed, then
removed greedily and exported as plain safetensors checkpoints.
"""

__version__ = "0.1.0"
