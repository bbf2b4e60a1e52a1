"""lm-eval task lookup, including the offline `local_*` benchmark tasks shipped with prune.

The YAML templates in `prune/tasks/` describe ARC, PIQA, WinoGrande, COPA,
OpenBookQA and LAMBADA with the same prompts as lm-eval's own tasks, but read
JSONL files from a local data folder. YAML cannot read environment variables,
so `task_manager` renders the templates with the absolute data path into
`cache_root()/tasks/<hash>/` and hands that folder (plus any user
`--include-path`) to `lm_eval.tasks.TaskManager`.

The data folder is, in order: the `data_dir` argument (`--data-dir`), the
`PRUNE_DATA_DIR` environment variable, or `../shared/data` beside the checkout.

Importing this module loads neither torch nor lm-eval (recipe validation reads
`LOCAL_TASKS`); lm-eval is imported when a task manager is first built.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prune.atomic import atomic_folder
from prune.defaults import cache_root
from prune.errors import PruneError

TEMPLATES = Path(__file__).with_name("tasks")
PLACEHOLDER = "@DATA_DIR@"
DATA_ENV = "PRUNE_DATA_DIR"
# Local task name -> the JSONL file it reads from the data folder.
LOCAL_TASKS: dict[str, str] = {
    "local_arc_easy": "arc_easy.jsonl",
    "local_arc_challenge": "arc_challenge.jsonl",
    "local_piqa": "piqa.jsonl",
    "local_winogrande": "winogrande.jsonl",
    "local_copa": "copa.jsonl",
    "local_openbookqa": "openbook_qa.jsonl",
    "local_lambada": "lambada_openai.jsonl",
}
# Local task name -> the fields each JSONL row must have (what its template reads).
LOCAL_FIELDS: dict[str, tuple[str, ...]] = {
    "local_arc_easy": ("query", "choices", "gold"),
    "local_arc_challenge": ("query", "choices", "gold"),
    "local_piqa": ("query", "choices", "gold"),
    "local_winogrande": ("context_options", "continuation", "gold"),
    "local_copa": ("query", "choices", "gold"),
    "local_openbookqa": ("query", "choices", "gold"),
    "local_lambada": ("context", "continuation"),
}


def default_data_dir() -> Path:
    """`../shared/data` beside the repository root (present in a development checkout)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The benchmark data folder to use, or None when none is configured or found.

    An explicit folder (argument or PRUNE_DATA_DIR) that does not exist is an error;
    the default folder is only used when present.
    """
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_ENV) or None
    if chosen is not None:
        path = Path(chosen).expanduser()
        origin = "--data-dir" if data_dir not in (None, "") else DATA_ENV
        if not path.is_dir():
            raise PruneError(
                f"data folder '{chosen}' (from {origin}) does not exist or is not a folder"
            )
        if not any((path / name).is_file() for name in LOCAL_TASKS.values()):
            raise PruneError(
                f"data folder '{chosen}' (from {origin}) holds none of the benchmark files "
                f"({', '.join(sorted(set(LOCAL_TASKS.values())))})"
            )
        return path.resolve()
    fallback = default_data_dir()
    return fallback if fallback.is_dir() else None


@functools.lru_cache(maxsize=1)
def local_task_metrics() -> dict[str, tuple[str, ...]]:
    """Local task name -> the metrics its template reports (its `metric_list`, in order),
    read from the YAML templates without lm-eval (recipe validation checks `metric:` with it)."""
    import yaml

    metrics: dict[str, tuple[str, ...]] = {}
    for template in sorted(TEMPLATES.glob("*.yaml")):
        spec = yaml.safe_load(template.read_text())
        if isinstance(spec, dict) and isinstance(spec.get("task"), str):
            listed = spec.get("metric_list") or []
            metrics[spec["task"]] = tuple(
                str(m["metric"]) for m in listed if isinstance(m, dict) and "metric" in m
            )
    return metrics


def render_local_tasks(data_dir: Path) -> Path:
    """Write the task templates with `data_dir` filled in; return the (cached) folder."""
    texts = {p.name: p.read_text() for p in sorted(TEMPLATES.glob("*.yaml"))}
    # json.dumps gives a valid double-quoted YAML scalar body for any path.
    quoted = json.dumps(str(data_dir))[1:-1]
    rendered = {name: text.replace(PLACEHOLDER, quoted) for name, text in texts.items()}
    digest = hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "tasks" / digest
    if target.is_dir():
        return target
    # Another process may render the same folder first: the contents are equal, keep either.
    with atomic_folder(target, keep_existing=True) as tmp:
        for name, text in rendered.items():
            (tmp / name).write_text(text)
    return target


def _include_list(
    include_path: str | os.PathLike | Iterable[str | os.PathLike] | None,
) -> list[Path]:
    if include_path in (None, ""):
        return []
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise PruneError(
                f"--include-path '{item}' does not exist (accepted: a folder of lm-eval task YAML files)"
            )
        paths.append(path.resolve())
    return paths


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def task_manager(
    data_dir: str | os.PathLike | None = None,
    include_path=None,
    names: str | Iterable[str] | None = None,
) -> Any:
    """An lm-eval TaskManager that knows lm-eval's tasks, the local tasks and the user's YAMLs.

    The local tasks are only registered when a data folder is found; asking for one
    without it gives a clear error in `resolve_task_names`. When `names` are given
    and all of them are local or user tasks, lm-eval's own (large) task index is
    skipped, which saves seconds. Managers are cached per process.
    """
    found = find_data_dir(data_dir)
    paths = [render_local_tasks(found)] if found is not None else []
    paths += _include_list(include_path)
    key = tuple(str(p) for p in paths)
    manager = None
    if names is not None and key:
        light = _manager(key, False)
        if set(split_task_names(names)) <= set(light.all_tasks):
            manager = light
    if manager is None:
        manager = _manager(key, True)
    manager.prune_data_dir = found  # for error messages
    return manager


def split_task_names(names: str | Iterable[str]) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (order kept, duplicates dropped)."""
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out


def resolve_task_names(names: str | Iterable[str], manager: Any) -> list[str]:
    """Check task names against the manager; PruneError with close matches for unknown ones."""
    wanted = split_task_names(names)
    if not wanted:
        raise PruneError(
            "no task given (accepted: comma-separated lm-eval task names, e.g. local_arc_easy,local_piqa)"
        )
    known = set(manager.all_tasks)
    data_dir = getattr(manager, "prune_data_dir", None)
    for name in wanted:
        if name in known:
            if (
                name in LOCAL_TASKS
                and data_dir is not None
                and not (data_dir / LOCAL_TASKS[name]).is_file()
            ):
                raise PruneError(
                    f"task '{name}' needs {data_dir / LOCAL_TASKS[name]}, which does not exist"
                )
            if name in LOCAL_TASKS and data_dir is not None:
                check_local_data(name, data_dir / LOCAL_TASKS[name])
            continue
        if name in LOCAL_TASKS:
            raise PruneError(
                f"task '{name}' needs the benchmark data folder, which was not found: pass --data-dir DIR "
                f"or set {DATA_ENV} (looked for {default_data_dir()})"
            )
        pool = sorted(known | set(LOCAL_TASKS))
        close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else f"local tasks: {', '.join(LOCAL_TASKS)}"
        )
        raise PruneError(f"unknown task '{name}' ({hint})")
    return wanted


def check_local_data(name: str, path: Path) -> None:
    """PruneError naming the file and row when a row of local task `name`'s JSONL file is not
    a JSON object with every field the task reads (e.g. a row without its label)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise PruneError(f"task '{name}': cannot read {path}: {exc.strerror or exc}") from exc
    _check_rows(name, str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _check_rows(name: str, path: str, size: int, mtime_ns: int) -> None:
    # Keyed on size and mtime too, so an edited file is checked again.
    fields = LOCAL_FIELDS[name]
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise PruneError(
                        f"task '{name}': row {number} of {path} is not valid JSON"
                    ) from None
                if not isinstance(row, dict):
                    raise PruneError(f"task '{name}': row {number} of {path} is not a JSON object")
                absent = [field for field in fields if row.get(field) is None]
                if absent:
                    raise PruneError(
                        f"task '{name}': row {number} of {path} has no {', '.join(absent)} "
                        f"(each row needs {', '.join(fields)})"
                    )
    except (OSError, UnicodeDecodeError) as exc:
        raise PruneError(
            f"task '{name}': cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from exc
