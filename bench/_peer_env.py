"""The peer tools' own virtual environment, beside capfilt's: created on first use, reused after.

Data-Juicer goes into ``.bench-peers-venv/`` (git-ignored) at the repo root, never into capfilt's
``.venv``. It runs the same torch as capfilt (2.14.1, with torchvision 0.29.1): when capfilt's
environment has exactly those releases installed, their files (torch, torchvision and the CUDA runtime
wheels torch depends on, ~5 GB) are hard-linked into the peer environment (no copy, no download: the
same files), otherwise pip installs them from the registry. A constraints file pins both, so no later
install can pull another torch.

Only stdlib here: this module also runs under the peer's own python (the driver imports nothing of capfilt).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / ".bench-peers-venv"

DATA_JUICER = "py-data-juicer==1.6.1"
# Data-Juicer's core requirements name neither torch nor transformers; its `generic` extra pins
# transformers==4.57.1 and torch==2.8.0. The extra is not installed (it would replace torch), and
# transformers is capfilt's own release: 4.57.1 cannot load a tokenizer that transformers 5 saved
# (tokenizer_config.json's `extra_special_tokens` is a list there; 4.57.1 calls `.keys()` on it and fails
# with "AttributeError: 'list' object has no attribute 'keys'"), so it cannot read capfilt's exports at all.
PEER_TRANSFORMERS = "transformers==5.24.0"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
# Imported by data_juicer/utils/file_utils.py (so by `import data_juicer`) but not among its requirements:
# older `datasets` releases brought it in through fsspec[http]; the ones transformers 5 allows do not.
UNDECLARED = ("aiohttp",)
STAMP = ".capfilt-peers-installed.json"

# Distributions hard-linked from capfilt's environment when their versions match the pins.
_LINKED_NAMES = ("torch", "torchvision", "triton")
_LINKED_PREFIXES = ("nvidia-", "cuda-")


def peer_python(venv: Path = PEER_VENV) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _run(step: str, command: list[str], log, timeout: float = 1800, keep_output: bool = False) -> dict[str, Any]:
    log(f"peer env: {step}: {' '.join(command)}")
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as error:
        rc, out, err = -1, str(error.stdout or ""), f"timed out after {timeout} s"
    record = {"step": step, "command": command, "rc": rc, "seconds": round(time.time() - started, 1)}
    if keep_output:
        record["output"] = (out or "") + (err or "")
    if rc != 0:
        record["error_tail"] = (err or out)[-3000:]
    return record


def _pinned_versions() -> dict[str, str]:
    return dict(pin.split("==") for pin in TORCH_PINS)


def link_torch_from_current_env(venv: Path, log) -> dict[str, Any]:
    """Hard-link (copy where linking fails) capfilt's installed torch, torchvision and their CUDA runtime
    wheels into ``venv``, metadata included, so pip sees them installed. Only when the versions match."""
    pins = _pinned_versions()
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in _LINKED_NAMES or name.startswith(_LINKED_PREFIXES):
            found[name] = dist
    for name, version in pins.items():
        if name not in found or found[name].version != version:
            have = found[name].version if name in found else None
            return {"step": "link torch", "linked": False, "why": f"{name} {have} here, {version} pinned"}
    target = _site_packages(venv)
    files = linked = 0
    for dist in found.values():
        root = Path(str(dist.locate_file("")))
        for entry in dist.files or []:
            relative = str(entry)
            if relative.startswith(".."):  # console scripts in bin/: not needed
                continue
            source, destination = root / relative, target / relative
            if not source.is_file() or destination.exists():
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, destination)
                linked += 1
            except OSError:
                shutil.copy2(source, destination)
            files += 1
    return {"step": "link torch", "linked": True, "distributions": sorted(f"{n}=={d.version}" for n, d in found.items()),
            "files": files, "hard_links": linked}


def installed_versions(python: Path) -> dict[str, str | None]:
    """The versions that matter, as the peer's python sees them."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {'python': sys.version.split()[0]}\n"
            "for name in ('py-data-juicer', 'transformers', 'torch', 'torchvision', 'datasets', 'tokenizers'):\n"
            "    try: out[name] = m.version(name)\n"
            "    except m.PackageNotFoundError: out[name] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-2000:]}


def ensure_peer_env(venv: Path = PEER_VENV, log=lambda *a: None, timeout: float = 1800) -> dict[str, Any]:
    """Create (first use) or reuse the peer environment. Returns a record: ok, versions, steps, error."""
    venv = Path(venv)
    stamp = venv / STAMP
    python = peer_python(venv)
    if stamp.exists() and python.exists():
        record = json.loads(stamp.read_text())
        record.update(created=False, ok=True)
        return record
    started = time.time()
    steps: list[dict[str, Any]] = []
    record: dict[str, Any] = {"venv": str(venv), "created": True, "ok": False, "steps": steps,
                              "requested": [DATA_JUICER, PEER_TRANSFORMERS, *UNDECLARED, *TORCH_PINS]}

    def fail(message: str) -> dict[str, Any]:
        record.update(error=message, seconds=round(time.time() - started, 1))
        log(f"peer env: FAILED: {message}")
        return record

    if not python.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        steps.append(_run("venv", [base, "-m", "venv", str(venv)], log, timeout))
        if steps[-1]["rc"] != 0:
            return fail(f"python -m venv failed: {steps[-1].get('error_tail', '')}")
    constraints = venv / "constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in TORCH_PINS))
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]

    steps.append(link_torch_from_current_env(venv, log))
    # With the files linked this only adds torch's small pure-Python dependencies (sympy, jinja2, ...);
    # without them it downloads torch itself.
    steps.append(_run("torch", [*pip, *TORCH_PINS], log, timeout))
    if steps[-1]["rc"] != 0:
        return fail(f"installing {' '.join(TORCH_PINS)} failed: {steps[-1].get('error_tail', '')}")

    steps.append(_run("data-juicer", [*pip, DATA_JUICER, PEER_TRANSFORMERS, *UNDECLARED], log, timeout))
    if steps[-1]["rc"] != 0:
        # Its requirements would need another torch or something this machine cannot install: the package
        # alone, then what the two ops import (see data_juicer/ops/{filter,mapper}/image_*.py, utils/model_utils.py).
        steps.append(_run("data-juicer --no-deps", [*pip, "--no-deps", DATA_JUICER], log, timeout))
        minimal = [PEER_TRANSFORMERS, *UNDECLARED, "datasets", "loguru", "jsonargparse", "pydantic>=2", "pillow", "numpy",
                   "pandas", "dill", "multiprocess", "psutil", "regex", "tqdm", "lazy_loader"]
        steps.append(_run("minimal deps", [*pip, *minimal], log, timeout))
        if steps[-1]["rc"] != 0:
            return fail(f"installing {DATA_JUICER} failed, with and without its dependencies: "
                        f"{steps[-1].get('error_tail', '')}")
    # Importing data_juicer.core.data makes Data-Juicer's LazyLoader `uv pip install` what it names and
    # lacks (here ray, with msgpack): done once now, and recorded, so the measured runs install nothing.
    imports = "import data_juicer.core.data, data_juicer.ops.filter, data_juicer.ops.mapper"
    warm = _run("import data_juicer", [str(python), "-c", imports], log, timeout, keep_output=True)
    warm["installed_on_import"] = [line.strip() for line in (warm.pop("output", "") or "").splitlines()
                                   if line.strip().startswith("+ ")]
    steps.append(warm)
    if warm["rc"] != 0:
        return fail(f"importing Data-Juicer failed: {warm.get('error_tail', '')}")
    versions = installed_versions(python)
    record["versions"] = versions
    if versions.get("torch", "").split("+")[0] != _pinned_versions()["torch"]:
        return fail(f"the peer environment has torch {versions.get('torch')}, not {TORCH_PINS[0]}")
    record.update(ok=True, seconds=round(time.time() - started, 1))
    stamp.write_text(json.dumps({k: v for k, v in record.items() if k not in ("created", "ok")}, indent=1))
    return record
