"""A MED small enough to train in milliseconds, and a pairs table made from a tiny generated world."""

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
def pairs_dir(tmp_path_factory):
    """A stage-like directory whose pairs/ table holds the human pairs of a tiny world (8 images)."""
    from capfilt.data.pairs import write_pairs
    from capfilt.data.world import write_world

    root = tmp_path_factory.mktemp("pairs_stage")
    world = write_world(WorldConfig(seed=1, num_web=0, num_human=8, num_test=0, image_size=32, rows_per_shard=8,
                                    failed_rows=0, corrupt_rows=0), str(root / "world"))
    write_pairs([PairSource(kind="shards", role="human", reader=ReaderConfig(paths=world.human + "/*.parquet"))],
                str(root))
    return str(root)
