"""`prune drop`: remove blocks from a checkpoint and write the result.

A local folder, a GGUF file's cached conversion or a Hub id (its snapshot in the Hugging
Face cache, weights fetched as safetensors only) with safetensors weights is pruned on
disk, tensor by tensor (`prune.streaming`); anything else is loaded, pruned in memory and
written by `prune.export`. Both write the drop's model card and mergekit config
(`prune.drop_card`). This module sits above both writers, so neither imports the other.

Either way prune.json's `compute_dtype` is null: a drop runs no forward pass, so only
`export_dtype` (the tensors on disk) describes the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prune.defaults import DEFAULT_SHARD_SIZE
from prune.export import PRUNE_JSON, ExtraFiles, check_output_dir, export_checkpoint
from prune.sizes import parse_size
from prune.surgery import count_layers


def drop_and_export(
    spec: str,
    layers: list[int],
    out: Path,
    *,
    dtype: str = "auto",
    export_dtype: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    files: ExtraFiles | None = None,
    device_map: Any = None,
    max_memory: Any = None,
) -> dict[str, Any]:
    """`prune drop`: remove `layers` and export; returns the prune.json record. `files`
    defaults to the drop's model card and mergekit config (`prune.drop_card.drop_files`).

    A local folder, a GGUF file's cached conversion or a Hub id with safetensors weights
    is pruned on disk, tensor by tensor (`prune.streaming`); anything else is loaded,
    pruned in memory and exported (`device_map`/`max_memory` place that load, see
    `prune.models.load_model`).
    The export dtype is `export_dtype`, else an explicit `dtype` (drop computes
    nothing: its `--dtype` has always been the saved dtype), else the source checkpoint's.
    """
    from prune.drop_card import drop_files
    from prune.models import check_placement, load_model, pick_device
    from prune.streaming import source_dtype, stream_drop_source

    if files is None:
        files = drop_files
    from prune.surgery import drop_layers

    out = Path(out)
    check_output_dir(out, overwrite)  # before the (slow) load
    parse_size(max_shard_size)
    pick_device(device)  # an unusable --device is refused even when nothing is loaded
    check_placement(device, device_map, max_memory)  # so are contradicting placements
    wanted = export_dtype if export_dtype != "auto" else dtype
    record = stream_drop_source(
        spec,
        layers,
        out,
        export_dtype=None if wanted == "auto" else wanted,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        files=files,
    )
    if record is not None:
        return record
    loaded = load_model(
        spec, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory
    )
    before = count_layers(loaded.model)
    removal = drop_layers(loaded.model, layers)
    target = wanted if wanted != "auto" else source_dtype(loaded)
    if target is not None:
        import torch

        loaded.model.to(getattr(torch, target))  # floating tensors only
    export_checkpoint(
        loaded,
        out,
        removal.removed,
        before,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        files=files,
    )
    return json.loads((out / PRUNE_JSON).read_text())
