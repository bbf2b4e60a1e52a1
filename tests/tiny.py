"""Tiny random models and a byte-level tokenizer for fast, offline tests.

`tiny_model("llama")` builds a model from a config object (hidden 32-64, a few
layers, vocab 256); nothing is downloaded. `byte_tokenizer()` maps each byte to
one token, so any text works with any tiny model.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 256


def _byte_chars() -> dict[int, str]:
    # The GPT-2 byte-to-printable-character table.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ids 0-255); byte 0 doubles as EOS and padding."""
    chars = _byte_chars()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[0], pad_token=chars[0])


# Per-architecture config overrides: sizes kept tiny, names as each config spells them.
CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
}


def tiny_config(model_type: str, num_layers: int = 4, **overrides):
    kwargs = {"vocab_size": VOCAB, "num_hidden_layers": num_layers, **CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", num_layers: int = 4, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in float32, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, **overrides))
    return model.eval()


def save_tiny_checkpoint(folder, model_type: str = "llama", num_layers: int = 4, seed: int = 0, **overrides):
    """Write a tiny model and the byte tokenizer to `folder` (usable as a MODEL argument)."""
    model = tiny_model(model_type, num_layers, seed, **overrides)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
