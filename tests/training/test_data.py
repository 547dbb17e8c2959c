"""The training sample stream: a function of (seed, step), split across ranks, decoded reproducibly."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from capfilt.config import ImageConfig
from capfilt.data.pairs import pair_files
from capfilt.training.data import make_batch, pair_index, rank_positions


def test_ranks_split_each_global_batch_and_a_resumed_run_continues_the_stream():
    batch, workers = 8, 2
    ranks = [rank_positions(0, 5, batch, workers, rank) for rank in range(workers)]
    for step in range(5):
        taken = np.concatenate([positions[step * 4 : (step + 1) * 4] for positions in ranks])
        assert sorted(taken) == list(range(step * batch, (step + 1) * batch))
    for rank in range(workers):
        assert rank_positions(3, 5, batch, workers, rank).tolist() == ranks[rank][3 * 4 :].tolist()


def test_every_epoch_is_a_seeded_permutation_of_the_pairs():
    stream = pair_index(np.arange(30), seed=7, num_pairs=10)
    epochs = stream.reshape(3, 10)
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # reshuffled every epoch
    assert pair_index(np.arange(12, 17), seed=7, num_pairs=10).tolist() == stream[12:17].tolist()
    assert pair_index(np.arange(30), seed=8, num_pairs=10).tolist() != stream.tolist()


def _kwargs(pairs_dir, tokenizer_dir, prompt=""):
    return {"pair_files": pair_files(pairs_dir), "tokenizer_dir": tokenizer_dir, "image_size": 32,
            "image_config_json": ImageConfig(hflip_p=0.0).model_dump_json(), "max_text_length": 20,
            "prompt": prompt, "seed": 3}


def test_batches_depend_on_positions_only_not_on_batching(pairs_dir, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    kwargs = _kwargs(pairs_dir, str(tmp_path))
    whole = make_batch({"position": np.arange(10, 16)}, **kwargs)
    halves = [make_batch({"position": np.arange(start, start + 3)}, **kwargs) for start in (10, 13)]
    for name in ("pixel_values", "input_ids", "attention_mask", "image_ids", "position"):
        assert np.array_equal(whole[name], np.concatenate([half[name] for half in halves])), name
    assert whole["pixel_values"].shape == (6, 3, 32, 32) and whole["input_ids"].shape == (6, 20)

    # Rows are the pairs the stream names, with their ids and tokenized texts.
    table = pq.read_table(pair_files(pairs_dir)[0])
    rows = pair_index(np.arange(10, 16), seed=3, num_pairs=table.num_rows)
    assert whole["image_ids"].tolist() == [table.column("image_id")[int(i)].as_py() for i in rows]
    expected = tokenizer([table.column("text")[int(i)].as_py() for i in rows], padding="max_length",
                         truncation=True, max_length=20).input_ids
    assert whole["input_ids"].tolist() == expected


def test_the_prompt_is_prepended_to_every_text(pairs_dir, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    plain = make_batch({"position": np.arange(4)}, **_kwargs(pairs_dir, str(tmp_path)))
    prompted = make_batch({"position": np.arange(4)}, **_kwargs(pairs_dir, str(tmp_path), prompt="a picture of "))
    prompt_ids = tokenizer("a picture of ").input_ids[1:-1]
    for plain_ids, prompted_ids in zip(plain["input_ids"], prompted["input_ids"]):
        assert prompted_ids[1 : 1 + len(prompt_ids)].tolist() == prompt_ids
        assert prompted_ids[1 + len(prompt_ids)] == plain_ids[1]


def test_the_prefetcher_yields_each_micro_batch_in_order_then_stops(pairs_dir, tokenizer, tmp_path):
    import ray

    from capfilt.training.data import BatchPrefetcher

    tokenizer.save_pretrained(tmp_path)
    kwargs = _kwargs(pairs_dir, str(tmp_path))
    positions = np.arange(5, 19)  # 14 positions: three micro-batches of 5, 5 and 4
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        batches = list(BatchPrefetcher(positions, 5, kwargs, data_cpus=0.5, ahead=2))
    finally:
        if started_here:
            ray.shutdown()
    assert [batch["position"].tolist() for batch in batches] == [list(range(5, 10)), list(range(10, 15)),
                                                                 list(range(15, 19))]
    expected = make_batch({"position": positions}, **kwargs)
    for name in ("pixel_values", "input_ids", "image_ids"):
        assert np.array_equal(np.concatenate([batch[name] for batch in batches]), expected[name]), name
