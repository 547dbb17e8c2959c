"""Input paths: brace and glob expansion over any fsspec store, and the keys derived from a file and row."""

from __future__ import annotations

import posixpath
import re
from typing import Any, Sequence

import fsspec

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{a,b}`` and zero-padded numeric ranges ``{00000..00009}``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        start, stop = int(first), int(last)
        padded = any(len(text.lstrip("-")) > 1 and text.lstrip("-").startswith("0") for text in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if stop >= start else -1
        options = [str(number).zfill(width) for number in range(start, stop + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace expression (as in bash): keep it literally
        return [head + "{" + body + "}" + path for path in expand_braces(tail)]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_paths(spec: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Files matching ``spec`` (paths, globs, brace lists; local or any fsspec URL), sorted, unique.

    Raises ``FileNotFoundError`` naming the pattern when a glob matches nothing or a named file is absent.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise FileNotFoundError("no input paths given")
    found: set[str] = set()
    for pattern in specs:
        for expanded in expand_braces(pattern):
            fs, fs_path = fsspec.core.url_to_fs(expanded, **(storage_options or {}))
            if _GLOB_CHARS.search(fs_path):
                matches = [path for path in fs.glob(fs_path) if fs.isfile(path)]
                if not matches:
                    raise FileNotFoundError(f"no input files match {expanded!r} (from {pattern!r})")
            elif fs.isfile(fs_path):
                matches = [fs_path]
            else:
                raise FileNotFoundError(f"input file {expanded!r} (from {pattern!r}) does not exist")
            found.update(_as_url(fs, path) for path in matches)
    return sorted(found)


def _as_url(fs, path: str) -> str:
    # Local files stay plain paths; anything else keeps its protocol so another process can reopen it.
    return path if "file" in _protocols(fs) else fs.unstrip_protocol(path)


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def file_name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def file_stem(path: str) -> str:
    return file_name(path).split(".", 1)[0]


def derived_key(path: str, row: int) -> str:
    """The stable key of a row whose input has no key: file stem and row index."""
    return f"{file_stem(path)}_{row:06d}"


def make_source_key(path: str, row: int) -> str:
    return f"{file_name(path)}:{row}"
