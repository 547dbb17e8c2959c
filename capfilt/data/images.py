"""Decoded images to model input: BLIP's preprocessing and augmentation (torch/torchvision).

Decoding lives in :mod:`capfilt.data.decode` (Pillow only); :func:`decode_batch` puts the two together.

:func:`eval_transform` reproduces transformers' ``BlipImageProcessor`` (square bicubic resize with
antialiasing on the uint8 tensor, no crop, rescale 1/255, CLIP mean/std) to within 5e-7. BLIP's own
code and transformers' ``BlipImageProcessorPil`` resize with PIL instead, which differs by at most
2 levels of 255 on some pixels. :func:`train_transform` is BLIP's training augmentation
(RandomResizedCrop, horizontal flip, RandAugment over BLIP's op set).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as tvF

from capfilt.config import CLIP_MEAN, CLIP_STD, ImageConfig
from capfilt.data.decode import DecodeError, decode_image

# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


class EvalTransform:
    """BLIP's test transform, numerically as transformers' ``BlipImageProcessor`` (torchvision backend).

    PIL -> uint8 tensor -> bicubic antialiased resize to ``image_size`` square (no crop) -> float32 ->
    ``(x - 255 mean) / (255 std)``, which is rescale 1/255 then normalise, fused as transformers fuses it.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.image_size = image_size
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = tvF.pil_to_tensor(image)
        pixels = tvF.resize(
            pixels, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        return tvF.normalize(pixels.to(torch.float32), self.mean, self.std)


def eval_transform(
    image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> EvalTransform:
    return EvalTransform(image_size, mean, std)


class BlipRandAugment(v2.RandAugment):
    """torchvision's RandAugment restricted to the ops of BLIP's ``RandomAugment``.

    BLIP (transform/randaugment.py) draws 2 of Identity, AutoContrast, Equalize, Brightness, Sharpness,
    ShearX/Y, TranslateX/Y, Rotate at level 5 of 10 and applies each with probability 0.5. Here the op
    set is BLIP's but magnitudes follow torchvision's scales (``magnitude`` of ``num_magnitude_bins``)
    and each drawn op is always applied.
    """

    BLIP_OPS = (
        "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    )  # fmt: skip
    _AUGMENTATION_SPACE = {name: v2.RandAugment._AUGMENTATION_SPACE[name] for name in BLIP_OPS}


class TrainTransform:
    """RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment -> the eval normalisation.

    Randomness comes from torch's global generator; pass ``seed`` (e.g. derived from key and epoch) to
    make one image's augmentation reproducible regardless of batching or worker.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 5,
        randaugment_bins: int = 11,
        hflip_p: float = 0.5,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        self.image_size = image_size
        self.augment = v2.Compose(
            [
                v2.PILToTensor(),
                v2.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(hflip_p),
                BlipRandAugment(
                    num_ops=randaugment_ops,
                    magnitude=randaugment_magnitude,
                    num_magnitude_bins=randaugment_bins,
                    # torchvision's affine ops on tensors have no bicubic; BLIP's (cv2) default is bilinear.
                    interpolation=InterpolationMode.BILINEAR,
                ),
            ]
        )
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        if seed is None:
            pixels = self.augment(image)
        else:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator alone: torch.manual_seed also seeds every accelerator backend, and where
                # none is initialised it records a stack trace for each (a demo batch of 32: 30.9 -> 23.7 ms).
                torch.random.default_generator.manual_seed(seed)
                pixels = self.augment(image)
        return tvF.normalize(pixels.to(torch.float32), self.mean, self.std)


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 5,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> TrainTransform:
    return TrainTransform(
        image_size,
        scale,
        randaugment_ops=randaugment_ops,
        randaugment_magnitude=randaugment_magnitude,
        mean=mean,
        std=std,
    )


def image_transform(config: ImageConfig, image_size: int, train: bool) -> EvalTransform | TrainTransform:
    """The transform a config section describes; ``image_size`` comes from the model's vision config."""
    if not train:
        return EvalTransform(image_size, config.mean, config.std)
    return TrainTransform(
        image_size,
        config.train_scale,
        randaugment_ops=config.randaugment_ops,
        randaugment_magnitude=config.randaugment_magnitude,
        hflip_p=config.hflip_p,
        mean=config.mean,
        std=config.std,
    )


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


class DecodeFailure(NamedTuple):
    index: int
    reason: str
    detail: str


def decode_batch(
    images: Sequence[bytes | None],
    max_pixels: int,
    transform: Callable[[Image.Image], torch.Tensor],
) -> tuple[torch.Tensor, list[int], list[DecodeFailure]]:
    """Decode and transform a batch; a bad image becomes a failure, never a lost batch.

    Returns the stacked tensors of the good images, their indices in ``images``, and one
    :class:`DecodeFailure` (index, reason, detail) per bad image. ``len(ok) + len(failures) == len(images)``.
    """
    tensors: list[torch.Tensor] = []
    ok: list[int] = []
    failures: list[DecodeFailure] = []
    for index, data in enumerate(images):
        try:
            image = decode_image(data, max_pixels)
        except DecodeError as error:
            failures.append(DecodeFailure(index, error.reason, error.detail))
            continue
        try:
            tensors.append(transform(image))
        except Exception as error:  # noqa: BLE001 -- one odd image must not take the batch with it
            failures.append(DecodeFailure(index, "transform_error", f"{type(error).__name__}: {error}"))
            continue
        ok.append(index)
    if tensors:
        return torch.stack(tensors), ok, failures
    size = getattr(transform, "image_size", 0)
    return torch.empty((0, 3, size, size)), ok, failures
