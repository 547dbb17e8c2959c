"""Sizing CapFilt's actor pool: what fits beside the CPUs reserved for reading, waiting for it, the stream's plan."""

from __future__ import annotations

import time

import pytest

from capfilt.config import CapFiltConfig, identity
from capfilt.stages.capfilt.read import ShardTask
from capfilt.stages.capfilt.run import actor_pool, resource_request, stream, wait_for_actor_pool


def test_gpu_actors_leave_the_cpus_reserved_for_reading():
    config = CapFiltConfig(reserve_cpus_for_reading=4, cpus_per_actor=1)
    pool = actor_pool(config, {"GPU": 8, "CPU": 8})
    assert pool["concurrency"] == (1, 4) and pool["num_gpus"] == 1 and pool["num_cpus"] == 1
    # Half a CPU per GPU actor: the 4 CPUs left hold all 8.
    assert actor_pool(config.model_copy(update={"cpus_per_actor": 0.5}), {"GPU": 8, "CPU": 8})["concurrency"] == (1, 8)
    # The vitb-8gpu pipeline's cluster: 8 single-GPU nodes of 8 CPUs, 8 reserved.
    assert actor_pool(CapFiltConfig(actors=8, reserve_cpus_for_reading=8), {"GPU": 8, "CPU": 64})["concurrency"] == 8
    with pytest.raises(ValueError, match="5 requested but the cluster fits 4"):
        actor_pool(config.model_copy(update={"actors": 5}), {"GPU": 8, "CPU": 8})
    with pytest.raises(ValueError, match="no room for an actor"):
        actor_pool(config, {"GPU": 8, "CPU": 4})


def test_the_autoscaler_is_asked_for_the_actors_and_the_reading_cpus():
    bundles, what = resource_request(CapFiltConfig(cpus_per_actor=2), {})
    assert bundles == [{"CPU": 2}, {"CPU": 1}]
    assert what == "1 CPU actor (2 CPUs) + 1 CPU for reading"
    # Once GPUs are there, GPU actors; the reading CPUs as single CPUs, which any node may hold.
    bundles, what = resource_request(CapFiltConfig(actors=3, reserve_cpus_for_reading=2.5), {"GPU": 1, "CPU": 8})
    assert bundles == [{"CPU": 1, "GPU": 1}] * 3 + [{"CPU": 1}, {"CPU": 1}, {"CPU": 0.5}]
    assert what == "3 GPU actors (1 GPU, 1 CPU each) + 2.5 CPUs for reading"


def test_waiting_for_room_times_out_naming_what_it_waited_for(ray_cluster):
    # The test cluster has 2 CPUs and no autoscaler: an actor of 2 CPUs beside 1 for reading never fits.
    config = CapFiltConfig(cpus_per_actor=2, wait_for_resources_s=1.5)
    said = []
    started = time.monotonic()
    with pytest.raises(TimeoutError) as error:
        wait_for_actor_pool(config, log=said.append, poll_s=0.2)
    assert 1.5 <= time.monotonic() - started < 10
    message = str(error.value)
    assert "waited 1.5 s for 1 CPU actor (2 CPUs) + 1 CPU for reading; the cluster has 2 CPUs" in message
    assert "capfilt.wait_for_resources_s" in message
    assert len(said) == 1 and "waiting up to 1.5 s" in said[0] and "capfilt.wait_for_resources_s" in said[0]
    # What fits is planned at once, without asking the autoscaler.
    assert wait_for_actor_pool(CapFiltConfig(wait_for_resources_s=0), log=said.append) == (
        {"concurrency": (1, 1), "threads": 1, "num_cpus": 1.0}, False)
    with pytest.raises(TimeoutError, match="waited 0 s for 2 CPU actors"):
        wait_for_actor_pool(CapFiltConfig(actors=2, wait_for_resources_s=0), log=said.append)
    # How long to wait changes nothing in the output: a run may resume with another value.
    assert identity(CapFiltConfig(wait_for_resources_s=5)) == identity(CapFiltConfig())


def test_reads_are_tasks_of_their_own_not_fused_into_the_actors(ray_cluster, capsys):
    # Fused, each actor would decode its own input and the model would wait on it.
    todo = [ShardTask(f"/data/{i:05d}.parquet", "web", {}) for i in range(3)]
    for pool in ({"concurrency": (1, 1), "threads": 1, "num_cpus": 1.0}, {"concurrency": 2, "threads": 1, "num_cpus": 1.0}):
        stream(CapFiltConfig(), todo, pool, 32).explain()
        optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
        assert "ActorPoolMapOperator[MapBatches(CapFiltWorker)]" in optimized, optimized
        assert "TaskPoolMapOperator[MapBatches(_read_task)]" in optimized, optimized
