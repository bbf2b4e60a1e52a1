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
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
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


def _every_third_full(num_layers: int) -> list[str]:
    """Gemma 3 style: mostly sliding-window layers, every third one full attention."""
    return ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(num_layers)]


# Small token ids for every architecture (some defaults, e.g. Phi-3's pad 32000, exceed VOCAB).
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

_DECODER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)

# Per-architecture config overrides: sizes kept tiny, names as each config spells them.
# A callable value is called with the layer count (for per-layer lists).
CONFIGS: dict[str, dict] = {
    "llama": dict(_DECODER),
    "mistral": dict(_DECODER, sliding_window=4),
    "qwen2": dict(_DECODER),
    "qwen3": dict(_DECODER, head_dim=8),
    "gemma2": dict(_DECODER, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
    "gemma3_text": dict(
        _DECODER,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=8,
        layer_types=_every_third_full,
    ),
    "phi3": dict(_DECODER),
    "olmo2": dict(_DECODER),
    "gpt2": dict(n_embd=32, n_head=4, n_inner=64, n_positions=64),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=64
    ),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "falcon": dict(hidden_size=32, num_attention_heads=4),
}


def tiny_config(model_type: str, num_layers: int = 4, **overrides):
    """The config of a tiny `model_type` model with `num_layers` blocks."""
    kwargs = {
        "vocab_size": VOCAB,
        "num_hidden_layers": num_layers,
        **TOKEN_IDS,
        **CONFIGS[model_type],
        **overrides,
    }
    kwargs = {k: v(num_layers) if callable(v) else v for k, v in kwargs.items()}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", num_layers: int = 4, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in float32, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, **overrides))
    return model.eval()


def save_tiny_checkpoint(
    folder, model_type: str = "llama", num_layers: int = 4, seed: int = 0, **overrides
):
    """Write a tiny model and the byte tokenizer to `folder` (usable as a MODEL argument)."""
    model = tiny_model(model_type, num_layers, seed, **overrides)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
