"""Layer surgery on tiny models: index validation, exact restore, no weight copies, clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from prune.errors import PruneError
from prune.surgery import (
    count_layers,
    drop_layers,
    layers_removed,
    locate_layers,
    normalize_indices,
    parse_layer_list,
    restore_layers,
)

IDS = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _layer_idx_map(model) -> dict[int, int]:
    """id(module) -> layer_idx for every module that has one."""
    return {
        id(m): m.layer_idx
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
    }


def _storage_bytes(model) -> int:
    """Bytes of distinct parameter storages (tied weights counted once)."""
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    return sum(storages.values())


# --- index validation -------------------------------------------------------------


def test_negative_indices_count_from_the_end():
    assert normalize_indices([-1, 0, -3], 6) == [0, 3, 5]


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([3, -1], "layer 3 is given twice (as 3 and -1)"),
        ([2, 2], "layer 2 is given twice (as 2 and 2)"),
        (
            [4],
            "layer index 4 is out of range: the model has 4 layers (accepted: 0..3, or -4..-1 from the end)",
        ),
        ([-5], "layer index -5 is out of range"),
        ([0, 1, 2, 3], "cannot remove all 4 layers: at least one must remain (remove at most 3)"),
        ([0, 1, -2, -1], "cannot remove all 4 layers"),
        (["1"], "layer index '1' is not an integer"),
        ([True], "layer index True is not an integer"),
    ],
)
def test_bad_indices_are_refused(indices, message):
    with pytest.raises(PruneError) as info:
        normalize_indices(indices, 4)
    assert message in str(info.value)


def test_drop_layers_refuses_bad_indices_without_touching_the_model():
    model = tiny_model("llama", 4)
    before = locate_layers(model).layers
    for bad in ([9], [1, -3], [0, 1, 2, 3]):
        with pytest.raises(PruneError):
            drop_layers(model, bad)
    assert locate_layers(model).layers is before
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", [3]),
        ("3,7,12", [3, 7, 12]),
        (" 1 , 2 ", [1, 2]),
        ("20-23", [20, 21, 22, 23]),
        ("5-5", [5]),
        ("1,4-6,-1", [1, 4, 5, 6, -1]),
        ("-3--1", [-3, -2, -1]),
        ("-2", [-2]),
    ],
)
def test_parse_layer_list(text, expected):
    assert parse_layer_list(text) == expected


@pytest.mark.parametrize(
    "text", ["", "a,b", "1,,2", "1,", "5-3", "1-", "x-3", "1.5", "1-2-3", "--1"]
)
def test_parse_layer_list_rejects_bad_text(text):
    with pytest.raises(PruneError) as info:
        parse_layer_list(text)
    assert f"bad --layers value {text!r}" in str(info.value)
    assert "e.g. 3,7,12" in str(info.value)


# --- drop / restore ---------------------------------------------------------------


def test_drop_layers_keeps_the_remaining_blocks_in_order():
    model = tiny_model("llama", 6)
    blocks = list(locate_layers(model).layers)
    removal = drop_layers(model, [-1, 2])
    assert removal.removed == [2, 5]
    assert list(locate_layers(model).layers) == [blocks[i] for i in (0, 1, 3, 4)]
    assert count_layers(model) == model.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in locate_layers(model).layers] == [0, 1, 2, 3]


def test_gpt2_layer_count_alias_follows():
    model = tiny_model("gpt2", 5)
    drop_layers(model, [0, 4])
    assert model.config.num_hidden_layers == model.config.n_layer == 3
    assert model.config.to_dict()["n_layer"] == 3


def test_gemma3_layer_types_are_sliced_and_restored():
    model = tiny_model("gemma3_text", 6)
    types = list(model.config.layer_types)
    assert types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    with layers_removed(model, [2, 3]) as removed:
        assert removed == [2, 3]
        assert model.config.layer_types == [types[i] for i in (0, 1, 4, 5)]
        # Each kept block still describes itself the way the config does.
        for block, kind in zip(locate_layers(model).layers, model.config.layer_types, strict=True):
            assert block.self_attn.layer_type == kind
    assert list(model.config.layer_types) == types


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "falcon"])
def test_layers_removed_restores_exactly(model_type):
    model = tiny_model(model_type, 5)
    stack = locate_layers(model)
    blocks = list(stack.layers)
    config = copy.deepcopy(model.config.to_dict())
    layer_idx = _layer_idx_map(model)
    logits = _logits(model)

    with layers_removed(model, [1, -1]):
        assert count_layers(model) == 3
        assert not torch.equal(_logits(model), logits)
    assert locate_layers(model).layers is stack.layers
    assert list(locate_layers(model).layers) == blocks
    assert model.config.to_dict() == config
    assert _layer_idx_map(model) == layer_idx
    assert torch.equal(_logits(model), logits)


def test_layers_removed_restores_after_an_exception():
    model = tiny_model("llama", 4)
    logits = _logits(model)
    with pytest.raises(ZeroDivisionError), layers_removed(model, [0]):
        1 / 0  # noqa: B018
    assert count_layers(model) == 4
    assert torch.equal(_logits(model), logits)


def test_nested_removals_unwind():
    model = tiny_model("llama", 5)
    logits = _logits(model)
    with layers_removed(model, [1]), layers_removed(model, [0, -1]):
        assert count_layers(model) == 2
        assert model.config.num_hidden_layers == 2
    assert count_layers(model) == 5
    assert torch.equal(_logits(model), logits)


def test_restore_refuses_a_model_changed_meanwhile():
    model = tiny_model("llama", 5)
    first = drop_layers(model, [0])
    drop_layers(model, [0])
    with pytest.raises(PruneError, match="model changed since layers were removed"):
        restore_layers(model, first)


def test_no_weight_copies():
    model = tiny_model("llama", 6)
    stack = locate_layers(model)
    kept = [0, 2, 3, 5]
    pointers = {
        (i, name): p.data_ptr() for i in kept for name, p in stack.layers[i].named_parameters()
    }
    embed_ptr = model.get_input_embeddings().weight.data_ptr()
    before = _storage_bytes(model)
    block_bytes = sum(p.numel() * p.element_size() for p in stack.layers[1].parameters())

    drop_layers(model, [1, 4])

    after_stack = locate_layers(model)
    for new, orig in enumerate(kept):
        for name, p in after_stack.layers[new].named_parameters():
            assert p.data_ptr() == pointers[(orig, name)], (orig, name)
    assert model.get_input_embeddings().weight.data_ptr() == embed_ptr
    assert _storage_bytes(model) == before - 2 * block_bytes


# --- unsupported models -----------------------------------------------------------


class _PlainBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (
            lambda: T5ForConditionalGeneration(
                T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
            ),
            "'t5'",
        ),
        (_PlainBlocks, "'_PlainBlocks'"),
        (lambda: nn.Linear(4, 4), "'Linear'"),
    ],
    ids=["t5", "plain-module", "linear"],
)
def test_unsupported_models_are_refused_with_the_supported_list(make, named):
    model = make()
    for action in (locate_layers, count_layers, lambda m: drop_layers(m, [0])):
        with pytest.raises(PruneError) as info:
            action(model)
        message = str(info.value)
        assert message.startswith("unsupported")
        assert named in message
        for supported in ("llama", "gemma3_text", "gpt2", "falcon", "opt", "gpt_neox"):
            assert supported in message


def test_index_dependent_blocks_are_refused():
    model = tiny_model("gpt2", 4, scale_attn_by_inverse_layer_idx=True)
    blocks = locate_layers(model).layers
    with pytest.raises(PruneError) as info:
        drop_layers(model, [1])
    assert "scale_attn_by_inverse_layer_idx=True" in str(info.value)
    assert locate_layers(model).layers is blocks and model.config.n_layer == 4
    # Off by default, and harmless settings pass.
    assert drop_layers(tiny_model("gpt2", 4), [1]).removed == [1]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, None),
        ({"scale_attn_by_inverse_layer_idx": False}, None),
        ({"decoder_sparse_step": 1}, None),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ],
)
def test_index_dependent_setting(settings, expected):
    from types import SimpleNamespace

    from prune.architectures import index_dependent_setting

    assert index_dependent_setting(SimpleNamespace(**settings)) == expected
