"""A MED small enough to train in milliseconds, and the pairs of a tiny generated world as training streams them."""

from __future__ import annotations

import pytest

from capfilt.config import MedConfig, PairSource, ReaderConfig, WorldConfig


def small_med_config(**overrides) -> MedConfig:
    fields = {
        "preset": "tiny",
        "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2, "mlp_dim": 128},
        "text": {"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128, "dropout": 0.0},
        "embed_dim": 32,
        "queue_size": 64,
    }
    fields.update(overrides)
    return MedConfig(**fields)


@pytest.fixture(scope="session")
def stream_units(tmp_path_factory):
    """The human pairs of a tiny world (24 images, 6 shards of 4) as training reads them:
    ``(sources, units)`` with units ``{source, path, pairs}`` as index_pairs records them."""
    from capfilt.data.pairs import read_unit_pairs, training_units
    from capfilt.data.world import write_world

    root = tmp_path_factory.mktemp("stream")
    world = write_world(WorldConfig(seed=1, num_web=0, num_human=24, num_test=0, image_size=32, rows_per_shard=4,
                                    failed_rows=0, corrupt_rows=0), str(root / "world"))
    sources = [PairSource(kind="shards", role="human", reader=ReaderConfig(paths=world.human + "/*.parquet"))]
    units = [{"source": unit.source, "path": unit.path,
              "pairs": read_unit_pairs(sources[unit.source], unit.path, with_images=False).num_rows}
             for unit in training_units(sources)]
    return sources, units
