"""Models larger than one device: `--device-map` / `--max-memory` load through accelerate.

On this CPU-only machine a device map places everything on the CPU, or offloads blocks to
disk (read back from the safetensors files): both must rank and drop exactly like a plain
load. A model dispatched over several devices is refused by the fast engine, so the
"auto" engine falls back to lm-eval with one line.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from prune.cli import cli
from prune.errors import FastEngineUnsupported, PruneError
from prune.sizes import parse_max_memory

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(f"{i}: {TEXT}" for i in range(6)) + "\n")
    return path


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_max_memory_takes_gpu_indices_cpu_and_disk():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {
        0: 20 * 2**30,
        1: 20 * 2**30,
        "cpu": 64 * 2**30,
    }
    # A recipe's YAML mapping (keys arrive as text) and `cuda:N` spellings.
    assert parse_max_memory({"0": "1GB", "disk": 5000, "cuda:1": "2GB"}) == {
        0: 10**9,
        "disk": 5000,
        1: 2 * 10**9,
    }


@pytest.mark.parametrize(
    "bad, named",
    [("gpu0=20GiB", "gpu0=20GiB"), ("cpu", "cpu"), ("0=lots", "0=lots"), ("0=1GB,", "''")],
)
def test_a_bad_max_memory_is_one_error_line_naming_it_and_the_accepted_form(
    bad, named, tiny_llama_dir
):
    for command in (["rank", str(tiny_llama_dir)], ["info", str(tiny_llama_dir)]):
        result = CliRunner().invoke(cli, [*command, "--max-memory", bad])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: --max-memory: bad entry"), lines
        assert named in lines[0] and "0=20GiB,1=20GiB,cpu=64GiB" in lines[0]


def test_device_and_device_map_together_are_one_error_line(tiny_llama_dir, tmp_path):
    for args in (
        ["info", str(tiny_llama_dir), "--device", "cpu", "--device-map", "auto"],
        ["drop", str(tiny_llama_dir), "-l", "1", "-o", str(tmp_path / "o"), "--device", "cpu",
         "--max-memory", "cpu=1GiB"],
    ):  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        assert result.output.startswith("Error: --device cpu and --device-map auto both say")
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_rank_cosine_with_a_device_map_matches_a_plain_load(tiny_llama_dir, calibration):
    common = ["rank", str(tiny_llama_dir), "-m", "cosine", "--calibration", str(calibration)]
    common += ["--no-cache", "--json", "--samples", "6", "--seq-len", "32"]
    plain = CliRunner().invoke(cli, ["-q", *common])
    mapped = CliRunner().invoke(
        cli, ["-q", *common, "--device-map", "sequential", "--max-memory", "cpu=1GiB"]
    )
    assert plain.exit_code == 0 and mapped.exit_code == 0, plain.output + mapped.output
    scores = [[row["cosine"] for row in json.loads(r.output)["layers"]] for r in (plain, mapped)]
    assert len(scores[0]) == 4 and scores[0] == pytest.approx(scores[1], rel=1e-6)


def test_drop_of_a_device_mapped_model_writes_the_same_weights(
    tiny_llama_dir, tmp_path, monkeypatch
):
    import prune.streaming

    streamed = CliRunner().invoke(
        cli, ["-q", "drop", str(tiny_llama_dir), "-l", "1,2", "-o", str(tmp_path / "streamed")]
    )
    # The in-memory path is the one that loads, so the device map applies there.
    monkeypatch.setattr(prune.streaming, "stream_drop_source", lambda *a, **k: None)
    mapped = CliRunner().invoke(
        cli,
        ["-q", "drop", str(tiny_llama_dir), "-l", "1,2", "-o", str(tmp_path / "mapped"),
         "--device-map", "auto", "--max-memory", "cpu=1GiB"],
    )  # fmt: skip
    assert streamed.exit_code == 0 and mapped.exit_code == 0, streamed.output + mapped.output
    want, got = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "mapped")
    assert sorted(want) == sorted(got) and "model.layers.2.mlp.up_proj.weight" not in got
    assert all(torch.equal(want[k], got[k]) for k in want)
    record = json.loads((tmp_path / "mapped" / "prune.json").read_text())
    assert record["removed_layers"] == [1, 2] and record["num_layers_after"] == 2


def test_disk_offload_ranks_and_drops_like_a_plain_load(tiny_llama_dir):
    from prune.measures.cosine import cosine_relevance
    from prune.models import input_device, load_model
    from prune.surgery import drop_layers

    plain = load_model(str(tiny_llama_dir), device="cpu")
    # Too little CPU memory for the blocks: accelerate offloads them to disk.
    offloaded = load_model(str(tiny_llama_dir), max_memory={"cpu": 20_000, "disk": "1GB"})
    placed = set(offloaded.model.hf_device_map.values())
    assert "disk" in placed, offloaded.model.hf_device_map
    assert input_device(offloaded.model) == torch.device("cpu")
    texts = [f"{i}: {TEXT}" for i in range(3)]
    want = cosine_relevance(plain.model, plain.tokenizer, texts, seq_len=32)
    got = cosine_relevance(offloaded.model, offloaded.tokenizer, texts, seq_len=32)
    assert [s.score for s in got.scores] == pytest.approx([s.score for s in want.scores], rel=1e-5)
    with pytest.raises(FastEngineUnsupported, match="dispatched across devices"):
        from prune.evaluate.engine import FastEngine

        FastEngine(offloaded.model)
    # Surgery keeps working with accelerate's hooks on the remaining blocks.
    ids = torch.tensor([[5, 9, 33, 70, 71, 2]])
    for loaded in (plain, offloaded):
        drop_layers(loaded.model, [1, 2])
    with torch.no_grad():
        assert torch.allclose(
            plain.model(ids).logits, offloaded.model(ids).logits, rtol=1e-5, atol=1e-6
        )


def test_fast_engine_refuses_a_model_over_two_devices_and_auto_falls_back(caplog):
    from tiny import tiny_model

    from prune.evaluate.engine import FastEngine
    from prune.evaluate.removals import with_fallback

    model = tiny_model("llama", 2)
    FastEngine(model)  # one device: fine
    model.hf_device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "meta",
    }
    with pytest.raises(FastEngineUnsupported, match=r"dispatched across devices .*\(cpu, meta\)"):
        FastEngine(model)
    engines = []

    def call(engine):
        engines.append(engine)
        if engine == "fast":
            FastEngine(model)
        return "scored"

    # (`prune -q` in an earlier test may have raised the "prune" logger's level.)
    with caplog.at_level(logging.WARNING, logger="prune.evaluate.removals"):
        assert with_fallback(call) == "scored"
    assert engines == ["fast", "lm-eval"]
    assert (
        "dispatched across devices by its device map (cpu, meta): falling back to the lm-eval engine"
        in caplog.text
    )


def test_recipes_take_device_map_and_max_memory():
    from prune.recipe import RecipeError, apply_overrides, parse_recipe

    base = "model: m\nprune: {remove: 1}\n"
    recipe = parse_recipe(base + "device_map: balanced\nmax_memory: {0: 20GiB, cpu: 64GiB}\n")
    assert recipe.device_map == "balanced" and recipe.max_memory == {"0": "20GiB", "cpu": "64GiB"}
    with pytest.raises(RecipeError) as info:
        parse_recipe(base + "device: cuda\ndevice_map: everywhere\nmax_memory: {gpu: 1GB}\n")
    problems = info.value.problems
    assert any(p.startswith("device_map: must be one of auto, balanced") for p in problems)
    assert any(p.startswith("max_memory: bad entry 'gpu: 1GB'") for p in problems)
    assert any(p.startswith("device: 'cuda' contradicts device_map") for p in problems)
    # `prune run --device-map` replaces the recipe's device; keys become text (JSON-safe).
    with_device = parse_recipe(base + "device: cuda\n")
    new, applied = apply_overrides(with_device, device_map="auto", max_memory={0: 10**9})
    assert (new.device, new.device_map, new.max_memory) == ("auto", "auto", {"0": 10**9})
    assert json.dumps(applied, sort_keys=True)
    with pytest.raises(PruneError, match="--device-map: must be one of"):
        apply_overrides(with_device, device_map="everywhere")
