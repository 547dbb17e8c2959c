"""One optimiser step without Ray: gradient accumulation, inputs, progress lines, impossible settings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from capfilt.config import TrainConfig
from capfilt.training.loop import format_record, model_inputs, prompt_length_of, train_step
from capfilt.training.optim import make_optimizer
from tests.training.conftest import small_med_config

# Same token count per text, so the LM loss (a mean over tokens) splits evenly into micro-batches.
TEXTS = ["a red circle", "a blue square", "a green star", "a black square"]


def test_two_micro_batches_equal_one_batch_of_both(tokenizer):
    from capfilt.models.med import MED

    tokens = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    assert bool(tokens.attention_mask.all())
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "input_ids": tokens.input_ids,
             "attention_mask": tokens.attention_mask, "image_ids": torch.arange(4)}
    halves = [{name: value[i : i + 2] for name, value in batch.items()} for i in (0, 2)]

    whole = MED.from_config(small_med_config(), tokenizer)
    split = copy.deepcopy(whole)
    results = []
    for model, micro in ((whole, [batch]), (split, halves)):
        # SGD, not AdamW: Adam divides by |gradient|, so a gradient that is zero up to float noise (an
        # attention key bias cancels in the softmax) would move by +-lr on noise alone.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        results.append(train_step(model, optimizer, micro, lr=1e-3, alpha=0.0, objectives=("lm",)))
    assert torch.allclose(results[0]["loss"], results[1]["loss"], atol=1e-6)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(whole.text_decoder.cls.predictions.bias, MED.from_config(small_med_config(), tokenizer)
                           .text_decoder.cls.predictions.bias)  # the step did change the model


def test_model_inputs_are_the_forward_arguments_as_tensors():
    batch = {"pixel_values": np.zeros((2, 3, 4, 4), np.float32), "input_ids": np.arange(20).reshape(2, 10),
             "attention_mask": np.ones((2, 10), np.int64), "image_ids": np.array([1, 2]), "position": np.array([0, 1])}
    inputs = model_inputs(batch, torch.device("cpu"))
    assert sorted(inputs) == ["attention_mask", "image_ids", "input_ids", "pixel_values"]
    assert all(isinstance(value, torch.Tensor) for value in inputs.values())
    assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()


def test_prompt_length_counts_the_mode_token_and_the_prompt(tokenizer):
    assert prompt_length_of(tokenizer, "") == 0
    assert prompt_length_of(tokenizer, "a picture of ") == len(tokenizer("a picture of").input_ids) - 1


def test_a_log_record_becomes_one_progress_line():
    line = format_record("pretrain", {"step": 5, "loss": 0.2, "loss_itc": 0.1, "lr": 1e-4, "steps_per_s": 2.0,
                                      "eta_s": 75}, 10)
    assert line == "[pretrain] step 5/10 loss 0.2000 (itc 0.1000) lr 1.00e-04 2.00 steps/s eta 1m15s"
    line = format_record("pretrain", {"step": 5, "loss": 0.2, "lr": 1e-4, "steps_per_s": 2.0, "eta_s": 75,
                                      "data_wait": 0.254}, 10)
    assert line == "[pretrain] step 5/10 loss 0.2000 () lr 1.00e-04 2.00 steps/s (25% waiting for data) eta 1m15s"


def test_a_bf16_autocast_step_runs_all_three_objectives(tokenizer):
    from capfilt.models.med import MED
    from capfilt.training.precision import autocast_for

    tokens = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "input_ids": tokens.input_ids,
             "attention_mask": tokens.attention_mask, "image_ids": torch.arange(4)}
    med = MED.from_config(small_med_config(queue_size=8), tokenizer)
    losses = train_step(med, make_optimizer(med, TrainConfig(warmup_steps=0)), [batch], lr=1e-4, alpha=0.4,
                        objectives=("itc", "itm", "lm"), autocast=autocast_for(torch.device("cpu"), "bf16"))
    assert set(losses) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert all(torch.isfinite(value) for value in losses.values())
    assert med.image_queue.dtype == torch.float32 and int(med.queue_ptr) == 4



def test_impossible_settings_fail_before_any_worker_starts(tmp_path):
    from capfilt.training.loop import TrainJob, check_job

    def job(**train):
        return TrainJob(config=TrainConfig(**train), out_dir=str(tmp_path), tokenizer_dir="", sources=[], units=[],
                        model=small_med_config())  # queue of 64

    assert check_job(job(batch_size=8), {"CPU": 2.0}) == (small_med_config(), False)
    with pytest.raises(ValueError, match="queue \\(64\\) must be a multiple of the global micro-batch 24"):
        check_job(job(batch_size=24), {"CPU": 2.0})
    with pytest.raises(ValueError, match="has 2 CPUs; training needs 3"):
        check_job(job(batch_size=8, workers=2), {"CPU": 2.0})
    with pytest.raises(ValueError, match="need a GPU each"):
        check_job(job(batch_size=8, use_gpu=True), {"CPU": 2.0})
    with pytest.raises(ValueError, match="max_text_length 80 exceeds"):
        check_job(job(batch_size=8, max_text_length=80), {"CPU": 2.0})
    # Trained in the driver the GPU is this process's, whatever the cluster has.
    here = torch.cuda.is_available()
    assert check_job(job(batch_size=8, train_in_driver=True), {"CPU": 2.0, "GPU": 1.0})[1] is here
    assert check_job(job(batch_size=8, train_in_driver=True), {"CPU": 2.0})[1] is here
    if not here:
        with pytest.raises(ValueError, match="need a GPU each; the driver's process sees none"):
            check_job(job(batch_size=8, use_gpu=True, train_in_driver=True), {"CPU": 2.0, "GPU": 1.0})


class _Trainer:
    """Stands in for Ray Train's trainer (this is a test of capfilt's thread layout, not of Ray Train):
    its fit writes progress records, as the training loop does, and notes the thread it runs in."""

    def __init__(self, log_path, fail: bool = False):
        self.log_path, self.fail, self.thread = log_path, fail, None

    def fit(self):
        import json
        import threading
        import time

        self.thread = threading.current_thread()
        with open(self.log_path, "a", encoding="utf-8") as handle:
            for step in (10, 20):
                handle.write(json.dumps({"step": step, "loss": 1.0, "lr": 1e-4}) + "\n")
                handle.flush()
                time.sleep(0.6)  # the follower's look comes between the two records
        if self.fail:
            raise RuntimeError("worker lost")
        return "result"


@pytest.mark.parametrize("fail", [False, True])
def test_training_runs_in_the_callers_thread_and_every_progress_line_is_printed(tmp_path, fail):
    # In the driver, torch's OpenMP pool is per thread: training in a second thread beside a main thread
    # that has used torch made every demo step ~1.6x slower (bench/README.md section 8, "One thread for torch").
    import threading

    from capfilt.training.loop import _fit_following

    trainer, lines = _Trainer(tmp_path / "train_log.jsonl", fail), []
    if fail:
        with pytest.raises(RuntimeError, match="worker lost"):
            _fit_following(trainer, str(trainer.log_path), 0, "pretrain", 20, lines.append)
    else:
        assert _fit_following(trainer, str(trainer.log_path), 0, "pretrain", 20, lines.append) == "result"
    assert trainer.thread is threading.current_thread()
    assert [line.split(" loss")[0] for line in lines] == ["[pretrain] step 10/20", "[pretrain] step 20/20"]
    assert not [thread for thread in threading.enumerate() if thread.name == "capfilt-train-log"]


def test_a_broken_log_stops_the_progress_lines_not_the_training(tmp_path):
    from capfilt.training.loop import _fit_following

    trainer, lines = _Trainer(tmp_path / "train_log.jsonl"), []
    trainer.log_path.write_text("not json\n")
    assert _fit_following(trainer, str(trainer.log_path), 0, "pretrain", 20, lines.append) == "result"
    assert len(lines) == 1 and lines[0].startswith("[pretrain] progress lines stopped: JSONDecodeError")
