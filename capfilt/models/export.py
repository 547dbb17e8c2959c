"""MED → plain transformers directories, and one loader for ours and published BLIP checkpoints.

- captioner: ``BlipForConditionalGeneration`` (vision_model ← visual_encoder, text_decoder ← text_decoder)
- filter:    ``BlipForImageTextRetrieval`` (vision_model, text_encoder, vision_proj, text_proj, itm_head)

Each directory holds the ``save_pretrained`` weights (safetensors), the tokenizer and the image
processor settings, so ``from_pretrained(dir)`` works without capfilt. The filter's ITM head expects
``[ENC]`` at position 0 (:func:`capfilt.models.tokens.itm_ids`), its ITC path ``[CLS]``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipImageProcessor

# The reference (CLIP) normalisation; test-time resize is a bicubic square resize, no crop.
from capfilt.config import CLIP_MEAN as IMAGE_MEAN  # noqa: E402 -- one source of the constants
from capfilt.config import CLIP_STD as IMAGE_STD
from capfilt.data.text import load_tokenizer
from capfilt.models.tokens import special_ids
from capfilt.training.store import fetch


def blip_config(med) -> BlipConfig:
    return BlipConfig(
        text_config=med.text_encoder.config.to_dict(),
        vision_config=med.visual_encoder.config.to_dict(),
        image_text_hidden_size=med.config.embed_dim,
        label_smoothing=med.config.lm_label_smoothing,  # the text config carries it too: that is what the decoder reads
    )


def image_processor(image_size: int) -> BlipImageProcessor:
    return BlipImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def _save(model: nn.Module, med, tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor(med.config.vision.image_size).save_pretrained(out_dir)
    return out_dir


def export_captioner(med, tokenizer, out_dir: str | Path) -> Path:
    """Write the MED's image-grounded decoder as a ``BlipForConditionalGeneration`` directory."""
    model = BlipForConditionalGeneration(blip_config(med))
    model.vision_model.load_state_dict(med.visual_encoder.state_dict())
    model.text_decoder.load_state_dict(med.text_decoder.state_dict())
    return _save(model, med, tokenizer, out_dir)


def export_filter(med, tokenizer, out_dir: str | Path) -> Path:
    """Write the MED's encoder, projections and ITM head as a ``BlipForImageTextRetrieval`` directory."""
    model = BlipForImageTextRetrieval(blip_config(med))
    model.vision_model.load_state_dict(med.visual_encoder.state_dict())
    model.text_encoder.load_state_dict(med.text_encoder.state_dict())
    for name in ("vision_proj", "text_proj", "itm_head"):
        getattr(model, name).load_state_dict(getattr(med, name).state_dict())
    return _save(model, med, tokenizer, out_dir)


# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on the requested device
    tokenizer: Any  # with [DEC]/[ENC] (capfilt.data.text.load_tokenizer)
    special: dict[str, int]  # capfilt.models.tokens.special_ids(tokenizer)
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    provenance: dict[str, Any]


def load_captioner(name_or_path: str | Path, revision: str | None = None, device="cpu", dtype=None) -> LoadedModel:
    """A ``BlipForConditionalGeneration``: our export or a published one (``Salesforce/blip-image-captioning-base``)."""
    return _load(BlipForConditionalGeneration, name_or_path, revision, device, dtype)


def load_filter(name_or_path: str | Path, revision: str | None = None, device="cpu", dtype=None) -> LoadedModel:
    """A ``BlipForImageTextRetrieval``: our export or a published one (``Salesforce/blip-itm-base-coco``)."""
    return _load(BlipForImageTextRetrieval, name_or_path, revision, device, dtype)


def _load(cls, name_or_path, revision, device, dtype) -> LoadedModel:
    requested = str(name_or_path)
    source = fetch(requested)  # a model directory on object storage: a local copy
    model, info = cls.from_pretrained(source, revision=revision, dtype=dtype, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    if missing:
        # A randomly initialised head would silently produce garbage captions or filter scores.
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{source}: not a complete {cls.__name__} checkpoint, missing {shown}")
    model.to(device).eval()

    tokenizer = load_tokenizer(source, revision=revision)
    special = special_ids(tokenizer)
    text_config = model.config.text_config
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(f"{source}: tokenizer has {len(tokenizer)} tokens, the model only {text_config.vocab_size}")
    if cls is BlipForConditionalGeneration and special["dec"] != text_config.bos_token_id:
        raise ValueError(
            f"{source}: tokenizer [DEC] is id {special['dec']}, the model starts captions with bos id "
            f"{text_config.bos_token_id}"
        )

    image = read_image_processor(source, revision=revision)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        special=special,
        image_size=image["image_size"],
        image_mean=image["mean"],
        image_std=image["std"],
        provenance=model_provenance(requested, revision=revision),
    )


def read_image_processor(name_or_path: str | Path, revision: str | None = None) -> dict[str, Any]:
    """``{"image_size", "mean", "std"}`` from the directory's ``preprocessor_config.json``."""
    source = str(name_or_path)
    processor = BlipImageProcessor.from_pretrained(source, revision=revision)
    size = dict(processor.size)
    height, width = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    if height != width:
        raise ValueError(f"{source}: image processor size {height}x{width} is not square")
    return {
        "image_size": int(height),
        "mean": tuple(float(x) for x in processor.image_mean),
        "std": tuple(float(x) for x in processor.image_std),
    }


def model_provenance(name_or_path: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Where a model came from, without loading it: a local directory is identified by the sha256 of
    its weights, a hub id by the commit its files resolved to. Unknown fields are left out."""
    import transformers
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    requested = str(name_or_path)
    source = fetch(requested)  # a model directory on object storage: a local copy
    config_file = cached_file(source, "config.json", revision=revision)
    record = {
        "source": requested,
        "architectures": json.loads(Path(config_file).read_text()).get("architectures"),
        "revision": extract_commit_hash(config_file, None) or revision,  # the resolved commit for a hub id
        "requested_revision": revision,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    path = Path(source)
    if path.is_dir():
        digest = hashlib.sha256()
        for weights in sorted(path.glob("*.safetensors")):
            with weights.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        record["weights_sha256"] = digest.hexdigest()
    return {key: value for key, value in record.items() if value is not None}
