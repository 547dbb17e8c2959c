"""A training stage's directory on object storage: a local working mirror, pushed as it becomes durable.

Training writes where Ray Train and torch write fast and atomically: a local directory. When the stage
directory is a URL (``s3://``, ``gs://``, anything fsspec opens), that local directory is a scratch
mirror (``$CAPFILT_SCRATCH_DIR``, default ``<tmp>/capfilt-scratch``, one folder per URL) and
:class:`StageStore` keeps the URL up to date with what a resumed run needs:

* before training: the claim (``_capfilt.json``, written straight to the URL), then whatever the URL
  already holds is pulled into an empty mirror (the pairs index, the initial MED, the log, the bad
  pairs and the newest complete checkpoint), so a run killed on one machine resumes on another;
* while training: each new complete checkpoint is uploaded file by file, ``state.json`` last (so a
  torn upload is told from a whole one exactly as a torn local copy is), with the log and bad-pair
  records up to it; older uploaded checkpoints are deleted once a newer one is whole;
* at the end: the MED and exported models, then ``_RESULT.json`` last, then the checkpoints go.

A local stage directory is its own mirror: every method is then a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from capfilt.training import checkpoint as ckpt

SCRATCH_ENV = "CAPFILT_SCRATCH_DIR"
REMOTE_CHECKPOINTS = "checkpoints"


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def scratch_for(url: str) -> Path:
    root = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "capfilt-scratch")
    name = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return root / f"{url.rstrip('/').rsplit('/', 1)[-1]}-{name}"


class StageStore:
    def __init__(self, out_dir: str, storage_options: dict[str, Any] | None = None):
        self.out_dir = str(out_dir).rstrip("/")
        self.remote = is_url(self.out_dir)
        self.local = scratch_for(self.out_dir) if self.remote else Path(self.out_dir)
        self.local.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.out_dir, **(storage_options or {}))
        self._pushed_step = -1

    def url(self, *parts: str) -> str:
        return "/".join([self.out_dir, *parts])

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- reading what the URL holds ----------------------------------------------------------------

    def read_json(self, name: str) -> dict | None:
        """A JSON file of the stage directory (the URL's copy when remote), None when absent."""
        if not self.remote:
            path = self.local / name
            return json.loads(path.read_text()) if path.exists() else None
        try:
            with self.fs.open(self._remote(name), "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    def remote_checkpoints(self) -> list[tuple[int, str]]:
        """Complete uploaded checkpoints as (step, remote path), oldest first."""
        found = []
        try:
            entries = self.fs.ls(self._remote(REMOTE_CHECKPOINTS), detail=False)
        except FileNotFoundError:
            return []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("step_"):
                continue
            try:
                with self.fs.open(f"{entry}/{ckpt.STATE_FILE}", "rb") as handle:
                    state = json.loads(handle.read())
                sizes = {info["name"].rsplit("/", 1)[-1]: info["size"] for info in self.fs.ls(entry, detail=True)}
            except (FileNotFoundError, ValueError):
                continue
            if all(sizes.get(file) == size for file, size in state["files"].items()):
                found.append((int(state["step"]), entry))
        return sorted(found)

    # -- before training ---------------------------------------------------------------------------

    def pull(self, names: tuple[str, ...], directories: tuple[str, ...]) -> None:
        """Bring into an empty mirror the URL's ``names`` (files) and ``directories``, and its newest
        complete checkpoint when the mirror has none as new."""
        if not self.remote:
            return
        for pattern in names:  # file names, or globs (bad_pairs.rank*.jsonl)
            for found in self.fs.glob(self._remote(pattern)):
                target = self.local / found.rsplit("/", 1)[-1]
                if not target.exists():
                    self.fs.get(found, str(target))
        for name in directories:
            target = self.local / name
            if not target.exists() and self.fs.exists(self._remote(name)):
                temporary = self.local / f".{name}.pulling"
                self.fs.get(self._remote(name), str(temporary), recursive=True)
                os.replace(temporary, target)
        uploaded = self.remote_checkpoints()
        local = ckpt.latest(self.local / REMOTE_CHECKPOINTS)
        if uploaded and (local is None or local[0] < uploaded[-1][0]):
            step, path = uploaded[-1]
            attempt = ckpt.next_attempt(self.local / REMOTE_CHECKPOINTS)  # a name no local attempt used
            target = self.local / REMOTE_CHECKPOINTS / attempt / ckpt.checkpoint_name(step)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(path, str(target), recursive=True)
            self._pushed_step = step

    # -- while training ----------------------------------------------------------------------------

    def push_checkpoint(self, files: tuple[str, ...]) -> int | None:
        """Upload the mirror's newest complete checkpoint if it is newer than the last one uploaded,
        with ``files`` (log, bad pairs) as they are now; returns its step."""
        if not self.remote:
            return None
        found = ckpt.latest(self.local / REMOTE_CHECKPOINTS)
        if found is None or found[0] <= self._pushed_step:
            return None
        step, directory = found
        for name in files:
            for path in sorted(self.local.glob(name)):
                self.fs.put(str(path), self._remote(path.name))
        target = self._remote(REMOTE_CHECKPOINTS, ckpt.checkpoint_name(step))
        names = sorted(path.name for path in Path(directory).iterdir() if path.name != ckpt.STATE_FILE)
        for name in [*names, ckpt.STATE_FILE]:  # state.json last: what makes the upload whole
            self.fs.put(str(Path(directory) / name), f"{target}/{name}")
        for older, path in self.remote_checkpoints():
            if older < step:
                self.fs.rm(path, recursive=True)
        self._pushed_step = step
        return step

    # -- at the end --------------------------------------------------------------------------------

    def push(self, relative: str) -> str:
        """Upload a file or directory of the mirror; returns where it now lives (its URL when remote)."""
        if not self.remote:
            return str(self.local / relative)
        source = self.local / relative
        if source.is_dir():
            for path in sorted(source.rglob("*")):
                if path.is_file():
                    self.fs.put(str(path), self._remote(relative, *path.relative_to(source).parts))
        else:
            self.fs.put(str(source), self._remote(relative))
        return self.url(relative)

    def remove_checkpoints(self) -> None:
        if self.remote and self.fs.exists(self._remote(REMOTE_CHECKPOINTS)):
            self.fs.rm(self._remote(REMOTE_CHECKPOINTS), recursive=True)


# -- another stage's outputs, wherever they live ------------------------------------------------------


def fetch(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local path to the file or directory at ``url`` (a local path is returned as it is).

    Stages hand each other their outputs as URLs when the run directory is on object storage; what
    needs files (a tokenizer, a MED, a ViT checkpoint, an exported model) reads a copy under the scratch
    directory. The copy is made again only when what the URL holds changed (names, sizes, ETags or
    modification times), so a stage that was redone is never read from an old copy.
    """
    if not is_url(url):
        return str(url)
    import shutil

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.isdir(root):
        listing = fs.find(root, detail=True)
    else:
        listing = {root: fs.info(root)}
    if not listing:
        raise FileNotFoundError(f"{url}: nothing there to fetch")
    signature = sorted(
        [name[len(root):].lstrip("/"), info.get("size"),
         str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")]
        for name, info in listing.items()
    )
    mirror = scratch_for(url)
    base = mirror.parent / "fetched" / mirror.name
    target, marker = base / root.rsplit("/", 1)[-1], base / "_fetched.json"
    if target.exists() and marker.exists() and json.loads(marker.read_text()) == signature:
        return str(target)
    base.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".fetching-", dir=base))
    for name in listing:
        relative = name[len(root):].lstrip("/")
        local = temporary / target.name / relative if relative else temporary / target.name
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get(name, str(local))
    marker.unlink(missing_ok=True)
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    os.replace(temporary / target.name, target)
    shutil.rmtree(temporary, ignore_errors=True)
    marker.write_text(json.dumps(signature))
    return str(target)
