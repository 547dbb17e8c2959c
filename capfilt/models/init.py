"""Start MED from pretrained unimodal weights, as BLIP does: a timm ViT and a BERT-style text model.

Both functions write into the online model in place, re-sync the momentum encoders, and return an
:class:`InitReport` saying what was loaded and what stayed freshly initialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)  # target parameter names written
    fresh: list[str] = field(default_factory=list)  # target parameters (or rows) left as initialised
    ignored: list[str] = field(default_factory=list)  # source keys with no counterpart (classifier heads, ...)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Re-grid a ViT position embedding ``(1, 1 + g*g, D)`` to ``(1, 1 + grid*grid, D)``.

    The class-token row is kept; the patch rows are resized bicubically on the 2-D grid, as BLIP's
    ``interpolate_pos_embed`` (224 px pretraining → 384 px fine-tuning).
    """
    old_grid = math.isqrt(pos_embed.shape[1] - 1)
    if old_grid * old_grid != pos_embed.shape[1] - 1:
        raise ValueError(f"position embedding of {pos_embed.shape[1]} rows is not [CLS] + a square patch grid")
    if old_grid == grid:
        return pos_embed
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([class_pos, patch_pos], dim=1)


# -------------------------------------------------------------------------------------------------
# timm ViT → BlipVisionModel
# -------------------------------------------------------------------------------------------------

_TIMM_TO_BLIP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj": "embeddings.patch_embedding",
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "norm": "post_layernorm",
}
# Source keys whose presence means the timm model computes something BlipVisionModel cannot.
_INCOMPATIBLE = {
    "reg_token": "register tokens",
    ".ls1.": "LayerScale",
    ".ls2.": "LayerScale",
    "q_norm": "qk-norm",
    "k_norm": "qk-norm",
    "attn.norm.": "attention output norm",
    "mlp.norm.": "MLP norm",
    "norm_pre.": "a pre-norm (CLIP-style) stem",
    "fc_norm.": "average pooling with fc_norm",
    "q_bias": "separate q/v biases",
}


def _timm_to_blip_key(key: str) -> str | None:
    name, _, suffix = key.rpartition(".")
    if key in ("cls_token", "pos_embed"):
        return _TIMM_TO_BLIP[key]
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        if rest in _TIMM_TO_BLIP:
            return f"encoder.layers.{index}.{_TIMM_TO_BLIP[rest]}.{suffix}"
        return None
    if name in ("patch_embed.proj", "norm"):
        return f"{_TIMM_TO_BLIP[name]}.{suffix}"
    return None


def _timm_state(source) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    path = Path(str(source))
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: timm safetensors state dict not found")
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.exists():
        raise ValueError(f"{path}: expected a timm model name or a .safetensors timm state dict")
    import timm

    return timm.create_model(str(source), pretrained=True, num_classes=0).state_dict()


def init_vision_from_timm(target, source) -> InitReport:
    """Load a timm ViT into ``target`` (a MED or a ``BlipVisionModel``).

    ``source``: a timm model name (pretrained download), a ``.safetensors`` timm state dict, a timm
    ``VisionTransformer`` or a state dict. The ViT must use a class token, qkv bias, no LayerScale,
    no registers and no qk-norm; anything else is an error naming the offending keys. The position
    embedding is re-gridded when the image size differs.
    """
    vision = target.visual_encoder if hasattr(target, "visual_encoder") else target
    config = vision.config
    if isinstance(source, nn.Module) and hasattr(source, "blocks"):
        heads = source.blocks[0].attn.num_heads
        if heads != config.num_attention_heads:
            raise ValueError(f"timm ViT has {heads} heads, the vision config {config.num_attention_heads}")
    state = _timm_state(source)
    if "cls_token" not in state:
        raise ValueError("timm ViT has no class token (cls_token); BlipVisionModel needs one")
    offending = sorted({why for key in state for marker, why in _INCOMPATIBLE.items() if marker in key})
    if offending:
        raise ValueError(f"timm ViT is not compatible with BlipVisionModel: it has {', '.join(offending)}")

    expected = vision.state_dict()
    report = InitReport()
    mapped = {}
    for key, value in state.items():
        blip_key = _timm_to_blip_key(key)
        if blip_key is None:
            if not key.startswith("head."):
                raise ValueError(f"timm ViT key {key!r} has no BlipVisionModel counterpart")
            report.ignored.append(key)
            continue
        if blip_key not in expected:
            raise ValueError(f"timm ViT key {key!r} → {blip_key!r}: not in the vision model (too many blocks?)")
        if key == "pos_embed":
            if math.isqrt(value.shape[1]) ** 2 == value.shape[1]:
                raise ValueError("timm ViT pos_embed has no class-token row (no_embed_class); not supported")
            value = interpolate_pos_embed(value, config.image_size // config.patch_size)
        if value.shape != expected[blip_key].shape:
            raise ValueError(
                f"timm ViT key {key!r} has shape {tuple(value.shape)}, {blip_key!r} needs {tuple(expected[blip_key].shape)}"
            )
        mapped[blip_key] = value
    missing = sorted(set(expected) - set(mapped))
    if missing:
        hint = " (no qkv bias?)" if any("qkv.bias" in k for k in missing) else ""
        raise ValueError(f"timm ViT lacks weights for {missing}{hint}")
    vision.load_state_dict(mapped, strict=True)
    report.loaded = sorted(mapped)
    if hasattr(target, "copy_params"):
        target.copy_params()
    return report


# -------------------------------------------------------------------------------------------------
# BERT → text encoder and decoder
# -------------------------------------------------------------------------------------------------


def _bert_state(source) -> tuple[dict[str, torch.Tensor], object]:
    """State dict with keys as BertModel's (no ``bert.`` prefix); ``cls.predictions.*`` only if pretrained."""
    if isinstance(source, nn.Module):
        model, head_missing = source, False
    else:
        from transformers import BertForMaskedLM
        from transformers.utils import logging

        # The MLM head is optional: its absence is reported in InitReport.fresh, not as a load warning.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            model, info = BertForMaskedLM.from_pretrained(str(source), output_loading_info=True)
        finally:
            logging.set_verbosity(verbosity)
        head_missing = any(k.startswith("cls.") for k in info["missing_keys"])
    state = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("bert.")
        if key.startswith("cls.") and head_missing:
            continue
        state[key] = value
    return state, model.config


def init_text_from_bert(med, source) -> InitReport:
    """Load a BERT-style checkpoint into MED's text encoder and decoder, as BLIP does.

    ``source``: a hub id or local directory (``from_pretrained``), or a ``BertModel`` /
    ``BertForMaskedLM``. Copied: embeddings (word rows of the shared vocabulary: the MED tokenizer
    must extend the BERT tokenizer, so [DEC]/[ENC] and later rows stay fresh; position rows up to
    MED's maximum length), each layer's self-attention, intermediate and output into the encoder,
    hence into the decoder's shared parts, and the self-attention into the decoder's own copy too;
    the MLM head transform and bias into the LM head if the checkpoint has them. Cross-attention
    stays fresh. BERT's token-type-0 embedding is folded into the position embeddings, so the
    unimodal text encoder computes exactly BERT's function.
    """
    state, bert_config = _bert_state(source)
    text_config = med.text_encoder.config
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        if getattr(bert_config, name) != getattr(text_config, name):
            raise ValueError(f"BERT {name}={getattr(bert_config, name)} but MED text {name}={getattr(text_config, name)}")

    targets = {}
    report = InitReport()
    for key, value in state.items():
        if key.startswith("encoder.layer."):
            targets[f"text_encoder.{key}"] = value
            if ".attention." in key:  # BERT has self-attention only; the decoder's own copy starts from it too
                targets[f"text_decoder.bert.{key}"] = value
        elif key.startswith("embeddings.") and "token_type" not in key:
            targets[f"text_encoder.{key}"] = value
        elif key.startswith("cls.predictions.transform.") or key == "cls.predictions.bias":
            targets[f"text_decoder.{key}"] = value
        else:
            report.ignored.append(key)  # pooler, token types (folded below), the tied decoder matrix
    token_type = state.get("embeddings.token_type_embeddings.weight")
    if token_type is not None:
        key = "text_encoder.embeddings.position_embeddings.weight"
        targets[key] = targets[key] + token_type[0]

    expected = med.state_dict()
    with torch.no_grad():
        for key, value in targets.items():
            target = expected[key]
            if value.shape == target.shape:
                target.copy_(value)
            elif key.endswith(("word_embeddings.weight", "predictions.bias")) and value.shape[1:] == target.shape[1:]:
                if len(value) > len(target):
                    raise ValueError(
                        f"BERT vocabulary ({len(value)}) is larger than MED's ({len(target)}): the MED "
                        "tokenizer must be the BERT tokenizer plus [DEC]/[ENC]"
                    )
                target[: len(value)].copy_(value)
                report.fresh.append(f"{key}[{len(value)}:{len(target)}]")
            elif key.endswith("position_embeddings.weight") and value.shape[1:] == target.shape[1:]:
                target.copy_(value[: len(target)])
            else:
                raise ValueError(f"BERT weight for {key!r} has shape {tuple(value.shape)}, MED needs {tuple(target.shape)}")
    report.loaded = sorted(targets)
    loaded_ptrs = {expected[k].data_ptr() for k in targets}
    seen = set()
    for key, tensor in expected.items():
        ptr = tensor.data_ptr()
        if key.startswith(("text_encoder.", "text_decoder.")) and ptr not in loaded_ptrs and ptr not in seen:
            report.fresh.append(key)
        seen.add(ptr)
    med.copy_params()
    return report
