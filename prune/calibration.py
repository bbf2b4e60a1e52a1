"""Calibration text for the cosine and perplexity measures.

A source is one of:
- a `.txt` file (one sample per blank-line-separated paragraph; one per line when
  there are no blank lines),
- a `.jsonl` file (each record's `text`, else `context` (+ `continuation`), else
  its first string field),
- a Hugging Face dataset name, `name[:config][@split]` (for users who are online),
- nothing: the default, LAMBADA (OpenAI) passages from `<data_dir>/lambada_openai.jsonl`,
  which are real book text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prune.defaults import CALIBRATION_SAMPLES
from prune.errors import PruneError

DEFAULT_FILE = "lambada_openai.jsonl"


def _record_text(record: object) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("context"), str):
        cont = record.get("continuation")
        return record["context"] + (" " + cont if isinstance(cont, str) else "")
    return next((v for v in record.values() if isinstance(v, str)), None)


def read_text_file(path: Path) -> list[str]:
    """Samples from a .txt or .jsonl file; PruneError for missing, unreadable or empty files."""
    if not path.exists():
        raise PruneError(
            f"calibration file '{path}' does not exist (accepted: a .txt or .jsonl file, or a dataset name)"
        )
    if not path.is_file():
        raise PruneError(
            f"calibration source '{path}' is not a file (accepted: a .txt or .jsonl file)"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PruneError(f"cannot read calibration file '{path}': {exc}") from exc
    if path.suffix.lower() in (".jsonl", ".json"):
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = _record_text(json.loads(line))
            except ValueError:
                raise PruneError(
                    f"calibration file '{path}' line {lineno} is not valid JSON"
                ) from None
            if text and text.strip():
                texts.append(text)
    else:
        blocks = [b.strip() for b in raw.split("\n\n")]
        texts = (
            [b for b in blocks if b]
            if len(blocks) > 1
            else [ln.strip() for ln in raw.splitlines() if ln.strip()]
        )
    if not texts:
        raise PruneError(f"calibration file '{path}' has no text")
    return texts


def read_hf_dataset(spec: str) -> list[str]:
    """Texts from a Hugging Face dataset `name[:config][@split]` (needs network or a local HF cache)."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        from datasets import load_dataset

        data = load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types for missing/offline datasets
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PruneError(f"cannot load calibration dataset '{spec}': {first}") from exc
    texts = [t for t in (_record_text(r) for r in data) if t and t.strip()]
    if not texts:
        raise PruneError(f"calibration dataset '{spec}' has no text field")
    return texts


def load_calibration(
    source: str | os.PathLike | None = None,
    *,
    samples: int = CALIBRATION_SAMPLES,
    data_dir: str | None = None,
) -> list[str]:
    """The first `samples` calibration texts from `source` (see the module docstring)."""
    if samples < 1:
        raise PruneError(f"samples {samples} is invalid (accepted: an integer >= 1)")
    if source in (None, ""):
        from prune.tasks import DATA_ENV, default_data_dir, find_data_dir

        folder = find_data_dir(data_dir)
        if folder is None or not (folder / DEFAULT_FILE).is_file():
            raise PruneError(
                f"no calibration text: the default needs {DEFAULT_FILE} in the data folder "
                f"(--data-dir, {DATA_ENV}, or {default_data_dir()}); or pass --calibration FILE"
            )
        texts = read_text_file(folder / DEFAULT_FILE)
    else:
        path = file_source(source)
        texts = read_text_file(path) if path is not None else read_hf_dataset(str(source))
    return texts[:samples]


def file_source(source: str | os.PathLike) -> Path | None:
    """The local file a calibration source names (an existing path, a .txt/.jsonl/.json/.text
    name or anything with a path separator), or None for a Hugging Face dataset name."""
    path = Path(source).expanduser()
    looks_like_file = path.suffix.lower() in (".txt", ".jsonl", ".json", ".text") or os.sep in str(
        source
    )
    return path if path.exists() or looks_like_file else None


def encode_texts(
    tokenizer: Any,
    texts: Sequence[str],
    seq_len: int,
    *,
    min_tokens: int = 1,
    empty_error: str = "calibration texts produced no tokens",
) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens), truncated to `seq_len`;
    texts shorter than `min_tokens` are skipped; PruneError(`empty_error`) if none is left."""
    encoded = [tokenizer(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= min_tokens]
    if not encoded:
        raise PruneError(empty_error)
    return encoded


def padded_batches(
    tokenizer: Any,
    texts: Sequence[str],
    seq_len: int,
    batch_size: int,
    device: Any,
    *,
    min_tokens: int = 1,
    empty_error: str = "calibration texts produced no tokens",
) -> Iterator[tuple[Any, Any]]:
    """Tokenize `texts` (truncated to `seq_len`) and yield right-padded (input_ids, mask) batches.

    Texts shorter than `min_tokens` are skipped; PruneError(`empty_error`) if none is left.
    Both tensors are (B, T) on `device`; the mask is 1 on real tokens.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_texts(
        tokenizer, texts, seq_len, min_tokens=min_tokens, empty_error=empty_error
    )
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        yield input_ids.to(device), mask.to(device)
