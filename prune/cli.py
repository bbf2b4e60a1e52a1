"""The `prune` command line: parse options, call one library function, print the result.

Library code raises PruneError; only this module turns it into `Error: ...` (adding
hints about flags, which the library does not know about).

Importing this module loads no torch, transformers or lm-eval, so `prune --help` and
`prune validate` answer at once: commands import the library inside their bodies.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from prune import __version__
from prune.defaults import (
    CALIBRATION_SAMPLES,
    CALIBRATION_SEQ_LEN,
    DEFAULT_MODEL,
    DEFAULT_SHARD_SIZE,
    DEFAULT_STRATEGIES,
    DEVICE_MAPS,
    DEVICES,
    DTYPES,
    ENGINES,
    EVAL_BATCH_SIZE,
    EXPORT_DTYPES,
    HEAL_BATCH_SIZE,
    HEAL_CHECKPOINT_EVERY,
    HEAL_LORA_RANK,
    HEAL_METHODS,
    HEAL_SAMPLES,
    HEAL_STEPS,
    REPORT_TASKS,
    SEED,
)
from prune.errors import FastEngineUnsupported, PruneError

log = logging.getLogger("prune")


@dataclass(frozen=True)
class Verbosity:
    """How much the user wants to see, from `-v` and `-q`; the group puts it on `ctx.obj`."""

    verbose: int = 0
    quiet: bool = False

    @property
    def progress(self) -> bool:
        """Whether to show progress bars (everything but `--quiet`)."""
        return not self.quiet


pass_verbosity = click.make_pass_decorator(Verbosity, ensure=True)


def _setup_logging(verbosity: Verbosity) -> None:
    level = (
        logging.ERROR if verbosity.quiet else logging.INFO if verbosity.verbose else logging.WARNING
    )
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("prune").setLevel(logging.DEBUG if verbosity.verbose > 1 else level)


def _configure_libraries(verbosity: Verbosity, *, datasets: bool = False) -> None:
    """Set the logs and progress bars of transformers and huggingface_hub (and datasets) through
    their own switches, for a command about to load a model or touch the Hub.

    Called from inside such commands, never at start-up, so `--help` and `validate` import
    none of these libraries.
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    if verbosity.verbose > 1:
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_error()
    if not verbosity.quiet:
        return
    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    disable_progress_bars()  # Hub downloads and uploads
    if datasets:  # "Generating train split" when calibration text comes from a dataset
        try:
            from datasets.utils.logging import disable_progress_bar
        except ImportError:  # pragma: no cover - an optional dependency of calibration
            return
        disable_progress_bar()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup (`finally`) runs on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def handle_errors(func):
    """Turn library errors into one `Error: ...` line and exit code 1; Ctrl-C and SIGTERM
    into `Error: interrupted` and 130 or 143 (128 + the signal, as shells report it)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FastEngineUnsupported as exc:
            raise click.ClickException(f"{exc.reason} (use --engine lm-eval)") from exc
        except PruneError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt as exc:
            # A library that saved resumable state says so in the message (`prune heal`).
            click.echo(f"Error: {str(exc) or 'interrupted'}", err=True)
            sys.exit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT))

    return wrapper


class MeasureChoice(click.ParamType):
    """A relevance measure name, checked against the registry when used (not at import)."""

    name = "measure"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from prune.measures import measure_names

        return "[" + "|".join(measure_names()) + "]"

    def convert(self, value, param, ctx):
        from prune.measures import measure_names

        names = measure_names()
        if value not in names:
            self.fail(f"'{value}' is not one of {', '.join(names)}.", param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        from prune.measures import measure_names

        return [CompletionItem(n) for n in measure_names() if n.startswith(incomplete)]


class MeasureList(MeasureChoice):
    """Comma-separated measure names -> a list (order kept, duplicates dropped); the library
    checks the names (an unknown one is an `Error:` line naming the accepted ones)."""

    name = "measures"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return super().get_metavar(param, ctx) + ",..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        chosen: list[str] = []
        for item in str(value).split(","):
            name = item.strip()
            if name and name not in chosen:
                chosen.append(name)
        return chosen


model_argument = click.argument("model", default=DEFAULT_MODEL, required=False)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="Weights dtype; auto = float32 on CPU, bfloat16 on GPU.",
)
device_option = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    envvar="PRUNE_DEVICE",
    help="Where to run the model.",
)
device_map_option = click.option(
    "--device-map",
    type=click.Choice(DEVICE_MAPS),
    default=None,
    help="Spread a model too large for one device over the GPUs, then CPU memory, then disk "
    "(accelerate); replaces --device.",
)
max_memory_option = click.option(
    "--max-memory",
    default=None,
    metavar="DEVICE=SIZE,...",
    help="Memory each device may hold under --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
    "(alone: --device-map auto).",
)


def _max_memory(text: str | None) -> dict | None:
    """`--max-memory` parsed (before any model loads), or None; a bad value is one Error line."""
    from prune.sizes import parse_max_memory

    return None if text is None else parse_max_memory(text, "--max-memory")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prune")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Remove whole transformer blocks from Hugging Face causal LMs.

    MODEL is a Hub id, a checkpoint folder, a .gguf file, or an embedded name
    (smollm2-135m, the default, or gemma3-270m).

    \b
    Examples:
      prune info smollm2-135m
      prune drop smollm2-135m --layers 20,21 --out pruned/
    """
    from prune.distributed import is_main

    # Under torchrun the processes other than 0 show nothing but errors (see `main`).
    ctx.obj = Verbosity(verbose, quiet or not is_main())
    _setup_logging(ctx.obj)


@cli.command()
@model_argument
@dtype_option
@device_option
@device_map_option
@max_memory_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_verbosity
@handle_errors
def info(
    verbosity: Verbosity,
    model: str,
    dtype: str,
    device: str,
    device_map: str | None,
    max_memory: str | None,
    as_json: bool,
) -> None:
    """Show architecture, layer count, parameter counts and where the blocks live."""
    from prune.models import load_model
    from prune.summary import describe_model

    memory = _max_memory(max_memory)
    _configure_libraries(verbosity)
    summary = describe_model(
        load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=memory)
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    per_block = summary["parameters_per_block"]
    click.echo(f"model:         {summary['model']}")
    click.echo(f"architecture:  {summary['architecture']} ({summary['model_type']})")
    click.echo(f"layers:        {summary['num_layers']} at `{summary['layer_path']}`")
    if summary["layer_types"]:
        kinds = sorted(set(summary["layer_types"]))
        click.echo(
            "layer types:   " + ", ".join(f"{k} x{summary['layer_types'].count(k)}" for k in kinds)
        )
    click.echo(f"parameters:    {summary['parameters']:,}")
    click.echo(
        f"per block:     {per_block[0]:,}"
        + (" (all equal)" if len(set(per_block)) == 1 else f" .. {max(per_block):,}")
    )
    click.echo(f"dtype/device:  {summary['dtype']} on {summary['device']}")
    click.echo(
        f"tokenizer:     {summary['tokenizer']}"
        if summary["tokenizer"]
        else "tokenizer:     none (weights only: drop works; rank, compare and run need one)"
    )


@cli.command()
@model_argument
@click.option(
    "-l",
    "--layers",
    required=True,
    help="Layers to remove, e.g. 3,7,12 or 20-23; negatives count from the end.",
)
@click.option(
    "-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--max-shard-size",
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Shard safetensors above this size, e.g. 500MB, 1.5GB or a number of bytes.",
)
@dtype_option
@click.option(
    "--export-dtype",
    type=click.Choice(("auto", *EXPORT_DTYPES)),
    default="auto",
    show_default=True,
    help="Dtype of the written weights; auto = --dtype when given, else the source's.",
)
@device_option
@device_map_option
@max_memory_option
@pass_verbosity
@handle_errors
def drop(
    verbosity: Verbosity,
    model: str,
    layers: str,
    out: Path,
    overwrite: bool,
    max_shard_size: str,
    dtype: str,
    export_dtype: str,
    device: str,
    device_map: str | None,
    max_memory: str | None,
) -> None:
    """Remove the given layers from MODEL and write a loadable checkpoint to --out.

    A local folder, .gguf file or Hub id with safetensors weights is pruned on disk, one
    tensor at a time, in the source's dtype: memory stays near one --max-shard-size shard.
    For a Hub id only the safetensors weights and the small files are downloaded (to the
    Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache).
    """
    from prune.drop import drop_and_export
    from prune.sizes import ACCEPTED, parse_size
    from prune.surgery import parse_layer_list

    try:
        shard_bytes = parse_size(max_shard_size)
    except PruneError:
        raise PruneError(
            f"bad --max-shard-size value {max_shard_size!r} (accepted: {ACCEPTED})"
        ) from None
    memory = _max_memory(max_memory)
    _configure_libraries(verbosity)
    record = drop_and_export(
        model,
        parse_layer_list(layers),
        out,
        dtype=dtype,
        export_dtype=export_dtype,
        device=device,
        device_map=device_map,
        max_memory=memory,
        overwrite=overwrite,
        max_shard_size=shard_bytes,
    )
    click.echo(
        f"removed layers {record['removed_layers']}: {record['num_layers_before']} -> "
        f"{record['num_layers_after']} layers; wrote {out}"
    )


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@handle_errors
def validate(recipe: Path) -> None:
    """Check RECIPE (all problems at once) without loading any model."""
    from prune.recipe import load_recipe, summarize_recipe

    loaded = load_recipe(recipe)
    for warning in loaded.warnings:
        click.echo(f"Warning: {warning}", err=True)
    click.echo(f"{recipe}: OK")
    for line in summarize_recipe(loaded):
        click.echo(f"  {line}")


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), help="Output folder (overrides export.out)."
)
@click.option(
    "--limit",
    type=int,
    help="First N documents per task, for ranking and reporting (overrides the recipe).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    envvar="PRUNE_DEVICE",
    help="Overrides the recipe's device.",
)
@device_map_option
@max_memory_option
@click.option(
    "--push/--no-push", default=None, help="Push the variants to the Hub (overrides push.enabled)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue in an existing output folder, reusing cached evaluations.",
)
@pass_verbosity
@handle_errors
def run(
    verbosity: Verbosity,
    recipe: Path,
    out: Path | None,
    limit: int | None,
    device: str | None,
    device_map: str | None,
    max_memory: str | None,
    push: bool | None,
    overwrite: bool,
    resume: bool,
) -> None:
    """Run RECIPE end to end: rank with each strategy, prune, re-evaluate, export, compare.

    \b
    Writes to the output folder:
      recipe.yaml, comparison.json, comparison.md, relevance.png,
      variants/<strategy>/  (a loadable checkpoint with its model card)
      variants/<strategy>-healed/  (with a `heal:` section: the variant, healed)
    """
    from prune.pipeline import run_recipe
    from prune.report import format_table, headline_rows

    memory = _max_memory(max_memory)
    _configure_libraries(verbosity, datasets=True)
    result = run_recipe(
        recipe,
        out=out,
        limit=limit,
        device=device,
        device_map=device_map,
        max_memory=memory,
        push=push,
        overwrite=overwrite,
        resume=resume,
        progress=verbosity.progress,
        echo=lambda msg: click.echo(msg, err=True) if not verbosity.quiet else None,
    )
    click.echo(format_table(headline_rows(result.comparison)))
    click.echo("")
    click.echo(f"outputs in {result.out}/:")
    for name in (
        "comparison.md",
        "comparison.json",
        "relevance.png",
        "tradeoff.png",
        "recipe.yaml",
    ):
        if (result.out / name).exists():
            click.echo(f"  {result.out / name}")
    for name, folder in result.variants.items():
        click.echo(f"  {folder}  ({name})")
    for name, url in result.pushed.items():
        click.echo(f"pushed {name}: {url}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Target repo, NAMESPACE/NAME (created if missing).")
@click.option(
    "--private", is_flag=True, help="Create the repo private (an existing public repo is refused)."
)
@click.option("--revision", help="Branch to push to (created from main if new). Default: main.")
@click.option(
    "--commit-message", help="Commit title. Default: 'Upload FOLDER (pruned with prune VERSION)'."
)
@click.option(
    "--create-pr",
    is_flag=True,
    help="Open a pull request against main instead of committing to it.",
)
@click.option(
    "--token", help="Hub token. Default: HF_TOKEN, then the stored `hf auth login` token."
)
@click.option("--endpoint", help="Hub URL. Default: HF_ENDPOINT, then https://huggingface.co.")
@pass_verbosity
@handle_errors
def push(
    verbosity: Verbosity,
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    token: str | None,
    endpoint: str | None,
) -> None:
    """Check FOLDER (a checkpoint with its model card) and upload it to the Hub.

    Re-pushing an unchanged folder makes no commit.

    \b
    Example:
      prune push out/variants/accuracy --repo-id you/smollm2-135m-pruned
    """
    from prune.hub import push_folder, push_warnings

    _configure_libraries(verbosity)
    for warning in push_warnings(folder):
        click.echo(f"Warning: {warning}", err=True)
    result = push_folder(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        endpoint=endpoint,
    )
    click.echo(f"repo:   {result.repo_url}")
    if result.pr_url:
        click.echo(f"pull request: {result.pr_url}")
    state = "new commit" if result.created_commit else "unchanged, no new commit"
    click.echo(f"commit: {result.commit_oid} on {result.revision} ({state})")


def relevance_options(func):
    """Options shared by `rank` and `compare` (evaluation, calibration, cache)."""
    options = [
        click.option(
            "-t",
            "--tasks",
            default=None,
            help="Comma-separated lm-eval tasks, e.g. local_arc_easy,local_piqa.",
        ),
        click.option(
            "--limit", type=int, default=None, help="First N documents of each task (>= 1)."
        ),
        click.option(
            "--num-fewshot",
            type=int,
            default=0,
            show_default=True,
            help="Few-shot examples per prompt.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=EVAL_BATCH_SIZE,
            show_default=True,
            help="Batch size for evaluation and calibration.",
        ),
        click.option(
            "--task-metric",
            default=None,
            help="Per-task score, e.g. acc or acc_norm (default: the task's headline).",
        ),
        click.option(
            "--include-path",
            type=click.Path(),
            default=None,
            help="Folder of extra lm-eval task YAMLs.",
        ),
        click.option(
            "--data-dir",
            type=click.Path(),
            default=None,
            envvar="PRUNE_DATA_DIR",
            help="Benchmark data folder for local_* tasks [env: PRUNE_DATA_DIR].",
        ),
        click.option(
            "--calibration",
            default=None,
            help="Calibration text: a .txt/.jsonl file or a HF dataset name (default: LAMBADA passages).",
        ),
        click.option(
            "--samples",
            type=int,
            default=CALIBRATION_SAMPLES,
            show_default=True,
            help="Calibration samples.",
        ),
        click.option(
            "--seq-len",
            type=int,
            default=CALIBRATION_SEQ_LEN,
            show_default=True,
            help="Calibration tokens per sample.",
        ),
        click.option(
            "--block-size",
            type=int,
            default=1,
            show_default=True,
            help="Score spans of N consecutive blocks (angular distance for N > 1).",
        ),
        click.option(
            "-l",
            "--layers",
            default=None,
            help="Score only these layers for accuracy/perplexity, e.g. 0-3,29 (cosine scores all).",
        ),
        click.option(
            "--engine",
            type=click.Choice(ENGINES),
            default="auto",
            show_default=True,
            help="Engine for accuracy and perplexity: fast (same numbers, much cheaper), lm-eval "
            "(the reference path, one evaluation per layer), auto = fast where it can.",
        ),
        click.option(
            "--adaptive",
            type=int,
            default=None,
            metavar="K",
            help="Opt-in adaptive sampling for a removal of K blocks (accuracy, probability, "
            "margin, kl; needs --limit): every block on limit/8 documents, then more (limit/4, "
            "... limit) only for blocks whose 95% interval straddles the cut between the K "
            "least relevant and the rest, until none does; scores settled early show (n=N).",
        ),
        click.option(
            "--no-cache",
            is_flag=True,
            help="Recompute every evaluation instead of reusing cached results.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout."),
        dtype_option,
        device_option,
        device_map_option,
        max_memory_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _relevance_kwargs(kw: dict, verbosity: Verbosity) -> dict:
    """The library's keyword arguments from the shared options, with `progress` from -q."""
    keys = (
        "tasks",
        "limit",
        "num_fewshot",
        "batch_size",
        "task_metric",
        "include_path",
        "data_dir",
        "calibration",
        "samples",
        "seq_len",
        "block_size",
        "layers",
        "engine",
        "adaptive",
        "dtype",
        "device",
        "device_map",
    )
    out = {k: kw[k] for k in keys}
    out["max_memory"] = _max_memory(kw["max_memory"])
    out["use_cache"] = not kw["no_cache"]
    out["progress"] = verbosity.progress
    return out


@cli.command()
@model_argument
@click.option(
    "-m",
    "--metric",
    type=MeasureChoice(),
    default="cosine",
    show_default=True,
    help="Relevance measure.",
)
@relevance_options
@pass_verbosity
@handle_errors
def rank(verbosity: Verbosity, model: str, metric: str, as_json: bool, **kw) -> None:
    """Score every layer of MODEL by one relevance measure and print the table.

    \b
    Examples:
      prune rank smollm2-135m --metric cosine
      prune rank smollm2-135m --metric accuracy --tasks local_arc_easy --limit 100
    """
    from prune.compare import rank_model, render_table

    _configure_libraries(verbosity, datasets=True)
    report = rank_model(model, metric, **_relevance_kwargs(kw, verbosity))
    click.echo(json.dumps(report, indent=2) if as_json else render_table(report))


@cli.command()
@model_argument
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for report.json, table.md, relevance.png.",
)
@click.option(
    "--measures",
    type=MeasureList(),
    default=",".join(DEFAULT_STRATEGIES),
    show_default=True,
    help="Comma-separated relevance measures.",
)
@click.option(
    "--perplexity", "with_ppl", is_flag=True, help="Also compute the perplexity increase."
)
@relevance_options
@pass_verbosity
@handle_errors
def compare(
    verbosity: Verbosity,
    model: str,
    out: Path,
    measures: list[str],
    with_ppl: bool,
    as_json: bool,
    **kw,
) -> None:
    """Compare cosine relevance with measured accuracy drop (and perplexity) per layer.

    \b
    Example:
      prune compare smollm2-135m --tasks local_arc_easy,local_piqa --limit 200 --out out/compare
    """
    from prune.compare import compare_model, render_table

    chosen = list(measures)
    if with_ppl and "perplexity" not in chosen:
        chosen.append("perplexity")
    _configure_libraries(verbosity, datasets=True)
    report, paths = compare_model(model, out, measures=chosen, **_relevance_kwargs(kw, verbosity))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_table(report))
        click.echo(f"wrote {paths['table']}, {paths['json']}, {paths['figure']}", err=True)


@cli.command()
@click.argument("variant", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", required=True, type=click.Path(path_type=Path), help="Healed checkpoint folder."
)
@click.option(
    "--teacher",
    default=None,
    help="Model to distil from. Default: the base model recorded in VARIANT/prune.json.",
)
@click.option("--steps", type=int, default=HEAL_STEPS, show_default=True, help="Optimizer steps.")
@click.option(
    "--method",
    type=click.Choice(HEAL_METHODS),
    default="lora",
    show_default=True,
    help="What trains: LoRA adapters on every block (merged on export), every block, or only "
    "the blocks beside each cut.",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Peak learning rate. Default: 2e-4 lora, 2e-5 full, 5e-5 adjacent.",
)
@click.option(
    "--batch-size",
    type=int,
    default=HEAL_BATCH_SIZE,
    show_default=True,
    help="Chunks per micro-batch.",
)
@click.option(
    "--seq-len", type=int, default=CALIBRATION_SEQ_LEN, show_default=True, help="Tokens per chunk."
)
@click.option(
    "--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option(
    "--lm-weight",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of the language-modelling loss added to the KL to the teacher.",
)
@click.option("--lora-rank", type=int, default=HEAL_LORA_RANK, show_default=True, help="LoRA rank.")
@click.option(
    "--calibration",
    default=None,
    help="Training text: a .txt/.jsonl file or a HF dataset name (default: LAMBADA passages).",
)
@click.option(
    "--samples",
    type=int,
    default=HEAL_SAMPLES,
    show_default=True,
    help="Calibration texts read; 10% of them are held out to measure before and after.",
)
@click.option(
    "--data-dir",
    type=click.Path(),
    default=None,
    envvar="PRUNE_DATA_DIR",
    help="Benchmark data folder holding the default calibration text [env: PRUNE_DATA_DIR].",
)
@click.option(
    "--seed", type=int, default=SEED, show_default=True, help="Seed of data order and init."
)
@click.option(
    "-t",
    "--tasks",
    "report_tasks",
    default=",".join(REPORT_TASKS),
    show_default=True,
    help="Report tasks scored before and after healing (paired over documents); 'none' skips.",
)
@click.option(
    "--limit",
    "report_limit",
    type=int,
    default=None,
    help="First N documents of each report task (>= 1; default all).",
)
@click.option(
    "--num-fewshot",
    "report_fewshot",
    type=int,
    default=0,
    show_default=True,
    help="Few-shot examples per report-task prompt.",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="auto",
    show_default=True,
    help="Engine for the report tasks: fast, lm-eval, auto = fast where it can.",
)
@dtype_option
@click.option(
    "--export-dtype",
    type=click.Choice(("auto", *EXPORT_DTYPES)),
    default="auto",
    show_default=True,
    help="Dtype of the written weights; auto = the variant's (whatever --dtype trains in).",
)
@device_option
@click.option(
    "--checkpoint-every",
    type=int,
    default=HEAL_CHECKPOINT_EVERY,
    show_default=True,
    help="Save a resumable state every N steps (0: only on Ctrl-C).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted heal from its saved state.")
@click.option(
    "--overwrite", is_flag=True, help="Replace --out, and discard an unfinished heal's state."
)
@pass_verbosity
@handle_errors
def heal(
    verbosity: Verbosity,
    variant: Path,
    out: Path,
    teacher: str | None,
    device: str,
    data_dir: str | None,
    checkpoint_every: int,
    resume: bool,
    overwrite: bool,
    report_tasks: str,
    report_limit: int | None,
    report_fewshot: int,
    engine: str,
    export_dtype: str,
    **settings,
) -> None:
    """Recover what pruning cost: distil the base model into the pruned VARIANT folder.

    Trains VARIANT to match its teacher's next-token distributions (KL divergence) on
    calibration text, measures the KL and perplexity on held-out text before and after,
    and writes a loadable checkpoint with the same blocks to --out. Ctrl-C saves a
    state that --resume continues.

    \b
    Example:
      prune drop smollm2-135m --layers 20,21 --out pruned/
      prune heal pruned/ --steps 200 --out healed/
    """
    from prune.evaluate.settings import EvalSettings
    from prune.heal import HealSettings, heal_variant

    _configure_libraries(verbosity, datasets=True)
    report = None
    if report_tasks.strip().lower() != "none":
        report = EvalSettings(
            tasks=report_tasks, limit=report_limit, num_fewshot=report_fewshot, data_dir=data_dir
        )
    result = heal_variant(
        variant,
        out,
        teacher=teacher,
        settings=HealSettings(**settings),
        report=report,
        engine=engine,
        export_dtype=export_dtype,
        device=device,
        data_dir=data_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        progress=verbosity.progress,
    )
    held = result.healing["heldout"]
    click.echo(
        f"KL to teacher {held['kl_before']:.4f} -> {held['kl_after']:.4f}, perplexity "
        f"{held['perplexity_before']:.2f} -> {held['perplexity_after']:.2f} on held-out text "
        f"({held['chunks']} chunks)"
    )
    tasks = result.healing.get("tasks")
    if tasks is not None:
        change = tasks["change"]
        lo, hi = change["ci95"]
        verdict = "distinguishable" if tasks["distinguishable"] else "not distinguishable"
        click.echo(
            f"report tasks {tasks['mean_before']:.3f} -> {tasks['mean_after']:.3f} "
            f"({change['diff']:+.3f}, 95% CI {lo:+.3f}..{hi:+.3f}, {verdict}; "
            f"{change['documents']} documents of {', '.join(tasks['tasks'])})"
        )
    click.echo(f"wrote {result.out}")


def main() -> None:
    """The `prune` entry point: SIGTERM (e.g. from a job scheduler) is handled like Ctrl-C."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    _join_processes()
    cli(prog_name="prune")


def _join_processes() -> None:
    """Under torchrun: join the process group before any model is loaded (each process on its
    own GPU); the processes other than 0 print nothing on stdout (process 0 prints the result).
    """
    from prune import distributed

    try:
        if not distributed.init() or distributed.is_main():
            return
    except PruneError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


if __name__ == "__main__":
    main()
