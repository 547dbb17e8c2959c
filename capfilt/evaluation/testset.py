"""The held-out test split: images, their reference captions and, in the generated world, their scenes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from capfilt.config import ReaderConfig
from capfilt.data.decode import DecodeError, decode_image
from capfilt.data.text import pre_caption

REFERENCES_COLUMN = "captions"  # the world's (and COCO-style) list of references; else the one caption
SCENE_COLUMN = "gt_scene"


@dataclass
class TestSet:
    keys: list[str]
    images: list[bytes]  # encoded; decoded batch by batch so a large split never sits in memory as pixels
    references: list[list[str]]  # cleaned with pre_caption
    scenes: list[str | None]  # the world's scene JSON; None on real data
    skipped: dict[str, int] = field(default_factory=dict)  # rows left out, by reason

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def texts(self) -> list[str]:
        """All references, image by image."""
        return [text for refs in self.references for text in refs]

    @property
    def text_image(self) -> list[int]:
        """For each of :attr:`texts`, the index of its image."""
        return [image for image, refs in enumerate(self.references) for _ in refs]

    @property
    def has_scenes(self) -> bool:
        return any(scene is not None for scene in self.scenes)

    def pixel_batches(self, transform: Callable, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.images), batch_size):
            chunk = self.images[start : start + batch_size]
            yield torch.stack([transform(decode_image(data)) for data in chunk])


def load_test_set(reader: ReaderConfig, max_images: int | None = None, max_words: int = 30, log=print) -> TestSet:
    """Read test shards in order; rows that failed to download, do not decode or have no usable
    caption are skipped and counted (a test set is curated: many skips mean the wrong files)."""
    from capfilt.data.shards import make_reader

    if not reader.paths:
        raise ValueError("evaluate: the test reader has no paths")
    test = TestSet([], [], [], [])

    def skip(reason: str) -> None:
        test.skipped[reason] = test.skipped.get(reason, 0) + 1

    for batch in make_reader(reader).read():
        if max_images is not None and len(test) >= max_images:
            break
        columns = batch.to_pydict()
        for i in range(batch.num_rows):
            if max_images is not None and len(test) >= max_images:
                break
            if columns["status"][i] != "success":
                skip(f"status: {columns['status'][i]}")
                continue
            raw = columns[REFERENCES_COLUMN][i] if REFERENCES_COLUMN in columns else [columns["caption"][i]]
            references = [pre_caption(text, max_words) for text in raw or [] if isinstance(text, str)]
            references = [text for text in references if text]
            if not references:
                skip("no_caption")
                continue
            try:
                decode_image(columns["image"][i])
            except DecodeError as error:
                skip(error.reason)
                continue
            test.keys.append(columns["key"][i])
            test.images.append(columns["image"][i])
            test.references.append(references)
            test.scenes.append(columns[SCENE_COLUMN][i] if SCENE_COLUMN in columns else None)
    if not test.keys:
        raise ValueError(f"evaluate: no usable test images in {reader.paths} (skipped: {test.skipped or 'none'})")
    if test.skipped:
        log(f"evaluate: skipped test rows {test.skipped}")
    return test
