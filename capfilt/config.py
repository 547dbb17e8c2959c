"""The pipeline schema. Every default capfilt uses lives in this file.

Each section is a strict pydantic model (unknown keys are errors that name the key), so a typo in a
pipeline YAML fails at load time instead of silently falling back to a default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------------


class VisionConfig(Section):
    """The ViT image encoder (transformers' BlipVisionModel)."""

    image_size: int = Field(384, gt=0, description="input side in pixels; 224 pretraining, 384 fine-tuning")
    patch_size: int = Field(16, gt=0)
    width: int = Field(768, gt=0)
    layers: int = Field(12, gt=0)
    heads: int = Field(12, gt=0)
    mlp_dim: int = Field(3072, gt=0)
    # The reference ViT uses 1e-6; transformers' BlipVisionConfig defaults to 1e-5.
    layer_norm_eps: float = 1e-6

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        return self


class TextConfig(Section):
    """The BERT-style text towers (transformers' BlipTextModel / BlipTextLMHeadModel)."""

    width: int = Field(768, gt=0)
    layers: int = Field(12, gt=0)
    heads: int = Field(12, gt=0)
    mlp_dim: int = Field(3072, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    # The reference trains with dropout 0.1; transformers' BlipTextConfig defaults to 0.0.
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_norm_eps: float = 1e-12

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        return self


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a laptop CPU in seconds; used by the demo and the tests.
    "tiny": {
        "vision": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "heads": 4, "mlp_dim": 512},
        "text": {"width": 128, "layers": 3, "heads": 4, "mlp_dim": 512, "max_position_embeddings": 64},
        "embed_dim": 128,
        "queue_size": 1024,
    },
    # ViT-B/16 + BERT-base: the reference sizes.
    "base": {
        "vision": {"image_size": 384, "patch_size": 16, "width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072},
        "text": {"width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072},
    },
    # ViT-L/16 + BERT-base (BLIP's large captioner and filter).
    "large": {
        "vision": {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096},
        "text": {"width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072},
    },
}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class MedConfig(Section):
    """MED: one ViT, a text encoder (ITC, ITM) and a text decoder (LM) sharing all but self-attention."""

    preset: Literal["tiny", "base", "large"] | None = Field(
        None, description="start from a named size; keys given beside it override the preset"
    )
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    vocab_size: int | None = Field(None, gt=0, description="None: follow the tokenizer")
    embed_dim: int = Field(256, gt=0, description="ITC projection size")
    queue_size: int = Field(57600, gt=0, description="ITC momentum feature queue length")
    momentum: float = Field(0.995, ge=0.0, le=1.0)
    temperature_init: float = Field(0.07, gt=0.0)
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    alpha: float = Field(0.4, ge=0.0, le=1.0, description="weight of momentum-distilled ITC targets")
    alpha_rampup_steps: int = Field(0, ge=0, description="ramp alpha linearly from 0 over this many steps")
    lm_label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            name = data["preset"]
            if name not in MODEL_PRESETS:
                return data  # the Literal check reports it
            return _deep_merge(MODEL_PRESETS[name], data)
        return data


# --------------------------------------------------------------------------------------------------
# Captioning and filtering settings
# --------------------------------------------------------------------------------------------------


class CaptionSampling(Section):
    """How the captioner writes captions. Defaults are the BLIP CapFilt reference settings."""

    method: Literal["nucleus", "beam"] = "nucleus"
    num_captions: int = Field(1, ge=1, description="K captions per image (nucleus); beam returns the best K")
    nucleus_top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int | None = Field(50, ge=1, description="None turns top-k off (the reference inherits 50)")
    temperature: float = Field(1.0, gt=0.0)
    repetition_penalty: float = Field(1.1, ge=1.0)
    # Lengths count the prompt tokens ([DEC] + prompt), as the reference does.
    max_length: int = Field(30, ge=2)
    min_length: int = Field(10, ge=0)
    num_beams: int = Field(3, ge=1)
    prompt: str = "a picture of "
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "CaptionSampling":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} exceeds max_length {self.max_length}")
        if self.method == "beam" and self.num_captions > self.num_beams:
            raise ValueError(f"num_captions {self.num_captions} exceeds num_beams {self.num_beams}")
        return self


BEAM_EVAL_SAMPLING = CaptionSampling(method="beam", num_beams=3, max_length=20, min_length=5)


# --------------------------------------------------------------------------------------------------
# Data in (readers, decoding) -- capfilt/data/shards.py, capfilt/data/images.py
# --------------------------------------------------------------------------------------------------

# === data sections ===


# --------------------------------------------------------------------------------------------------
# The generated world -- capfilt/data/world.py
# --------------------------------------------------------------------------------------------------

# === world sections ===
