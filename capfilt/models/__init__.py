"""MED (BLIP's model), its initialisation, checkpoints and exports.

Exports resolve lazily: ``capfilt.models.tokens`` (imported by the text utilities) must not pull in
torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MED": "med",
    "alpha_at": "med",
    "save_med": "med",
    "load_med": "med",
    "InitReport": "init",
    "init_vision_from_timm": "init",
    "init_text_from_bert": "init",
    "init_from_blip": "init",
    "init_from_med": "init",
    "check_tokenizer_matches": "init",
    "apply_init": "init",
    "interpolate_pos_embed": "init",
    "LoadedModel": "export",
    "export_captioner": "export",
    "export_filter": "export",
    "load_captioner": "export",
    "load_filter": "export",
    "model_provenance": "export",
    "read_image_processor": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"capfilt.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'capfilt.models' has no attribute {name!r}")
