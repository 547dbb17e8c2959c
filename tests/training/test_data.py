"""The training sample stream: a function of (seed, position), read a window of shards at a time,
split across ranks, decoded reproducibly; bad pairs counted and replaced."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import ImageConfig
from capfilt.training.data import StreamPlan, make_batch, rank_positions, read_unit


def test_ranks_split_each_global_batch_and_a_resumed_run_continues_the_stream():
    batch, workers = 8, 2
    ranks = [rank_positions(0, 5, batch, workers, rank) for rank in range(workers)]
    for step in range(5):
        taken = np.concatenate([positions[step * 4 : (step + 1) * 4] for positions in ranks])
        assert sorted(taken) == list(range(step * batch, (step + 1) * batch))
    for rank in range(workers):
        assert rank_positions(3, 5, batch, workers, rank).tolist() == ranks[rank][3 * 4 :].tolist()


def test_each_epoch_visits_every_pair_once_a_window_of_shards_at_a_time():
    unit_pairs = [5, 0, 7, 3, 9, 4, 6]  # an empty unit never appears
    total = sum(unit_pairs)
    plan = StreamPlan(unit_pairs, seed=7, shuffle_shards=2)
    windows, units, ordinals = plan.locate(np.arange(3 * total))
    epochs = []
    for epoch in range(3):
        part = slice(epoch * total, (epoch + 1) * total)
        pairs = sorted(zip(units[part].tolist(), ordinals[part].tolist()))
        assert pairs == [(unit, ordinal) for unit, count in enumerate(unit_pairs) for ordinal in range(count)]
        epochs.append(list(zip(units[part].tolist(), ordinals[part].tolist())))
        # Windows follow one another: each is a contiguous run of the stream holding at most 2 units.
        in_epoch = windows[part]
        assert np.all(np.diff(in_epoch) >= 0) and len(np.unique(in_epoch)) <= plan.windows_per_epoch == 4
        for window in np.unique(in_epoch):
            assert len(set(units[part][in_epoch == window].tolist())) <= 2
    assert len({tuple(epoch) for epoch in epochs}) == 3  # a new shard order and permutation every epoch

    # A function of (seed, position) alone: any slice, asked later or by another plan, is the same.
    again = StreamPlan(unit_pairs, seed=7, shuffle_shards=2)
    assert again.locate(np.arange(40, 61))[1].tolist() == units[40:61].tolist()
    assert again.locate(np.arange(40, 61))[2].tolist() == ordinals[40:61].tolist()
    assert StreamPlan(unit_pairs, seed=8, shuffle_shards=2).locate(np.arange(total))[1].tolist() != units[:total].tolist()


def test_every_window_holds_a_share_of_every_source():
    # Eight web shards and a human set of two: each of the two windows gets one human shard, every epoch.
    groups = [0] * 8 + [1] * 2
    plan = StreamPlan([10] * 10, seed=0, shuffle_shards=8, unit_groups=groups)
    assert plan.windows_per_epoch == 2
    for window in range(2 * 20):
        units = plan.window_units(window).tolist()
        assert len(units) == 5 and sum(groups[unit] for unit in units) == 1, (window, units)
    # Still every pair once per epoch.
    _, units, ordinals = plan.locate(np.arange(100))
    assert sorted(zip(units.tolist(), ordinals.tolist())) == [(u, o) for u in range(10) for o in range(10)]


def test_shuffle_shards_0_is_one_global_permutation_per_epoch():
    plan = StreamPlan([4, 4, 4, 4], seed=1, shuffle_shards=0)
    windows, units, _ = plan.locate(np.arange(32))
    assert plan.windows_per_epoch == 1 and windows.tolist() == [0] * 16 + [1] * 16
    # Pairs of all units interleave from the start (a 2-unit window could not mix 3 units in 8 pairs).
    assert len(set(units[:8].tolist())) >= 3


def _kwargs(tokenizer_dir, prompt=""):
    return {"tokenizer_dir": tokenizer_dir, "image_size": 32,
            "image_config_json": ImageConfig(hflip_p=0.0).model_dump_json(), "max_text_length": 20,
            "prompt": prompt, "seed": 3}


def _batch(stream_units, positions, tokenizer_dir, prompt="", tables=None, shuffle_shards=2):
    sources, units = stream_units
    plan = StreamPlan([unit["pairs"] for unit in units], seed=3, shuffle_shards=shuffle_shards)
    _, unit_of, ordinals = plan.locate(np.asarray(positions))
    ids = sorted(set(unit_of.tolist()))
    tables = tables or {}
    found = [tables.get(unit) or read_unit(sources[units[unit]["source"]].model_dump_json(), units[unit]["path"],
                                           units[unit]["pairs"]) for unit in ids]
    return make_batch(np.asarray(positions), unit_of, ordinals, ids, *found, **_kwargs(tokenizer_dir, prompt)), \
        unit_of, ordinals


def test_batches_depend_on_positions_only_not_on_batching(stream_units, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    whole, unit_of, ordinals = _batch(stream_units, np.arange(10, 16), str(tmp_path))
    halves = [_batch(stream_units, np.arange(start, start + 3), str(tmp_path))[0] for start in (10, 13)]
    for name in ("pixel_values", "input_ids", "attention_mask", "image_ids", "position"):
        assert np.array_equal(whole[name], np.concatenate([half[name] for half in halves])), name
    assert whole["pixel_values"].shape == (6, 3, 32, 32) and whole["input_ids"].shape == (6, 20)
    assert whole["bad"] == []

    # Rows are the pairs the plan names, read from the shards themselves, with their ids and texts.
    from capfilt.data.pairs import image_id

    _, units = stream_units
    texts, ids = [], []
    for unit, ordinal in zip(unit_of, ordinals):
        shard = pq.read_table(units[unit]["path"])
        texts.append(shard.column("caption")[int(ordinal)].as_py())
        ids.append(image_id(shard.column("jpg")[int(ordinal)].as_py()))
    assert whole["image_ids"].tolist() == ids
    from capfilt.data.text import clean_caption

    expected = tokenizer([clean_caption(text) for text in texts], padding="max_length", truncation=True,
                         max_length=20).input_ids
    assert whole["input_ids"].tolist() == expected


def test_the_prompt_is_prepended_to_every_text(stream_units, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    plain = _batch(stream_units, np.arange(4), str(tmp_path))[0]
    prompted = _batch(stream_units, np.arange(4), str(tmp_path), prompt="a picture of ")[0]
    prompt_ids = tokenizer("a picture of ").input_ids[1:-1]
    for plain_ids, prompted_ids in zip(plain["input_ids"], prompted["input_ids"]):
        assert prompted_ids[1 : 1 + len(prompt_ids)].tolist() == prompt_ids
        assert prompted_ids[1 + len(prompt_ids)] == plain_ids[1]


def test_bad_pairs_are_listed_and_replaced_by_the_next_good_pair(stream_units, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    sources, units = stream_units
    positions = np.arange(0, 8)
    clean, unit_of, ordinals = _batch(stream_units, positions, str(tmp_path), shuffle_shards=0)
    # Corrupt the image of the batch's second pair, and make another unit unreadable.
    broken_unit, broken_ordinal = int(unit_of[1]), int(ordinals[1])
    entry = read_unit(sources[0].model_dump_json(), units[broken_unit]["path"], units[broken_unit]["pairs"])
    images = entry["table"].column("image").to_pylist()
    images[broken_ordinal] = images[broken_ordinal][:40]  # a truncated JPEG
    table = entry["table"].set_column(entry["table"].schema.get_field_index("image"), "image",
                                      pa.array(images, pa.binary()))
    gone = next(int(unit) for unit in unit_of if int(unit) != broken_unit)
    tables = {broken_unit: {**entry, "table": table},
              gone: {"error": "shard_unreadable", "detail": f"{units[gone]['path']}: FileNotFoundError"}}
    batch, _, _ = _batch(stream_units, positions, str(tmp_path), tables=tables, shuffle_shards=0)

    bad = {record["position"]: record for record in batch["bad"]}
    lost = {1} | {index for index, unit in enumerate(unit_of) if int(unit) == gone}
    assert set(bad) == {int(positions[index]) for index in lost}
    assert bad[1]["reason"].startswith("decode_error") and bad[1]["key"] is not None
    assert all(bad[int(positions[index])]["reason"] == "shard_unreadable" for index in lost - {1})
    for index in range(len(positions)):  # a bad pair holds the next good one (cyclically); the rest are as before
        replacement = index
        while replacement in lost:
            replacement = (replacement + 1) % len(positions)
        assert batch["image_ids"][index] == clean["image_ids"][replacement]
        assert batch["input_ids"][index].tolist() == clean["input_ids"][replacement].tolist()
        if index not in lost:
            assert np.array_equal(batch["pixel_values"][index], clean["pixel_values"][index])
    everything_gone = {unit: tables[gone] for unit in set(unit_of.tolist())}
    with pytest.raises(RuntimeError, match=r"no pair of the micro-batch .*\(shard_unreadable\)"):
        _batch(stream_units, positions, str(tmp_path), tables=everything_gone, shuffle_shards=0)


def test_a_unit_that_changed_since_indexing_or_is_gone_is_reported(stream_units, tmp_path):
    sources, units = stream_units
    moved = tmp_path / "gone.parquet"
    assert read_unit(sources[0].model_dump_json(), str(moved), 4)["error"] == "shard_unreadable"
    shutil.copy(units[0]["path"], moved)
    changed = read_unit(sources[0].model_dump_json(), str(moved), units[0]["pairs"] + 1)
    assert changed["error"] == "shard_changed" and "when the stage indexed it" in changed["detail"]


def test_the_prefetcher_reads_each_window_once_and_holds_only_the_windows_in_use(stream_units, tokenizer,
                                                                                 tmp_path):
    import ray

    from capfilt.training.data import BatchPrefetcher, UnitCache

    tokenizer.save_pretrained(tmp_path)
    sources, units = stream_units
    total = sum(unit["pairs"] for unit in units)
    positions = np.arange(5, 5 + 2 * total + 3)  # two epochs and a bit, micro-batches of 5
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cache = ray.remote(UnitCache).options(num_cpus=0, max_concurrency=3).remote(
            [source.model_dump_json() for source in sources], units, 3, 1, 1)
        plan = StreamPlan([unit["pairs"] for unit in units], seed=3, shuffle_shards=1)
        held = []
        batches = []
        for batch in BatchPrefetcher(positions, 5, plan, cache, 0, _kwargs(str(tmp_path)), data_cpus=0.5, ahead=2):
            batches.append(batch)
            held.append(ray.get(cache.held.remote()))
    finally:
        if started_here:
            ray.shutdown()
    assert [batch["position"].tolist() for batch in batches] == [positions[i : i + 5].tolist()
                                                                 for i in range(0, len(positions), 5)]
    # One shard per window: the prefetched micro-batches span at most 3 windows, plus one read ahead.
    assert max(held) <= 4 < len(units)
    expected = _batch(stream_units, positions, str(tmp_path), shuffle_shards=1)[0]
    for name in ("pixel_values", "input_ids", "image_ids"):
        assert np.array_equal(np.concatenate([batch[name] for batch in batches]), expected[name]), name
