"""Evaluate a model (optionally with blocks removed) on lm-eval tasks, with a disk cache.

`evaluate` scores an in-memory model with the real lm-evaluation-harness
(`HFLM` wrapped around the model, `lm_eval.simple_evaluate`). `evaluate_removals`
scores the model with each candidate set of blocks removed (`()` is the full
model), removing blocks temporarily with `prune.surgery.layers_removed` (no
weight copies), and caches one JSON file per (model, removed blocks, task,
settings) so interrupted runs resume and repeated runs are instant. Another
engine can be plugged in by name: any engine other than "lm-eval" is served by
`prune.fasteval.evaluate_candidates(model, tokenizer, settings, candidates)`.

`perplexity` is the token-level perplexity of a model on plain texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prune.errors import PruneError

log = logging.getLogger(__name__)

ENGINES = ("auto", "fast", "lm-eval")  # auto = fast, falling back to lm-eval where it cannot
# Bump when a change alters scores, so old cache entries are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how; everything that changes a score is part of the cache key.

    `limit` takes the first N documents of each task (lm-eval's order); `task_metric`
    picks the per-task score ("acc", "acc_norm", ...), None = the task's headline
    metric (its first higher-is-better metric, as lm-eval lists them).
    """

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int = 0
    batch_size: int = 8
    task_metric: str | None = None
    data_dir: str | None = None
    include_path: str | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t for t in self.tasks.split(",") if t.strip()))
        else:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise PruneError("no task given (accepted: lm-eval task names, e.g. local_arc_easy)")
        if self.limit is not None and (isinstance(self.limit, bool) or int(self.limit) < 1):
            raise PruneError(
                f"limit {self.limit} is invalid (accepted: an integer >= 1, or no limit)"
            )
        if self.num_fewshot < 0:
            raise PruneError(
                f"num_fewshot {self.num_fewshot} is invalid (accepted: an integer >= 0)"
            )
        if self.batch_size < 1:
            raise PruneError(f"batch size {self.batch_size} is invalid (accepted: an integer >= 1)")


@dataclass
class TaskScore:
    """One task's score: `value` of `metric` over `n` documents, with lm-eval's standard error."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskScore:
        return cls(
            task=str(data["task"]),
            metric=str(data["metric"]),
            value=float(data["value"]),
            stderr=None if data.get("stderr") is None else float(data["stderr"]),
            n=int(data["n"]),
            higher_is_better=bool(data.get("higher_is_better", True)),
        )


# --------------------------------------------------------------------------- lm-eval engine


class _DropExpected(logging.Filter):
    """Hide lm-eval warnings that are expected when prune drives it (in-memory model, num_fewshot)."""

    EXPECTED = (
        "`pretrained` model kwarg",
        "Passed an already-initialized model",
        "Overwriting default num_fewshot",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


def _quiet_lm_eval() -> None:
    # lm-eval logs every task and request batch at INFO; keep our stderr readable.
    for name in ("lm_eval", "datasets"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected())


class LmEvalRunner:
    """Holds one HFLM wrapper and the built task objects, reused across candidates."""

    def __init__(self, model: Any, tokenizer: Any, settings: EvalSettings) -> None:
        _quiet_lm_eval()
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import get_task_dict

        from prune.tasks import resolve_task_names, task_manager

        self.settings = settings
        self.manager = task_manager(settings.data_dir, settings.include_path, settings.tasks)
        self.names = resolve_task_names(settings.tasks, self.manager)
        with contextlib.redirect_stdout(io.StringIO()):
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        self.task_dict = get_task_dict(self.names, self.manager)

    def run(self, tasks: Sequence[str] | None = None) -> dict[str, TaskScore]:
        """Evaluate the model as it is now on `tasks` (default: all of the settings' tasks)."""
        from lm_eval import simple_evaluate

        wanted = list(tasks) if tasks is not None else list(self.names)
        # Built task objects are reused (no re-reading of datasets); groups are passed by
        # name so lm-eval aggregates them as usual.
        top = {str(getattr(k, "group_name", k)): v for k, v in self.task_dict.items()}
        if all(name in top and not isinstance(top[name], dict) for name in wanted):
            task_arg: list[Any] = [top[name] for name in wanted]
        else:
            task_arg = wanted
        s = self.settings
        # lm-eval prints tables to stdout and a progress bar per request batch to stderr;
        # our own bar over candidates is the one to watch (lm-eval's logs still show).
        quiet = not log.isEnabledFor(logging.DEBUG)
        with contextlib.redirect_stdout(io.StringIO()), _maybe_redirect_stderr(quiet):
            results = simple_evaluate(
                model=self.lm,
                tasks=task_arg,
                task_manager=self.manager,
                num_fewshot=s.num_fewshot,
                limit=s.limit,
                batch_size=s.batch_size,
                bootstrap_iters=1000,
                log_samples=False,
                random_seed=s.seed,
                numpy_random_seed=s.seed,
                torch_random_seed=s.seed,
                fewshot_random_seed=s.seed,
            )
        if results is None:  # non-zero rank in distributed runs
            raise PruneError(
                "lm-eval returned no results (distributed evaluation is not supported)"
            )
        return scores_from_results(results, wanted, s.task_metric)


@contextlib.contextmanager
def _maybe_redirect_stderr(enabled: bool):
    if not enabled:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def scores_from_results(
    results: dict, wanted: Sequence[str], task_metric: str | None
) -> dict[str, TaskScore]:
    """Pick one score per requested task from lm-eval's results dict."""
    table = results["results"]
    hib = results.get("higher_is_better", {})
    n_samples = results.get("n-samples", {})
    names = [w for w in wanted if w in table]
    if len(names) < len(wanted):  # a tag expands into tasks that are reported one by one
        names += [k for k in table if k not in names and k not in wanted]
    scores: dict[str, TaskScore] = {}
    for name in names:
        entry = table[name]
        metrics = [k.split(",")[0] for k in entry if "," in k and "_stderr" not in k.split(",")[0]]
        if task_metric is not None:
            if task_metric not in metrics:
                raise PruneError(
                    f"task '{name}' has no metric '{task_metric}' (accepted for it: {', '.join(metrics)})"
                )
            metric = task_metric
        else:
            better = hib.get(name, {})
            metric = next(
                (m for m in metrics if better.get(m, True)), metrics[0] if metrics else None
            )
            if metric is None:
                raise PruneError(f"task '{name}' reported no metric")
        key = next(k for k in entry if k.split(",")[0] == metric)
        filt = key.split(",", 1)[1]
        stderr = entry.get(f"{metric}_stderr,{filt}")
        stderr = (
            float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
        )
        info = n_samples.get(name, {})
        n = int(info.get("effective", info.get("original", 0))) if isinstance(info, dict) else 0
        scores[name] = TaskScore(
            name, metric, float(entry[key]), stderr, n, bool(hib.get(name, {}).get(metric, True))
        )
    return scores


_LAST_RUNNER: list[Any] = []  # one slot: (model, tokenizer, settings, runner)


def lm_eval_runner(model: Any, tokenizer: Any, settings: EvalSettings) -> LmEvalRunner:
    """An LmEvalRunner for this model and settings, reused across calls (building one takes seconds)."""
    if _LAST_RUNNER:
        m, t, s, runner = _LAST_RUNNER[0]
        if m is model and t is tokenizer and s == settings:
            return runner
    runner = LmEvalRunner(model, tokenizer, settings)
    _LAST_RUNNER[:] = [(model, tokenizer, settings, runner)]
    return runner


def evaluate(
    model: Any, tokenizer: Any, settings: EvalSettings, *, engine: str = "auto"
) -> dict[str, TaskScore]:
    """Score the model as it is now on the settings' tasks; returns task -> TaskScore."""
    check_engine(engine)
    if engine == "auto":
        return with_fallback(lambda e: evaluate(model, tokenizer, settings, engine=e))
    if engine == "lm-eval":
        return lm_eval_runner(model, tokenizer, settings).run()
    return _fast_engine()(model, tokenizer, settings, [()])[0]


def with_fallback(call: Callable[[str], Any]) -> Any:
    """Run `call` with the fast engine; where it cannot handle the task or model, with lm-eval."""
    from prune.fasteval import FastEngineUnsupported

    try:
        return call("fast")
    except FastEngineUnsupported as exc:
        log.warning("%s: falling back to the lm-eval engine", str(exc).split("; use --engine")[0])
        return call("lm-eval")


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise PruneError(f"unknown engine '{engine}' (accepted: {', '.join(ENGINES)})")


def _fast_engine() -> Callable:
    try:
        from prune.fasteval import evaluate_candidates
    except ImportError as exc:
        raise PruneError(f"the fast engine is not available ({exc}); use --engine lm-eval") from exc
    return evaluate_candidates


# --------------------------------------------------------------------------- cache


def model_fingerprint(loaded: Any) -> str:
    """A stable id of the weights as they are now (source, dtype, block list).

    With a known source: its fingerprint, the dtype, the layer count and a small
    sample of every block's weights (so two models pruned differently from the same
    source differ). Without one (tests, in-memory models): a hash of all parameters.
    """
    from prune.surgery import count_layers, locate_layers

    model = getattr(loaded, "model", loaded)
    source = getattr(loaded, "source", None)
    digest = hashlib.sha256()
    dtype = next(model.parameters()).dtype
    digest.update(f"{dtype}|{count_layers(model)}".encode())
    if source is not None and getattr(source, "fingerprint", None):
        digest.update(source.fingerprint.encode())
        for block in locate_layers(model).layers:
            for name, param in block.named_parameters():
                flat = param.detach().reshape(-1)
                sample = torch.cat([flat[:8], flat[-8:], flat[:: max(1, flat.numel() // 16)][:16]])
                digest.update(name.encode() + sample.float().cpu().numpy().tobytes())
    else:
        for name, param in model.named_parameters():
            digest.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


class ResultCache:
    """One JSON file per (model, removed blocks, task, settings, engine) under cache_root()/results.

    Writes are atomic (temp file + rename); unreadable or malformed entries count
    as missing and are overwritten by the next `put`.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        if root is None:
            from prune.models import cache_root

            root = cache_root() / "results"
        self.root = Path(root)

    @staticmethod
    def key(
        fingerprint: str, removed: Sequence[int], task: str, settings: EvalSettings, engine: str
    ) -> str:
        from prune import __version__

        payload = {
            "model": fingerprint,
            "removed": sorted(int(i) for i in removed),
            "task": task,
            "limit": settings.limit,
            "num_fewshot": settings.num_fewshot,
            "seed": settings.seed,
            "metric": settings.task_metric,
            "engine": engine,
            "data_dir": settings.data_dir,
            "include_path": settings.include_path,
            "code": f"{__version__}/{CACHE_VERSION}",
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> TaskScore | None:
        try:
            data = json.loads(self.path(key).read_text())
            return TaskScore.from_dict(data["score"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring corrupt cache entry %s (%s)", self.path(key), exc)
            return None

    def put(self, key: str, score: TaskScore, meta: dict[str, Any] | None = None) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"score": score.to_dict(), "meta": meta or {}}, fh)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get_json(self, key: str) -> Any | None:
        """Any JSON value stored with `put_json` (None when missing or corrupt)."""
        try:
            return json.loads(self.path(key).read_text())["value"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring corrupt cache entry %s (%s)", self.path(key), exc)
            return None

    def put_json(self, key: str, value: Any) -> None:
        """Store any JSON value atomically."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"value": value}, fh)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get_value(self, key: str) -> float | None:
        """A cached plain number (e.g. a perplexity), stored as a TaskScore."""
        score = self.get(key)
        return None if score is None else score.value


# --------------------------------------------------------------------------- removals


def evaluate_removals(
    loaded: Any,
    settings: EvalSettings,
    candidates: list[tuple[int, ...]],
    *,
    engine: str = "auto",
    cache: ResultCache | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
) -> list[dict[str, TaskScore]]:
    """Score the model with each candidate set of blocks removed; `()` is the full model.

    Indices refer to the model as it is now. With a `cache`, results already on
    disk are reused and new ones are written as soon as they are known, so an
    interrupted run resumes where it stopped. Returns one task -> TaskScore dict
    per candidate, in order.

    "lm-eval" removes and restores blocks in place, one candidate at a time (peak
    memory: one model), with a progress bar over candidates. Other engines get the
    uncached candidates in one call of `prune.fasteval.evaluate_candidates` (which
    shares work across them), or in calls of `chunk_size` candidates each.
    """
    from tqdm.auto import tqdm

    from prune.surgery import count_layers, layers_removed, normalize_indices

    check_engine(engine)
    if engine == "auto":
        return with_fallback(
            lambda e: evaluate_removals(
                loaded,
                settings,
                candidates,
                engine=e,
                cache=cache,
                progress=progress,
                chunk_size=chunk_size,
            )
        )
    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = count_layers(model)
    normed = [tuple(normalize_indices(list(c), num_layers)) if c else () for c in candidates]
    names = _task_names(settings)
    fingerprint = model_fingerprint(loaded) if cache is not None else ""

    def key(removed: tuple[int, ...], name: str) -> str:
        return ResultCache.key(fingerprint, removed, name, settings, engine)

    def store(removed: tuple[int, ...], fresh: dict[str, TaskScore]) -> None:
        if cache is None:
            return
        meta = {"removed": list(removed), "settings": asdict(settings), "engine": engine}
        for name, score in fresh.items():
            cache.put(key(removed, name), score, meta)

    found: dict[tuple[int, ...], dict[str, TaskScore]] = {}
    for removed in dict.fromkeys(normed):
        hits = {}
        if cache is not None:
            for name in names:
                hit = cache.get(key(removed, name))
                if hit is not None:
                    hits[name] = hit
        found[removed] = hits
    todo = [r for r, hits in found.items() if len(hits) < len(names)]

    if todo and engine == "lm-eval":
        runner = lm_eval_runner(model, tokenizer, settings)
        bar = tqdm(normed, desc="evaluating removals", unit="model", disable=not progress)
        for removed in bar:
            bar.set_postfix_str(f"removed={list(removed)}")
            missing = [n for n in names if n not in found[removed]]
            if not missing:
                continue
            with layers_removed(model, removed):
                fresh = runner.run(missing)
            store(removed, fresh)
            found[removed].update(fresh)
    elif todo:
        evaluate_candidates = _fast_engine()
        size = chunk_size or len(todo)
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        for chunk in tqdm(
            chunks,
            desc=f"evaluating removals ({engine})",
            unit="chunk",
            disable=not progress or len(chunks) < 2,
        ):
            for removed, fresh in zip(
                chunk,
                evaluate_candidates(model, tokenizer, settings, chunk, progress=progress),
                strict=True,
            ):
                fresh = {n: s for n, s in fresh.items() if n not in found[removed]}
                store(removed, fresh)
                found[removed].update(fresh)
    # Task order as requested, whether a score came from the cache or not.
    return [{**{n: found[r][n] for n in names if n in found[r]}, **found[r]} for r in normed]


def _task_names(settings: EvalSettings) -> list[str]:
    from prune.tasks import resolve_task_names, task_manager

    return resolve_task_names(
        settings.tasks, task_manager(settings.data_dir, settings.include_path, settings.tasks)
    )


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 256, batch_size: int = 8
) -> float:
    """Token-level perplexity: exp(mean negative log-likelihood over all predicted tokens).

    Each text is truncated to `seq_len` tokens (with the tokenizer's special tokens)
    and scored on its own; padding is excluded.
    """
    if not texts:
        raise PruneError("perplexity needs at least one text")
    from prune.calibration import padded_batches

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for input_ids, mask in padded_batches(
        tokenizer,
        texts,
        seq_len,
        batch_size,
        device,
        min_tokens=2,
        empty_error="perplexity: every text is shorter than two tokens",
    ):
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, T, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        target = input_ids[:, 1:]
        nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        valid = mask[:, 1:].bool()
        total_nll += float(nll[valid].sum())
        total_tokens += int(valid.sum())
    return math.exp(total_nll / total_tokens)
