"""The learning-rate schedule and AdamW's parameter groups."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from capfilt.config import TrainConfig
from capfilt.training.optim import adamw, load_state, lr_at, make_optimizer, param_groups
from tests.training.conftest import small_med_config


def test_warmup_is_linear_then_cosine_reaches_min_lr_at_the_last_step():
    config = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, warmup_lr=1e-5, min_lr=1e-6, schedule="cosine")
    assert lr_at(0, config) == pytest.approx(1e-5)
    assert lr_at(5, config) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(10, config) == pytest.approx(1e-3)  # warm-up done: the peak
    assert lr_at(60, config) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)  # half way down the cosine
    assert lr_at(110, config) == pytest.approx(1e-6)
    values = [lr_at(step, config) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up


def test_step_decay_multiplies_every_decay_every_steps_down_to_min_lr():
    config = TrainConfig(steps=1000, warmup_steps=0, lr=1e-3, schedule="step", decay_rate=0.5, decay_every=10,
                         min_lr=1e-4)
    assert lr_at(0, config) == lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(10, config) == pytest.approx(5e-4)
    assert lr_at(25, config) == pytest.approx(2.5e-4)
    assert lr_at(999, config) == pytest.approx(1e-4)


def test_no_weight_decay_on_biases_norms_temperature_and_vit_tokens(tokenizer):
    from capfilt.models.med import MED

    med = MED.from_config(small_med_config(), tokenizer)
    decay, no_decay = param_groups(med, 0.05)
    names = {id(param): name for name, param in med.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"temp", "visual_encoder.embeddings.class_embedding", "visual_encoder.embeddings.position_embedding",
            "vision_proj.bias", "text_encoder.embeddings.LayerNorm.weight"} <= no_decay_names
    assert {"vision_proj.weight", "itm_head.weight", "text_encoder.embeddings.word_embeddings.weight"} <= decay_names
    # Momentum encoders are not optimised; a tied parameter is optimised once.
    assert not any(name.split(".")[0].endswith("_m") for name in decay_names | no_decay_names)
    trainable = {id(p) for p in med.parameters() if p.requires_grad}
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped)) == len(trainable)

    optimizer = make_optimizer(med, TrainConfig(warmup_steps=0, lr=2e-4))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["lr"] == pytest.approx(2e-4) for group in optimizer.param_groups)


def test_adamw_is_fused_on_cpu_and_steps_as_the_per_tensor_loop_does():
    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    models = [copy.deepcopy(template) for _ in range(2)]
    fused = adamw([{"params": list(models[0].parameters()), "weight_decay": 0.05}], 1e-2)
    loop = torch.optim.AdamW([{"params": list(models[1].parameters()), "weight_decay": 0.05}], lr=1e-2, foreach=False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    inputs = torch.randn(8, 6)
    for _ in range(5):
        for model, optimizer in zip(models, (fused, loop)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for fused_param, loop_param in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused_param, loop_param, rtol=1e-5, atol=1e-6)
    # Same state layout: a checkpoint of the loop optimiser resumes into the fused one, step for step,
    # and the resumed optimiser stays fused (load_state_dict alone would take the saved run's kernel).
    copied = copy.deepcopy(models[1])
    resumed = adamw([{"params": list(copied.parameters()), "weight_decay": 0.05}], 1e-2)
    saved = io.BytesIO()
    torch.save(loop.state_dict(), saved)
    load_state(resumed, torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    assert resumed.param_groups[0]["fused"] is True
    for param, copied_param in zip(models[1].parameters(), copied.parameters()):
        copied_param.grad = param.grad.clone()
    loop.step()
    resumed.step()
    for loop_param, resumed_param in zip(models[1].parameters(), copied.parameters()):
        torch.testing.assert_close(resumed_param, loop_param, rtol=1e-5, atol=1e-6)
