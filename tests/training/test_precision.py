"""capfilt.training.precision: where ``mixed_precision: auto`` means bf16."""

import pytest
import torch

from capfilt.training.precision import CPU_BF16_MIN_WIDTH, autocast_for


# The decision for a GPU is checked on machines without one, where torch warns that it would not autocast.
@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    def kind(device, setting, width=None):
        context = autocast_for(torch.device(device), setting, width)
        return "bf16" if isinstance(context, torch.autocast) else "fp32"

    assert kind("cpu", "off") == "fp32" and kind("cpu", "bf16") == "bf16" and kind("cuda", "auto") == "bf16"
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value, raising=False)
        assert kind("cpu", "auto") == kind("cpu", "auto", CPU_BF16_MIN_WIDTH) == expected
        # Narrower towers train faster in fp32 on a CPU; a GPU and an explicit bf16 do not look at width.
        assert kind("cpu", "auto", CPU_BF16_MIN_WIDTH // 2) == "fp32"
        assert kind("cpu", "bf16", 32) == kind("cuda", "auto", 32) == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert kind("cpu", "auto") == "fp32"  # a torch without the probes
