"""Write a pruned model as a plain transformers checkpoint folder, atomically.

The folder holds `config.json`, `model.safetensors` (sharded above
`max_shard_size`), `generation_config.json`, tokenizer files and `prune.json`.
Each safetensors file's metadata also records the removed layers and the
source, written in the same pass as the tensors (never a second copy of a
shard). Everything is written into a temporary sibling folder that is renamed
into place at the end (`prune.atomic.atomic_folder`), so an interrupted export
never leaves a half-written folder behind, and the temporaries of an export that
was killed outright are removed before the next one to the same place.

prune.json keeps the chain when an already pruned folder is pruned again:
`removed_layers`, `num_layers_before` and `source` describe this prune (indices of
the model it loaded), while `removed_layers_original` (every block removed so far,
in the original model's numbering), `num_layers_original` and `original_source`
(the model the first prune loaded) describe the whole chain, and `chain` lists the
earlier prune.json records, oldest first (each without its own `chain`). For a
first prune these equal `removed_layers`, `num_layers_before` and `source`, and
`chain` is empty. The source's license carries over through `source.license`
(see `prune.models.resolve_source`).

Two dtypes are recorded, because they can differ: `export_dtype` is what the tensors on
disk are, `compute_dtype` the dtype the model was loaded and evaluated in (`prune run`,
healing), or null when nothing was computed (`prune drop` only moves tensors).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prune import __version__
from prune.atomic import atomic_folder, sweep_temporaries, write_error
from prune.defaults import DEFAULT_SHARD_SIZE
from prune.errors import PruneError
from prune.models import LoadedModel, ModelSource, pruned_record
from prune.sizes import parse_size
from prune.surgery import count_layers, locate_layers

PRUNE_JSON = "prune.json"

log = logging.getLogger(__name__)

# Extra files of an export: a mapping, or a function of the prune.json record giving one
# (the card of a drop describes the record).
ExtraFiles = Mapping[str, str | bytes] | Callable[[Mapping[str, Any]], Mapping[str, str | bytes]]


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder (unless overwriting) or an unwritable place, before any work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PruneError(f"output '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PruneError(
            f"output folder '{out}' exists and is not empty (pass --overwrite to replace it)"
        )
    # The temp folder is created beside `out`: the nearest existing ancestor must be a writable folder.
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PruneError(f"cannot write output folder '{out}': '{parent}' is not a writable folder")


@contextmanager
def _safetensors_metadata(ours: dict[str, str]) -> Iterator[None]:
    """Make `save_pretrained` write `ours` into every safetensors file it saves, beside
    its own ("format": "pt"), in the same pass as the tensors.

    transformers has no argument for it: its `safe_save_file` (safetensors' `save_file`,
    looked up at call time) is wrapped for the duration of the block.
    """
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_save_file

    def save_with_metadata(tensors, filename, metadata=None):
        return original(tensors, filename, metadata={**(metadata or {}), **ours})

    modeling_utils.safe_save_file = save_with_metadata
    try:
        yield
    finally:
        modeling_utils.safe_save_file = original


def _tensor_metadata(record: Mapping[str, Any]) -> dict[str, str]:
    """What every safetensors file records about the pruning (a subset of prune.json)."""
    return {
        "prune.removed_layers": json.dumps(record["removed_layers"]),
        "prune.source": json.dumps(
            {k: record["source"][k] for k in ("spec", "hub_id", "revision", "sha256")}
        ),
        "prune.version": __version__,
    }


def _write_record(folder: Path, record: Mapping[str, Any]) -> None:
    """Write prune.json (after the weights and the tokenizer)."""
    (folder / PRUNE_JSON).write_text(json.dumps(record, indent=2) + "\n")


def dtype_name(dtype: Any) -> str | None:
    """The name prune.json records for a dtype: "bfloat16" for torch.bfloat16 or
    "torch.bfloat16"; None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def prune_record(
    loaded: LoadedModel,
    removed: list[int],
    layers_before: int,
    extra: Mapping[str, Any] | None,
    *,
    compute_dtype: Any = None,
) -> dict[str, Any]:
    """The provenance written to prune.json (see the module docstring for the chain and
    dtype fields); the export dtype is the loaded model's."""
    return build_record(
        loaded.source,
        removed,
        layers_before,
        count_layers(loaded.model),
        locate_layers(loaded.model).path,
        extra,
        export_dtype=loaded.model.dtype,
        compute_dtype=compute_dtype,
    )


def build_record(
    source: ModelSource,
    removed: list[int],
    layers_before: int,
    layers_after: int,
    layer_path: str,
    extra: Mapping[str, Any] | None,
    *,
    export_dtype: Any,
    compute_dtype: Any = None,
) -> dict[str, Any]:
    """prune.json from the source's description alone (no model needed: the streaming export).

    `export_dtype` is the dtype of the written tensors, `compute_dtype` the one the model
    was evaluated in (None: nothing was computed); torch dtypes or their names.
    """
    record: dict[str, Any] = {
        "prune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source.to_dict(),
        "removed_layers": list(removed),
        "num_layers_before": layers_before,
        "num_layers_after": layers_after,
        "layer_path": layer_path,
        **_chain(source, removed, layers_before),
        "export_dtype": dtype_name(export_dtype),
        "compute_dtype": dtype_name(compute_dtype),
    }
    if extra:
        record.update(extra)
    return record


def _chain(source: ModelSource, removed: list[int], layers_before: int) -> dict[str, Any]:
    """The chain fields of prune.json: this prune alone, or continuing the one that wrote the
    source folder's prune.json (its kept blocks, in original numbering, are this model's)."""
    first = {
        "removed_layers_original": sorted(removed),
        "num_layers_original": layers_before,
        "original_source": source.to_dict(),
        "chain": [],
    }
    earlier = pruned_record(Path(source.path)) if source.kind == "local" and source.path else None
    if earlier is None:
        return first
    gone = earlier.get("removed_layers_original", earlier.get("removed_layers"))
    depth = earlier.get("num_layers_original", earlier.get("num_layers_before"))
    valid = (
        isinstance(depth, int)
        and isinstance(gone, list)
        and all(isinstance(i, int) and 0 <= i < depth for i in gone)
    )
    kept = [i for i in range(depth) if i not in gone] if valid else []
    if len(kept) != layers_before:
        log.warning(
            "%s/%s does not describe this checkpoint (%s layers left; its weights hold %d): "
            "recording this prune without the earlier ones",
            source.path,
            PRUNE_JSON,
            len(kept) if valid else "unknown",
            layers_before,
        )
        return first
    original = earlier.get("original_source") or earlier.get("source") or first["original_source"]
    return {
        "removed_layers_original": sorted({*gone, *(kept[i] for i in removed)}),
        "num_layers_original": depth,
        "original_source": original,
        "chain": [
            *(prior if isinstance(prior := earlier.get("chain"), list) else []),
            {k: v for k, v in earlier.items() if k != "chain"},
        ],
    }


def export_checkpoint(
    loaded: LoadedModel,
    out: Path,
    removed: list[int],
    layers_before: int,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    extra: Mapping[str, Any] | None = None,
    files: ExtraFiles | None = None,
    compute_dtype: Any = None,
) -> Path:
    """Save the (already pruned) model in `loaded` to `out`; returns the folder.

    `removed` are the layer indices removed from the source model; `max_shard_size` is a
    size such as "2GB" or a byte count; `files` maps extra file names (e.g. README.md) to
    their contents. The tensors are written in the model's dtype (prune.json's
    `export_dtype`); `compute_dtype` is the dtype it was evaluated in, None when nothing
    was computed. An existing `out` is replaced only with `overwrite`; any OSError or
    SafetensorError (disk full, permissions) becomes one PruneError and leaves `out` as it
    was. Temporaries that a killed export left beside `out` are removed first.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    shard_bytes = parse_size(max_shard_size)  # transformers gets bytes, never the text
    sweep_temporaries(out)
    try:
        with atomic_folder(out, what="output folder") as tmp:
            _write_checkpoint(
                loaded, tmp, removed, layers_before, shard_bytes, extra, files, compute_dtype
            )
    except OSError as exc:  # the errors `atomic_folder` does not name (e.g. a name too long)
        error = write_error(exc, out, "output folder")
        if error is not None:
            raise error from exc
        raise PruneError(f"cannot write output folder '{out}': {exc.strerror or exc}") from exc
    return out


def _write_checkpoint(
    loaded: LoadedModel,
    folder: Path,
    removed: list[int],
    layers_before: int,
    shard_bytes: int,
    extra: Mapping[str, Any] | None,
    files: ExtraFiles | None,
    compute_dtype: Any,
) -> None:
    """Write every file of the checkpoint into `folder` (a private temporary one)."""
    record = prune_record(loaded, removed, layers_before, extra, compute_dtype=compute_dtype)
    with _safetensors_metadata(_tensor_metadata(record)):
        loaded.model.save_pretrained(folder, max_shard_size=shard_bytes)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    _write_record(folder, record)
    write_files(folder, files, record)


def write_files(
    folder: Path, files: ExtraFiles | None, record: Mapping[str, Any] | None = None
) -> None:
    """Write the extra files (README.md, a mergekit config, ...) into `folder`; a callable
    `files` is called with the prune.json `record` first."""
    if callable(files):
        files = files(record or {})
    for name, content in (files or {}).items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
