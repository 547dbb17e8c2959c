"""Fine-tuning the captioner and the filter from the pretrained MED, on human pairs (COCO's role).

They are two separate copies of the pretrained MED: sharing parameters between captioner and filter
makes the filter agree with the captioner's mistakes (the BLIP paper's confirmation bias).

- captioner: LM only, ``"a picture of "`` prepended to each caption (its tokens carry no loss),
  exported as a ``BlipForConditionalGeneration`` directory;
- filter: ITC + ITM, exported as a ``BlipForImageTextRetrieval`` directory (ITM with ``[ENC]`` first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from capfilt.config import PairSource, TrainConfig

CAPTIONER_DIR = "captioner"
FILTER_DIR = "filter"


def run_finetune_captioner(
    train: TrainConfig,
    init_med: str,
    tokenizer_dir: str,
    sources: list[PairSource],
    out_dir: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Returns ``{"med", "model": <BlipForConditionalGeneration dir>, "steps", "pairs", "seconds", ...}``.

    ``train`` defaults: :class:`~capfilt.config.CaptionerTrainConfig`.
    """
    from capfilt.models.export import export_captioner
    from capfilt.training.stage import run_training_stage

    if "lm" not in train.objectives:
        raise ValueError(f"the captioner is the LM decoder: its objectives must include 'lm', got {train.objectives}")

    def export(med, tokenizer, out: Path) -> dict[str, Path]:
        return {"model": export_captioner(med, tokenizer, out / CAPTIONER_DIR)}

    return run_training_stage("finetune_captioner", train, sources, tokenizer_dir, out_dir, init_med=init_med,
                              export=export, log=log)


def run_finetune_filter(
    train: TrainConfig,
    init_med: str,
    tokenizer_dir: str,
    sources: list[PairSource],
    out_dir: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Returns ``{"med", "model": <BlipForImageTextRetrieval dir>, "steps", "pairs", "seconds", ...}``.

    ``train`` defaults: :class:`~capfilt.config.FilterTrainConfig`.
    """
    from capfilt.models.export import export_filter
    from capfilt.training.stage import run_training_stage

    if "itm" not in train.objectives:
        raise ValueError(f"the filter is the ITM head: its objectives must include 'itm', got {train.objectives}")

    def export(med, tokenizer, out: Path) -> dict[str, Path]:
        return {"model": export_filter(med, tokenizer, out / FILTER_DIR)}

    return run_training_stage("finetune_filter", train, sources, tokenizer_dir, out_dir, init_med=init_med,
                              export=export, log=log)
