"""The driver side of CapFilt without Ray or models: ``explode`` and ``ShardAssembler`` on hand-made result rows."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.data.output import CommittedOutput
from capfilt.stages.capfilt import (
    FILTERED,
    HUMAN,
    KEPT,
    MARKER_ROW,
    PAIRS_SCHEMA,
    REJECTED,
    REJECTS_SCHEMA,
    RESULT_SCHEMA,
    SYNTHETIC,
    WEB,
    ShardAssembler,
    explode,
)

LABELS = ("filter@abc", "nucleus:k=2", 3)


def _explode_reference(results: pa.Table, filter_id: str, sampling: str, round_: int) -> tuple[pa.Table, pa.Table]:
    """The row-by-row Python explode the Arrow one replaced (kept here as the specification)."""
    pairs = {name: [] for name in PAIRS_SCHEMA.names}
    rejects = {name: [] for name in REJECTS_SCHEMA.names}
    columns = results.to_pydict()
    order = sorted(range(results.num_rows), key=lambda i: (columns["shard"][i], columns["row"][i]))
    for i in order:
        common = {"key": columns["key"][i], "source_key": columns["source_key"][i], "shard": columns["shard"][i],
                  "row": columns["row"][i]}
        if columns["outcome"][i] == REJECTED:
            for name, value in {**common, "text": None, "source": columns["role"][i], "reason": columns["reason"][i],
                                "detail": columns["detail"][i], "score": None, "stage": "read", "captioner_id": None,
                                "round": round_}.items():
                rejects[name].append(value)
            continue
        for text, source, captioner, prob, sim, decision in zip(
            columns["texts"][i], columns["text_sources"][i], columns["captioner_ids"][i],
            columns["itm_probs"][i], columns["itc_sims"][i], columns["decisions"][i],
        ):
            if decision == "kept":
                row = {**common, "text": text, "source": source, "itm_prob": prob, "itc_sim": sim,
                       "captioner_id": captioner, "filter_id": None if source == HUMAN else filter_id,
                       "sampling": sampling if source == SYNTHETIC else None, "round": round_,
                       "sha256": columns["sha256"][i], "extra": columns["extra"][i], "image": columns["image"][i]}
                for name in PAIRS_SCHEMA.names:
                    pairs[name].append(row[name])
            else:
                row = {**common, "text": text, "source": source, "reason": decision, "detail": None, "score": prob,
                       "stage": "filter" if prob is not None else "caption", "captioner_id": captioner, "round": round_}
                for name in REJECTS_SCHEMA.names:
                    rejects[name].append(row[name])
    return pa.Table.from_pydict(pairs, schema=PAIRS_SCHEMA), pa.Table.from_pydict(rejects, schema=REJECTS_SCHEMA)


def _result_rows(shard: str, rows: int, seed: int, embed: bool = False) -> list[dict]:
    """Result rows as CapFiltWorker makes them: read rejects, human rows, web rows with K=2 captions."""
    rng = random.Random(seed)
    out = []
    for row in range(rows):
        common = {"shard": shard, "row": row, "key": f"{shard[-3:]}-{row:04d}", "source_key": f"src{row}",
                  "sha256": f"{seed:02d}{row:062d}", "extra": '{"width": %d}' % rng.randint(1, 99),
                  "image": bytes([row % 256]) * 5 if embed else None, "shard_rows": None}
        kind = rng.random()
        if kind < 0.15:
            out.append({**common, "role": WEB, "outcome": REJECTED, "reason": "decode_error: truncated",
                        "detail": "bad bytes", "texts": [], "text_sources": [], "captioner_ids": [],
                        "itm_probs": [], "itc_sims": [], "decisions": []})
        elif kind < 0.3:
            out.append({**common, "role": HUMAN, "outcome": KEPT, "reason": None, "detail": None,
                        "texts": [f"human text {row}"], "text_sources": [HUMAN], "captioner_ids": [None],
                        "itm_probs": [None], "itc_sims": [None], "decisions": ["kept"]})
        else:
            probs = [rng.random() for _ in range(3)]
            decisions = ["kept" if p >= 0.5 else "itm_below_threshold" for p in probs]
            texts = [f"web {row}", f"cap a {row}", f"cap b {row}"]
            if rng.random() < 0.2:  # an empty caption is dropped before scoring: no score, stage "caption"
                probs[2], decisions[2], texts[2] = None, "caption_empty", ""
            out.append({**common, "role": WEB, "outcome": KEPT if KEPT in decisions else FILTERED, "reason": None,
                        "detail": None, "texts": texts, "text_sources": [WEB, SYNTHETIC, SYNTHETIC],
                        "captioner_ids": [None, "cap@1", "cap@1"], "itm_probs": probs,
                        "itc_sims": [None if p is None else p / 2 for p in probs], "decisions": decisions})
    return out


def _batches(shards: dict[str, int], batch_rows: int, seed: int = 0, embed: bool = False) -> list[pa.Table]:
    """Result batches as the driver receives them: shards interleaved, each shard's end marker after its rows."""
    stream = []
    for number, (shard, rows) in enumerate(shards.items()):
        stream.extend(_result_rows(shard, rows, seed + number, embed))
        marker = {name: None for name in RESULT_SCHEMA.names}
        marker.update(shard=shard, role=WEB, row=MARKER_ROW, shard_rows=rows, texts=[], text_sources=[],
                      captioner_ids=[], itm_probs=[], itc_sims=[], decisions=[])
        stream.append(marker)
    return [pa.Table.from_pylist(stream[i:i + batch_rows], schema=RESULT_SCHEMA) for i in range(0, len(stream), batch_rows)]


@pytest.mark.parametrize("embed", [False, True])
def test_arrow_explode_matches_the_row_by_row_reference(embed):
    rows = [row for number, shard in enumerate(["s/b", "s/a", "s/c"]) for row in _result_rows(shard, 40, number, embed)]
    random.Random(1).shuffle(rows)
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    chunked = pa.concat_tables([table.slice(0, 17), table.slice(17, 50), table.slice(67)])  # as concatenated shards are
    pairs, rejects = explode(chunked, *LABELS)
    expected_pairs, expected_rejects = _explode_reference(table, *LABELS)
    assert pairs.num_rows > 0 and rejects.num_rows > 0
    assert {"read", "filter", "caption"} == set(rejects.column("stage").to_pylist())
    assert pairs.schema == PAIRS_SCHEMA and rejects.schema == REJECTS_SCHEMA
    assert pairs.equals(expected_pairs) and rejects.equals(expected_rejects)
    empty_pairs, empty_rejects = explode(RESULT_SCHEMA.empty_table(), *LABELS)
    assert empty_pairs.equals(PAIRS_SCHEMA.empty_table()) and empty_rejects.equals(REJECTS_SCHEMA.empty_table())


def _assemble(root, batches, rows_per_file: int, max_buffer_bytes: int) -> CommittedOutput:
    output = CommittedOutput(str(root))
    assembler = ShardAssembler(output, 0, rows_per_file, *LABELS, max_buffer_bytes=max_buffer_bytes)
    flushes = []
    for batch in batches:
        before = assembler.commit_id
        assembler.add(batch)
        flushes.append(assembler.commit_id - before)
        # Bounded: after every batch, what waits for a commit is below the limit (a shard is never split).
        assert assembler.ready_bytes < max_buffer_bytes and assembler.ready_rows < rows_per_file
    assembler.flush()
    assert not assembler.pending()
    return output


def _table(output: CommittedOutput, name: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in output.data_files(name)])


def test_byte_limit_commits_whole_shards_with_the_same_rows(tmp_path):
    shards = {f"mem://in/{i:03d}.parquet": 30 for i in range(6)}
    batches = _batches(shards, batch_rows=7)
    one = _assemble(tmp_path / "one", batches, rows_per_file=10**9, max_buffer_bytes=2**40)
    many = _assemble(tmp_path / "many", batches, rows_per_file=10**9, max_buffer_bytes=1)

    assert len(one.commits()) == 1 and len(one.data_files("pairs")) == 1
    # A one-byte limit commits every shard as soon as it is complete: one commit per shard, none split.
    commits = many.commits()
    assert len(commits) == len(shards) and len(many.data_files("pairs")) == len(shards)
    assert sorted(shard for commit in commits for shard in commit.shards) == sorted(shards)
    assert all(len(commit.shards) == 1 for commit in commits)
    # The same rows, in the same order (shards arrive in name order here), and the same accounting.
    for name in ("pairs", "rejects"):
        assert _table(many, name).equals(_table(one, name)), name
    assert {s: c for commit in commits for s, c in commit.shards.items()} == one.commits()[0].shards


def test_byte_limit_between_shard_sizes_groups_shards(tmp_path):
    shards = {f"mem://in/{i:03d}.parquet": 30 for i in range(8)}
    batches = _batches(shards, batch_rows=11)
    shard_bytes = pa.concat_tables(batches).nbytes / len(batches) * 31 / 11  # roughly one shard's result bytes
    many = _assemble(tmp_path / "many", batches, rows_per_file=10**9, max_buffer_bytes=int(2.5 * shard_bytes))
    one = _assemble(tmp_path / "one", batches, rows_per_file=10**9, max_buffer_bytes=2**40)
    commits = many.commits()
    assert 2 <= len(commits) < len(shards)
    assert sorted(shard for commit in commits for shard in commit.shards) == sorted(shards)
    for name in ("pairs", "rejects"):
        assert _table(many, name).equals(_table(one, name)), name
