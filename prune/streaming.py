"""Remove blocks from a safetensors checkpoint on disk, one tensor at a time.

`prune drop` on a big model should not need the model in memory: the kept blocks'
tensors are read one at a time (safetensors `safe_open`), renamed to consecutive
block indices and written into new shards as each fills, so the peak memory is
about one output shard (`--max-shard-size`), and the tensors are bit-identical in
the source dtype unless an export dtype is asked for. The config is retargeted by
the same function as in memory (`prune.surgery.drop_layers`, run on a model built
on the meta device, which holds no weights), and the checkpoint is checked as
strictly as `prune.models` checks a loaded one: the same missing, unexpected and
wrongly shaped tensors, depth mismatches and damaged files give the same errors.

A Hub id is streamed from a snapshot in the Hugging Face cache (`hub_checkpoint`):
first the small files (config, safetensors index, tokenizer, license), then only the
safetensors weights the index lists (or `model.safetensors`), never the other formats a
repo may also hold (.bin, .gguf, ONNX, original consolidated weights). HF_HUB_OFFLINE
reads the cache only; HF_ENDPOINT and the token are the client's.

What this module cannot read as plain tensors (weights in other formats, a Hub id
without safetensors or that cannot be reached, checkpoints that transformers converts
while loading, quantized ones) raises `NotStreamable`, and `stream_drop_source` then lets
the caller use the in-memory path, which reports a missing repo in its own words.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune import export
from prune.atomic import atomic_folder, sweep_temporaries, write_error
from prune.defaults import DEFAULT_SHARD_SIZE, EXPORT_DTYPES
from prune.errors import PruneError
from prune.export import PRUNE_JSON, ExtraFiles, build_record, check_output_dir, write_files
from prune.models import (
    TOKENIZER_FILES,
    ModelSource,
    _first_line,
    _natural,
    check_loading_info,
    resolve_source,
)
from prune.sizes import parse_size

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# safetensors' dtype names -> torch's, for the dtypes a checkpoint is streamed in.
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_FLOATING = ("float64", "float32", "bfloat16", "float16")
# Source files never copied: weights (rewritten here, or stale copies in another format), the
# files rewritten here, and the source's model card (it describes the source).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_REWRITTEN = frozenset({"config.json", PRUNE_JSON, "README.md"})
SMALL_FILE = 100 * 2**20  # larger non-weight files are not copied (they are not tokenizers)
# What a Hub snapshot is fetched with before its weights: the files `copy_small_files` would
# copy from a local folder, by name (a repo's other files may be gigabytes: .bin, .gguf, ONNX).
HUB_SMALL_FILES = (
    "config.json",
    "generation_config.json",
    INDEX,
    *TOKENIZER_FILES,
    "*.tiktoken",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE*",
    "LICENCE*",
    "NOTICE*",
    "USE_POLICY*",
)


class NotStreamable(PruneError):
    """The checkpoint cannot be pruned on disk (the reason is the message); load it instead."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the source checkpoint, known from its file's header."""

    name: str  # its key in the source file
    file: Path
    shape: tuple[int, ...]
    dtype: str  # torch's name, e.g. "bfloat16"

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass
class StreamPlan:
    """What `stream_drop` writes: the kept tensors under their new names, and the config."""

    source: ModelSource
    spec: str  # what the user typed, for messages
    folder: Path
    tensors: dict[str, TensorEntry]  # new name -> source tensor, in the model's order
    config: Any  # the retargeted transformers config
    model_class: str
    generation_config: Any | None  # written when the source folder has no generation_config.json
    removed: list[int]
    layers_before: int
    layer_path: str


def damaged(spec: str, file: Path | str, exc: BaseException) -> PruneError:
    """The error `prune.models` gives for an unreadable weights file."""
    return PruneError(
        f"cannot load model '{spec}': weights file {file} is damaged or truncated "
        f"({_first_line(exc)})"
    )


def read_headers(folder: Path, spec: str) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in `folder` (name, file, shape, dtype), from the headers
    only; NotStreamable without safetensors weights, PruneError on a damaged file."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: folder / file for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PruneError(
                f"cannot load model '{spec}': {index} is damaged ({_first_line(exc)})"
            ) from exc
    elif (folder / WEIGHTS).is_file():
        files = None
    else:
        raise NotStreamable(f"no {WEIGHTS} or {INDEX} in {folder}")
    entries: dict[str, TensorEntry] = {}
    for file in sorted(set(files.values())) if files else [folder / WEIGHTS]:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    found = fh.get_slice(name)
                    dtype = _DTYPES.get(found.get_dtype())
                    if dtype is None:
                        raise NotStreamable(f"tensor {name} has dtype {found.get_dtype()}")
                    entries[name] = TensorEntry(name, file, tuple(found.get_shape()), dtype)
        except PruneError:
            raise
        except Exception as exc:  # SafetensorError, OSError: either way the file is unusable
            raise damaged(spec, file, exc) from exc
    for name, file in (files or {}).items():
        if entries.get(name) is None or entries[name].file != file:
            raise damaged(spec, file, KeyError(f"{name} is listed in {INDEX} but not in the file"))
    return entries


def _meta_model(folder: Path) -> Any:
    """The model of `folder`'s config on the meta device (shapes and names, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        if getattr(config, "quantization_config", None) is not None:
            raise NotStreamable("the checkpoint is quantized")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except NotStreamable:
        raise
    except Exception as exc:  # the in-memory path reports a bad config in its own words
        raise NotStreamable(f"cannot build the model from its config: {_first_line(exc)}") from exc


def _model_keys(model: Any, names: Sequence[str]) -> dict[str, str]:
    """Each checkpoint key -> the model key transformers loads it into (its renamings, e.g.
    GPT-NeoX's embed_out -> lm_head); NotStreamable when a tensor would be converted."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers: no renamings
        return {name: name for name in names}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    expected = model.state_dict()
    keys = {}
    for name in names:
        key, converted = rename_source_key(
            name, renamings, converters, model.base_model_prefix, expected
        )
        if converted is not None:
            raise NotStreamable(f"transformers converts tensor {name} while loading")
        keys[name] = key
    return keys


def _check_tensors(
    model: Any, entries: Mapping[str, TensorEntry], keys: Mapping[str, str], spec: str, folder: Path
) -> None:
    """Refuse weights that do not fit the config, as `prune.models.check_loading_info` does."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    held = {keys[name]: entry.shape for name, entry in entries.items()}
    info = {
        "missing_keys": set(expected) - set(held),
        "unexpected_keys": set(held) - set(expected),
        "mismatched_keys": [
            (key, held[key], expected[key])
            for key in sorted(set(held) & set(expected), key=_natural)
            if held[key] != expected[key]
        ],
        "error_msgs": [],
    }
    check_loading_info(model, info, spec, str(folder))


def plan_stream(
    folder: Path,
    layers: Sequence[int],
    *,
    spec: str | None = None,
    source: ModelSource | None = None,
) -> StreamPlan:
    """Check the checkpoint in `folder` and work out what to write when `layers` are removed.

    Raises NotStreamable when it cannot be pruned on disk, PruneError when it is damaged or
    does not fit its config, or when `layers` cannot be removed (as `drop_layers` does).
    """
    from prune.surgery import drop_layers, locate_layers

    folder = Path(folder)
    spec = spec or str(folder)
    source = source or resolve_source(str(folder))
    entries = read_headers(folder, spec)
    model = _meta_model(folder)
    keys = _model_keys(model, list(entries))
    _check_tensors(model, entries, keys, spec, folder)
    stack = locate_layers(model)
    layers_before = len(stack)
    block = re.compile(rf"{re.escape(stack.path)}\.(\d+)\.(.+)")
    found = {name: block.fullmatch(key) for name, key in keys.items()}
    indices = {int(match[1]) for match in found.values() if match}
    if indices != set(range(layers_before)):  # check_loading_info has caught this already
        raise PruneError(
            f"cannot load model '{spec}': config.json declares {layers_before} layers but the "
            f"weights in {folder} hold blocks {sorted(indices)}"
        )
    removal = drop_layers(model, layers)  # normalises `layers`, retargets the config
    new_index = {
        old: new
        for new, old in enumerate(i for i in range(layers_before) if i not in removal.removed)
    }
    order = {key: position for position, key in enumerate(model.state_dict())}
    renamed: dict[str, TensorEntry] = {}
    for name, entry in sorted(
        entries.items(),
        key=lambda item: (order.get(keys[item[0]], len(order)), _natural(keys[item[0]])),
    ):
        match = found[name]
        if match is None:
            renamed[name] = entry
            continue
        index = int(match[1])
        if index not in new_index:
            continue
        # The checkpoint spells the block list its own way (e.g. before a renaming): change
        # only the index that follows its block-list prefix.
        raw = re.fullmatch(rf"(.+?)\.{index}\.({re.escape(match[2])})", name)
        if raw is None:
            raise NotStreamable(f"cannot find the block index in tensor {name}")
        renamed[f"{raw[1]}.{new_index[index]}.{raw[2]}"] = entry
    has_generation = (folder / "generation_config.json").is_file()
    return StreamPlan(
        source=source,
        spec=spec,
        folder=folder,
        tensors=renamed,
        config=model.config,
        model_class=type(model).__name__,
        generation_config=None
        if has_generation or not model.can_generate()
        else model.generation_config,
        removed=removal.removed,
        layers_before=layers_before,
        layer_path=stack.path,
    )


def _dtype_name(entries: Mapping[str, TensorEntry]) -> str:
    """The source's dtype: that of most floating-point bytes (float32 when there are none)."""
    totals: dict[str, int] = {}
    for entry in entries.values():
        if entry.dtype in _FLOATING:
            totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.numel
    return max(totals, key=totals.get) if totals else "float32"


def _itemsize(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize


@contextmanager
def _opened(file: Path, spec: str) -> Iterator[_Reader]:
    """`safe_open(file)`, with a failure to read it reported as a damaged file (never as the
    failed write that a safetensors error inside the export would otherwise look like)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:
        raise damaged(spec, file, exc) from exc
    with handle:
        yield _Reader(handle, file, spec)


@dataclass
class _Reader:
    handle: Any
    file: Path
    spec: str

    def get(self, name: str) -> Any:
        try:
            return self.handle.get_tensor(name)
        except Exception as exc:
            raise damaged(self.spec, self.file, exc) from exc


def stream_drop(
    source_folder: Path,
    out: Path,
    removed: Sequence[int],
    *,
    export_dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
    files: ExtraFiles | None = None,
    spec: str | None = None,
    source: ModelSource | None = None,
    compute_dtype: Any = None,
) -> dict[str, Any]:
    """Write the checkpoint in `source_folder` without blocks `removed` to `out`; returns the
    prune.json record.

    `export_dtype` ("float32", "bfloat16", "float16") converts the floating-point tensors;
    None keeps each tensor as it is. `files` maps extra file names (README.md, ...) to their
    contents. `compute_dtype` is recorded in prune.json: the dtype the caller evaluated the
    model in, None (nothing computed) for a plain drop. Written atomically like
    `prune.export.export_checkpoint` (same folder layout, shard names, safetensors metadata
    and prune.json).
    """
    if export_dtype is not None and export_dtype not in EXPORT_DTYPES:
        raise PruneError(
            f"unknown export dtype '{export_dtype}' (accepted: {', '.join(EXPORT_DTYPES)})"
        )
    out = Path(out)
    check_output_dir(out, overwrite)
    parse_size(max_shard_size)
    plan = plan_stream(Path(source_folder), removed, spec=spec, source=source)
    return write_plan(
        plan, out, export_dtype, max_shard_size, overwrite, extra, files, compute_dtype
    )


def write_plan(
    plan: StreamPlan,
    out: Path,
    export_dtype: str | None,
    max_shard_size: str | int,
    overwrite: bool,
    extra: Mapping[str, Any] | None,
    files: ExtraFiles | None,
    compute_dtype: Any = None,
) -> dict[str, Any]:
    """Write `plan` to `out` atomically (see `stream_drop`); returns the prune.json record."""
    out = Path(out)
    check_output_dir(out, overwrite)
    shard_bytes = parse_size(max_shard_size)
    sweep_temporaries(out)
    try:
        with atomic_folder(out, what="output folder") as tmp:
            return _write(plan, tmp, export_dtype, shard_bytes, extra, files, compute_dtype)
    except OSError as exc:  # the errors `atomic_folder` does not name (e.g. a name too long)
        error = write_error(exc, out, "output folder")
        if error is not None:
            raise error from exc
        raise PruneError(f"cannot write output folder '{out}': {exc.strerror or exc}") from exc


def _write(
    plan: StreamPlan,
    folder: Path,
    export_dtype: str | None,
    shard_bytes: int,
    extra: Mapping[str, Any] | None,
    files: ExtraFiles | None,
    compute_dtype: Any,
) -> dict[str, Any]:
    """Write shards, index, config, copied files and prune.json into `folder` (a temporary)."""
    import torch
    from huggingface_hub import split_state_dict_into_shards_factory
    from transformers import modeling_utils
    from transformers.utils import logging as hf_logging

    dtype = export_dtype or _dtype_name(plan.tensors)
    record = build_record(
        plan.source,
        plan.removed,
        plan.layers_before,
        plan.layers_before - len(plan.removed),
        plan.layer_path,
        extra,
        export_dtype=dtype,
        compute_dtype=compute_dtype,
    )
    metadata = {"format": "pt", **export._tensor_metadata(record)}

    def target(entry: TensorEntry) -> str:
        return export_dtype if export_dtype and entry.dtype in _FLOATING else entry.dtype

    sizes = {name: entry.numel * _itemsize(target(entry)) for name, entry in plan.tensors.items()}
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda size: size,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=shard_bytes,
    )
    shards = split.filename_to_tensors.items()
    for filename, names in hf_logging.tqdm(shards, desc="Writing model shards"):
        tensors = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(plan.tensors[name].file, []).append(name)
        # One source file open at a time, closed before the next: its pages leave memory.
        for file, group in by_file.items():
            with _opened(file, plan.spec) as reader:
                for name in group:
                    entry = plan.tensors[name]
                    tensor = reader.get(entry.name)
                    if target(entry) != entry.dtype:
                        tensor = tensor.to(getattr(torch, target(entry)))
                    tensors[name] = tensor
        # safetensors' save_file, through the name the in-memory export writes with: one
        # shard writer for both paths (and one place to inject a failing disk in tests).
        modeling_utils.safe_save_file(tensors, str(folder / filename), metadata=metadata)
        del tensors
    if split.is_sharded:
        index = {
            "metadata": {
                "total_parameters": sum(entry.numel for entry in plan.tensors.values()),
                **split.metadata,
            },
            "weight_map": split.tensor_to_filename,
        }
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    plan.config.dtype = dtype
    plan.config.architectures = [plan.model_class]
    plan.config.save_pretrained(str(folder))
    if plan.generation_config is not None:
        plan.generation_config.save_pretrained(str(folder))
    copy_small_files(plan.folder, folder)
    export._write_record(folder, record)  # looked up at call time, like the in-memory export
    write_files(folder, files, record)
    return record


def copy_small_files(source: Path, folder: Path) -> list[str]:
    """Copy the source folder's other files (generation config, tokenizer, license, ...) into
    `folder`; weights, the rewritten files, hidden files and subfolders are left out."""
    copied = []
    for entry in sorted(source.iterdir()):
        name = entry.name
        if (
            name.startswith(".")
            or name in _REWRITTEN
            or name.endswith(_WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
            or not entry.is_file()
        ):
            continue
        if entry.stat().st_size > SMALL_FILE:
            log.warning(
                "not copying %s: over %d MiB, not a tokenizer file", entry, SMALL_FILE >> 20
            )
            continue
        shutil.copyfile(entry, folder / name)
        copied.append(name)
    return copied


def stream_drop_source(
    spec: str,
    layers: Sequence[int],
    out: Path,
    *,
    export_dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
    files: ExtraFiles | None = None,
    compute_dtype: Any = None,
    revision: str | None = None,
) -> dict[str, Any] | None:
    """`stream_drop` for what the user typed: a local folder, a GGUF file (or embedded model)
    through its cached conversion, or a Hub id through its snapshot (`hub_checkpoint`, at
    `revision`, default main: pass the commit the caller loaded to prune the same weights).

    None when the model must be loaded instead: no safetensors weights, a Hub repo that
    cannot be found or reached (loading says why), a checkpoint transformers converts, or
    a cached GGUF conversion that needs repairing, which loading does. A failed download
    of a Hub repo's weights is a PruneError, raised before anything is written to `out`.
    """
    from prune.models import gguf_checkpoint

    source = resolve_source(spec)
    try:
        if source.kind == "local":
            folder = Path(source.path)
        elif source.kind == "hub":
            folder = hub_checkpoint(spec, revision)
            # As `prune.models.load_model` records a Hub model: the commit it read.
            source = ModelSource(spec, "hub", None, spec, folder.name, None)
        else:
            folder = gguf_checkpoint(Path(source.path), source.sha256)
        plan = plan_stream(folder, layers, spec=spec, source=source)
    except NotStreamable as exc:
        log.info("pruning in memory: %s", exc)
        return None
    except PruneError:
        if source.kind in ("local", "hub"):
            raise
        return None  # loading repairs a damaged cached conversion, or says what to delete
    return write_plan(
        plan, out, export_dtype, max_shard_size, overwrite, extra, files, compute_dtype
    )


def hub_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of the Hub model `repo_id` at `revision` (default main) in the
    Hugging Face cache, with its small files (`HUB_SMALL_FILES`) and its safetensors weights:
    the shards its index lists, else `model.safetensors`; no other file is requested.

    NotStreamable when the repo cannot be found or reached, when offline and its weights are
    not cached (loading then reports either in its own words, or finds other weights), or
    when it holds no safetensors weights; PruneError when downloading its weights fails.
    """
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(HUB_SMALL_FILES),
                endpoint=endpoint,
            )
        )
    except Exception as exc:
        cached = getattr(exc, "snapshot_path", None)  # offline: a partly cached snapshot
        if cached is None:
            if not _hub_failure(exc):
                raise
            raise NotStreamable(
                f"cannot fetch '{repo_id}' from the Hub: {_first_line(exc)}"
            ) from exc
        folder = Path(cached)
    if not (folder / "config.json").is_file():
        raise NotStreamable(f"no config.json in the snapshot of '{repo_id}'")
    listed = (folder / INDEX).is_file()
    for name in _indexed_files(folder) if listed else [WEIGHTS]:
        try:
            # The commit of the snapshot: every file from the same revision, even if the
            # branch moves meanwhile; a cached file is not requested again.
            hf_hub_download(repo_id, name, revision=folder.name, endpoint=endpoint)
        except LocalEntryNotFoundError as exc:
            if constants.HF_HUB_OFFLINE:
                raise NotStreamable(f"{name} of '{repo_id}' is not in the cache") from exc
            raise _download_failed(repo_id, endpoint, exc) from exc
        except EntryNotFoundError as exc:
            if not listed:
                raise NotStreamable(f"'{repo_id}' has no {WEIGHTS} or {INDEX}") from exc
            raise _download_failed(repo_id, endpoint, exc) from exc
        except Exception as exc:
            if not _hub_failure(exc):
                raise
            raise _download_failed(repo_id, endpoint, exc) from exc
    return folder


def _indexed_files(folder: Path) -> list[str]:
    """The weight files the snapshot's safetensors index lists ([] for an unreadable index,
    or one naming files outside the snapshot: `read_headers` then reports it damaged)."""
    try:
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    plain = all(
        isinstance(name, str)
        and name.endswith(".safetensors")
        and ".." not in Path(name).parts
        and not Path(name).is_absolute()
        for name in names
    )
    return names if plain else []


def _hub_failure(exc: BaseException) -> bool:
    """Whether `exc` is the Hub client's or the network's (not a bug of ours): OSError covers
    the client's HTTP, offline and cache errors; then its repo id checks, and the HTTP
    library's transport errors (named, as `prune.hub` does: the library is the client's)."""
    from huggingface_hub.errors import HFValidationError

    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, (OSError, HFValidationError)) or bool(
        names & {"HTTPError", "RequestError"}
    )


def _download_failed(repo_id: str, endpoint: str | None, exc: BaseException) -> PruneError:
    from huggingface_hub import constants

    return PruneError(
        f"cannot download the weights of model '{repo_id}' from {endpoint or constants.ENDPOINT}"
        f" ({_first_line(exc)}); nothing was written: check the network, HF_ENDPOINT or the "
        "token, then re-run (finished files stay in the Hugging Face cache)"
    )


def source_dtype(loaded: Any) -> str | None:
    """The dtype the loaded model's checkpoint declares (config.json's `dtype`), or None."""
    folder = loaded.checkpoint_dir
    try:
        if folder is not None:
            config = json.loads((Path(folder) / "config.json").read_text())
        elif loaded.source.hub_id:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                loaded.source.hub_id, "config.json", revision=loaded.source.revision
            )
            config = json.loads(Path(path).read_text())
        else:
            return None
    except Exception:  # unknown: keep the loaded dtype
        return None
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in EXPORT_DTYPES else None
