import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest
import yaml

from capfilt.config import CapFiltConfig, ReaderConfig
from capfilt.data.output import OutputConflictError
from capfilt.stages.capfilt import decide, run_capfilt

K = 2


def _config(world, models, **overrides):
    values = dict(
        web=ReaderConfig(paths=f"{world.web}/*.parquet"),
        human=ReaderConfig(paths=f"{world.human}/*.parquet"),
        captioners=[{"path": models["captioner"]}],
        filters=[{"path": models["filter"]}],
        sampling={"num_captions": K, "max_length": 12, "min_length": 6},
        batch_size=4,
        decode_batch_size=8,
        cpus_per_actor=1.0,
        rows_per_file=20,
    )
    values.update(overrides)
    return CapFiltConfig.model_validate(values)


def _rows(output):
    pairs = pq.read_table(f"{output}/pairs").to_pylist()
    rejects = pq.read_table(f"{output}/rejects").to_pylist()
    pair_view = sorted((r["shard"].rsplit("/", 2)[-2:].__str__(), r["row"], r["source"], r["text"], round(r["itm_prob"] or 0, 5))
                       for r in pairs)
    reject_view = sorted((r["shard"].rsplit("/", 2)[-2:].__str__(), r["row"], r["source"] or "", r["text"] or "", r["reason"])
                         for r in rejects)
    return pair_view, reject_view


def test_decide_threshold_and_best_n():
    assert decide([0.9, 0.4, 0.5], 0.5, "threshold", 1) == ["kept", "itm_below_threshold", "kept"]
    assert decide([0.6, 0.9, 0.7, 0.1], 0.5, "best_n", 2) == ["not_in_best_n", "kept", "kept", "itm_below_threshold"]


@pytest.fixture(scope="module")
def baseline(ray_cluster, small_world, tiny_models, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("capfilt") / "out")
    manifest = run_capfilt(_config(small_world, tiny_models), output)
    return output, manifest


def test_accounting_reconciles_per_shard_and_in_total(baseline, small_world):
    output, manifest = baseline
    web_rows = sum(pq.read_metadata(p).num_rows for p in small_world.shards["web"])
    human_rows = sum(pq.read_metadata(p).num_rows for p in small_world.shards["human"])
    totals = manifest["totals"]
    assert totals["rows_in"] == web_rows + human_rows
    for shard, counts in manifest["shards"].items():
        assert counts["rows_in"] == counts["kept"] + counts["filtered"] + counts["rejected"], shard
    assert totals["rows_in"] == totals["kept"] + totals["filtered"] + totals["rejected"]
    # The world's faults: failed downloads and undecodable bytes are rejected with their reasons.
    assert totals["reasons"]["status: failed_to_download"] == 2
    assert sum(v for r, v in totals["reasons"].items() if r.startswith("decode_error")) == 2

    pairs = pq.read_table(f"{output}/pairs")
    rejects = pq.read_table(f"{output}/rejects")
    # Every decoded web image had 1 web + K synthetic texts: each is a pair or a text reject.
    text_rejects = sum(1 for r in rejects.column("stage").to_pylist() if r != "read")
    web_texts = (web_rows - totals["rejected"]) * (1 + K)
    assert pairs.num_rows + text_rejects == web_texts + human_rows
    assert pairs.num_rows == totals["texts_kept"]
    assert set(pairs.column("source").to_pylist()) <= {"web", "synthetic", "human"}
    assert pairs.filter(pa.compute.equal(pairs["source"], "human")).num_rows == human_rows
    synthetic = pairs.filter(pa.compute.equal(pairs["source"], "synthetic")).to_pylist()
    for row in synthetic:
        assert row["itm_prob"] >= 0.5 and row["captioner_id"] and row["filter_id"] and row["sampling"].startswith("nucleus")
    for row in rejects.to_pylist():
        if row["reason"] == "itm_below_threshold":
            assert row["score"] < 0.5
    assert (Path(output) / "_SUCCESS").exists()
    assert manifest["models"]["filters"][0]["weights_sha256"]


def test_rerunning_a_finished_output_does_nothing(baseline, small_world, tiny_models):
    output, _ = baseline
    commits = sorted(os.listdir(f"{output}/_commits"))
    run_capfilt(_config(small_world, tiny_models), output)
    assert sorted(os.listdir(f"{output}/_commits")) == commits


def test_changed_config_is_refused(baseline, small_world, tiny_models):
    output, _ = baseline
    with pytest.raises(OutputConflictError, match="threshold: 0.5 -> 0.7"):
        run_capfilt(_config(small_world, tiny_models, threshold=0.7), output)


def test_batch_size_and_actor_count_do_not_change_the_output(baseline, small_world, tiny_models, tmp_path):
    output, _ = baseline
    other = str(tmp_path / "b16")
    run_capfilt(_config(small_world, tiny_models, batch_size=16, decode_batch_size=5, actors=2, cpus_per_actor=0.5), other)
    assert _rows(other) == _rows(output)


def test_without_itc_similarity_the_same_rows_are_kept_and_itc_sim_is_null(baseline, small_world, tiny_models, tmp_path):
    output, _ = baseline
    with pytest.raises(OutputConflictError, match="itc_similarity: True -> False"):
        run_capfilt(_config(small_world, tiny_models, itc_similarity=False), output)  # a different output
    itm_only = str(tmp_path / "itm-only")
    run_capfilt(_config(small_world, tiny_models, itc_similarity=False), itm_only)
    assert _rows(itm_only) == _rows(output)
    scored = lambda rows: [r for r in rows if r["source"] != "human"]  # noqa: E731  (human pairs are never scored)
    baseline_pairs = scored(pq.read_table(f"{output}/pairs").to_pylist())
    pairs = scored(pq.read_table(f"{itm_only}/pairs").to_pylist())
    assert pairs and all(r["itc_sim"] is not None for r in baseline_pairs)
    assert all(r["itc_sim"] is None and r["itm_prob"] is not None for r in pairs)


def test_the_filter_alone_scores_the_web_texts_as_with_captions(baseline, small_world, tiny_models, tmp_path):
    """BLIP's 'filter only' row: no synthetic captions, no captioner loaded, the same web scores and decisions."""
    output, manifest = baseline
    alone = str(tmp_path / "filter-alone")
    result = run_capfilt(_config(small_world, tiny_models, captioners=[], sampling={"num_captions": 0}), alone)
    assert result["models"]["captioners"] == []
    totals = result["totals"]
    assert totals["rows_in"] == manifest["totals"]["rows_in"] == totals["kept"] + totals["filtered"] + totals["rejected"]
    pairs = pq.read_table(f"{alone}/pairs")
    assert "synthetic" not in set(pairs.column("source").to_pylist())
    without_synthetic = lambda view: [row for row in view if row[2] != "synthetic"]  # noqa: E731
    assert _rows(alone) == (without_synthetic(_rows(output)[0]), without_synthetic(_rows(output)[1]))
    with pytest.raises(ValueError, match="at least one captioner is needed"):
        run_capfilt(_config(small_world, tiny_models, captioners=[]), str(tmp_path / "no-captioner"))


def test_threshold_zero_keeps_every_text(small_world, tiny_models, tmp_path, ray_cluster):
    """BLIP's 'captioner only' row: every web and synthetic text kept, scores still recorded."""
    everything = run_capfilt(_config(small_world, tiny_models, threshold=0.0), str(tmp_path / "keep-all"))
    assert "itm_below_threshold" not in everything["totals"]["reasons"]
    scored = [r["itm_prob"] for r in pq.read_table(f"{tmp_path}/keep-all/pairs").to_pylist() if r["source"] != "human"]
    assert all(p is not None for p in scored)
    # The same texts at a threshold inside their scores: the ones below it are what threshold 0 kept.
    middle = sorted(scored)[len(scored) // 2]
    assert min(scored) < middle
    strict = run_capfilt(_config(small_world, tiny_models, threshold=middle), str(tmp_path / "strict"))
    below = sum(p < middle for p in scored)
    assert strict["totals"]["reasons"]["itm_below_threshold"] == below > 0
    assert everything["totals"]["texts_kept"] == strict["totals"]["texts_kept"] + below


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, tokenizer):
    """A second captioner and filter: the tiny MED of ``tiny_models`` (tests/conftest.py) from another seed,
    so its weights, and so its captions and match probabilities, differ from the first's."""
    import torch

    from capfilt.config import MedConfig
    from capfilt.models.export import export_captioner, export_filter
    from capfilt.models.med import MED

    with torch.random.fork_rng():  # the seed stays in here: other tests' random state is untouched
        torch.manual_seed(1)
        config = MedConfig(preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1,
                                                   "heads": 2, "mlp_dim": 128},
                           text={"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, embed_dim=32, queue_size=64)
        med = MED.from_config(config, tokenizer)
    root = tmp_path_factory.mktemp("other-models")
    return {"captioner": str(export_captioner(med, tokenizer, root / "captioner")),
            "filter": str(export_filter(med, tokenizer, root / "filter"))}


def _texts(output):
    """Every text of the output, pairs and text rejects together, as dicts with ``itm_prob`` (a reject's
    score), ``itc_sim`` (pairs only) and ``reason`` ("kept" for a pair)."""
    texts = [{**row, "reason": "kept"} for row in pq.read_table(f"{output}/pairs").to_pylist()]
    for row in pq.read_table(f"{output}/rejects").to_pylist():
        if row["stage"] != "read":
            texts.append({**row, "itm_prob": row["score"], "itc_sim": None})
    return texts


def _text_view(texts):
    return sorted((t["shard"], t["row"], t["source"], t["text"], round(t["itm_prob"] or 0, 5)) for t in texts)


def _split_threshold(probs):
    """A threshold halfway between the two middle scores: half the texts fall below it, none on it.
    (The tiny random filters score every text above 0.5, so the default threshold would drop none.)"""
    ordered = sorted(probs)
    middle = len(ordered) // 2
    assert ordered[middle - 1] < ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def test_two_captioners_write_k_captions_each(baseline, small_world, tiny_models, other_models, tmp_path):
    output, manifest = baseline  # captioner A alone, the same sampling
    alone = _texts(output)
    threshold = _split_threshold(t["itm_prob"] for t in alone if t["itm_prob"] is not None)
    captioners = [{"path": tiny_models["captioner"], "name": "cap-a"}, {"path": other_models["captioner"], "name": "cap-b"}]
    target = str(tmp_path / "two-captioners")
    result = run_capfilt(_config(small_world, tiny_models, captioners=captioners, threshold=threshold), target)
    ids = [model["id"] for model in result["models"]["captioners"]]
    assert [i.split("@")[0] for i in ids] == ["cap-a", "cap-b"]
    a, b = ids
    assert result["models"]["captioners"][0]["weights_sha256"] != result["models"]["captioners"][1]["weights_sha256"]

    texts = _texts(target)
    web_rows = sum(pq.read_metadata(p).num_rows for p in small_world.shards["web"])
    human_rows = sum(pq.read_metadata(p).num_rows for p in small_world.shards["human"])
    assert result["totals"]["rejected"] == manifest["totals"]["rejected"] > 0  # the world's bad web rows
    images = {(t["shard"], t["row"]) for t in texts if t["source"] == "web"}  # one web text per decoded web image
    assert len(images) == web_rows - result["totals"]["rejected"]
    # Every decoded web image: 1 web + K synthetic texts from each of the two captioners, as a pair or a reject.
    assert len(texts) == len(images) * (1 + 2 * K) + human_rows
    synthetic = [t for t in texts if t["source"] == "synthetic"]
    per_captioner = {}
    for t in synthetic:
        key = (t["shard"], t["row"], t["captioner_id"])
        per_captioner[key] = per_captioner.get(key, 0) + 1
    assert per_captioner == {(shard, row, captioner): K for shard, row in images for captioner in ids}
    assert all(t["captioner_id"] is None for t in texts if t["source"] != "synthetic")
    # Both kinds of row carry the captioner: pairs, and the filter's rejects (the threshold splits the scores).
    assert {t["captioner_id"] for t in synthetic if t["reason"] == "kept"} == {a, b}
    assert {t["captioner_id"] for t in synthetic if t["reason"] == "itm_below_threshold"} == {a, b}
    for t in texts:
        if t["source"] != "human":
            assert t["reason"] == ("kept" if t["itm_prob"] >= threshold else "itm_below_threshold")

    # A's captions are the ones A writes alone: the first member draws caption j's noise from (seed, key,
    # round, j), as a single captioner does (capfilt/inference/captioner.py row_seed), and B's captions
    # come after A's, so B cannot turn one of A's into a duplicate. So everything but B's texts (web,
    # human and A's texts, with their scores) is what the baseline has.
    assert _text_view(t for t in texts if t["captioner_id"] != b) == _text_view(alone)

    def captions(rows, captioner):
        by_image = {}
        for t in rows:
            if t["source"] == "synthetic" and t["captioner_id"] == captioner:
                by_image.setdefault((t["shard"], t["row"]), []).append(t["text"])
        return {image: sorted(found) for image, found in by_image.items()}

    a_captions, b_captions = captions(synthetic, a), captions(synthetic, b)
    assert sum(a_captions[image] != b_captions[image] for image in images) > len(images) // 2
    # Members draw their own noise (captions K..2K-1 of the image): the same captioner listed twice writes
    # new samples, not the first member's captions again (which would all be rejected as duplicates).
    twice = [{"path": tiny_models["captioner"], "name": "cap-a"}, {"path": tiny_models["captioner"], "name": "cap-a2"}]
    target = str(tmp_path / "same-captioner-twice")
    result = run_capfilt(_config(small_world, tiny_models, captioners=twice, threshold=threshold), target)
    first, second = (model["id"] for model in result["models"]["captioners"])
    again = _texts(target)
    assert captions(again, first) == a_captions
    second_captions = captions(again, second)
    assert sum(second_captions.get(image) != a_captions[image] for image in images) > len(images) // 2
    assert result["totals"]["reasons"].get("duplicate_text", 0) < len(images) * K // 2


def test_two_filters_average_their_match_probabilities(baseline, small_world, tiny_models, other_models, tmp_path):
    output, _ = baseline  # filter 1 alone, the same captioner and sampling, so the same texts
    f1, f2 = {"path": tiny_models["filter"], "name": "f1"}, {"path": other_models["filter"], "name": "f2"}
    # Threshold 0: F2 keeps every text, so each has its itc_sim (recorded on pairs only) to compare.
    run_capfilt(_config(small_world, tiny_models, filters=[f2], threshold=0.0), str(tmp_path / "f2"))

    def scored(target):
        return {(t["shard"], t["row"], t["text"]): t for t in _texts(target) if t["itm_prob"] is not None}

    first, second = scored(output), scored(str(tmp_path / "f2"))
    assert first.keys() == second.keys()
    mean = {key: (first[key]["itm_prob"] + second[key]["itm_prob"]) / 2 for key in first}
    # A threshold that splits the averaged scores, so the decisions are not all one way.
    threshold = _split_threshold(mean.values())
    both = str(tmp_path / "f1+f2")
    manifest = run_capfilt(_config(small_world, tiny_models, filters=[f1, f2], threshold=threshold), both)
    ensemble = scored(both)
    assert ensemble.keys() == first.keys()
    assert {t["source"] for t in ensemble.values()} == {"web", "synthetic"}
    similarities = 0
    for key, text in ensemble.items():
        assert text["itm_prob"] == pytest.approx(mean[key], abs=1e-5), key
        # The keep decision reads the averaged probability.
        assert text["reason"] == ("kept" if text["itm_prob"] >= threshold else "itm_below_threshold"), key
        if text["reason"] == "kept" and first[key]["itc_sim"] is not None:  # the ITC similarity is averaged too
            assert text["itc_sim"] == pytest.approx((first[key]["itc_sim"] + second[key]["itc_sim"]) / 2, abs=1e-5)
            similarities += 1
    assert similarities > 0
    # The filters differ enough that averaging decides: either filter alone keeps another set at this threshold.
    assert max(abs(first[k]["itm_prob"] - second[k]["itm_prob"]) for k in ensemble) > 0.01
    kept = {k for k, t in ensemble.items() if t["reason"] == "kept"}
    assert kept != {k for k, t in first.items() if t["itm_prob"] >= threshold}
    assert kept != {k for k, t in second.items() if t["itm_prob"] >= threshold}

    ids = [model["id"] for model in manifest["models"]["filters"]]
    assert [i.split("@")[0] for i in ids] == ["f1", "f2"]
    assert manifest["models"]["filters"][0]["weights_sha256"] != manifest["models"]["filters"][1]["weights_sha256"]
    pairs = pq.read_table(f"{both}/pairs").to_pylist()
    assert {p["filter_id"] for p in pairs if p["source"] != "human"} == {"+".join(ids)}
    assert all(p["filter_id"] is None for p in pairs if p["source"] == "human")


def test_byte_limit_commits_whole_shards_sooner_with_the_same_rows(baseline, small_world, tiny_models, tmp_path):
    output, manifest = baseline
    target = str(tmp_path / "bytes")
    # rows_per_file never triggers here: only the one-byte buffer limit does, so every completed shard
    # (or the few completed by one batch) is committed at once.
    run_capfilt(_config(small_world, tiny_models, rows_per_file=10**9, max_buffer_bytes=1), target)
    commits = [json.loads(path.read_text()) for path in sorted(Path(target, "_commits").iterdir())]
    assert len(commits) > len(os.listdir(f"{output}/_commits")) and len(commits) > 1
    shards = [shard for commit in commits for shard in commit["shards"]]
    assert sorted(shards) == sorted(manifest["shards"])  # each shard in exactly one commit
    assert len(list(Path(target, "pairs").iterdir())) > 1
    assert _rows(target) == _rows(output)


def test_resume_after_the_driver_is_killed(baseline, small_world, tiny_models, tmp_path, ray_cluster):
    ray_address = ray_cluster.get_runtime_context().gcs_address
    output, _ = baseline
    pipeline = tmp_path / "pipeline.yaml"
    killed = tmp_path / "killed"
    config = _config(small_world, tiny_models, rows_per_file=1, batch_size=1).model_dump(mode="json")
    config["output"] = str(killed)
    pipeline.write_text(yaml.safe_dump({"name": "kill", "run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 2},
                                        "capfilt": config}))
    # The driver joins the test's cluster, as `ray job submit` drivers do.
    command = [sys.executable, "-m", "capfilt.cli", "run", str(pipeline), "--address", ray_address]
    log = open(tmp_path / "driver.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 480
    while time.time() < deadline and not (killed / "_commits").exists() and process.poll() is None:
        time.sleep(0.05)
    assert (killed / "_commits").exists(), (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "_SUCCESS").exists()
    done_before = len(os.listdir(killed / "_commits"))
    assert done_before < len(list(small_world.shards["web"])) + len(list(small_world.shards["human"]))

    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert (killed / "_SUCCESS").exists()
    assert _rows(str(killed)) == _rows(output)
    keys = pq.read_table(killed / "pairs", columns=["shard", "row", "text", "source"]).to_pylist()
    assert len(keys) == len({tuple(k.values()) for k in keys})  # no duplicates


def _actor_pids(marker: str = "CapFiltWorker") -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().decode(errors="replace")
        except OSError:
            continue
        if command.startswith("ray::") and marker in command:
            pids.append(int(entry))
    return pids


def test_resume_after_an_actor_process_is_killed(baseline, small_world, tiny_models, tmp_path):
    import threading

    output, _ = baseline
    target = str(tmp_path / "actor-killed")
    result = {}

    def run():
        try:
            result["manifest"] = run_capfilt(_config(small_world, tiny_models, batch_size=1, rows_per_file=1), target)
        except BaseException as error:  # noqa: BLE001 -- reported below
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 240
    killed = []
    while time.time() < deadline and not killed:
        if (Path(target) / "_commits").exists():
            for pid in _actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed, "no CapFilt actor process was found to kill"
    assert not thread.is_alive()
    if "error" in result:
        # Ray gave up on the actor: the rerun must finish the job without duplicates.
        result["manifest"] = run_capfilt(_config(small_world, tiny_models), target)
    assert (Path(target) / "_SUCCESS").exists()
    assert _rows(target) == _rows(output)


def test_s3_input_and_output_on_a_real_s3_protocol_server(baseline, small_world, tiny_models, s3_server):
    output, _ = baseline
    options = s3_server.storage_options
    for split in ("web", "human"):
        for path in small_world.shards[split]:
            s3_server.client.upload_file(str(path), s3_server.bucket, f"world/{split}/{Path(path).name}")
    config = _config(
        small_world, tiny_models,
        web=ReaderConfig(paths=s3_server.url("world/web/*.parquet"), storage_options=options),
        human=ReaderConfig(paths=s3_server.url("world/human/{00000..00001}.parquet"), storage_options=options),
        output_storage_options=options,
    )
    manifest = run_capfilt(config, s3_server.url("out"))
    listing = s3_server.client.list_objects_v2(Bucket=s3_server.bucket, Prefix="out/")["Contents"]
    names = {item["Key"] for item in listing}
    assert "out/_SUCCESS" in names and "out/manifest.json" in names
    assert manifest["totals"]["rows_in"] == sum(pq.read_metadata(p).num_rows
                                                for s in ("web", "human") for p in small_world.shards[s])
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    pairs = pq.read_table(f"{s3_server.bucket}/out/pairs", filesystem=fs)
    local = pq.read_table(f"{output}/pairs")
    assert sorted(zip(pairs["key"].to_pylist(), pairs["text"].to_pylist())) == sorted(
        zip(local["key"].to_pylist(), local["text"].to_pylist()))
    assert all(url.startswith(s3_server.url("world/")) for url in pairs["shard"].to_pylist())
