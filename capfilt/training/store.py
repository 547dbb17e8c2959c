"""A training stage's directory on object storage: a local working mirror, pushed as it becomes durable.

Training writes where Ray Train and torch write fast and atomically: a local directory. When the stage
directory is a URL (``s3://``, ``gs://``, anything fsspec opens), that local directory is a scratch
mirror (``$CAPFILT_SCRATCH_DIR``, default ``<tmp>/capfilt-scratch``, one folder per URL) and
:class:`StageStore` keeps the URL up to date with what a resumed run needs:

* before training: the claim (``_capfilt.json``, written straight to the URL), then whatever the URL
  already holds is pulled into an empty mirror (the pairs index, the initial MED, the log and the bad
  pairs), so a run killed on one machine resumes on another;
* while training: rank 0, wherever it runs, uploads each checkpoint to ``<url>/checkpoints/step_N``
  itself (:func:`upload_checkpoint`: file by file, ``state.json`` last, so a torn upload is told from
  a whole one exactly as a torn local copy is; older ones are deleted once a newer one is whole), and
  the log and bad-pair records follow it (:mod:`capfilt.training.records`); a resumed run's workers
  read the newest whole one (:func:`remote_checkpoints`) from the URL;
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

    # -- before training ---------------------------------------------------------------------------

    def pull(self, names: tuple[str, ...], directories: tuple[str, ...]) -> None:
        """Bring into the mirror the URL's ``names`` (files or globs) and ``directories`` it lacks."""
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


# -- checkpoints at a URL --------------------------------------------------------------------------


def _whole_checkpoints(fs, root: str) -> list[tuple[int, str]]:
    """(step, path in ``fs``) of the whole checkpoints under ``root/checkpoints``, oldest first."""
    fs.invalidate_cache()  # fsspec keeps filesystems, and their listings, per options: others upload here
    found = []
    try:
        entries = fs.ls(f"{root.rstrip('/')}/{REMOTE_CHECKPOINTS}", detail=False)
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("step_"):
            continue
        try:
            with fs.open(f"{entry}/{ckpt.STATE_FILE}", "rb") as handle:
                state = json.loads(handle.read())
            sizes = {info["name"].rsplit("/", 1)[-1]: info["size"] for info in fs.ls(entry, detail=True)}
        except (FileNotFoundError, ValueError):
            continue
        if all(sizes.get(file) == size for file, size in state["files"].items()):
            found.append((int(state["step"]), entry.rstrip("/")))
    return sorted(found)


def remote_checkpoints(url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """The whole checkpoints under ``<url>/checkpoints`` as (step, URL), oldest first."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocol = url.split("://", 1)[0]
    return [(step, f"{protocol}://{path}") for step, path in _whole_checkpoints(fs, root)]


def upload_checkpoint(directory: str | Path, step: int, stage_url: str, keep: int | None,
                      storage_options: dict[str, Any] | None = None) -> str:
    """Upload the checkpoint in ``directory`` to ``<stage_url>/checkpoints/step_N`` (``state.json`` last:
    what makes the upload whole), then delete all but the newest ``keep`` whole ones; returns its URL."""
    fs, root = fsspec.core.url_to_fs(stage_url, **(storage_options or {}))
    name = ckpt.checkpoint_name(step)
    target = f"{root.rstrip('/')}/{REMOTE_CHECKPOINTS}/{name}"
    files = sorted(path.name for path in Path(directory).iterdir() if path.name != ckpt.STATE_FILE)
    for file in [*files, ckpt.STATE_FILE]:
        fs.put(str(Path(directory) / file), f"{target}/{file}")
    for _, older in _whole_checkpoints(fs, root)[:-keep] if keep else []:
        fs.rm(older, recursive=True)
    return f"{stage_url.rstrip('/')}/{REMOTE_CHECKPOINTS}/{name}"


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
    fs.invalidate_cache()  # a listing cached by this process would hide a change made elsewhere
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
    base = _fetched_base(url)
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


def _fetched_base(url: str) -> Path:
    mirror = scratch_for(url)
    return mirror.parent / "fetched" / mirror.name


def forget(url: str) -> None:
    """Delete this machine's copy of ``url`` made by :func:`fetch` (a checkpoint read once, say)."""
    if is_url(url):
        import shutil

        shutil.rmtree(_fetched_base(url), ignore_errors=True)
