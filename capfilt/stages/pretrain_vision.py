"""Pretraining the ViT as an image classifier, before it sees a caption: what ImageNet is to BLIP.

BLIP's MED never learns to see from image-text pairs alone: its ViT starts from ImageNet weights.
This stage trains a timm ``VisionTransformer`` of ``model.vision``'s architecture on labelled images
(one class per image, or every class an image shows: a multi-label set, as JFT's) and saves it as a
timm checkpoint, which the first MED pretraining then loads through the same path as a user's
ImageNet weights (:func:`capfilt.models.init.init_vision_from_timm`).

The labelled images are decoded once at the model's resolution and held in memory as uint8: the
stage is for small labelled sets such as the generated world's; for ImageNet itself, name a timm
model in ``model.init.vision``. Every input row is either trained on, held out, or counted under a
reject reason. Training runs as one Ray task (on a GPU when the cluster has one); its result comes
back to the driver, which writes it, so the stage directory may be local or on object storage.

Stage directory::

    OUT/vit.safetensors    the timm state dict (classifier head included, ignored by MED)
    OUT/classes.json       the class names in head order, and the stage's result
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
import numpy as np
import torch

from capfilt.config import ReaderConfig, VisionConfig, VisionPretrainConfig

WEIGHTS_FILE = "vit.safetensors"
RECORD_FILE = "classes.json"


def timm_vit(vision: VisionConfig, num_classes: int, pool: str = "max"):
    """A timm ViT that :func:`~capfilt.models.init.init_vision_from_timm` maps onto ``BlipVisionModel``:
    class token, qkv bias, pre-norm blocks, final norm (before pooling: no fc_norm), then ``pool``."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.width, depth=vision.layers,
        num_heads=vision.heads, mlp_ratio=vision.mlp_dim / vision.width, qkv_bias=True, class_token=True,
        global_pool=pool, fc_norm=False, num_classes=num_classes,
    )


@dataclass
class LabelledImages:
    """Decoded images (uint8, N x 3 x S x S), their target matrix (N x classes), and what was left out."""

    pixels: torch.Tensor
    targets: torch.Tensor  # float multi-hot; one-hot rows for single-label sets
    keys: list[str]
    classes: list[str]
    multi_label: bool
    rows: int = 0
    rejects: Counter = field(default_factory=Counter)


def read_labelled(reader: ReaderConfig, label_column: str, image_size: int) -> LabelledImages:
    """Every row of ``reader``'s shards: decoded and resized, or counted under a reject reason."""
    from capfilt.data.decode import DecodeError, decode_image
    from capfilt.data.shards import make_reader, split_by_status

    # Resize only: the model normalises, and augmentation works on the resized pixels.
    resize = _resizer(image_size)
    shard_reader = make_reader(reader)
    images, labels, keys = [], [], []
    rejects: Counter = Counter()
    multi_label = None
    rows = 0
    for path in shard_reader.paths():
        for batch in shard_reader.read_shard(path):
            rows += batch.num_rows
            if label_column not in batch.column_names:
                raise ValueError(f"{path}: no label column {label_column!r} (columns: {batch.column_names})")
            good, rejected = split_by_status(batch)
            rejects.update(rejected.column("reason").to_pylist())
            for key, image, label in zip(good.column("key").to_pylist(), good.column("image").to_pylist(),
                                         good.column(label_column).to_pylist()):
                is_list = isinstance(label, list)
                if multi_label is None and label is not None:
                    multi_label = is_list
                if label is not None and is_list != multi_label:
                    raise ValueError(f"{path}: key {key!r}: {label_column!r} mixes single labels and label lists")
                if label is None or label == "" or label == []:
                    rejects["label_missing"] += 1
                    continue
                try:
                    decoded = decode_image(image)
                except DecodeError as error:
                    rejects[error.reason] += 1
                    continue
                images.append(resize(decoded))
                labels.append(sorted(set(label)) if is_list else [label])
                keys.append(key)
    if not images:
        raise ValueError(f"no usable labelled images in {reader.paths} (rejects: {dict(rejects)})")
    classes = sorted({name for row in labels for name in row})
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.zeros(len(labels), len(classes))
    for row, names in enumerate(labels):
        targets[row, [index[name] for name in names]] = 1.0
    return LabelledImages(torch.stack(images), targets, keys, classes, bool(multi_label), rows, rejects)


def _resizer(image_size: int) -> Callable:
    import torchvision.transforms.v2.functional as tvF
    from torchvision.transforms import InterpolationMode

    def resize(image):
        pixels = tvF.pil_to_tensor(image)
        return tvF.resize(pixels, [image_size, image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)

    return resize


def holdout_mask(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which images are held out: a function of (seed, key), so the split does not move with shard order."""
    from capfilt.training.data import derived_seed

    threshold = fraction * 2**63
    return np.array([derived_seed("holdout", seed, key) < threshold for key in keys], dtype=bool)


def lr_at(step: int, config: VisionPretrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    from capfilt.config import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std


def loss_of(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    return torch.nn.functional.cross_entropy(logits, targets.argmax(1))


@torch.no_grad()
def evaluate(model, pixels: torch.Tensor, targets: torch.Tensor, multi_label: bool, batch: int = 256) -> dict:
    """Held-out accuracy: per class and exact-set for multi-label sets, top-1 for single-label ones."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(_normalise(pixels[i : i + batch].to(device))).float().cpu()
                        for i in range(0, len(pixels), batch)])
    model.train()
    if multi_label:
        predicted = (logits > 0).float()
        return {"images": len(pixels), "exact_set_accuracy": round(float((predicted == targets).all(1).float().mean()), 4),
                "label_accuracy": round(float((predicted == targets).float().mean()), 4)}
    return {"images": len(pixels), "top1_accuracy": round(float((logits.argmax(1) == targets.argmax(1)).float().mean()), 4)}


def train_classifier(config: VisionPretrainConfig, vision: VisionConfig, data: LabelledImages,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The classifier's training loop (no Ray: unit-testable). Returns the state dict and held-out metrics.

    Batches are a fresh permutation of the training images per epoch, seeded by (seed, epoch).
    """
    from capfilt.training.data import derived_seed
    from capfilt.training.optim import adamw
    from capfilt.training.precision import autocast_for, precision_name

    torch.set_num_threads(max(1, math.ceil(config.cpus)))
    device = torch.device("cuda" if config.use_gpu is not False and torch.cuda.is_available() else "cpu")
    held = holdout_mask(data.keys, config.holdout_fraction, config.seed)
    train_pixels, train_targets = data.pixels[~held], data.targets[~held]
    if len(train_pixels) == 0:
        raise ValueError(f"holdout_fraction {config.holdout_fraction} leaves no image to train on")
    torch.manual_seed(config.seed)
    model = timm_vit(vision, len(data.classes), config.pool).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
    optimizer = adamw([{"params": decay, "weight_decay": config.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], config.lr)
    autocast = autocast_for(device, config.mixed_precision, vision.width)
    count, batch = len(train_pixels), min(config.batch_size, len(train_pixels))
    per_epoch = count // batch
    started, losses = time.time(), []
    for step in range(config.steps):
        epoch, offset = divmod(step, per_epoch)
        if offset == 0:  # one permutation per epoch, not one per step
            order = torch.randperm(count, generator=torch.Generator().manual_seed(derived_seed("order", config.seed, epoch)))
        chosen = order[offset * batch : (offset + 1) * batch]
        pixels, targets = train_pixels[chosen].to(device), train_targets[chosen].to(device)
        flip = torch.rand(len(chosen), generator=torch.Generator().manual_seed(derived_seed("flip", config.seed, step)))
        flip = (flip < config.hflip_p).to(device)
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        with autocast:
            logits = model(_normalise(pixels))
        loss = loss_of(logits.float(), targets, data.multi_label)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            rate = (step + 1) / (time.time() - started)
            log(f"[pretrain_vision] step {step + 1}/{config.steps} loss {np.mean(losses[-config.log_every:]):.4f} "
                f"lr {lr_at(step, config):.2e} {rate:.1f} steps/s")
    metrics = {"train_images": count, "final_loss": round(float(np.mean(losses[-config.log_every:])), 5),
               "precision": precision_name(autocast)}
    if held.any():
        metrics["holdout"] = evaluate(model, data.pixels[held], data.targets[held], data.multi_label)
    return {"state": {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()},
            "metrics": metrics}


def _train_task(config_json: str, vision_json: str, reader_json: str) -> dict[str, Any]:
    """The Ray task: read, train, and hand the weights back as safetensors bytes."""
    from safetensors.torch import save

    config = VisionPretrainConfig.model_validate_json(config_json)
    vision = VisionConfig.model_validate_json(vision_json)
    data = read_labelled(ReaderConfig.model_validate_json(reader_json), config.label_column, vision.image_size)
    lines: list[str] = []
    trained = train_classifier(config, vision, data, log=lambda line: (print(line, flush=True), lines.append(line)))
    return {"weights": save(trained["state"]), "classes": data.classes, "multi_label": data.multi_label,
            "rows": data.rows, "images": len(data.keys), "rejects": dict(sorted(data.rejects.items())),
            "metrics": trained["metrics"], "log": lines}


def run_pretrain_vision(config: VisionPretrainConfig, vision: VisionConfig, reader: ReaderConfig, out_dir: str,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the classifier as a Ray task and write ``vit.safetensors`` and ``classes.json`` to ``out_dir``.

    Returns ``{"vit": <weights path>, "classes", "images", "rejects", "metrics", "seconds"}``.
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    gpus = ray.cluster_resources().get("GPU", 0.0)
    use_gpu = gpus >= 1 if config.use_gpu == "auto" else bool(config.use_gpu)
    if use_gpu and gpus < 1:
        raise ValueError(f"pretrain_vision.use_gpu: the cluster has {gpus:g} GPUs")
    started = time.time()
    task = ray.remote(num_cpus=config.cpus, num_gpus=1 if use_gpu else 0)(_train_task)
    log(f"[pretrain_vision] {config.steps} steps of {config.batch_size} images on a "
        f"{vision.layers}-layer {vision.width}-wide ViT/{vision.patch_size} at {vision.image_size} px"
        f"{' on a GPU' if use_gpu else ''}")
    outcome = ray.get(task.remote(config.model_dump_json(), vision.model_dump_json(), reader.model_dump_json()))
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    weights = f"{out_dir.rstrip('/')}/{WEIGHTS_FILE}"
    with fsspec.open(weights, "wb") as handle:
        handle.write(outcome["weights"])
    result = {"vit": weights, "classes": outcome["classes"], "multi_label": outcome["multi_label"],
              "rows": outcome["rows"], "images": outcome["images"], "rejects": outcome["rejects"],
              "metrics": outcome["metrics"], "seconds": round(time.time() - started, 1)}
    with fsspec.open(f"{out_dir.rstrip('/')}/{RECORD_FILE}", "w") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
    log(f"[pretrain_vision] {result['images']} of {result['rows']} rows, classes {result['classes']}, "
        f"rejected {result['rejects'] or 'none'}; trained in {result['metrics']['precision']}; "
        f"held out: {result['metrics'].get('holdout', 'none')}")
    return result
