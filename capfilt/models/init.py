"""Start MED from pretrained weights: a timm ViT and a BERT-style text model (as BLIP's pretraining
does), published BLIP checkpoints (fine-tuning), or a MED directory (continued pretraining).

Every loader writes into the model in place, leaves the momentum encoders equal to the online ones
(or, for a MED directory, to its saved ones), and returns an :class:`InitReport` saying what was
loaded and what stayed freshly initialised; :func:`apply_init` runs the ones a ``model.init``
section asks for.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from capfilt.config import InitConfig

# How many names a log line or an error message shows before "and N more".
_SHOWN_NAMES = 5


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)  # target parameter names written
    fresh: list[str] = field(default_factory=list)  # target parameters (or rows) left as initialised
    ignored: list[str] = field(default_factory=list)  # source keys with no counterpart (classifier heads, ...)

    def summary(self) -> dict:
        """For a stage's completion record: the counts, and every fresh name (those are what a run must explain)."""
        return {"loaded": len(self.loaded), "ignored": len(self.ignored), "fresh": list(self.fresh)}

    def as_log_line(self) -> str:
        fresh = f"{len(self.fresh)} fresh" + (f" ({_some(self.fresh)})" if self.fresh else "")
        return f"init: {len(self.loaded)} loaded, {fresh}, {len(self.ignored)} ignored"


def _some(names: list[str], separator: str = ", ") -> str:
    shown = separator.join(names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _is_momentum(name: str) -> bool:
    return name.split(".", 1)[0].endswith("_m")


def _fresh_parameters(med, written: set[int]) -> list[str]:
    """The online parameters no loader wrote (by storage, so a tensor shared by encoder and decoder is
    listed once, under its first name). Momentum copies follow the online ones and are left out."""
    fresh, seen = [], set()
    for name, parameter in med.named_parameters(remove_duplicate=False):
        pointer = parameter.data_ptr()
        if _is_momentum(name) or pointer in seen:
            continue
        seen.add(pointer)
        if pointer not in written:
            fresh.append(name)
    return fresh


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


_TORCH_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin")
# Where training scripts (timm's, DeiT's) keep the weights inside a checkpoint; the EMA copy is not the model trained.
_CHECKPOINT_WRAPPERS = ("state_dict", "model")


def _timm_state(source) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    path = Path(str(source))
    if path.suffix in (".safetensors", *_TORCH_CHECKPOINT_SUFFIXES) and not path.is_file():
        raise FileNotFoundError(f"{path}: timm checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in _TORCH_CHECKPOINT_SUFFIXES:
        return _torch_checkpoint_state(path)
    if path.exists():
        raise ValueError(f"{path}: expected a timm model name or a .safetensors / .pth / .pt / .bin timm checkpoint")
    import timm

    return timm.create_model(str(source), pretrained=True, num_classes=0).state_dict()


def _torch_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{path}: holds more than tensors, which are not unpickled ({reason}); save its state dict alone"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(checkpoint).__name__}")
    for wrapper in _CHECKPOINT_WRAPPERS:
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: not a state dict, {_some(not_tensors)} are not tensors")
    # DataParallel / DistributedDataParallel prefix every key of the model they wrap.
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def init_vision_from_timm(target, source) -> InitReport:
    """Load a timm ViT into ``target`` (a MED or a ``BlipVisionModel``).

    ``source``: a timm model name (pretrained download), a timm ``VisionTransformer``, a state dict, or
    a checkpoint file: ``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` read with
    ``torch.load(weights_only=True)`` (tensors only, nothing else is unpickled), unwrapped from a
    training checkpoint's ``state_dict`` or ``model`` entry (the EMA copy is not taken) and stripped of
    a ``module.`` prefix. The ViT must use a class token, qkv bias, no LayerScale, no registers and no
    qk-norm; anything else is an error naming the offending keys. The position embedding is re-gridded
    when the image size differs. ``loaded`` names the MED's parameters (``visual_encoder.*``) when
    ``target`` is a MED.
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
    prefix = "" if vision is target else "visual_encoder."
    report.loaded = sorted(prefix + key for key in mapped)
    if hasattr(target, "copy_params"):
        target.copy_params()
    return report


# -------------------------------------------------------------------------------------------------
# BERT → text encoder and decoder
# -------------------------------------------------------------------------------------------------


def _bert_state(source, revision: str | None) -> tuple[dict[str, torch.Tensor], object]:
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
            model, info = BertForMaskedLM.from_pretrained(str(source), revision=revision, output_loading_info=True)
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


def init_text_from_bert(med, source, revision: str | None = None) -> InitReport:
    """Load a BERT-style checkpoint into MED's text encoder and decoder, as BLIP does.

    ``source``: a hub id (at ``revision``) or local directory (``from_pretrained``), or a ``BertModel`` /
    ``BertForMaskedLM``. Copied: embeddings (word rows of the shared vocabulary: the MED tokenizer
    must extend the BERT tokenizer, so [DEC]/[ENC] and later rows stay fresh; position rows up to
    MED's maximum length), each layer's self-attention, intermediate and output into the encoder,
    hence into the decoder's shared parts, and the self-attention into the decoder's own copy too;
    the MLM head transform and bias into the LM head if the checkpoint has them. Cross-attention
    stays fresh. BERT's token-type-0 embedding is folded into the position embeddings, so the
    unimodal text encoder computes exactly BERT's function.
    """
    state, bert_config = _bert_state(source, revision)
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
    written = {expected[k].data_ptr() for k in targets}
    text = ("text_encoder.", "text_decoder.")
    report.fresh += [key for key in _fresh_parameters(med, written) if key.startswith(text)]
    med.copy_params()
    return report


# -------------------------------------------------------------------------------------------------
# Published BLIP checkpoints and MED directories
# -------------------------------------------------------------------------------------------------

# Per ``what`` (the model.init field): the transformers class, and its module prefixes → MED's.
_BLIP_CHECKPOINTS = {
    "blip_captioning": (
        "BlipForConditionalGeneration",
        {"vision_model.": "visual_encoder.", "text_decoder.": "text_decoder."},
    ),
    "blip_retrieval": (
        "BlipForImageTextRetrieval",
        {
            "vision_model.": "visual_encoder.",
            "text_encoder.": "text_encoder.",
            "vision_proj.": "vision_proj.",
            "text_proj.": "text_proj.",
            "itm_head.": "itm_head.",
        },
    ),
}
# Matrices with one row per token: a checkpoint may fill fewer rows than MED has (a tokenizer MED extends).
_VOCAB_ROWS = ("word_embeddings.weight", "predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias")


def _check_heads(what: str, vision_config, text_config, med) -> None:
    # Heads change the function without changing any shape, so the weights alone cannot tell.
    towers = (("vision", vision_config, med.visual_encoder.config), ("text", text_config, med.text_encoder.config))
    for tower, theirs, ours in towers:
        if theirs.num_attention_heads != ours.num_attention_heads:
            raise ValueError(
                f"{what} {tower} num_attention_heads={theirs.num_attention_heads}, MED {tower} "
                f"num_attention_heads={ours.num_attention_heads}"
            )


def _fit(what: str, source_key: str, key: str, value: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """``value`` shaped for ``target``: the ViT position grid re-gridded, text positions past MED's
    maximum length dropped (never used), vocabulary rows as many as the source has (at most MED's)."""
    if key.endswith("embeddings.position_embedding"):
        value = interpolate_pos_embed(value, grid)
    elif key.endswith("embeddings.position_embeddings.weight") and len(value) > len(target):
        value = value[: len(target)]
    elif key.endswith(_VOCAB_ROWS) and value.shape[1:] == target.shape[1:]:
        if len(value) > len(target):
            raise ValueError(
                f"{what} vocabulary ({len(value)} rows in {source_key}) is larger than MED's ({len(target)} rows "
                f"in {key}): the run's tokenizer must be the checkpoint's (plus [DEC]/[ENC])"
            )
        return value
    if value.shape != target.shape:
        raise ValueError(
            f"{what} {source_key} has shape {tuple(value.shape)}, MED {key} needs {tuple(target.shape)}"
        )
    return value


def _write(
    med, what: str, pairs: list[tuple[str, str, torch.Tensor]], covers: tuple[str, ...]
) -> tuple[set[str], dict[int, int]]:
    """Copy ``(source key, MED parameter name, tensor)`` into ``med``, all checked before any is written.

    ``covers``: prefixes of the MED parameters the source must provide in full (a source with fewer
    layers is an error, as is one with more). Returns the names written and, for vocabulary matrices
    filled in part, ``{data_ptr: rows filled}``.
    """
    parameters = dict(med.named_parameters(remove_duplicate=False))
    extra = [source_key for source_key, key, _ in pairs if key not in parameters]
    if extra:
        raise ValueError(f"{what} has weights MED has no place for (more layers than MED?): {_some(extra)}")
    grid = med.config.vision.image_size // med.config.vision.patch_size
    fitted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for source_key, key, value in pairs:
        target = parameters[key]
        # Aliases (the LM head's tied matrix and bias) arrive under each name, as one tensor in the source too.
        fitted[target.data_ptr()] = (target, _fit(what, source_key, key, value, target, grid))
    lacking = [
        key for key, parameter in parameters.items() if key.startswith(covers) and parameter.data_ptr() not in fitted
    ]
    if lacking:
        raise ValueError(f"{what} has no weights for MED {_some(lacking)} (fewer layers than MED?)")

    partial = {}
    with torch.no_grad():
        for pointer, (target, value) in fitted.items():
            if value.shape == target.shape:
                target.copy_(value)
            else:  # vocabulary rows (_fit allowed nothing else)
                target[: len(value)].copy_(value)
                partial[pointer] = len(value)
    return {key for _, key, _ in pairs}, partial


def _pointers(med, names) -> set[int]:
    parameters = dict(med.named_parameters(remove_duplicate=False))
    return {parameters[name].data_ptr() for name in names}


def _row_entries(med, partial: dict[int, int]) -> list[str]:
    """``name[filled:rows]`` for each tensor filled in part, under its first name as in :func:`_fresh_parameters`."""
    return [
        f"{name}[{partial[parameter.data_ptr()]}:{len(parameter)}]"
        for name, parameter in med.named_parameters()
        if parameter.data_ptr() in partial
    ]


def _blip_pairs(med, what: str, source: str, revision: str | None):
    """``(pairs, ignored)`` of one published-format BLIP checkpoint, read with ``from_pretrained``."""
    import transformers
    from transformers import AutoConfig

    class_name, prefixes = _BLIP_CHECKPOINTS[what]
    found = AutoConfig.from_pretrained(source, revision=revision).architectures or ["no architectures entry"]
    if class_name not in found:
        raise ValueError(f"{what} {source}: config.json says {', '.join(found)}, expected {class_name}")
    model, info = getattr(transformers, class_name).from_pretrained(
        source, revision=revision, use_safetensors=True, output_loading_info=True
    )
    if info["missing_keys"]:
        # from_pretrained fills them randomly; copying those would pass noise off as pretrained weights.
        missing = _some(sorted(info["missing_keys"]))
        raise ValueError(f"{what} {source}: not a complete {class_name} checkpoint, missing {missing}")
    _check_heads(what, model.config.vision_config, model.config.text_config, med)
    pairs, ignored = [], sorted(info["unexpected_keys"])
    for key, value in model.state_dict().items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            ignored.append(key)
        else:
            pairs.append((key, prefixes[prefix] + key.removeprefix(prefix), value))
    return pairs, ignored


def init_from_blip(
    med, retrieval: str | None = None, captioning: str | None = None, revision: str | None = None
) -> InitReport:
    """Load published-format BLIP checkpoints (hub ids at ``revision``, or directories) into ``med``.

    ``retrieval``: a ``BlipForImageTextRetrieval`` → ViT, text encoder, ITC projections, ITM head.
    ``captioning``: a ``BlipForConditionalGeneration`` → ViT and text decoder (its embeddings,
    cross-attention, intermediate and output are the modules MED shares with the encoder).

    With both, the captioning checkpoint is loaded first and the retrieval one over it: the ViT and
    every shared text module come from ``retrieval``; only the decoder's own self-attention and the
    LM head's transform and bias from ``captioning``. With one of them, the other's own parts stay
    fresh: ``captioning`` alone leaves the encoder's self-attention, projections and ITM head;
    ``retrieval`` alone the decoder's self-attention and the LM head's transform and bias.

    ``temp`` always stays at ``temperature_init``: transformers' ``BlipForImageTextRetrieval`` has no
    ITC temperature (BLIP's ``temp`` did not survive the conversion; only ``BlipModel`` has a
    ``logit_scale``). The ViT position embedding is re-gridded to MED's image size (published ones are
    384 px); text positions past MED's maximum length are dropped. A checkpoint vocabulary smaller than
    MED's fills the first rows (the rest are listed fresh), a larger one is an error. Any other
    difference (width, layers, heads, MLP size, architecture) is an error naming the weight and both
    shapes. Weights are read from safetensors only. The momentum encoders are reset to the result.
    """
    ordered = (("blip_captioning", captioning), ("blip_retrieval", retrieval))
    sources = [(what, source) for what, source in ordered if source]
    if not sources:
        raise ValueError("init_from_blip needs retrieval and/or captioning")
    report, loaded, partial = InitReport(), set(), {}
    for what, source in sources:
        pairs, ignored = _blip_pairs(med, what, str(source), revision)
        written, written_in_part = _write(med, what, pairs, covers=tuple(_BLIP_CHECKPOINTS[what][1].values()))
        loaded |= written
        # What this checkpoint wrote replaces what the one before left fresh.
        rewritten = _pointers(med, written)
        partial = {pointer: rows for pointer, rows in partial.items() if pointer not in rewritten}
        partial.update(written_in_part)
        report.ignored += [f"{what}:{key}" for key in ignored]
    report.loaded = sorted(loaded)
    report.fresh = _row_entries(med, partial) + _fresh_parameters(med, _pointers(med, loaded))
    med.copy_params()
    return report


def init_from_med(med, model_dir: str | Path) -> InitReport:
    """Copy a MED directory written by ``save_med`` into ``med`` (continued pretraining).

    Every parameter is copied, the momentum encoders included (they are part of the trained state);
    the ITC queues are not: they hold the old run's features and image ids, which would be false
    positives against the new data's ids. The ViT position embedding is re-gridded to ``med``'s image
    size. The vocabulary and special ids must be the same; any other difference is an error naming
    the parameter and both shapes.
    """
    from capfilt.models.med import load_med

    source = load_med(model_dir)
    what = f"med {model_dir}"
    if (source.vocab_size, source.special) != (med.vocab_size, med.special):
        raise ValueError(
            f"{what}: vocabulary of {source.vocab_size} rows with special ids {source.special}, MED has "
            f"{med.vocab_size} rows with {med.special}: the run must use the directory's tokenizer"
        )
    _check_heads(what, source.visual_encoder.config, source.text_encoder.config, med)
    pairs = [(key, key, value) for key, value in source.named_parameters(remove_duplicate=False)]
    written, _ = _write(med, what, pairs, covers=("",))
    return InitReport(loaded=sorted(written), fresh=_fresh_parameters(med, _pointers(med, written)))


# -------------------------------------------------------------------------------------------------
# Tokenizer agreement and the model.init section
# -------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def check_tokenizer_matches(tokenizer, source: str, revision: str | None = None, what: str = "model.init.text") -> None:
    """Raise unless ``tokenizer`` gives every token of ``source``'s own tokenizer the same id.

    Pretrained embedding rows (and LM head rows) mean the source's tokens; a run tokenizing with other
    ids would train on shuffled embeddings without any error. Extra tokens in ``tokenizer`` ([DEC],
    [ENC] added by ``load_tokenizer``) are fine. A local directory without tokenizer files has
    nothing to compare against and passes.
    """
    path = Path(str(source))
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(source), revision=revision)
    ours = tokenizer.get_vocab()
    by_id = sorted(theirs.get_vocab().items(), key=lambda item: item[1])
    differing = [
        f"{token!r} is {i} there, {ours.get(token, 'absent')} here" for token, i in by_id if ours.get(token) != i
    ]
    if differing:
        raise ValueError(
            f"{what}: the run's tokenizer ({len(tokenizer)} tokens) does not match {source}'s ({len(theirs)} "
            f"tokens): {len(differing)} tokens have other ids, e.g. {_some(differing, '; ')}; use {source}'s "
            "tokenizer (tokenizer.source)"
        )


def apply_init(med, init: "InitConfig", tokenizer=None) -> InitReport:
    """Load what ``init`` (``model.init``) names into ``med`` and report on the whole model.

    ``tokenizer`` (the run's): checked first against each text source's own tokenizer
    (:func:`check_tokenizer_matches`). ``fresh`` covers every online parameter no part loaded, each
    shared tensor once, plus vocabulary rows a source did not fill; ``ignored`` names each source
    key after its kind (``timm:head.weight``, ``bert:...``, ``blip_retrieval:...``).
    """
    if tokenizer is not None:
        for name in ("text", "blip_retrieval", "blip_captioning"):
            if getattr(init, name):
                check_tokenizer_matches(tokenizer, getattr(init, name), init.revision, what=f"model.init.{name}")
    parts = []
    if init.med:
        parts.append(_from(init_from_med(med, init.med), "med"))
    if init.blip_retrieval or init.blip_captioning:  # names each checkpoint in its ignored keys itself
        parts.append(init_from_blip(med, init.blip_retrieval, init.blip_captioning, init.revision))
    if init.vision:
        parts.append(_from(init_vision_from_timm(med, init.vision), "timm"))
    if init.text:
        parts.append(_from(init_text_from_bert(med, init.text, init.revision), "bert"))

    loaded = sorted({name for part in parts for name in part.loaded})
    rows = [entry for part in parts for entry in part.fresh if entry.endswith("]")]  # see _row_entries
    return InitReport(
        loaded=loaded,
        fresh=rows + _fresh_parameters(med, _pointers(med, loaded)),
        ignored=[key for part in parts for key in part.ignored],
    )


def _from(report: InitReport, kind: str) -> InitReport:
    report.ignored = [f"{kind}:{key}" for key in report.ignored]
    return report
