"""`prune rank` and `prune compare`: validate the options, load the model, run the measures,
and return (and write) the per-layer report of prune.layer_report.

Every option is checked against the measure registry (prune/measures/) before any
model is loaded: unknown measure names, missing tasks or calibration texts, a bad
`--adaptive`. `write_report` writes report.json, table.md and relevance.png, each
atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prune.defaults import (
    CALIBRATION_BATCH_SIZE,
    CALIBRATION_SAMPLES,
    CALIBRATION_SEQ_LEN,
    DEFAULT_STRATEGIES,
    EVAL_BATCH_SIZE,
)
from prune.distributed import is_main
from prune.errors import PruneError
from prune.layer_report import build_report, render_table
from prune.measures import (
    Measure,
    Ranking,
    RankRequest,
    adaptive_rounds,
    get_measure,
    measure_names,
    registry,
)


def check_measures(names: Sequence[str]) -> list[Measure]:
    """The registered measures called `names`; PruneError naming the accepted ones otherwise."""
    if not names:
        raise PruneError(f"no measure given (accepted: {', '.join(measure_names())})")
    return [get_measure(name) for name in names]


def compare_measures(
    loaded: Any,
    settings: Any,
    *,
    texts: Sequence[str] | None,
    model_name: str,
    measures: Sequence[str] = DEFAULT_STRATEGIES,
    seq_len: int = CALIBRATION_SEQ_LEN,
    batch_size: int = CALIBRATION_BATCH_SIZE,
    block_size: int = 1,
    engine: str = "auto",
    cache: Any = None,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    adaptive: int | None = None,
) -> dict[str, Any]:
    """Run the chosen measures on one loaded model and return the report (prune.layer_report).

    `settings` (EvalSettings) serves the measures that evaluate tasks, `texts` those
    that read calibration texts. `layers` and `adaptive` go to the measures they apply
    to (per-layer measures; measures that accept adaptive sampling); a one-pass measure
    such as cosine always scores every block.
    """
    rankings: dict[str, Ranking] = {}
    timings: dict[str, float] = {}
    for measure in check_measures(measures):
        start = time.perf_counter()
        request = RankRequest(
            loaded,
            texts=texts if measure.needs_texts else None,
            settings=settings if measure.needs_tasks else None,
            seq_len=seq_len,
            batch_size=batch_size,
            block_size=block_size,
            layers=layers if measure.per_layer else None,
            engine=engine,
            cache=cache,
            progress=progress,
            adaptive=adaptive if measure.adaptive else None,
        )
        rankings[measure.name] = measure.rank(request)
        timings[measure.name] = round(time.perf_counter() - start, 2)
    return build_report(model_name, rankings, timings)


def report_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Where `write_report` puts report.json ("json"), table.md ("table") and relevance.png
    ("figure")."""
    out = Path(out_dir)
    return {"json": out / "report.json", "table": out / "table.md", "figure": out / "relevance.png"}


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, table.md and relevance.png into `out_dir` (each atomically)."""
    from prune.atomic import write_file
    from prune.plot import plot_relevance

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out '{out}' exists and is not a folder")
    paths = report_paths(out)
    write_file(paths["json"], json.dumps(report, indent=2) + "\n")
    write_file(paths["table"], render_table(report))
    write_file(paths["figure"], plot_relevance(report))
    return paths


# --------------------------------------------------------------------------- command entry points


def _check_adaptive(measures: list[Measure], limit: int | None, adaptive: int | None) -> None:
    """A bad `--adaptive` value, a missing `--limit`, or no measure that accepts it: PruneError.
    (K below the number of candidates is checked once the model's depth is known.)"""
    if adaptive is None:
        return
    if not any(m.adaptive for m in measures):
        accepting = [m.name for m in registry().values() if m.adaptive]
        plural = "s" if len(accepting) > 1 else ""
        raise PruneError(
            f"--adaptive applies to the {', '.join(accepting)} measure{plural} only "
            f"(this run measures: {', '.join(m.name for m in measures)})"
        )
    adaptive_rounds(limit, adaptive)


def _prepare(
    measures: list[Measure],
    *,
    tasks: str | Sequence[str] | None,
    limit: int | None,
    num_fewshot: int,
    batch_size: int,
    task_metric: str | None,
    include_path: str | None,
    data_dir: str | None,
    calibration: str | None,
    samples: int,
    use_cache: bool,
) -> tuple[Any, list[str] | None, Any]:
    """Check everything cheap (settings, task names, calibration) before a model is loaded;
    returns (EvalSettings or None, calibration texts or None, ResultCache or None)."""
    settings = None
    task_measures = [m.name for m in measures if m.needs_tasks]
    if task_measures:
        if not tasks:
            raise PruneError(
                f"the {task_measures[0]} measure needs --tasks (e.g. local_arc_easy,local_piqa)"
            )
        from prune.evaluate.settings import EvalSettings
        from prune.tasks import resolve_task_names, split_task_names, task_manager

        settings = EvalSettings(
            tasks=tuple(split_task_names(tasks)),
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            task_metric=task_metric,
            data_dir=data_dir,
            include_path=include_path,
        )
        resolve_task_names(settings.tasks, task_manager(data_dir, include_path, settings.tasks))
    texts = None
    if any(m.needs_texts for m in measures):
        from prune.calibration import load_calibration

        texts = load_calibration(calibration, samples=samples, data_dir=data_dir)
    cache = None
    if use_cache:
        from prune.evaluate.cache import ResultCache

        cache = ResultCache()
    return settings, texts, cache


def _parse_layers(layers: str | Sequence[int] | None) -> list[int] | None:
    if layers is None or layers == "":
        return None
    if isinstance(layers, str):
        from prune.surgery import parse_layer_list

        return parse_layer_list(layers)
    return list(layers)


def measure_model(
    model: str,
    measures: Sequence[str],
    *,
    tasks: str | Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = EVAL_BATCH_SIZE,
    task_metric: str | None = None,
    include_path: str | None = None,
    data_dir: str | None = None,
    calibration: str | None = None,
    samples: int = CALIBRATION_SAMPLES,
    seq_len: int = CALIBRATION_SEQ_LEN,
    block_size: int = 1,
    layers: str | Sequence[int] | None = None,
    engine: str = "auto",
    use_cache: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    adaptive: int | None = None,
    device_map: str | None = None,
    max_memory: Any = None,
) -> dict[str, Any]:
    """Check the options (before any model is loaded), load MODEL and run `measures` on it.

    `batch_size` serves both the task evaluation and the calibration passes; `device_map`
    and `max_memory` spread a large model over devices (`prune.models.load_model`). Returns
    the report dict that `rank` prints and `compare` writes.
    """
    from prune.models import load_model

    chosen = check_measures(measures)
    _check_adaptive(chosen, limit, adaptive)
    settings, texts, cache = _prepare(
        chosen,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        task_metric=task_metric,
        include_path=include_path,
        data_dir=data_dir,
        calibration=calibration,
        samples=samples,
        use_cache=use_cache,
    )
    # Every measure reads text (calibration or tasks): a weight-only folder fails here, in one line.
    purpose = f"ranking layers by {', '.join(m.name for m in chosen)}"
    loaded = load_model(
        model,
        dtype=dtype,
        device=device,
        tokenizer_for=purpose,
        device_map=device_map,
        max_memory=max_memory,
    )
    report = compare_measures(
        loaded,
        settings,
        texts=texts,
        model_name=model,
        measures=[m.name for m in chosen],
        seq_len=seq_len,
        batch_size=batch_size,
        block_size=block_size,
        engine=engine,
        cache=cache,
        progress=progress,
        layers=_parse_layers(layers),
        adaptive=adaptive,
    )
    report["source"] = loaded.source.to_dict()
    return report


def compare_model(
    model: str,
    out: str | os.PathLike,
    *,
    measures: Sequence[str] = DEFAULT_STRATEGIES,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """`prune compare`: run the measures (options as in `measure_model`) and write
    report.json/table.md/relevance.png to `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out '{out}' exists and is not a folder")
    report = measure_model(model, measures, **options)
    if not is_main():  # under torchrun process 0 alone writes; the others only shared the work
        return report, report_paths(out)
    return report, write_report(report, out)


def rank_model(model: str, metric: str, **options: Any) -> dict[str, Any]:
    """`prune rank`: one measure on MODEL (options as in `measure_model`), as a report dict
    (same layout as `compare`)."""
    return measure_model(model, [metric], **options)
