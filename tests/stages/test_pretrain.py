"""The pretrain stage on Ray Train: killed mid-run, it resumes exactly from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capfilt.config import ImageConfig, MedConfig, PairSource, ReaderConfig, TokenizerConfig, TrainConfig
from capfilt.data.output import OutputConflictError
from capfilt.stages.pretrain import prepare_tokenizer, run_pretrain
from capfilt.training.records import read_log

STEPS, CHECKPOINT_EVERY = 60, 20
# The run killed twice (killed_twice): a checkpoint every 10 steps, so the resumed run makes one of its
# own well before the end wherever the first kill lands.
TWICE_EVERY = 10  # checkpoint_every of the run killed twice

# Run in a child process so the test can SIGKILL a driver that owns its own Ray cluster.
CHILD = """
import json, sys
import ray
from capfilt.config import MedConfig, PairSource, TrainConfig
from capfilt.stages.pretrain import run_pretrain
args = json.loads(open(sys.argv[1]).read())
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
run_pretrain(TrainConfig(**args["train"]), MedConfig(**args["model"]), args["tokenizer_dir"],
             [PairSource(**source) for source in args["sources"]], args["out_dir"],
             storage_options=args.get("storage_options"))
"""


def _model() -> MedConfig:
    return MedConfig(preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2,
                                            "mlp_dim": 128},
                     text={"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, embed_dim=32, queue_size=64)


def _train(**overrides) -> TrainConfig:
    values = dict(steps=STEPS, batch_size=8, lr=1e-3, warmup_steps=2, schedule="cosine", min_lr=1e-4,
                  checkpoint_every=CHECKPOINT_EVERY, log_every=1, image=ImageConfig(hflip_p=0.0))
    values.update(overrides)
    return TrainConfig(**values)


def _sources(world) -> list[PairSource]:
    # 8 human pairs and the usable rows of two web shards: about 16 pairs.
    return [PairSource(kind="shards", role="human", reader=ReaderConfig(paths=world.human + "/*.parquet")),
            PairSource(kind="shards", role="web", reader=ReaderConfig(paths=world.web + "/0000{0..1}.parquet"))]


@pytest.fixture(scope="module")
def tokenizer_dir(small_world, tmp_path_factory):
    return prepare_tokenizer(TokenizerConfig(vocab_size=200), _sources(small_world),
                             str(tmp_path_factory.mktemp("tokenizer")), log=lambda _: None)


def test_prepare_tokenizer_trains_on_the_captions_once(small_world, tokenizer_dir):
    from capfilt.data.text import load_tokenizer
    from capfilt.models.tokens import special_ids

    tokenizer = load_tokenizer(tokenizer_dir)
    assert {"dec", "enc"} <= set(special_ids(tokenizer))
    assert "circle" in tokenizer.get_vocab() or "square" in tokenizer.get_vocab()  # whole words of the world
    messages = []
    prepare_tokenizer(TokenizerConfig(vocab_size=200), _sources(small_world), tokenizer_dir, log=messages.append)
    assert messages == [f"[tokenizer] complete in {tokenizer_dir}, skipped"]


def test_prepare_tokenizer_copies_an_existing_one(tokenizer, tmp_path):
    from capfilt.data.text import load_tokenizer

    tokenizer.save_pretrained(tmp_path / "given")
    out = prepare_tokenizer(TokenizerConfig(source=str(tmp_path / "given")), [], str(tmp_path / "run"),
                            log=lambda _: None)
    assert load_tokenizer(out).get_vocab() == tokenizer.get_vocab()


def _wait_for(condition, process, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the pretrain child exited ({process.returncode}) before {what}: "
                                 f"{process.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_until_quiet(path: Path, seconds: float, timeout_s: float) -> None:
    deadline, last, since = time.time() + timeout_s, None, time.time()
    while time.time() < deadline:
        size = path.stat().st_size
        if size != last:
            last, since = size, time.time()
        elif time.time() - since >= seconds:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} kept growing after its driver was killed")


def _losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _pretrain_in_a_child_killed_past(step: int, train: TrainConfig, world, tokenizer_dir: str,
                                     tmp_path: Path) -> tuple[Path, int]:
    """The pretrain stage in a child process (CHILD), SIGKILLed once it has trained past ``step``;
    returns its stage directory and the child's pid."""
    out_dir = tmp_path / "pretrain"
    args = {"train": train.model_dump(mode="json"), "model": _model().model_dump(mode="json"),
            "tokenizer_dir": tokenizer_dir, "sources": [s.model_dump(mode="json") for s in _sources(world)],
            "out_dir": str(out_dir)}
    (tmp_path / "args.json").write_text(json.dumps(args))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "args.json")], cwd=Path.cwd(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    log_path = out_dir / "train_log.jsonl"
    try:
        _wait_for(lambda: max(_losses(read_log(str(log_path))), default=0) >= step, child, 240,
                  f"training past step {step}")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    return out_dir, child.pid


def _kill_the_worker_past_a_checkpoint_of_this_run(log_path: Path, killed: dict) -> None:
    """SIGKILL the Ray Train worker once the run that last started has trained 3 steps past a checkpoint."""
    deadline = time.time() + 240
    while time.time() < deadline:
        records = read_log(str(log_path))
        starts = [index for index, r in enumerate(records) if r.get("event") == "start"]
        current = records[starts[-1]:] if len(starts) >= 2 else []  # the resumed run's records
        checkpoints = [r["step"] for r in current if r.get("event") == "checkpoint"]
        if checkpoints and max(_losses(current), default=0) >= checkpoints[-1] + 3:
            for pid in _descendants_named("RayTrainWorker"):
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, losses=_losses(records))
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed_twice(ray_cluster, small_world, tokenizer_dir, tmp_path_factory):
    """One pretraining run killed twice: its driver (a child process, SIGKILL) past its first checkpoint;
    then, resumed here, its training worker past a checkpoint of the resumed run, which restarts from it.

    Two tests read what happened: the resume after the driver was killed, and the restart after the
    worker was lost. Each start of Ray Train costs ~20 s on two cores, so one run serves both."""
    import threading

    tmp_path = tmp_path_factory.mktemp("killed-twice")
    # Kill the driver once it has trained past its first checkpoint.
    out_dir, _ = _pretrain_in_a_child_killed_past(TWICE_EVERY + 3, _train(checkpoint_every=TWICE_EVERY), small_world,
                                                  tokenizer_dir, tmp_path)
    log_path = out_dir / "train_log.jsonl"
    # The dead driver's Ray workers outlive it by a moment; let them go before the rerun (which would
    # stop them anyway: see capfilt.training.checkpoint.CURRENT_FILE).
    _wait_until_quiet(log_path, seconds=3.0, timeout_s=60)
    first = out_dir / "checkpoints" / "attempt-000" / f"step_{TWICE_EVERY:08d}"
    facts = {"out_dir": out_dir, "log_path": log_path, "killed_losses": _losses(read_log(str(log_path))),
             "first_checkpoint_files": set(json.loads((first / "state.json").read_text())["files"]),
             "result_before_resume": (out_dir / "_RESULT.json").exists(), "messages": [], "worker_killed": {}}

    killer = threading.Thread(target=_kill_the_worker_past_a_checkpoint_of_this_run,
                              args=(log_path, facts["worker_killed"]), daemon=True)
    killer.start()
    facts["result"] = run_pretrain(_train(checkpoint_every=TWICE_EVERY), _model(), tokenizer_dir, _sources(small_world),
                                   str(out_dir), log=facts["messages"].append)
    killer.join(timeout=5)
    facts["records"] = read_log(str(log_path))
    return facts


def _reported_steps(messages: list[str]) -> tuple[list[int], list[int]]:
    """The steps the stage reported before and after it restarted from a lost worker."""
    restart = next((i for i, m in enumerate(messages) if "restarting from the last checkpoint" in m), len(messages))
    steps = [[int(m.split()[2].split("/")[0]) for m in part if m.startswith("[pretrain] step ")]
             for part in (messages[:restart], messages[restart:])]
    return steps[0], steps[1]


def test_killed_pretraining_resumes_from_its_checkpoint_and_learns(killed_twice, small_world, tokenizer_dir):
    from capfilt.models.med import load_med

    out_dir, messages, result, records = (killed_twice[k] for k in ("out_dir", "messages", "result", "records"))
    killed_losses = killed_twice["killed_losses"]
    assert {"med.safetensors", "med.json", "optimizer.pt"} <= killed_twice["first_checkpoint_files"]
    assert not killed_twice["result_before_resume"]

    resumed = result["resumed_from_step"]
    assert resumed is not None and resumed % TWICE_EVERY == 0 and TWICE_EVERY <= resumed < STEPS
    assert any(f"resuming from step {resumed}" in message for message in messages)
    # Each step from there on is reported once, up to the lost worker's restart (see the test below).
    before_restart, _ = _reported_steps(messages)
    assert before_restart and before_restart == list(range(resumed + 1, before_restart[-1] + 1)), before_restart
    starts = [r for r in records if r.get("event") == "start"]
    assert [s["step"] for s in starts][:2] == [0, resumed] and starts[1]["resumed_from"].endswith(
        f"step_{resumed:08d}")
    # Every attempt's rank 0 says where and in what precision it trains (mixed_precision auto: fp32 on a
    # CPU for towers 64 wide, below capfilt.training.precision.CPU_BF16_MIN_WIDTH).
    precision = "fp32"
    workers = [r for r in records if r.get("event") == "worker"]
    assert len(workers) >= len(starts) and {(w["device"], w["precision"]) for w in workers} == {("cpu", precision)}
    assert f"[pretrain] rank 0 on cpu: {precision}, 1 torch threads" in messages
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in records if "loss" in r)
    losses = _losses(records)
    assert sorted(losses) == list(range(1, STEPS + 1))  # each step once: the killed run's tail was rewound
    # Same data, same random draws: the steps both runs trained agree exactly.
    overlap = [step for step in killed_losses if step > resumed]
    assert overlap
    assert all(losses[step] == pytest.approx(killed_losses[step], abs=1e-5) for step in overlap)
    # It learns: the captioning loss falls fastest on 16 pairs; the total falls too.
    def mean(name, steps):
        by_step = {r["step"]: r[name] for r in records if name in r}
        return sum(by_step[s] for s in steps) / len(steps)

    first, last = range(1, 6), range(STEPS - 4, STEPS + 1)
    assert mean("loss_lm", last) < 0.9 * mean("loss_lm", first)
    assert mean("loss", last) < 0.95 * mean("loss", first)

    assert result["steps"] == STEPS and result["pairs"]["by_source"]["human"] == 8
    assert result["pairs"]["total"] == sum(result["pairs"]["by_source"].values()) >= 14
    med = load_med(result["med"])
    assert med.config.vision.image_size == 32
    assert (Path(result["med"]) / "tokenizer.json").is_file()
    assert not (out_dir / "checkpoints").exists()

    # Complete: a rerun returns the record without training (checkpoint_every is a runtime setting);
    # other settings are refused.
    again: list[str] = []
    assert run_pretrain(_train(), _model(), tokenizer_dir, _sources(small_world), str(out_dir),
                        log=again.append) == result
    assert again == [f"[pretrain] complete in {out_dir}, skipped"]
    with pytest.raises(OutputConflictError, match="train.lr"):
        run_pretrain(_train(lr=5e-4), _model(), tokenizer_dir, _sources(small_world), str(out_dir))


def test_pairs_that_cannot_be_used_in_training_are_counted_and_replaced(ray_cluster, small_world, tokenizer_dir,
                                                                         tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from capfilt.data.pairs import PAIRS_INDEX, index_pairs

    shards = tmp_path / "web"
    shutil.copytree(small_world.web, shards)
    corrupt = sum(pq.read_table(path).column("gt_image_status").to_pylist().count("corrupt")
                  for path in shards.glob("*.parquet"))
    assert corrupt == 2
    sources = [PairSource(kind="shards", role="web", reader=ReaderConfig(paths=str(shards / "*.parquet")))]
    # In the driver: bad pairs are met by the decoding tasks, wherever the rank runs.
    train = _train(steps=6, checkpoint_every=6, max_bad_fraction=0.5, shuffle_shards=3, train_in_driver=True)
    out_dir = tmp_path / "pretrain"
    index = index_pairs(sources, str(out_dir))  # the stage reuses it: the shard goes missing after indexing
    assert index["total"] == 36 - 2  # two rows failed to download; the corrupt ones are met in training
    gone = next(unit for unit in index["units"] if unit["pairs"] == 4
                and "corrupt" not in pq.read_table(unit["path"]).column("gt_image_status").to_pylist())
    os.remove(gone["path"])
    # A shard that cannot be read when the stage counts the pairs is a named reject (its rows unknown),
    # not a crash; one gone by then is simply not listed.
    (shards / "99999.parquet").write_bytes(b"not parquet")
    recount = index_pairs(sources, str(tmp_path / "recount"))
    assert recount["total"] == 30 and recount["rejects"]["shard_unreadable"] == 1
    assert [unit["error"] for unit in recount["units"] if "error" in unit][0].startswith(str(shards / "99999"))

    result = run_pretrain(train, _model(), tokenizer_dir, sources, str(out_dir), log=lambda _: None)
    bad = result["bad_pairs"]
    # 48 pairs trained over 34: every pair is met once, some twice.
    decode_errors = {reason: n for reason, n in bad["by_reason"].items() if reason.startswith("decode_error: ")}
    assert bad["by_reason"]["shard_unreadable"] == 4 and sum(decode_errors.values()) == 2
    assert set(bad["by_reason"]) == {"shard_unreadable", *decode_errors}
    assert bad["pairs"] == 6 and bad["fraction"] == round(6 / 34, 6) and bad["met"] >= 6
    assert any(gone["path"] in example.get("detail", "") for example in bad["examples"])
    assert result["steps"] == 6

    # More bad pairs than the run allows stop it, naming the reasons and where they are listed.
    (tmp_path / "strict").mkdir()
    shutil.copy(out_dir / PAIRS_INDEX, tmp_path / "strict" / PAIRS_INDEX)
    with pytest.raises(Exception, match="of the 34 pairs could not be used.*max_bad_fraction 0.1 allows"):
        run_pretrain(_train(steps=6, checkpoint_every=6, max_bad_fraction=0.1, shuffle_shards=3, train_in_driver=True),
                     _model(),
                     tokenizer_dir, sources, str(tmp_path / "strict"), log=lambda _: None)


def test_pairs_and_stage_directory_on_s3_train_and_resume_on_another_machine(
        ray_cluster, small_world, tokenizer_dir, tmp_path, s3_server, monkeypatch):
    from capfilt.data.shards import expand_paths
    from capfilt.models.med import load_med
    from capfilt.training.store import SCRATCH_ENV, scratch_for

    url = s3_server.url("runs/pretrain")
    options = s3_server.storage_options
    # The pairs are read from the bucket too, a unit at a time, by the index tasks and the unit cache.
    for source in _sources(small_world):
        for path in expand_paths(source.reader.paths):
            s3_server.client.upload_file(path, s3_server.bucket, f"shards/{source.role}/{Path(path).name}")
    on_s3 = [PairSource(kind="shards", role=source.role, reader=ReaderConfig(
        paths=s3_server.url(f"shards/{source.role}/*.parquet"), storage_options=options)) for source in _sources(small_world)]
    args = {"train": _train().model_dump(mode="json"), "model": _model().model_dump(mode="json"),
            "tokenizer_dir": tokenizer_dir, "sources": [s.model_dump(mode="json") for s in on_s3],
            "out_dir": url, "storage_options": options}
    (tmp_path / "args.json").write_text(json.dumps(args))
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "machine-a"))
    mirror_a = scratch_for(url)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "args.json")], cwd=Path.cwd(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                             env={**os.environ, SCRATCH_ENV: str(tmp_path / "machine-a")})

    def uploaded() -> set[str]:
        listing = s3_server.client.list_objects_v2(Bucket=s3_server.bucket, Prefix="runs/pretrain/")
        return {item["Key"][len("runs/pretrain/"):] for item in listing.get("Contents", [])}

    first_state = f"checkpoints/step_{CHECKPOINT_EVERY:08d}/state.json"
    try:
        _wait_for(lambda: first_state in uploaded()
                  and max(_losses(read_log(str(mirror_a / "train_log.jsonl"))), default=0) >= CHECKPOINT_EVERY + 3,
                  child, 240, "a checkpoint on S3 and training past it")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    _wait_until_quiet(mirror_a / "train_log.jsonl", seconds=3.0, timeout_s=60)
    killed_losses = _losses(read_log(str(mirror_a / "train_log.jsonl")))
    assert {"_capfilt.json", "_pairs_index.json", "train_log.jsonl"} <= uploaded()
    assert "_RESULT.json" not in uploaded()

    # Another machine: an empty mirror. It resumes from the newest checkpoint on S3.
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "machine-b"))
    messages: list[str] = []
    result = run_pretrain(_train(), _model(), tokenizer_dir, on_s3, url, log=messages.append,
                          storage_options=options)
    resumed = result["resumed_from_step"]
    assert resumed is not None and resumed % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= resumed < STEPS
    assert any(f"resuming from step {resumed}" in message for message in messages)
    assert result["pairs"]["by_source"]["human"] == 8 and result["pairs"]["units"] == 4
    assert result["bad_pairs"]["pairs"] == 0
    losses = _losses(read_log(str(scratch_for(url) / "train_log.jsonl")))
    assert sorted(losses) == list(range(1, STEPS + 1))  # the log came along and was rewound
    overlap = [step for step in killed_losses if step > resumed]
    assert overlap and all(losses[step] == pytest.approx(killed_losses[step], abs=1e-5) for step in overlap)

    stage_files = uploaded()
    assert {"_RESULT.json", "med/med.safetensors", "med/med.json", "train_log.jsonl"} <= stage_files
    assert not any(name.startswith("checkpoints/") for name in stage_files)
    assert not list((tmp_path / "machine-b" / "fetched").glob("step_*"))  # the final checkpoint's copy went
    assert result["remote"]["med"] == f"{url}/med"
    assert result["med"].startswith(str(tmp_path / "machine-b")) and load_med(result["med"]).config.vision.image_size == 32

    # A third machine finds it complete and gets the model, without training.
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "machine-c"))
    again: list[str] = []
    found = run_pretrain(_train(), _model(), tokenizer_dir, on_s3, url, log=again.append,
                         storage_options=options)
    assert again == [f"[pretrain] complete in {url}, skipped"]
    assert found["med"].startswith(str(tmp_path / "machine-c")) and load_med(found["med"]) is not None
    with pytest.raises(OutputConflictError, match="train.lr"):
        run_pretrain(_train(lr=5e-4), _model(), tokenizer_dir, on_s3, url, storage_options=options)


def _descendants_named(marker: str) -> list[int]:
    """Our own processes (this test's Ray cluster) whose command line has ``marker``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    ours, frontier = set(), [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        ours.update(children)
        frontier.extend(children)
    found = []
    for pid in ours:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_a_training_worker_lost_mid_run_restarts_from_the_last_checkpoint(killed_twice):
    killed, messages, result, records = (killed_twice[k] for k in ("worker_killed", "messages", "result", "records"))
    assert killed, "the training worker was never found to kill"
    assert result["steps"] == STEPS and Path(result["med"]).is_dir()
    assert any("lost 1 worker(s)" in message and "restarting from the last checkpoint" in message
               for message in messages), messages
    # The resumed run (the second start) lost its worker past a checkpoint it made, and restarted from it.
    starts = [r["step"] for r in records if r.get("event") == "start"]
    assert len(starts) == 3 and starts[0] == 0 and starts[2] % TWICE_EVERY == 0 and starts[2] > starts[1]
    assert _reported_steps(messages)[1] == list(range(starts[2] + 1, STEPS + 1))
    losses = _losses(records)
    assert sorted(losses) == list(range(1, STEPS + 1))  # the same final step count, each step once
    # The restarted run trains the same samples in each step: the steps both ran agree exactly.
    overlap = [step for step in killed["losses"] if step > starts[2]]
    assert overlap and all(losses[step] == pytest.approx(killed["losses"][step], abs=1e-5) for step in overlap)


def test_training_in_the_driver_trains_the_same_steps_and_resumes_after_the_driver_is_killed(
        killed_twice, small_world, tokenizer_dir, tmp_path):
    """train_in_driver (Ray Train's local mode): no worker process, the same losses step for step as the
    Ray Train worker of killed_twice (same data, same draws), checkpoints in the stage directory, and a
    driver killed past one resumes from it."""
    import torch

    train = _train(checkpoint_every=TWICE_EVERY, train_in_driver=True)
    out_dir, child_pid = _pretrain_in_a_child_killed_past(2 * TWICE_EVERY + 3, train, small_world, tokenizer_dir,
                                                          tmp_path)
    log_path = out_dir / "train_log.jsonl"
    killed = read_log(str(log_path))
    attempt = out_dir / "checkpoints" / "attempt-000"
    kept = sorted(path.name for path in attempt.iterdir() if path.name.startswith("step_"))
    assert 1 <= len(kept) <= train.keep_checkpoints and f"step_{2 * TWICE_EVERY:08d}" in kept, kept

    threads = torch.get_num_threads()
    messages: list[str] = []
    result = run_pretrain(train, _model(), tokenizer_dir, _sources(small_world), str(out_dir), log=messages.append)
    assert torch.get_num_threads() == threads  # the loop's own thread count is not left on the caller
    records = read_log(str(log_path))
    # Both runs trained in their driver's process: the child's, then this one.
    assert [r["pid"] for r in records if r.get("event") == "worker"] == [child_pid, os.getpid()]
    assert "[pretrain] rank 0 on cpu (in the driver): fp32, 1 torch threads" in messages
    resumed = result["resumed_from_step"]
    assert resumed is not None and resumed >= 2 * TWICE_EVERY and resumed % TWICE_EVERY == 0
    assert any(f"resuming from step {resumed}: {STEPS} steps of 8 pairs in the driver" in message
               for message in messages), messages
    losses = _losses(records)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # The Ray Train worker's run of the same settings (train_in_driver is a runtime setting): step for step.
    worker_losses = _losses(killed_twice["records"])
    assert all(losses[step] == pytest.approx(worker_losses[step], abs=1e-5) for step in range(1, STEPS + 1))
    assert all(losses[step] == pytest.approx(loss, abs=1e-5) for step, loss in _losses(killed).items())
    assert Path(result["med"]).is_dir() and not (out_dir / "checkpoints").exists()


def test_training_in_the_driver_takes_one_rank():
    with pytest.raises(ValueError, match="train_in_driver trains one rank, in the driver; workers is 2"):
        _train(workers=2, train_in_driver=True)
