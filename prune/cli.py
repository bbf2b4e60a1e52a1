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
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("prune").setLevel(logging.DEBUG if verbose > 1 else level)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_info() if verbose > 1 else hf_logging.set_verbosity_error()
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
    "--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
    help="Weights dtype; auto = float32 on CPU, bfloat16 on GPU.",
)
device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True, envvar="PRUNE_DEVICE",
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
        click.echo("layer types:   " + ", ".join(f"{k} x{summary['layer_types'].count(k)}" for k in kinds))
    click.echo(f"parameters:    {summary['parameters']:,}")
    click.echo(f"per block:     {per_block[0]:,}" + (" (all equal)" if len(set(per_block)) == 1 else f" .. {max(per_block):,}"))
    click.echo(f"dtype/device:  {summary['dtype']} on {summary['device']}")


@cli.command()
@model_argument
@click.option("-l", "--layers", required=True, help="Layers to remove, e.g. 3,7,12 or 20-23; negatives count from the end.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Shard safetensors above this size.")
@dtype_option
@device_option
@handle_errors
def drop(model: str, layers: str, out: Path, overwrite: bool, max_shard_size: str, dtype: str, device: str) -> None:
    """Remove the given layers from MODEL and write a loadable checkpoint to --out."""
    from prune.export import drop_and_export
    from prune.surgery import parse_layer_list

    record = drop_and_export(
        model, parse_layer_list(layers), out, dtype=dtype, device=device,
        overwrite=overwrite, max_shard_size=max_shard_size,
    )
    click.echo(
        f"removed layers {record['removed_layers']}: {record['num_layers_before']} -> "
        f"{record['num_layers_after']} layers; wrote {out}"
    )


def main() -> None:
    cli(prog_name="prune")


if __name__ == "__main__":
    main()
