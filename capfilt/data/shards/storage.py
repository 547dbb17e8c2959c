"""Opening input files so that a storage failure (network, timeout, throttling) is told apart from bytes
that do not parse, and retried."""

from __future__ import annotations

import time

from capfilt.config import ReaderConfig
from capfilt.data.shards.errors import ShardTransientError


class StorageError(OSError):
    """An error of the underlying file object, told apart from the parsers' own ``OSError``s."""


# Errors that a retry cannot fix although they are OSErrors.
PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def open_guarded(fs, fs_path: str, path: str, **options):
    """Open ``fs_path`` for reading, guarded; a failure to open that a retry may fix is a StorageError."""
    try:
        return GuardedFile(fs.open(fs_path, "rb", **options))
    except PERMANENT_OS_ERRORS:
        raise
    except OSError as error:  # includes TimeoutError and ConnectionError
        raise StorageError(f"cannot open {path} ({type(error).__name__}: {error})") from error


def retrying(call, path: str, config: ReaderConfig, sleep=time.sleep):
    """``call(open)`` where ``open(fs, fs_path)`` opens guarded; storage errors retried as in ``read_shard``.

    For readers of part of a shard (e.g. the images of some rows) that do not go through ``read_shard``.
    """
    for attempt in range(config.read_retries + 1):
        try:
            return call(lambda fs, fs_path: open_guarded(fs, fs_path, path))
        except StorageError as error:
            if attempt == config.read_retries:
                raise ShardTransientError(path, f"storage error after {attempt + 1} attempts: {error}") from None
            sleep(config.retry_backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class GuardedFile:
    """A file object whose own I/O errors are :class:`StorageError`, whichever parser called it.

    pyarrow and tarfile re-raise what the file object raised, so after a failure the reader can tell
    a storage blip (retry) from bytes that do not parse (give up).
    """

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def _guard(self, method, *args):
        try:
            return method(*args)
        except PERMANENT_OS_ERRORS:
            raise
        except OSError as error:
            raise StorageError(f"{type(error).__name__}: {error}") from error

    def read(self, *args):
        return self._guard(self._handle.read, *args)

    def readinto(self, *args):
        return self._guard(self._handle.readinto, *args)

    def seek(self, *args):
        return self._guard(self._handle.seek, *args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()
