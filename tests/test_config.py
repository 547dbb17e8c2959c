"""Pipeline files: safe loading, errors that name the key, what counts as a stage's identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from capfilt.config import CapFiltConfig, ConfigError, TrainConfig, identity, load_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
def test_shipped_pipelines_validate(name):
    assert load_pipeline(str(REPO / "pipelines" / name))


def test_errors_name_every_bad_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain:\n  stepz: 3\n  batch_size: -1\ncapfilt:\n  sampling: {nucleus_top_p: 2}\n")
    with pytest.raises(ConfigError) as error:
        load_pipeline(str(path))
    message = str(error.value)
    assert str(path) in message and "3 invalid key(s)" in message
    for key in ("pretrain.stepz", "pretrain.batch_size", "capfilt.sampling.nucleus_top_p"):
        assert key in message


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(str(path))


def test_runtime_settings_are_not_part_of_a_stage_identity():
    base = CapFiltConfig()
    faster = CapFiltConfig(batch_size=512, actors=4, rows_per_file=10, reserve_cpus_for_reading=0)
    assert identity(base) == identity(faster)
    assert identity(base) != identity(CapFiltConfig(threshold=0.7))
    assert identity(base) != identity(CapFiltConfig(sampling={"num_captions": 3}))
    assert identity(TrainConfig(workers=1, log_every=5)) == identity(TrainConfig(workers=4, log_every=50))
    assert identity(TrainConfig()) != identity(TrainConfig(steps=7))
    assert identity(TrainConfig()) != identity(TrainConfig(image={"hflip_p": 0.0}))
