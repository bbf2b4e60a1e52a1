"""The `prune` command line: parse options, call one library function, print the result.

Library code raises PruneError; only this module turns it into `Error: ...`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from prune import __version__
from prune.errors import PruneError
from prune.models import DEFAULT_MODEL, DEVICES, DTYPES

log = logging.getLogger("prune")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("prune").setLevel(logging.DEBUG if verbose > 1 else level)
    if quiet:
        os.environ["TQDM_DISABLE"] = (
            "1"  # tqdm reads this only when imported: also tell the libraries
        )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_info() if verbose > 1 else hf_logging.set_verbosity_error()
        if quiet:  # "Loading weights", "Writing model shards", Hub downloads
            hf_logging.disable_progress_bar()
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def handle_errors(func):
    """Turn library errors into one `Error: ...` line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PruneError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)

    return wrapper


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prune")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
def cli(verbose: int, quiet: bool) -> None:
    """Remove whole transformer blocks from Hugging Face causal LMs.

    MODEL is a Hub id, a checkpoint folder, a .gguf file, or an embedded name
    (smollm2-135m, the default, or gemma3-270m).

    \b
    Examples:
      prune info smollm2-135m
      prune drop smollm2-135m --layers 20,21 --out pruned/
    """
    _setup_logging(verbose, quiet)


@cli.command()
@model_argument
@dtype_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@handle_errors
def info(model: str, dtype: str, device: str, as_json: bool) -> None:
    """Show architecture, layer count, parameter counts and where the blocks live."""
    from prune.models import load_model
    from prune.summary import describe_model

    summary = describe_model(load_model(model, dtype=dtype, device=device))
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
    "--max-shard-size", default="2GB", show_default=True, help="Shard safetensors above this size."
)
@dtype_option
@device_option
@handle_errors
def drop(
    model: str,
    layers: str,
    out: Path,
    overwrite: bool,
    max_shard_size: str,
    dtype: str,
    device: str,
) -> None:
    """Remove the given layers from MODEL and write a loadable checkpoint to --out."""
    from prune.export import drop_and_export
    from prune.surgery import parse_layer_list

    record = drop_and_export(
        model,
        parse_layer_list(layers),
        out,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
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
@click.option(
    "--push/--no-push", default=None, help="Push the variants to the Hub (overrides push.enabled)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue in an existing output folder, reusing cached evaluations.",
)
@handle_errors
def run(
    recipe: Path,
    out: Path | None,
    limit: int | None,
    device: str | None,
    push: bool | None,
    overwrite: bool,
    resume: bool,
) -> None:
    """Run RECIPE end to end: rank with each strategy, prune, re-evaluate, export, compare.

    \b
    Writes to the output folder:
      recipe.yaml, comparison.json, comparison.md, relevance.png,
      variants/<strategy>/  (a loadable checkpoint with its model card)
    """
    from prune.run import format_table, headline_rows, run_recipe

    quiet = bool(click.get_current_context().find_root().params.get("quiet"))
    result = run_recipe(
        recipe,
        out=out,
        limit=limit,
        device=device,
        push=push,
        overwrite=overwrite,
        resume=resume,
        progress=not quiet,
        echo=lambda msg: click.echo(msg, err=True) if not quiet else None,
    )
    click.echo(format_table(headline_rows(result.comparison)))
    click.echo("")
    click.echo(f"outputs in {result.out}/:")
    for name in ("comparison.md", "comparison.json", "relevance.png", "recipe.yaml"):
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
@handle_errors
def push(
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
    from prune.hub import push_folder

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
            default=8,
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
            "--samples", type=int, default=64, show_default=True, help="Calibration samples."
        ),
        click.option(
            "--seq-len",
            type=int,
            default=256,
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
            type=click.Choice(["auto", "fast", "lm-eval"]),
            default="auto",
            show_default=True,
            help="Engine for accuracy and perplexity: fast (same numbers, much cheaper), lm-eval "
            "(the reference path, one evaluation per layer), auto = fast where it can.",
        ),
        click.option(
            "--halving",
            type=int,
            default=None,
            metavar="K",
            help="Opt-in early stopping for accuracy: successive halving over the blocks on "
            "limit/8, limit/4, ... documents; the K least relevant get exact scores, the rest "
            "estimates (needs --limit).",
        ),
        click.option(
            "--no-cache",
            is_flag=True,
            help="Recompute every evaluation instead of reusing cached results.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout."),
        dtype_option,
        device_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _relevance_kwargs(kw: dict) -> dict:
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
        "halving",
        "dtype",
        "device",
    )
    out = {k: kw[k] for k in keys}
    out["use_cache"] = not kw["no_cache"]
    out["progress"] = os.environ.get("TQDM_DISABLE") != "1"
    return out


@cli.command()
@model_argument
@click.option(
    "-m",
    "--metric",
    type=click.Choice(["cosine", "accuracy", "perplexity"]),
    default="cosine",
    show_default=True,
    help="Relevance measure.",
)
@relevance_options
@handle_errors
def rank(model: str, metric: str, as_json: bool, **kw) -> None:
    """Score every layer of MODEL by one relevance measure and print the table.

    \b
    Examples:
      prune rank smollm2-135m --metric cosine
      prune rank smollm2-135m --metric accuracy --tasks local_arc_easy --limit 100
    """
    from prune.compare import rank_model, render_table

    report = rank_model(model, metric, **_relevance_kwargs(kw))
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
    default="cosine,accuracy",
    show_default=True,
    help="Comma-separated: cosine, accuracy, perplexity.",
)
@click.option(
    "--perplexity", "with_ppl", is_flag=True, help="Also compute the perplexity increase."
)
@relevance_options
@handle_errors
def compare(model: str, out: Path, measures: str, with_ppl: bool, as_json: bool, **kw) -> None:
    """Compare cosine relevance with measured accuracy drop (and perplexity) per layer.

    \b
    Example:
      prune compare smollm2-135m --tasks local_arc_easy,local_piqa --limit 200 --out out/compare
    """
    from prune.compare import compare_model, render_table

    chosen = [m.strip() for m in measures.split(",") if m.strip()]
    if with_ppl and "perplexity" not in chosen:
        chosen.append("perplexity")
    report, paths = compare_model(model, out, measures=chosen, **_relevance_kwargs(kw))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_table(report))
        click.echo(f"wrote {paths['table']}, {paths['json']}, {paths['figure']}", err=True)


def main() -> None:
    cli(prog_name="prune")


if __name__ == "__main__":
    main()
