"""Checkpoints: safetensors weights, safely loaded optimizer state, torn copies never resumed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from capfilt.config import TrainConfig
from capfilt.training import checkpoint as ckpt
from capfilt.training.optim import make_optimizer
from tests.training.conftest import small_med_config


@pytest.fixture
def trained_state(tokenizer):
    from capfilt.models.med import MED

    torch.manual_seed(0)
    med = MED.from_config(small_med_config(), tokenizer)
    optimizer = make_optimizer(med, TrainConfig(warmup_steps=0))
    med.itm_head.weight.sum().backward()
    optimizer.step()
    return med, optimizer


def test_a_checkpoint_is_safetensors_plus_weights_only_optimizer_state(trained_state, tmp_path):
    from capfilt.models.med import load_med

    med, optimizer = trained_state
    directory = ckpt.write(tmp_path / "step_00000007", med, optimizer, 7, {"fingerprint": "abc"})
    state = ckpt.read_state(directory)
    assert state["step"] == 7 and state["fingerprint"] == "abc"
    assert set(state["files"]) == {"med.safetensors", "med.json", "optimizer.pt"}
    with safe_open(str(directory / "med.safetensors"), "pt") as weights:
        assert "itm_head.weight" in weights.keys() and "image_queue" in weights.keys()

    restored = load_med(directory)
    assert torch.equal(restored.itm_head.weight, med.itm_head.weight)
    moments = ckpt.load_optimizer_state(directory)  # torch.load(weights_only=True): no pickle execution
    fresh = make_optimizer(restored, TrainConfig(warmup_steps=0))
    fresh.load_state_dict(moments)
    assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def _fake(directory, step: int, size: int = 4):
    directory.mkdir(parents=True)
    (directory / "med.safetensors").write_bytes(b"x" * size)
    (directory / "state.json").write_text(json.dumps({"step": step, "files": {"med.safetensors": size}}))
    return directory


def test_torn_checkpoints_are_ignored_and_the_newest_complete_one_wins(tmp_path):
    root = tmp_path / "checkpoints"
    _fake(root / "attempt-000" / "step_00000010", 10)
    _fake(root / "attempt-000" / "step_00000020", 20)
    torn = _fake(root / "attempt-001" / "step_00000030", 30)
    (torn / "med.safetensors").write_bytes(b"xx")  # cut short by a kill
    missing = _fake(root / "attempt-001" / "step_00000040", 40)
    (missing / "med.safetensors").unlink()  # state.json copied before the weights
    (root / "attempt-001" / "step_00000050").mkdir()  # nothing copied yet

    assert [step for step, _ in ckpt.checkpoints(root)] == [10, 20]
    step, path = ckpt.latest(root)
    assert step == 20 and path.name == "step_00000020"
    assert ckpt.next_attempt(root) == "attempt-002"

    ckpt.prune(root, keep=path)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()) == [
        "attempt-000", "attempt-000/step_00000020"]
    assert ckpt.latest(root)[0] == 20
