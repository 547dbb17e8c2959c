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
@click.argument("pipeline")
def validate(pipeline: str) -> None:
    """Check a pipeline YAML (a path, or a URL such as s3://bucket/pipeline.yaml), or a comparison file's
    every row; every bad key is named."""
    from capfilt.compare import is_comparison, load_comparison
    from capfilt.runner import plan

    try:
        rows = load_comparison(pipeline)[1] if is_comparison(pipeline) else {"": load_pipeline(pipeline)}
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    for row, config in rows.items():
        where = f"{pipeline}: row {row!r}" if row else pipeline
        try:
            steps = [step.name for step in plan(config)]
        except ValueError as error:
            raise click.ClickException(f"{where}: {error}") from None
        click.echo(f"{where}: valid; stages: {', '.join(steps) or 'none'}")


@main.command()
@click.argument("pipeline")
@click.option("--run-dir", default=None,
              help="where artifacts go (default: run_dir in the YAML, else runs/<name> in the current directory)")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
@click.option("--reuse-stages-from", "reuse_from", multiple=True, metavar="RUN_DIR",
              help="take a stage complete there with the same settings and inputs instead of redoing it (repeatable)")
def run(pipeline: str, run_dir: str | None, address: str | None, reuse_from: tuple[str, ...]) -> None:
    """Run a pipeline's stages in order, skipping the complete ones.

    PIPELINE is a path or a URL (s3://bucket/pipeline.yaml; credentials as the backend finds them, e.g.
    AWS_* for S3). A complete stage whose settings or inputs changed is refused, naming the changed
    keys: use a new --run-dir, or delete that stage's directory and those of the stages after it.
    """
    try:
        config = load_pipeline(pipeline)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    from capfilt.runner import run_pipeline

    _with_ray(config, address, lambda: run_pipeline(config, run_dir, reuse_from=reuse_from))


@main.command()
@click.argument("comparison")
@click.option("--run-dir", default=None, help="rows go to RUN_DIR/<row> (default: run_dir in the file, else runs/<name>)")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
@click.option("--reuse-stages-from", "reuse_from", multiple=True, metavar="RUN_DIR",
              help="also reuse stages complete in this run directory, e.g. a finished demo (repeatable)")
def compare(comparison: str, run_dir: str | None, address: str | None, reuse_from: tuple[str, ...]) -> None:
    """Run the rows of a comparison file (a base pipeline and overrides per row) and write one table.

    Each row is a `capfilt run` in RUN_DIR/<row>; a stage complete in an earlier row with the same settings
    and inputs is reused, not redone. The table goes to RUN_DIR/table.md and table.json (pipelines/paper.yaml:
    BLIP's ablations on the generated world).
    """
    from capfilt.compare import load_comparison, run_comparison

    try:
        _, pipelines = load_comparison(comparison)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    try:
        _with_ray(next(iter(pipelines.values())), address, lambda: run_comparison(comparison, run_dir, reuse_from=reuse_from))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def _with_ray(config, address: str | None, work) -> None:
    """``work()`` on the cluster at ``address`` (else RAY_ADDRESS, the config's, or a new local one)."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        # A local cluster needs no network: keep Ray on loopback (read when ray is imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

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
    from capfilt.stages.capfilt import InputReadError

    try:
        work()
    except InputReadError as error:  # the input's fault, not capfilt's: the message, no traceback
        raise click.ClickException(str(error)) from None
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


@main.command("export")
@click.argument("capfilt_output")
@click.argument("dest")
@click.option("--format", "format_", type=click.Choice(["webdataset", "parquet"]), default="webdataset",
              show_default=True, help="webdataset: img2dataset's tars + .parquet index; parquet: images inline")
@click.option("--source", multiple=True, type=click.Choice(["web", "synthetic", "human"]),
              help="export these text sources only (repeat; default: all)")
@click.option("--group-by", type=click.Choice(["text", "image"]), default="text", show_default=True,
              help="one sample per kept text, or per image with all its kept texts")
@click.option("--min-score", type=float, default=None, help="only texts with ITM probability >= this (unscored pass)")
@click.option("--samples-per-shard", type=int, default=None, help="default: ExportConfig (10000)")
@click.option("--image-column", default=None, help="parquet: the image bytes column (default: jpg, as img2dataset)")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
@_STORAGE_OPTION
def export_command(capfilt_output, dest, format_, source, group_by, min_score, samples_per_shard, image_column,
                   address, storage_options) -> None:
    """Write a finished CapFilt output as WebDataset tars or Parquet that other trainers read.

    CAPFILT_OUTPUT and DEST are local paths or URLs (s3://, gs://); --storage-option applies to both and
    to the input shards the pairs refer to. Resumable: run the same command again after a kill.
    """
    import ray
    from pydantic import ValidationError

    from capfilt.config import ExportConfig
    from capfilt.reporting.reader import parse_storage_options
    from capfilt.stages.export import ExportError, run_export

    options = parse_storage_options(storage_options)
    values = {"format": format_, "sources": list(source) or None, "group_by": group_by, "min_score": min_score,
              "samples_per_shard": samples_per_shard, "image_column": image_column, "input_storage_options": options,
              "output_storage_options": options}
    try:
        settings = ExportConfig(**{name: value for name, value in values.items() if value is not None})
    except ValidationError as error:
        raise click.ClickException(f"export options: {error}") from None
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", **({} if address else {"include_dashboard": False}))
    try:
        manifest = run_export(capfilt_output, dest, settings, options, log=lambda line: click.echo(line, err=True))
    except (ExportError, ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    finally:
        ray.shutdown()
    totals = manifest["totals"]
    if totals["errors"]:
        raise click.ClickException(f"{totals['errors']} pairs could not be resolved against their input shards "
                                   f"({totals['errors_by_reason']}); they are listed in {dest}/errors")
    click.echo(dest)


if __name__ == "__main__":
    sys.exit(main())
