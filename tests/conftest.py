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


class FaultyS3Proxy:
    """A loopback HTTP proxy in front of the S3 server that fails chosen GETs, as a flaky network does.

    ``fail(pattern, times)``: the next ``times`` GETs of object paths containing ``pattern`` get a 500
    ``InternalError`` instead of the object. Everything else is forwarded unchanged, so clients talk S3
    to a real S3-protocol server.
    """

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.failures: dict[str, int] = {}
        self.failed: list[str] = []
        self.lock = threading.Lock()
        target = urlparse(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                if self.command == "GET" and proxy._take_failure(self.path):
                    body = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {name: value for name, value in self.headers.items() if name.lower() != "connection"}
                connection.request(self.command, self.path, body=data, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD answer has no body but the object's length.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, pattern: str, times: int) -> None:
        with self.lock:
            self.failures[pattern] = times

    def _take_failure(self, path: str) -> bool:
        with self.lock:
            for pattern, left in self.failures.items():
                if pattern in path and left > 0:
                    self.failures[pattern] = left - 1
                    self.failed.append(path)
                    return True
        return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_s3(s3_server):
    """``s3_server`` behind a :class:`FaultyS3Proxy`; ``storage_options`` reach the server through the proxy,
    with the S3 client's own retries off, so each injected failure reaches capfilt's retries."""
    proxy = FaultyS3Proxy(s3_server.endpoint)
    proxy.storage_options = {"key": "testing", "secret": "testing",
                             "client_kwargs": {"endpoint_url": proxy.endpoint, "region_name": "us-east-1"},
                             "config_kwargs": {"retries": {"max_attempts": 1}}}
    try:
        yield proxy
    finally:
        proxy.close()
