"""AdamW and the learning-rate schedule.

The schedule is a pure function of the step (:func:`lr_at`), set on the optimiser before every step,
so a resumed run needs no scheduler state: the step number is the state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from capfilt.config import TrainConfig

# timm's ViT no_weight_decay(): the class token and position embedding are not shrunk towards zero.
NO_DECAY_NAMES = ("class_embedding", "position_embedding")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine or step decay."""
    if step < config.warmup_steps:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / config.warmup_steps
    if config.schedule == "cosine":
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decays = (step - config.warmup_steps) // config.decay_every
    return max(config.min_lr, config.lr * config.decay_rate**decays)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight matrices decay; biases, norms, the ITC temperature
    (all of ndim < 2) and the ViT's class/position embeddings do not. Tied parameters appear once."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # the momentum encoders follow by EMA, not by gradient
        if param.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter is a float tensor on a CPU or CUDA device.

    The default on a CPU (one loop over the tensors) takes 11 ms of the demo MED's ~245 ms pretraining
    step, the fused kernel 2.8 ms (bench/README.md, section 8). The state dict is the same either way.
    """
    fused = all(param.is_floating_point() and param.device.type in ("cpu", "cuda")
                for group in groups for param in group["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def load_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's optimiser state into ``optimizer``, which keeps its own kernel (fused or not):
    ``load_state_dict`` would take the saved run's, and that belongs to the machine the run was on."""
    kernels = [(group.get("fused"), group.get("foreach")) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (fused, foreach) in zip(optimizer.param_groups, kernels):
        group["fused"], group["foreach"] = fused, foreach


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return adamw(param_groups(model, config.weight_decay), lr_at(0, config))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
