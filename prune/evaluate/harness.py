"""The glue to lm-evaluation-harness: the only module in prune that touches lm-eval's private API.

- `LmEvalRunner` holds one `HFLM` around an in-memory model and the built task
  objects, and scores the model as it is now with `lm_eval.simple_evaluate`;
  `run(lm=...)` scores through any other lm-eval `LM` instead (the fast engine's
  recording and replaying ones). `lm_eval_runner` reuses the last runner, since
  building one takes seconds. `scores_from_results` picks one `TaskScore` per task
  from lm-eval's results, and `outcomes_from_samples` turns lm-eval's logged samples
  into the task's per-document `DocOutcomes`.
- `FastEvaluator` puts the fast engine (`prune.evaluate.engine`) behind lm-eval's
  task machinery, so both engines report the same numbers: lm-eval builds the
  requests (a recording LM), HFLM's own `_encode_pair` and truncation tokenize
  them, the engine computes (log-likelihood, is greedy) for every candidate, and
  the answers go back through lm-eval's filters, `process_results` and
  aggregation (a replaying LM), so acc, acc_norm and their standard errors come
  from lm-eval's code. `evaluate_candidates` is the one-call form; it hands each
  candidate's scores to `on_done` as soon as the engine finishes that candidate.

Private lm-eval API used here: `HFLM._encode_pair`, `HFLM._device` (set to a dispatched
model's input device); `lm_eval.evaluator`'s
`add_env_info` / `get_git_commit_hash`, switched off while the fast engine drives
`simple_evaluate` (`_without_env_info`); and `lm_eval.utils.apply_template` / `env`,
replaced while either engine runs by a version that compiles each template once
(`_compiled_templates`; same text, since logging samples renders every target again).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lm_eval.api.model import LM

from prune.errors import FastEngineUnsupported, PruneError
from prune.evaluate.engine import Answer, FastEngine, Key, Request, check_single_device
from prune.evaluate.settings import DocOutcomes, EvalSettings, TaskScore

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- lm-eval runner


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
        if getattr(model, "hf_device_map", None):
            from prune.models import input_device

            # HFLM puts inputs on `model.device`, the meta device when weights are offloaded.
            self.lm._device = input_device(model)
        self.task_dict = get_task_dict(self.names, self.manager)

    def run(
        self,
        tasks: Sequence[str] | None = None,
        *,
        lm: LM | None = None,
        task_metric: str | None = None,
        outcomes: bool = True,
    ) -> dict[str, TaskScore]:
        """Score the model as it is now on `tasks` (default: all of the settings' tasks).

        `lm` answers lm-eval's requests instead of this runner's HFLM; `task_metric`
        replaces the settings' metric for this call (None: the settings' one). Each
        task's score carries its per-document `outcomes` (from lm-eval's logged
        samples) unless `outcomes` is False.
        """
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
        with (
            contextlib.redirect_stdout(io.StringIO()),
            _maybe_redirect_stderr(quiet),
            _compiled_templates(),
            _one_process(),
        ):
            results = simple_evaluate(
                model=self.lm if lm is None else lm,
                tasks=task_arg,
                task_manager=self.manager,
                num_fewshot=s.num_fewshot,
                limit=s.limit,
                batch_size=s.batch_size,
                bootstrap_iters=1000,
                log_samples=outcomes,
                random_seed=s.seed,
                numpy_random_seed=s.seed,
                torch_random_seed=s.seed,
                fewshot_random_seed=s.seed,
            )
        if results is None:  # non-zero rank in distributed runs
            raise PruneError(
                "lm-eval returned no results (distributed evaluation is not supported)"
            )
        metric = s.task_metric if task_metric is None else task_metric
        scores = scores_from_results(results, wanted, metric)
        if outcomes:
            self._attach_outcomes(scores, results)
        return scores

    def _attach_outcomes(self, scores: dict[str, TaskScore], results: dict) -> None:
        """Fill each task score's `outcomes` from the samples lm-eval logged for that task,
        under the filter its metric was reported with (a group's row has none)."""
        samples = results.get("samples") or {}
        for name, score in scores.items():
            if name not in samples:
                continue
            entry = results["results"][name]
            key = next(k for k in entry if k.split(",")[0] == score.metric)
            score.outcomes = outcomes_from_samples(
                self._task(name), samples[name], key.split(",", 1)[1]
            )

    def _task(self, name: str) -> Any:
        """The built task object called `name` (its doc_to_choice/doc_to_target read the gold)."""
        if not hasattr(self, "_tasks"):
            self._tasks = dict(_leaf_tasks(self.task_dict))
        if name not in self._tasks:  # a task lm-eval built itself from a group or tag
            from lm_eval.tasks import get_task_dict

            self._tasks.update(_leaf_tasks(get_task_dict([name], self.manager)))
        return self._tasks[name]


def _leaf_tasks(task_dict: dict) -> Iterator[tuple[str, Any]]:
    """(name, task object) for every task in lm-eval's (possibly nested) task dict."""
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        elif value is not None:
            yield str(getattr(value, "task_name", None) or key), value


def outcomes_from_samples(task: Any, samples: Sequence[dict], filter_key: str) -> DocOutcomes:
    """The per-document outcomes of one task from lm-eval's logged samples (`log_samples=True`).

    lm-eval 0.4 logs one sample per (filter, document), in document order, with
    `doc_id`, `doc`, `target` (= `doc_to_target(doc)`), `filtered_resps` (what
    `process_results` scored: one `(log-likelihood, is greedy)` per request, in
    request order), `filter`, `metrics` (the names) and each metric's value under its
    name. The gold index and acc_norm's divisors are read as lm-eval's own
    multiple-choice scoring reads them (`ConfigurableTask.process_results`): gold from
    `doc_to_text` for tasks with several contexts (WinoGrande's partial scoring) and
    `doc_to_target` otherwise, a string label as its index among the choices; the
    divisor of each choice is `len(choice)` of `doc_to_choice(doc)`.
    """
    rows = [x for x in samples if x.get("filter", filter_key) == filter_key]
    multiple_choice = getattr(task, "OUTPUT_TYPE", None) == "multiple_choice" and hasattr(
        task, "doc_to_choice"
    )
    doc_ids: list[int] = []
    lls: list[list[float]] = []
    gold: list[int | None] = []
    lengths: list[list[int]] = []
    logged: dict[str, list[Any]] = {name: [] for name in rows[0].get("metrics", ())} if rows else {}
    for row in rows:
        doc_ids.append(int(row["doc_id"]))
        lls.append([_loglikelihood(r) for r in row["filtered_resps"] if _has_ll(r)])
        if multiple_choice:
            doc = row["doc"]
            choices = task.doc_to_choice(doc)
            label = task.doc_to_text(doc) if getattr(task, "multiple_input", 0) else row["target"]
            gold.append(_gold_index(label, choices, bool(getattr(task, "multiple_target", 0))))
            lengths.append([len(c) for c in choices])
        else:
            gold.append(None)
            lengths.append([len(str(a[1])) for a in row["arguments"] if len(a) > 1])
        for name, column in logged.items():
            column.append(row.get(name))
    # Tuple-valued metrics (f1's (gold, pred), word_perplexity's (ll, words), ...) are left out.
    values = {
        name: [float(v) for v in column]
        for name, column in logged.items()
        if all(isinstance(v, numbers.Real) for v in column)
    }
    return DocOutcomes(doc_ids, values, lls, gold, lengths)


def _has_ll(resp: Any) -> bool:
    """Whether a filtered response carries a log-likelihood (not a generated string)."""
    first = resp[0] if isinstance(resp, (tuple, list)) and resp else resp
    return isinstance(first, numbers.Real)


def _loglikelihood(resp: Any) -> float:
    return float(resp[0] if isinstance(resp, (tuple, list)) else resp)


def _gold_index(label: Any, choices: Sequence[str], multiple_target: bool) -> int | None:
    """lm-eval's reading of a multiple-choice label: an index, or a choice's text."""
    if multiple_target or isinstance(label, (list, tuple)):
        return None  # several gold choices: acc counts any of them
    if isinstance(label, str):
        return choices.index(label) if label in choices else None
    if isinstance(label, numbers.Integral) and 0 <= int(label) < len(choices):
        return int(label)
    return None


@functools.lru_cache(maxsize=1024)
def _compiled_template(template: str) -> Any:
    from lm_eval.utils import env

    return env.from_string(template)


@contextmanager
def _compiled_templates() -> Iterator[None]:
    """Compile each Jinja template of a task once instead of once per document.

    lm-eval's `utils.apply_template` compiles the template string on every call (about a
    millisecond each), and a task renders its templates for every document when it builds
    requests and again when it logs samples. The rendered text is the same; only the
    compilation is reused.
    """
    import lm_eval.utils as utils

    saved = utils.apply_template
    utils.apply_template = lambda template, doc: _compiled_template(template).render(**doc)
    try:
        yield
    finally:
        utils.apply_template = saved


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


# --------------------------------------------------------------------------- fast engine glue


class _RecordingLM(LM):
    """Collects the loglikelihood requests lm-eval would send to a model (answers are dummies)."""

    def __init__(self) -> None:
        super().__init__()
        self.instances: list[Any] = []

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[Answer]:
        self.instances.extend(requests)
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise FastEngineUnsupported(
            "the fast engine scores loglikelihood tasks only (this task needs rolling perplexity)"
        )

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise FastEngineUnsupported(
            "the fast engine scores loglikelihood tasks only (this task generates text)"
        )


class _ReplayLM(_RecordingLM):
    """Answers lm-eval's requests from precomputed (log-likelihood, is greedy) pairs."""

    def __init__(self, answers: dict[Key, Answer]) -> None:
        super().__init__()
        self.answers = answers

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[Answer]:
        try:
            return [self.answers[tuple(req.args)] for req in requests]
        except KeyError as exc:  # lm-eval built different requests than when recording
            raise PruneError(
                f"fast engine: lm-eval asked for request {str(exc)[:80]}, which it did not build "
                "when recording (the lm-eval engine can score this task)"
            ) from None


@contextmanager
def _one_process() -> Iterator[None]:
    """Let `simple_evaluate` return its results in every torchrun process: it returns None
    unless LOCAL_RANK is 0, while prune splits candidates, not documents, across processes
    (`prune.distributed`), so each lm-eval call is a whole single-process evaluation."""
    saved = os.environ.get("LOCAL_RANK")
    if saved is None:
        yield
        return
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        os.environ["LOCAL_RANK"] = saved


@contextmanager
def _without_env_info() -> Iterator[None]:
    """Skip the environment report `simple_evaluate` adds to every result (it runs `pip list`
    and `git` in subprocesses: about half a second per call, and it changes no score)."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda storage: None), (lambda: None)
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = saved


def _encode(hflm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize one request exactly as `HFLM.loglikelihood` does."""
    if context == "":
        cont = hflm.tok_encode(continuation, add_special_tokens=False)
        if hflm.prefix_token_id != cont[0]:
            return [hflm.prefix_token_id], cont
        return cont[:1], cont[1:]
    return hflm._encode_pair(context, continuation)


# --------------------------------------------------------------------------- fast evaluator


class FastEvaluator:
    """The fast engine behind lm-eval's task machinery: requests in, lm-eval scores out."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: EvalSettings,
        *,
        progress: bool = False,
        **engine_options: Any,
    ) -> None:
        check_single_device(model)  # before recording the requests, which takes a while
        self.model, self.settings = model, settings
        self.runner = lm_eval_runner(model, tokenizer, settings)  # shared with the lm-eval path
        self.hflm = self.runner.lm  # tokenizes the requests exactly as the lm-eval path does
        recorder = _RecordingLM()
        with _without_env_info():
            self.runner.run(lm=recorder, outcomes=False)
        self.recorded = recorder.instances  # lm-eval's Instances, in its order
        self.requests = self._tokenize(recorder.instances)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.engine = FastEngine(
            model, pad_id=pad if isinstance(pad, int) else 0, progress=progress, **engine_options
        )

    def _tokenize(self, instances: list[Any]) -> list[Request]:
        max_length = self.hflm.max_length
        requests: dict[tuple[tuple[str, int], Key], Request] = {}
        for inst in instances:
            key = tuple(inst.args)
            group = (str(inst.task_name), int(inst.doc_id))
            if (group, key) in requests:
                continue
            context, continuation = key
            ctx, cont = _encode(self.hflm, context, continuation)
            if not ctx or not cont:
                raise PruneError(
                    f"request {key!r} has an empty context or continuation after tokenization"
                )
            if len(cont) > max_length:
                raise PruneError(
                    f"a continuation of {len(cont)} tokens exceeds the model's length {max_length}"
                )
            inputs = (ctx + cont)[-(max_length + 1) :][:-1]
            requests[(group, key)] = Request(key, group, inputs, cont)
        return list(requests.values())

    def answers(
        self,
        candidates: Sequence[Sequence[int]],
        on_done: Callable[[int, dict[Key, Answer]], None] | None = None,
    ) -> list[dict[Key, Answer]]:
        """Per candidate: (context, continuation) -> (log-likelihood, is greedy).

        `on_done(i, answers)` is called as soon as candidate `i`'s answers are complete
        (`FastEngine.run`), before the remaining candidates are computed.
        """

        def keyed(values: Sequence[Answer]) -> dict[Key, Answer]:
            return {req.key: ans for req, ans in zip(self.requests, values, strict=True)}

        report = None if on_done is None else (lambda i, values: on_done(i, keyed(values)))
        return [keyed(v) for v in self.engine.run(self.requests, candidates, on_done=report)]

    def scores(
        self,
        answers: dict[Key, Answer],
        task_metric: str | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, TaskScore]:
        """lm-eval's scores (`TaskScore` per task) for one candidate's answers, computed by the
        same `LmEvalRunner.run` as the lm-eval path; `task_metric` overrides the settings' one."""
        with _without_env_info():
            return self.runner.run(tasks, lm=_ReplayLM(answers), task_metric=task_metric)


def evaluate_candidates(
    model: Any,
    tokenizer: Any,
    settings: EvalSettings,
    candidates: list[tuple[int, ...]],
    progress: bool = True,
    on_done: Callable[[int, dict[str, TaskScore]], None] | None = None,
) -> list[dict[str, TaskScore]]:
    """Score the model with each candidate set of blocks removed (`()` = full model), like the
    lm-eval path does, in one shared computation. Returns one task -> TaskScore dict per candidate.

    `on_done(i, scores)` receives candidate `i`'s scores as soon as the engine has finished
    it, while the other candidates are still to run (so a caller can cache each one and an
    interrupted call loses only the candidates not yet finished).
    """
    evaluator = FastEvaluator(model, tokenizer, settings, progress=progress and len(candidates) > 1)
    scores: dict[int, dict[str, TaskScore]] = {}

    def finished(index: int, answers: dict[Key, Answer]) -> None:
        scores[index] = evaluator.scores(answers)
        if on_done is not None:
            on_done(index, scores[index])

    answers = evaluator.answers(candidates, on_done=finished)
    return [scores[i] if i in scores else evaluator.scores(a) for i, a in enumerate(answers)]


def close_calls(
    answers: dict[Key, Answer], instances: Sequence[Any], tolerance: float = 1e-3
) -> int:
    """Documents whose best two choices' log-likelihoods are within `tolerance` (ties that
    float rounding may order either way); counts raw and length-normalised scores separately."""
    by_doc: dict[tuple[str, int], list[Any]] = {}
    for inst in instances:
        by_doc.setdefault((inst.task_name, inst.doc_id), []).append(inst)
    count = 0
    for insts in by_doc.values():
        if len(insts) < 2:
            continue
        lls = sorted((answers[tuple(i.args)][0] for i in insts), reverse=True)
        norm = sorted(
            (answers[tuple(i.args)][0] / max(1, len(i.args[1])) for i in insts), reverse=True
        )
        count += int(abs(lls[0] - lls[1]) <= tolerance) + int(abs(norm[0] - norm[1]) <= tolerance)
    return count
