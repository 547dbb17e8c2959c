"""What produced a result: library versions, recorded next to every score."""

from __future__ import annotations

import platform
from importlib import metadata

_LIBRARIES = ("capfilt", "torch", "torchvision", "transformers", "tokenizers", "timm", "ray", "pyarrow", "pillow", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
