import json

import pyarrow as pa
import pytest

from capfilt.data.output import Commit, CommittedOutput, OutputConflictError


def _table(n):
    return pa.table({"key": [f"k{i}" for i in range(n)]})


def test_only_committed_files_count_and_orphans_are_removed(tmp_path):
    out = CommittedOutput(str(tmp_path / "out"))
    out.claim({"threshold": 0.5})
    next_id = out.recover(["pairs"])
    assert next_id == 0
    out.write_table("pairs/part-00000-000.parquet", _table(3))
    out.commit(Commit(0, {"a.parquet": {"rows_in": 3}}, ["pairs/part-00000-000.parquet"]))
    # A killed run: a data file with no commit record.
    out.write_table("pairs/part-00001-000.parquet", _table(2))

    resumed = CommittedOutput(str(tmp_path / "out"))
    resumed.claim({"threshold": 0.5})
    assert resumed.recover(["pairs"]) == 2  # the orphan's id is not reused
    assert not (tmp_path / "out/pairs/part-00001-000.parquet").exists()
    assert resumed.done_shards() == {"a.parquet"}
    assert resumed.data_files("pairs") == [f"{tmp_path}/out/pairs/part-00000-000.parquet"]
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_changed_config_is_refused_with_the_changed_key(tmp_path):
    out = CommittedOutput(str(tmp_path / "out"))
    out.claim({"filter": {"threshold": 0.5}, "k": 1})
    with pytest.raises(OutputConflictError, match=r"filter\.threshold: 0\.5 -> 0\.7"):
        CommittedOutput(str(tmp_path / "out")).claim({"filter": {"threshold": 0.7}, "k": 1})


def test_finish_writes_manifest_then_success(tmp_path):
    out = CommittedOutput(str(tmp_path / "out"))
    out.claim({})
    assert not out.is_finished()
    out.finish({"rows_in": 5})
    assert out.is_finished()
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == {"rows_in": 5}
