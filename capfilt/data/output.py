"""An output directory that commits whole input shards atomically, locally or on object storage.

Layout::

    OUT/_capfilt.json            what produced this output (config fingerprint); written first
    OUT/<table>/part-CCCCC-NNN.parquet   data files of commit CCCCC (e.g. tables pairs/ and rejects/)
    OUT/_commits/CCCCC.json      the commit record: which input shards and files it covers
    OUT/manifest.json            per-shard accounting, rebuilt from the commit records at the end
    OUT/_SUCCESS                 written last, when every input shard is committed

A data file counts only once a commit record names it, and a commit record is one atomic write
(rename on local disk, a single PUT on object storage). So a run killed at any moment leaves either a
whole commit or files that no commit names; resuming deletes the latter and redoes exactly the input
shards that no commit covers. Input shards are never split across commits, so "done" is a property
of an input shard, and rerunning a finished output does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

FINGERPRINT = "_capfilt.json"
COMMITS = "_commits"
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"


class OutputConflictError(RuntimeError):
    """The output directory was produced by a different configuration."""


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                changes.append(f"{path}: added ({new[key]!r})")
            elif key not in new:
                changes.append(f"{path}: removed (was {old[key]!r})")
            else:
                changes.extend(_diff(old[key], new[key], path))
        return changes
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


@dataclass
class Commit:
    commit_id: int
    shards: dict[str, dict[str, int]]  # input shard -> its counts
    files: list[str]  # paths relative to the output root
    extra: dict[str, Any] = field(default_factory=dict)


class CommittedOutput:
    """The output root of one stage run; see the module docstring for the protocol."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.url = root.rstrip("/")
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # -- paths and atomic writes -------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _write_atomic(self, relative: str, data: bytes) -> None:
        final = self.path(relative)
        self.fs.makedirs(os.path.dirname(final), exist_ok=True)
        if self._local:
            temporary = f"{final}.tmp-{uuid.uuid4().hex}"
            with self.fs.open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, final)
        else:
            # An object-store PUT is atomic: readers see the whole object or none.
            self.fs.pipe_file(final, data)

    @contextlib.contextmanager
    def open_atomic(self, relative: str):
        """A file to write ``relative`` through, visible under its name only once closed whole."""
        final = self.path(relative)
        self.fs.makedirs(os.path.dirname(final), exist_ok=True)
        if self._local:
            temporary = f"{final}.tmp-{uuid.uuid4().hex}"
            try:
                with self.fs.open(temporary, "wb") as handle:
                    yield handle
                os.replace(temporary, final)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
        else:
            # An object store shows a multipart upload only once it is completed, on close.
            with self.fs.open(final, "wb") as handle:
                yield handle

    def _read_json(self, relative: str) -> Any:
        with self.fs.open(self.path(relative), "rb") as handle:
            return json.loads(handle.read())

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    # -- the fingerprint -------------------------------------------------------------------------

    def claim(self, fingerprint: dict[str, Any]) -> None:
        """Bind this output to ``fingerprint``; refuse if an earlier run wrote it with another one."""
        if self.exists(FINGERPRINT):
            previous = self._read_json(FINGERPRINT)
            if previous.get("hash") != config_hash(fingerprint):
                changes = _diff(previous.get("fingerprint", {}), fingerprint)
                raise OutputConflictError(
                    f"{self.url} was written by a different configuration; refusing to mix outputs. "
                    f"Changed: {'; '.join(changes) or 'unknown'}. "
                    "Use a new output directory, or delete the old one to start over."
                )
            return
        payload = {"hash": config_hash(fingerprint), "fingerprint": fingerprint}
        self._write_atomic(FINGERPRINT, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    # -- commits -----------------------------------------------------------------------------

    def commits(self) -> list[Commit]:
        found = []
        if not self.fs.exists(self.path(COMMITS)):
            return found
        for name in sorted(self.fs.ls(self.path(COMMITS), detail=False)):
            base = os.path.basename(name)
            if not base.endswith(".json"):
                continue
            record = json.loads(self.fs.cat_file(name))
            found.append(Commit(record["commit_id"], record["shards"], record["files"], record.get("extra", {})))
        return found

    def done_shards(self) -> set[str]:
        return {shard for commit in self.commits() for shard in commit.shards}

    def recover(self, tables: Iterable[str]) -> int:
        """Delete data files that no commit names (left by a killed run); return the next commit id."""
        committed = {file for commit in self.commits() for file in commit.files}
        highest = max((commit.commit_id for commit in self.commits()), default=-1)
        for table in tables:
            directory = self.path(table)
            if not self.fs.exists(directory):
                continue
            for name in self.fs.ls(directory, detail=False):
                relative = f"{table}/{os.path.basename(name)}"
                if relative not in committed:
                    self.fs.rm(name)
                    # Orphans still reserve their commit id, so a new commit never reuses a name.
                    highest = max(highest, _commit_id_of(relative))
        return highest + 1

    def recover_files(self, tables: Iterable[str], suffixes: tuple[str, ...]) -> int:
        """:meth:`recover`, and also the root's data files (names ending in ``suffixes``) that no commit names,
        for layouts that keep their data at the top (as img2dataset's shards are)."""
        next_id = self.recover(tables)
        committed = {file for commit in self.commits() for file in commit.files}
        for name in self.fs.ls(self.root, detail=False):
            base = os.path.basename(name.rstrip("/"))
            stray = base.endswith(suffixes) or any(f"{suffix}.tmp-" in base for suffix in suffixes)
            if stray and base not in committed and self.fs.isfile(name):
                self.fs.rm(name)
        return next_id

    def write_table(self, relative: str, table: pa.Table) -> None:
        final = self.path(relative)
        self.fs.makedirs(os.path.dirname(final), exist_ok=True)
        if self._local:
            temporary = f"{final}.tmp-{uuid.uuid4().hex}"
            pq.write_table(table, temporary, filesystem=self.fs)
            os.replace(temporary, final)
        else:
            pq.write_table(table, final, filesystem=self.fs)

    def commit(self, commit: Commit) -> None:
        record = {"commit_id": commit.commit_id, "shards": commit.shards, "files": commit.files, "extra": commit.extra}
        self._write_atomic(f"{COMMITS}/{commit.commit_id:05d}.json", json.dumps(record, sort_keys=True).encode())

    # -- the end -----------------------------------------------------------------------------

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self._write_atomic(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())

    def finish(self, manifest: dict[str, Any]) -> None:
        self.write_manifest(manifest)
        self._write_atomic(SUCCESS, b"")

    def is_finished(self) -> bool:
        return self.exists(SUCCESS)

    def manifest(self) -> dict[str, Any]:
        return self._read_json(MANIFEST)

    def data_files(self, table: str) -> list[str]:
        """Committed files of ``table``, as full URLs in commit order."""
        prefix = f"{table}/"
        files = [file for commit in self.commits() for file in commit.files if file.startswith(prefix)]
        return [f"{self.url}/{file}" for file in files]


def _commit_id_of(relative: str) -> int:
    # part-CCCCC-NNN.parquet
    stem = os.path.basename(relative)
    try:
        return int(stem.split("-")[1])
    except (IndexError, ValueError):
        return -1
