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

# kind -> (the objective it cannot do without, the transformers class it is exported as, its directory)
_KINDS = {
    "captioner": ("lm", "the LM decoder", CAPTIONER_DIR),
    "filter": ("itm", "the ITM head", FILTER_DIR),
}


def run_finetune(
    kind: str,
    train: TrainConfig,
    init_med: str,
    tokenizer_dir: str,
    sources: list[PairSource],
    out_dir: str,
    log: Callable[[str], None] = print,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune a copy of ``init_med`` into a captioner or a filter and export it.

    Returns ``{"med", "model": <exported dir>, "steps", "pairs", "seconds", ...}``. ``train`` defaults:
    :class:`~capfilt.config.CaptionerTrainConfig` / :class:`~capfilt.config.FilterTrainConfig`.
    """
    from capfilt.models.export import export_captioner, export_filter
    from capfilt.training.stage import run_training_stage

    objective, role, directory = _KINDS[kind]
    if objective not in train.objectives:
        raise ValueError(f"the {kind} is {role}: its objectives must include '{objective}', got {train.objectives}")
    exporter = export_captioner if kind == "captioner" else export_filter

    def export(med, tokenizer, out: Path) -> dict[str, Path]:
        return {"model": exporter(med, tokenizer, out / directory)}

    return run_training_stage(f"finetune_{kind}", train, sources, tokenizer_dir, out_dir, init_med=init_med,
                              export=export, log=log, storage_options=storage_options)


def run_finetune_captioner(train: TrainConfig, init_med: str, tokenizer_dir: str, sources: list[PairSource],
                           out_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`run_finetune` of a ``BlipForConditionalGeneration`` (LM only, with the prompt)."""
    return run_finetune("captioner", train, init_med, tokenizer_dir, sources, out_dir, log)


def run_finetune_filter(train: TrainConfig, init_med: str, tokenizer_dir: str, sources: list[PairSource],
                        out_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`run_finetune` of a ``BlipForImageTextRetrieval`` (ITC + ITM)."""
    return run_finetune("filter", train, init_med, tokenizer_dir, sources, out_dir, log)
