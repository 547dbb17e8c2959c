"""CapFilt on a cold cluster: a head with no CPUs and no worker node yet, as docker/ray-cluster.yaml starts
(``resources: {"CPU": 0}``, ``min_workers: 0``). The job asks Ray's autoscaler for what one actor and the
reads need and waits; a worker node joining then (here by hand, ``ray start --address``) lets it finish.

The cluster is a real one of ``ray start`` nodes on loopback addresses (see test_multinode.py).
"""

from __future__ import annotations

import shutil
import time

import pytest

from capfilt.config import WorldConfig
from tests.deploy.test_multinode import ENTRYPOINT, TERMINAL, Cluster, _check_output, _job_dir


@pytest.fixture
def cold_cluster():
    cluster = Cluster()
    try:
        cluster.start_head(num_cpus=0)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Four shards of 4 rows, a failed and a corrupt one among them: the job's work stays short."""
    from capfilt.data.world import write_world

    config = WorldConfig(seed=5, num_web=12, num_human=4, num_test=0, image_size=32, rows_per_shard=4,
                         failed_rows=1, corrupt_rows=1)
    return write_world(config, str(tmp_path_factory.mktemp("tiny-world")))


@pytest.mark.timeout(600)
def test_capfilt_job_waits_for_a_worker_node_on_a_cold_cluster(cold_cluster, tiny_world, tiny_models, tmp_path):
    output = tmp_path / "out"
    job = cold_cluster.submit(_job_dir(tmp_path / "job", tiny_world, tiny_models, output), *ENTRYPOINT)

    waiting = "capfilt: waiting up to 600 s (capfilt.wait_for_resources_s) for 1 CPU actor (1 CPU) + 1 CPU for reading"
    deadline = time.time() + 300
    while waiting not in (logs := cold_cluster.logs(job)):
        info = cold_cluster.job(job)
        assert info["status"] not in TERMINAL, f"{info.get('message')}\n{logs[-4000:]}"
        assert time.time() < deadline, f"the job did not start waiting:\n{logs[-4000:]}"
        time.sleep(1)
    assert "the cluster has 0 CPUs" in logs
    assert not (output / "_commits").exists()

    cold_cluster.add_worker(num_cpus=2)  # an actor and a read task
    info = cold_cluster.wait_job(job)
    logs = cold_cluster.logs(job)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-4000:]}"
    assert logs.count("capfilt: waiting up to") == 1
    _check_output(output, tiny_world)
    assert set(cold_cluster.workers) <= cold_cluster.job_nodes(job)  # the head has no CPU to run any
