"""Publish a pruned checkpoint folder to the Hugging Face Hub (or any Hub-compatible server).

`check_pushable` refuses a folder that would not load (config and safetensors
present and consistent with each other, README.md metadata parseable) before
any request is made, so a broken model is never published; a folder without a
README.md is pushed with a warning (`push_warnings`). `push_folder` then
uses the real `huggingface_hub` client: `create_repo(exist_ok=True)`, a new
branch when `revision` names one, and `upload_folder`, which skips unchanged
files and never makes an empty commit. Weight files left on the remote by an
earlier push (other shard names) are deleted in the same commit, so the remote
weights always mirror the folder.

The token comes from the caller, `HF_TOKEN` or the stored login (the client's
own lookup) and is never printed; the endpoint from the caller or
`HF_ENDPOINT`. Failures become one-line `PruneError`s naming the cause (401,
403, network, server error); the local folder is never modified.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prune import __version__
from prune.errors import PruneError

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
README = "README.md"
# Remote files that would conflict with the pushed weights if an earlier push left them behind.
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
REPO_ID_PLACEHOLDERS = ("strategy", "layers")
_REPO_ID_PART = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?", re.ASCII)
# Network failures, matched by class name so this works with whichever HTTP library
# the installed huggingface_hub uses (requests, httpx or httpx2).
_NETWORK_ERRORS = {
    "ConnectError",
    "ConnectTimeout",
    "NetworkError",
    "TimeoutException",
    "ConnectionError",
    "Timeout",
}


@dataclass(frozen=True)
class PushResult:
    """Where a folder went: the repo, and the commit the pushed revision now points to."""

    repo_id: str
    repo_url: str
    revision: str
    commit_oid: str | None
    commit_url: str | None
    created_commit: bool  # False when nothing changed since the last push
    pr_url: str | None = None

    @property
    def url(self) -> str:
        """The repo's URL (what to show users)."""
        return self.repo_url

    def to_dict(self) -> dict[str, Any]:
        """Plain fields, for JSON records."""
        return asdict(self)


# -- checking the folder ---------------------------------------------------------------


def check_pushable(folder: str | Path) -> None:
    """Refuse (PruneError) a folder that is not a loadable checkpoint with a valid card.

    Checks that config.json parses, that the safetensors weights (a single file,
    or an index and every shard it names) can be read and hold exactly the
    tensors, with the shapes, that config.json's model expects, and that the
    YAML front matter of README.md, if present, parses as Hub metadata.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PruneError(
            f"'{folder}' is not a folder; pass the checkpoint folder written by `prune drop` or `prune run`"
        )
    config = _read_config(folder)
    tensors = _read_weights(folder)
    _check_against_config(folder, config, tensors)
    if (folder / README).exists():
        check_card(folder / README)


def push_warnings(folder: str | Path) -> list[str]:
    """What is worth a warning (not a refusal) before pushing `folder`: no README.md means
    a Hub repo with an empty model card, without base model or license."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / README).exists():
        return [
            f"'{folder}' has no README.md: the Hub repo will have an empty model card (no "
            "base model, no license); folders written by `prune drop` and `prune run` have one"
        ]
    return []


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise PruneError(f"'{folder}' has no {CONFIG}; not a checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PruneError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise PruneError(f"{path} has no 'model_type'; not a transformers config")
    return config


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except Exception as exc:  # SafetensorError and OSError: a truncated or foreign file
        raise PruneError(f"{path} is not a readable safetensors file: {exc}") from exc


def _read_weights(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over all weight files; the index must match its shards exactly."""
    index_path = folder / WEIGHTS_INDEX
    if (folder / WEIGHTS).is_file() and index_path.is_file():
        raise PruneError(f"'{folder}' has both {WEIGHTS} and {WEIGHTS_INDEX}; remove the stale one")
    if (folder / WEIGHTS).is_file():
        return _safetensors_shapes(folder / WEIGHTS)
    if not index_path.is_file():
        raise PruneError(
            f"'{folder}' has no weights: expected {WEIGHTS} or {WEIGHTS_INDEX} (safetensors only)"
        )
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise PruneError(f"{index_path} is not a safetensors index (no 'weight_map')") from exc
    tensors: dict[str, list[int]] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise PruneError(
                f"{index_path} names shard '{shard}', which is missing from the folder"
            )
        shapes = _safetensors_shapes(folder / shard)
        listed = {name for name, where in weight_map.items() if where == shard}
        if listed != set(shapes):
            absent = sorted(listed - set(shapes))
            extra = sorted(set(shapes) - listed)
            detail = (
                f"'{absent[0]}' is not in the shard"
                if absent
                else f"'{extra[0]}' is not in the index"
            )
            raise PruneError(f"{index_path} does not match shard '{shard}': {detail}")
        tensors.update(shapes)
    return tensors


def _check_against_config(
    folder: Path, config: dict[str, Any], tensors: Mapping[str, list[int]]
) -> None:
    """Build the config's model on the meta device (no memory) and compare tensor names and shapes."""
    import torch
    import transformers

    if config.get("auto_map"):
        log.info("skipping the weights/config comparison: %s uses custom model code", folder)
        return
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise PruneError(
            f"{folder / CONFIG} cannot be loaded by transformers: {_one_line(exc)}"
        ) from exc
    names = [a for a in (cfg.architectures or []) if hasattr(transformers, a)]
    model_class = getattr(transformers, names[0]) if names else transformers.AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = (
                model_class._from_config(cfg)
                if hasattr(model_class, "_from_config")
                else model_class.from_config(cfg)
            )
    except Exception as exc:
        raise PruneError(
            f"{folder / CONFIG} does not describe a model transformers can build: {_one_line(exc)}"
        ) from exc

    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    renamed = _as_loaded(model, tensors, expected)
    present = {new: tensors[old] for old, (new, _) in renamed.items()}
    converted = {new for new, merged in renamed.values() if merged}  # shapes change when loaded
    params = dict(model.named_parameters(remove_duplicate=False))
    shared: dict[int, set[str]] = {}
    for name, param in params.items():
        shared.setdefault(id(param), set()).add(name)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_missing = [
        re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    ]
    ignore_unexpected = [
        re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    ]

    def saved_elsewhere(name: str) -> bool:
        # Tied weights (lm_head = embeddings) are saved once under one of their names.
        if tied.get(name) in present:
            return True
        return name in params and any(alias in present for alias in shared[id(params[name])])

    missing = [
        n
        for n in expected
        if n not in present
        and n not in converted
        and not saved_elsewhere(n)
        and not any(p.search(n) for p in ignore_missing)
    ]
    unexpected = [
        n for n in present if n not in expected and not any(p.search(n) for p in ignore_unexpected)
    ]
    reshaped = [
        n for n in present if n in expected and n not in converted and present[n] != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
    if reshaped:
        n = reshaped[0]
        problems.append(
            f"{len(reshaped)} with the wrong shape (e.g. '{n}' is {present[n]}, config expects {expected[n]})"
        )
    if problems:
        raise PruneError(
            f"the weights in '{folder}' do not match {CONFIG}: tensors " + "; ".join(problems)
        )


def _as_loaded(
    model: Any, tensors: Mapping[str, list[int]], expected: Mapping[str, Any]
) -> dict[str, tuple[str, bool]]:
    """Checkpoint name -> (name in the model, merged by a converter), as `from_pretrained` renames them.

    transformers 5 renames legacy checkpoint keys on load (e.g. GPT-NeoX's
    `embed_out` -> `lm_head`) and may merge several into one; its private
    helpers are used when present, and names are compared as saved otherwise.
    """
    identity = {name: (name, False) for name in tensors}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        result = {}
        for name in tensors:
            new, pattern = rename_source_key(
                name, renamings, converters, model.base_model_prefix, expected
            )
            result[name] = (new, pattern is not None)
        return result
    except Exception as exc:  # older or newer transformers: compare names as saved
        log.debug("no transformers key renaming available (%s)", exc)
        return identity


def check_card(path: str | Path) -> None:
    """Refuse a README.md whose YAML front matter does not parse as Hub model-card metadata."""
    import yaml
    from huggingface_hub import ModelCard

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PruneError(f"{path} is not UTF-8 text") from exc
    if text.lstrip().startswith("---") and not re.match(
        r"^\s*---\r?\n[\s\S]*?\r?\n---[ \t]*(\r?\n|$)", text
    ):
        raise PruneError(f"{path}: the YAML front matter is not closed by a '---' line")
    try:
        ModelCard(text, ignore_metadata_errors=False)
    except yaml.YAMLError as exc:
        raise PruneError(f"{path}: the YAML front matter does not parse: {_one_line(exc)}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise PruneError(f"{path}: invalid model card metadata: {_one_line(exc)}") from exc


# -- repo ids for `prune run --push` ----------------------------------------------------


def repo_id_placeholders(template: str) -> set[str]:
    """The `{name}` placeholders in a repo id template; PruneError for unknown or malformed ones."""
    try:
        fields = [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        raise PruneError(
            f"repo id template '{template}' is malformed ({exc}); use {{strategy}} and {{layers}}"
        ) from exc
    for name, spec, conv in fields:
        if name not in REPO_ID_PLACEHOLDERS:
            accepted = ", ".join(f"{{{p}}}" for p in REPO_ID_PLACEHOLDERS)
            raise PruneError(
                f"unknown placeholder {{{name}}} in repo id '{template}'; accepted: {accepted}"
            )
        if spec or conv:
            raise PruneError(
                f"placeholder {{{name}}} in repo id '{template}' takes no format spec or conversion"
            )
    return {name for name, _, _ in fields}


def render_repo_id(template: str, strategy: str, layers: int | Sequence[int]) -> str:
    """Fill `{strategy}` and `{layers}` in a repo id template and check the result.

    `layers` is rendered as given: a number as is (e.g. the layers kept, `24`), a
    list of removed indices joined by '-' (`[3, 7, 12]` -> `3-7-12`).
    """
    repo_id_placeholders(template)
    layers_text = str(layers) if isinstance(layers, int) else "-".join(str(i) for i in layers)
    repo_id = template.format(strategy=strategy, layers=layers_text)
    check_repo_id(repo_id)
    return repo_id


def check_repo_id(repo_id: str) -> None:
    """Refuse anything but NAMESPACE/NAME with the characters the Hub accepts."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(
        _REPO_ID_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts
    ):
        raise PruneError(
            f"invalid repo id '{repo_id}': expected NAMESPACE/NAME using letters, digits, '-', '_' and '.' "
            "(no '--' or '..', at most 96 characters each)"
        )


# -- pushing ---------------------------------------------------------------------------


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Check `folder`, then upload it to `repo_id` (created if needed); returns where it went.

    `revision` is a branch, created from main when new. Re-pushing an unchanged
    folder makes no commit (`created_commit=False`). With `private=True`, an
    existing public repo is refused rather than silently published to.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise PruneError(
            f"--create-pr opens a pull request against main; it cannot be combined with --revision {revision}"
        )
    check_pushable(folder)
    api, token = _client(token, endpoint)
    target = revision or "main"
    message = commit_message or f"Upload {folder.name} (pruned with prune {__version__})"
    with _hub_errors(api.endpoint, repo_id, target, token):
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        info = api.repo_info(repo_id)
        if private and info.private is False:
            raise PruneError(
                f"repo '{repo_id}' already exists and is public; --private does not change an existing repo "
                "(change its visibility on the Hub first, or push to another repo id)"
            )
        if target != "main" and not create_pr:
            _ensure_branch(api, repo_id, target)
            info = api.repo_info(repo_id, revision=target)
        head_before = info.sha
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=message,
            revision=revision if not create_pr else None,
            create_pr=create_pr,
            delete_patterns=STALE_WEIGHT_PATTERNS,
        )
    created = commit.pr_url is not None if create_pr else commit.oid != head_before
    return PushResult(
        repo_id=repo_id,
        repo_url=repo_url,
        revision=target,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        created_commit=created,
        pr_url=commit.pr_url,
    )


def push_many(
    pushes: Sequence[tuple[str | Path, str]],
    **options: Any,
) -> list[PushResult]:
    """Push several (folder, repo_id) pairs; every folder is checked before the first upload.

    `options` are `push_folder`'s keyword arguments. Two folders may not share a
    repo id (the second would overwrite the first).
    """
    seen: dict[str, Path] = {}
    for folder, repo_id in pushes:
        check_repo_id(repo_id)
        if repo_id in seen:
            raise PruneError(
                f"'{seen[repo_id]}' and '{folder}' would both be pushed to '{repo_id}'; use {{strategy}} in the repo id"
            )
        seen[repo_id] = Path(folder)
        check_pushable(folder)
    return [push_folder(folder, repo_id, **options) for folder, repo_id in pushes]


def _client(token: str | None, endpoint: str | None):
    """An HfApi for `endpoint` (default: HF_ENDPOINT, read now rather than at import) and the token."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PruneError(
            "no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`"
        )
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    return HfApi(endpoint=endpoint, token=token), token


def _ensure_branch(api, repo_id: str, branch: str) -> None:
    if api.revision_exists(repo_id, branch):
        return
    if branch.startswith("refs/") or re.fullmatch(r"[0-9a-f]{40}", branch):
        raise PruneError(
            f"revision '{branch}' does not exist in '{repo_id}'; only a branch name can be created"
        )
    log.info("creating branch %s in %s", branch, repo_id)
    api.create_branch(repo_id, branch=branch, exist_ok=True)


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextmanager
def _hub_errors(endpoint: str, repo_id: str, revision: str, token: str | None) -> Iterator[None]:
    """Turn client exceptions into one-line PruneErrors that name the cause (and never the token)."""
    try:
        yield
    except PruneError:
        raise
    except Exception as exc:
        message = _explain(exc, endpoint, repo_id, revision)
        if message is None:
            raise
        if token:
            message = message.replace(token, "***")
        raise PruneError(message) from None


def _explain(exc: BaseException, endpoint: str, repo_id: str, revision: str) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    for err in _causes(exc):
        if isinstance(err, OfflineModeIsEnabled):
            return "cannot push while offline mode is on (HF_HUB_OFFLINE=1); unset it and retry"
        if isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
            return _explain_http(
                err, endpoint, repo_id, revision, isinstance(err, RevisionNotFoundError)
            )
        if {cls.__name__ for cls in type(err).__mro__} & _NETWORK_ERRORS:
            return f"cannot reach the Hub at {endpoint} ({_one_line(err) or type(err).__name__}); check the network or --endpoint/HF_ENDPOINT, then retry"
    if isinstance(
        exc, ValueError
    ):  # the client's own checks, e.g. README metadata refused by the server
        return f"push to '{repo_id}' refused: {_one_line(exc)}"
    return None


def _explain_http(err, endpoint: str, repo_id: str, revision: str, revision_missing: bool) -> str:
    status = err.response.status_code
    try:
        url = str(err.response.request.url)
    except RuntimeError:  # a response built without a request
        url = ""
    said = _one_line(err.server_message or "") or _one_line(err).split(" for url")[0]
    namespace = repo_id.split("/")[0]
    if status == 401:
        return f"authentication failed (401 from {endpoint}): the token was rejected; pass a valid --token, set HF_TOKEN or run `hf auth login`"
    if status == 403:
        return f"permission denied (403): this token cannot write to '{repo_id}' (namespace '{namespace}' belongs to someone else, or the token is read-only): {said}"
    if status == 404 and "/xet-" in url:
        return f"{endpoint} does not support Xet storage (404 on {url}); set HF_HUB_DISABLE_XET=1 and retry"
    if status == 404 and revision_missing:
        return f"revision '{revision}' not found in '{repo_id}' (404)"
    if status == 404:
        return (
            f"repository '{repo_id}' not found on {endpoint} or not visible with this token (404)"
        )
    if status >= 500:
        return f"server error {status} from {endpoint} (after the client's retries): {said}; nothing was committed, retry with `prune push`"
    return f"the Hub refused the push ({status}): {said}"
