"""A local Ray cluster, a small noisy generated world and tiny exported captioner/filter models."""

from __future__ import annotations

import pytest

from capfilt.config import MedConfig, WorldConfig


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    from capfilt.data.world import write_world

    config = WorldConfig(seed=3, num_web=36, num_human=8, num_test=0, image_size=32, rows_per_shard=4,
                         failed_rows=2, corrupt_rows=2)
    return write_world(config, str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """A captioner and a filter exported from one tiny random MED (32 px), as capfilt writes them."""
    import torch

    from capfilt.models.export import export_captioner, export_filter
    from capfilt.models.med import MED

    torch.manual_seed(0)
    config = MedConfig(preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2,
                                               "mlp_dim": 128},
                       text={"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, embed_dim=32, queue_size=64)
    med = MED.from_config(config, tokenizer)
    root = tmp_path_factory.mktemp("models")
    return {"captioner": str(export_captioner(med, tokenizer, root / "captioner")),
            "filter": str(export_filter(med, tokenizer, root / "filter"))}
