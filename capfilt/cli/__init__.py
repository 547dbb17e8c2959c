"""The ``capfilt`` command: thin wrappers that parse, call and print."""

from __future__ import annotations

import os
import sys

import click

from capfilt.config import ConfigError, load_pipeline


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="capfilt")
def main() -> None:
    """BLIP-style CapFilt: caption and filter web image-text data, and pretrain on the result."""


@main.command()
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False))
def validate(pipeline: str) -> None:
    """Check a pipeline YAML; every bad key is named."""
    try:
        config = load_pipeline(pipeline)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    from capfilt.runner import plan

    try:
        steps = [step.name for step in plan(config)]
    except ValueError as error:
        raise click.ClickException(f"{pipeline}: {error}") from None
    click.echo(f"{pipeline}: valid; stages: {', '.join(steps) or 'none'}")


@main.command()
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", default=None, help="where artifacts go (default: run_dir in the YAML, else runs/<name>)")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
def run(pipeline: str, run_dir: str | None, address: str | None) -> None:
    """Run a pipeline's stages in order, skipping the complete ones."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        # A local cluster needs no network: keep Ray on loopback (read when ray is imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from capfilt.runner import run_pipeline

    try:
        config = load_pipeline(pipeline)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    address = address or config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local" always starts a fresh cluster; a bare ray.init() would join whatever cluster this
        # machine last started (/tmp/ray/ray_current_cluster), possibly a dead one.
        # The dashboard (on 127.0.0.1) also serves the State API that Ray Train polls; without it the
        # console fills with "State API may be temporarily unavailable" once a second.
        ray.init(address="local", num_cpus=config.ray.num_cpus, object_store_memory=config.ray.object_store_memory,
                 include_dashboard=True)
    try:
        run_pipeline(config, run_dir)
    finally:
        ray.shutdown()


@main.command()
@click.argument("out_dir")
@click.option("--pipeline", type=click.Path(exists=True, dir_okay=False),
              help="take the world from this pipeline's synth section")
@click.option("--seed", type=int, default=None)
@click.option("--num-web", type=int, default=None)
def synth(out_dir: str, pipeline: str | None, seed: int | None, num_web: int | None) -> None:
    """Write the generated world (web, human and test pairs with ground truth) to OUT_DIR."""
    from capfilt.config import WorldConfig
    from capfilt.data.world import write_world

    world = (load_pipeline(pipeline).synth if pipeline else None) or WorldConfig()
    overrides = {name: value for name, value in (("seed", seed), ("num_web", num_web)) if value is not None}
    world = world.model_copy(update=overrides)
    paths = write_world(WorldConfig.model_validate(world.model_dump()), out_dir)
    for name, value in vars(paths).items():
        click.echo(f"{name}: {value}")


_STORAGE_OPTION = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="fsspec storage option (JSON values parsed, e.g. anon=true); also $CAPFILT_STORAGE_OPTIONS as a JSON object",
)


@main.command("inspect")
@click.argument("path")
@click.option("--source", multiple=True, type=click.Choice(["web", "synthetic", "human"]), help="only these text sources")
@click.option("--reason", multiple=True, help="only rejects with this reason ('kept' selects the pairs)")
@click.option("--min-score", type=float, default=None, help="only texts with ITM probability >= this")
@click.option("--max-score", type=float, default=None, help="only texts with ITM probability <= this")
@click.option("--key", multiple=True, help="only rows of this image key (row-group statistics skip the rest)")
@click.option("--samples", type=click.IntRange(min=0), default=5, show_default=True, help="sample rows per table")
@click.option("--json", "as_json", is_flag=True, help="print the same information as JSON")
@_STORAGE_OPTION
def inspect_command(path, source, reason, min_score, max_score, key, samples, as_json, storage_options) -> None:
    """Counts, score quantiles, kept fraction by threshold, samples and shard accounting of a CapFilt output."""
    import json

    from capfilt.reporting.inspect import format_inspection, inspect_output
    from capfilt.reporting.reader import OutputError, parse_storage_options
    from capfilt.reporting.texts import TextFilter

    selection = TextFilter(tuple(source), tuple(reason), min_score, max_score, tuple(key))
    try:
        info = inspect_output(path, parse_storage_options(storage_options), selection, samples)
    except (OutputError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_inspection(info))


@main.command("report")
@click.argument("path")
@click.option("-o", "--output", "html_path", default="report.html", show_default=True, help="the HTML file to write")
@click.option("--samples-per-bucket", type=int, default=None, help="default: ReportConfig")
@click.option("--max-rejects-per-reason", type=int, default=None, help="default: ReportConfig")
@click.option("--thumbnail-size", type=int, default=None, help="default: ReportConfig")
@click.option("--seed", type=int, default=None, help="default: ReportConfig")
@_STORAGE_OPTION
def report_command(path, html_path, samples_per_bucket, max_rejects_per_reason, thumbnail_size, seed,
                   storage_options) -> None:
    """One self-contained HTML page: summary, score histograms, kept fraction, gallery, rejects, shards."""
    from pydantic import ValidationError

    from capfilt.config import ReportConfig
    from capfilt.reporting.reader import OutputError, parse_storage_options
    from capfilt.reporting.report import build_report

    overrides = {"samples_per_bucket": samples_per_bucket, "max_rejects_per_reason": max_rejects_per_reason,
                 "thumbnail_size": thumbnail_size, "seed": seed}
    try:
        config = ReportConfig(**{name: value for name, value in overrides.items() if value is not None})
        build_report(path, html_path, config, parse_storage_options(storage_options),
                     progress=lambda message: click.echo(message, err=True))
    except ValidationError as error:
        raise click.ClickException(f"report options: {error}") from None
    except (OutputError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(html_path)


if __name__ == "__main__":
    sys.exit(main())
