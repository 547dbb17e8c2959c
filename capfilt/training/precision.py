"""Mixed precision: bf16 autocast where the hardware multiplies bf16 matrices, fp32 elsewhere."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a GPU, or a CPU with AVX512-BF16 or AMX.

    Elsewhere oneDNN emulates bf16 and autocast makes a CPU step slower, not faster.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    # torch exposes these probes privately only; a torch without them gets fp32.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


# Below this width (the narrower of the vision and text towers) a CPU step is faster in fp32: the casts
# cost more than the smaller matmuls save (bench/train_step.py: 0.89x at 64 wide, 1.46-1.71x at 128).
CPU_BF16_MIN_WIDTH = 128


def autocast_for(device: torch.device, mixed_precision: str, width: int | None = None):
    """bf16 autocast when ``bf16``; never when ``off``; when ``auto``, on a GPU, and on a CPU with bf16
    matmuls for a model at least :data:`CPU_BF16_MIN_WIDTH` wide (``width`` None: any width).

    Weights, optimiser state and the losses stay fp32.
    """
    if mixed_precision == "off":
        return nullcontext()
    if mixed_precision == "auto":
        narrow = device.type == "cpu" and width is not None and width < CPU_BF16_MIN_WIDTH
        if narrow or not native_bf16(device):
            return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def precision_name(autocast) -> str:
    """How a context from :func:`autocast_for` trains, for logs and records."""
    return "bf16 autocast" if isinstance(autocast, torch.autocast) else "fp32"
