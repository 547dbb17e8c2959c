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
    stages = [name for name in ("synth", "ingest", "capfilt") if getattr(config, name) is not None]
    click.echo(f"{pipeline}: valid; stages: {', '.join(stages) or 'none'}")


@main.command()
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", default=None, help="where artifacts go (default: run_dir in the YAML, else runs/<name>)")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
def run(pipeline: str, run_dir: str | None, address: str | None) -> None:
    """Run a pipeline's stages in order, skipping the complete ones."""
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
        ray.init(num_cpus=config.ray.num_cpus, object_store_memory=config.ray.object_store_memory,
                 include_dashboard=False)
    try:
        run_pipeline(config, run_dir)
    finally:
        ray.shutdown()


@main.command()
@click.argument("out_dir")
@click.option("--pipeline", type=click.Path(exists=True, dir_okay=False), help="take the world from this pipeline's synth section")
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


if __name__ == "__main__":
    sys.exit(main())
