"""One real CapFilt output per session: the stage run once on the shared tiny world with tiny models
(``small_world`` and ``tiny_models`` from tests/conftest.py).

``keep_policy: best_n`` with ``best_n: 1`` makes every decoded image keep one text and drop the
others (``not_in_best_n``), so the output has pairs, scored rejects and the world's unreadable rows
whatever the random models score.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from capfilt.config import CapFiltConfig, ReaderConfig

K = 2  # synthetic captions per image


@dataclass(frozen=True)
class Output:
    path: str
    manifest: dict
    world: object


@pytest.fixture(scope="session")
def capfilt_output(tmp_path_factory, small_world, tiny_models) -> Output:
    import ray

    from capfilt.stages.capfilt import run_capfilt

    config = CapFiltConfig.model_validate(dict(
        web=ReaderConfig(paths=f"{small_world.web}/*.parquet"),
        human=ReaderConfig(paths=f"{small_world.human}/*.parquet"),
        captioners=[{"path": tiny_models["captioner"]}],
        filters=[{"path": tiny_models["filter"]}],
        sampling={"num_captions": K, "max_length": 12, "min_length": 6},
        keep_policy="best_n", best_n=1,
        batch_size=8, decode_batch_size=8, cpus_per_actor=1.0, rows_per_file=20,
    ))
    # Ray only for this run: the stages' session fixture starts its own cluster later.
    started_here = not ray.is_initialized()
    if started_here:
        # address="local": a fresh cluster even when another one runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        path = str(tmp_path_factory.mktemp("capfilt_output") / "out")
        manifest = run_capfilt(config, path, log=lambda *args: None)
    finally:
        if started_here:
            ray.shutdown()
    return Output(path, manifest, small_world)


@pytest.fixture
def output_copy(capfilt_output, tmp_path) -> Path:
    """A copy of the output a test may damage."""
    return Path(shutil.copytree(capfilt_output.path, tmp_path / "out"))
