"""The runner's bookkeeping: complete stages are skipped, changed or stale ones refused (no Ray, fake stages)."""

from __future__ import annotations

import shutil

import pytest

from capfilt import runner
from capfilt.config import PipelineConfig, TokenizerConfig, WorldConfig
from capfilt.runner import StageConflictError, Step, run_pipeline


def _fake_plan(monkeypatch, vocab_size: int = 200, world_seed: int = 0) -> list[str]:
    """synth, pretrain_vision, tokenizer, pretrain_noisy, round_0/pretrain: what each runs is logged."""
    ran: list[str] = []

    def stage(run, step):
        ran.append(step.name)
        return {"dir": run.stage_dir(step.name)}

    steps = [Step("synth", stage, WorldConfig(seed=world_seed)), Step("pretrain_vision", stage, WorldConfig(seed=1)),
             Step("tokenizer", stage, TokenizerConfig(vocab_size=vocab_size)),
             Step("pretrain_noisy", stage, WorldConfig(seed=2)),
             Step("round_0/pretrain", stage, WorldConfig(seed=3), {"continue": "pretrain_noisy"})]
    monkeypatch.setattr(runner, "plan", lambda config: steps)
    return ran


def test_a_stage_made_from_one_that_would_be_redone_is_refused(tmp_path, monkeypatch):
    config, root = PipelineConfig(), tmp_path / "run"
    ran = _fake_plan(monkeypatch)
    run_pipeline(config, str(root), log=lambda _: None)
    assert ran == ["synth", "pretrain_vision", "tokenizer", "pretrain_noisy", "round_0/pretrain"]

    ran = _fake_plan(monkeypatch)
    run_pipeline(config, str(root), log=lambda _: None)
    assert ran == []  # all complete

    ran = _fake_plan(monkeypatch, vocab_size=300)
    with pytest.raises(StageConflictError, match="vocab_size: 200 -> 300.*delete that stage's directory"):
        run_pipeline(config, str(root), log=lambda _: None)
    assert ran == []

    # Deleting the changed stage's directory alone would train on the old vocabulary: refused, before
    # anything runs, naming every stage made from it.
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(StageConflictError, match=r"pretrain_noisy \(from tokenizer\); round_0/pretrain \(from "
                                                 r"pretrain_noisy, tokenizer\); delete the directories of "
                                                 r"pretrain_noisy, round_0/pretrain too"):
        run_pipeline(config, str(root), log=lambda _: None)
    assert ran == []
    for name in ("pretrain_noisy", "round_0"):
        shutil.rmtree(root / name)
    run_pipeline(config, str(root), log=lambda _: None)
    assert ran == ["tokenizer", "pretrain_noisy", "round_0/pretrain"]

    # A stage nothing later reads is redone alone.
    ran = _fake_plan(monkeypatch, vocab_size=300)
    shutil.rmtree(root / "pretrain_vision")
    run_pipeline(config, str(root), log=lambda _: None)
    assert ran == ["pretrain_vision"]


def test_stages_are_reused_from_another_run_only_when_made_from_the_same_data_and_inputs(tmp_path, monkeypatch):
    config, first = PipelineConfig(), str(tmp_path / "first")
    _fake_plan(monkeypatch)
    run_pipeline(config, first, log=lambda _: None)

    ran, logged = _fake_plan(monkeypatch), []
    run = run_pipeline(config, str(tmp_path / "same"), log=logged.append, reuse_from=[first])
    assert ran == [] and sum(line.endswith(", reused") for line in logged) == 5
    assert run.outputs["round_0/pretrain"] == {"dir": f"{first}/round_0/pretrain"}  # its files stay where they are
    # Reused records are this run's own from then on: a rerun skips them, even without reuse_from.
    ran = _fake_plan(monkeypatch)
    run_pipeline(config, str(tmp_path / "same"), log=lambda _: None)
    assert ran == []

    # Another vocabulary: what precedes the tokenizer is reused, what was trained with it is not, although
    # pretrain_noisy's own section is the same (it reads the tokenizer without declaring it).
    ran = _fake_plan(monkeypatch, vocab_size=300)
    run_pipeline(config, str(tmp_path / "vocab"), log=lambda _: None, reuse_from=[first])
    assert ran == ["tokenizer", "pretrain_noisy", "round_0/pretrain"]
    # Another world: nothing after it is reused, the ViT's identical section notwithstanding.
    ran = _fake_plan(monkeypatch, world_seed=1)
    run_pipeline(config, str(tmp_path / "world"), log=lambda _: None, reuse_from=[str(tmp_path / "vocab"), first])
    assert ran == ["synth", "pretrain_vision", "tokenizer", "pretrain_noisy", "round_0/pretrain"]
