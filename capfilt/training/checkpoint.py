"""Training checkpoints: what one holds, how to tell a whole one from a torn one, which to resume.

A checkpoint directory (``step_00000100/``) holds the MED as :func:`capfilt.models.med.save_med`
writes it (safetensors: online and momentum encoders, queues), ``optimizer.pt`` (AdamW moments;
read back with ``torch.load(weights_only=True)``, never unpickled) and ``state.json`` (the step and
every file's size). The step is all the remaining state: the learning rate, the data position and
every random draw are functions of (seed, step).

Ray Train copies a checkpoint into ``<root>/attempt-NNN/step_SSSSSSSS`` file by file (for a stage on
object storage rank 0 uploads it to ``<url>/checkpoints/step_SSSSSSSS`` the same way, see
:mod:`capfilt.training.store`; trained in the driver, the loop copies it there itself, :func:`install`),
so a driver killed mid-copy leaves a torn directory. A checkpoint counts only when ``state.json`` parses
and every file it lists has its recorded size (:func:`is_complete`). Each run of a stage is a new
attempt (a new Ray Train run name), so Ray never tries to restore its own, possibly torn, run snapshot:
the resume point is chosen here (:func:`latest`), and everything older is deleted before the new attempt
starts (:func:`prune`). ``CURRENT`` names the attempt that may write (:mod:`capfilt.training.records`
checks it): the workers of a killed driver live on for a few seconds and must not write into a run that
has moved on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the records actor and the store read checkpoints' state without torch
    import torch

STATE_FILE = "state.json"
CURRENT_FILE = "CURRENT"  # the attempt allowed to write; a superseded run's stray workers stop
OPTIMIZER_FILE = "optimizer.pt"
_ATTEMPT = re.compile(r"^attempt-(\d+)$")
_STEP = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def write(directory: str | Path, med, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None) -> Path:
    """Fill ``directory`` with a checkpoint of ``step``; ``state.json`` comes last."""
    import torch

    from capfilt.models.med import save_med

    directory = Path(directory)
    save_med(med, directory)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    files = {path.name: path.stat().st_size for path in sorted(directory.iterdir()) if path.name != STATE_FILE}
    state = {"step": step, "files": files, **(extra or {})}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return directory


def read_state(directory: str | Path) -> dict | None:
    """``state.json`` of a complete checkpoint, None for a torn or foreign directory."""
    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        files = state["files"]
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return state


def is_complete(directory: str | Path) -> bool:
    return read_state(directory) is not None


def load_optimizer_state(directory: str | Path, device: torch.device | str = "cpu") -> dict:
    import torch

    return torch.load(Path(directory) / OPTIMIZER_FILE, map_location=device, weights_only=True)


def _attempts(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _ATTEMPT.match(path.name)) and path.is_dir()]
    return sorted(found)


def _whole_in(attempt: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of one attempt directory as (step, directory)."""
    return [(int(state["step"]), path) for path in attempt.iterdir()
            if _STEP.match(path.name) and path.is_dir() and (state := read_state(path)) is not None]


def checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint under ``root`` as (step, directory), oldest first."""
    return sorted(found for _, attempt in _attempts(Path(root)) for found in _whole_in(attempt))


def latest(root: str | Path) -> tuple[int, Path] | None:
    """The complete checkpoint with the highest step, if any."""
    found = checkpoints(root)
    return found[-1] if found else None


def current_attempt(root: str | Path) -> str | None:
    try:
        return (Path(root) / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def set_current_attempt(root: str | Path, attempt: str) -> None:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f"{CURRENT_FILE}.tmp"
    temporary.write_text(attempt)
    os.replace(temporary, root / CURRENT_FILE)


def next_attempt(root: str | Path, used: Sequence[str] = ()) -> str:
    """A name no earlier attempt used (not even one killed before Ray created its directory, nor any of
    ``used``: attempts another machine ran, named in the log it left)."""
    numbers = [number for number, _ in _attempts(Path(root))]
    for name in [current_attempt(root) or "", *used]:
        match = _ATTEMPT.match(name)
        if match:
            numbers.append(int(match.group(1)))
    return f"attempt-{max(numbers) + 1 if numbers else 0:03d}"


def prune(root: str | Path, keep: Path | None) -> None:
    """Delete every earlier attempt's files except the checkpoint ``keep`` (the resume point)."""
    for _, attempt in _attempts(Path(root)):
        for path in attempt.iterdir():
            if keep is not None and path.resolve() == Path(keep).resolve():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not any(attempt.iterdir()):
            attempt.rmdir()


def install(directory: str | Path, attempt_dir: Path, step: int, keep: int) -> Path:
    """Copy the checkpoint in ``directory`` to ``attempt_dir/step_N`` as Ray Train copies a reported one
    (``state.json`` last), then delete all but the newest ``keep`` whole ones of the attempt."""
    target = attempt_dir / checkpoint_name(step)
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(path.name for path in Path(directory).iterdir() if path.name != STATE_FILE)
    for name in [*files, STATE_FILE]:
        shutil.copyfile(Path(directory) / name, target / name)
    for _, older in sorted(_whole_in(attempt_dir))[:-keep]:
        shutil.rmtree(older, ignore_errors=True)
    return target


def remove_all(root: str | Path) -> None:
    if os.path.isdir(root):
        shutil.rmtree(root, ignore_errors=True)
