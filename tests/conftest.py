"""Shared fixtures: small things built in code, never downloaded."""

from __future__ import annotations

import os

import pytest
import torch

from capfilt.config import MedConfig, WorldConfig

# Two cores: keep each test process to one intra-op thread so parallel work (Ray) is not starved.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray clusters started by the tests listen on loopback only (Ray reads this when it is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TOY_CORPUS = [
    "a red circle left of a blue square",
    "two green triangles above a yellow star on a striped background",
    "a small purple square below a large orange circle",
    "a picture of a dog running on grass",
    "click to enlarge",
    "img 2041 jpg",
    "three blue stars and a red triangle",
    "a large white circle right of a small black square",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from capfilt.data.text import train_tokenizer

    return train_tokenizer(TOY_CORPUS * 20, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)


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


@pytest.fixture
def s3_server():
    """A real S3-protocol server (moto) on loopback with a fresh bucket, emptied afterwards.

    moto keeps its state per process, not per server, so each test gets its own bucket name and the
    state is reset when the test ends; otherwise one test's objects appear in the next one's output.
    """
    import uuid

    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        bucket = f"capfilt-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        yield _S3(endpoint=endpoint, bucket=bucket, client=client)
        requests.post(f"{endpoint}/moto-api/reset", timeout=10)
    finally:
        server.stop()


class _S3:
    def __init__(self, endpoint, bucket, client):
        self.endpoint, self.bucket, self.client = endpoint, bucket, client

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options that reach this server."""
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"
