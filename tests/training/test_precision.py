"""capfilt.training.precision: where ``mixed_precision: auto`` means bf16."""

import torch

from capfilt.training.precision import autocast_for


def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    def kind(device, setting):
        context = autocast_for(torch.device(device), setting)
        return "bf16" if isinstance(context, torch.autocast) else "fp32"

    assert kind("cpu", "off") == "fp32" and kind("cpu", "bf16") == "bf16" and kind("cuda", "auto") == "bf16"
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value, raising=False)
        assert kind("cpu", "auto") == expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert kind("cpu", "auto") == "fp32"  # a torch without the probes
