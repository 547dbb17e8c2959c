"""The evaluate stage: each model on the held-out split, and CapFilt's output against the world's truth.

For every named MED (e.g. the one pretrained on noisy web data and the one pretrained on bootstrapped
data) it measures retrieval (R@1/5/10 both ways) and captioning (BLEU-4, CIDEr-D and, in the generated
world, caption accuracy). Captions come from the MED exported as a ``BlipForConditionalGeneration``
and loaded back, the path published captioners take too. Given a CapFilt output it adds the filter's
noise detection, the captioner's accuracy and CapFilt's counts. Writes ``metrics.json``, one
``captions/<model>.jsonl`` per model, and returns the metrics.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import fsspec
import torch

from capfilt.config import EvaluateConfig, ReaderConfig
from capfilt.evaluation.captioning import caption_metrics
from capfilt.evaluation.filtering import (
    capfilt_counts,
    captioner_metrics,
    filter_metrics,
    read_capfilt_output,
    read_ground_truth,
    web_shards_of,
)
from capfilt.evaluation.report import format_table
from capfilt.evaluation.retrieval import RetrievalModel, retrieval_metrics, shortlist
from capfilt.evaluation.testset import TestSet, load_test_set

METRICS_FILE = "metrics.json"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluate.device: cuda requested but no GPU is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def evaluate_retrieval(
    model: RetrievalModel, tokenizer, test: TestSet, config: EvaluateConfig, transform: Callable, device
) -> dict[str, Any]:
    """R@K both ways for a MED or a :class:`~capfilt.evaluation.retrieval.FilterRetrieval`."""
    lists = shortlist(
        model, tokenizer, test.pixel_batches(transform, config.batch_size), test.texts,
        k_test=config.k_test, batch_size=config.batch_size, max_text_length=config.max_text_length, device=device,
    )
    return {**retrieval_metrics(lists, test.text_image), "k_test": min(config.k_test, len(test)), "itm_pairs": lists.itm_pairs}


def generate_captions(loaded, test: TestSet, config: EvaluateConfig, device) -> list[str]:
    """One caption per test image (the best beam) from a loaded captioner (:func:`capfilt.models.export.load_captioner`)."""
    from capfilt.data.images import eval_transform
    from capfilt.inference.captioner import Captioner

    captioner = Captioner(loaded.model, loaded.tokenizer, config.sampling, device)
    transform = eval_transform(loaded.image_size, loaded.image_mean, loaded.image_std)
    captions: list[str] = []
    for pixel_values in test.pixel_batches(transform, config.batch_size):
        keys = test.keys[len(captions) : len(captions) + len(pixel_values)]
        captions += [image_captions[0] for image_captions in captioner.generate(pixel_values, keys)]
    return captions


def _load(name: str, path: str):
    from capfilt.data.text import load_tokenizer
    from capfilt.models.med import load_med

    med = load_med(path).eval()
    if not any((Path(path) / file).is_file() for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ValueError(f"evaluate models.{name}: {path} has no tokenizer; save the MED with save_med(med, dir, tokenizer)")
    return med, load_tokenizer(path)


def evaluate_med(name: str, path: str, test: TestSet, config: EvaluateConfig, device) -> tuple[dict[str, Any], list[str]]:
    """Retrieval and captioning metrics of one MED directory (save_med format), and its captions."""
    from capfilt.data.images import eval_transform
    from capfilt.models.export import export_captioner, load_captioner

    med, tokenizer = _load(name, path)
    with tempfile.TemporaryDirectory(prefix="capfilt-eval-") as directory:
        export_captioner(med, tokenizer, directory)
        loaded = load_captioner(directory, device=device)
    med.to(device)
    retrieval = evaluate_retrieval(med, tokenizer, test, config, eval_transform(med.config.vision.image_size), device)
    captions = generate_captions(loaded, test, config, device)
    captioning = caption_metrics(captions, test.references, test.scenes if test.has_scenes else None)
    return {"retrieval": retrieval, "captioning": captioning}, captions


def _write(url: str, text: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as handle:
        handle.write(text)


def _caption_records(test: TestSet, captions: list[str]) -> str:
    from capfilt.data.world import check_caption

    lines = []
    for key, caption, references, scene in zip(test.keys, captions, test.references, test.scenes):
        record = {"key": key, "caption": caption, "references": references}
        if scene is not None:
            record["accurate"] = bool(check_caption(caption, scene))
        lines.append(json.dumps(record))
    return "\n".join(lines) + "\n"


def run_evaluate(
    config: EvaluateConfig,
    models: dict[str, str],
    test: ReaderConfig,
    out_dir: str,
    capfilt_outputs: dict[str, str] | None = None,
    web: ReaderConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate ``models`` (name -> MED directory) on ``test`` and CapFilt's outputs (round name -> output
    directory) against the truth of their web shards, ``web`` (default: those each manifest records).

    The first output's filter, captioner and counts are the top-level ``filter``, ``captioner`` and
    ``capfilt``; with more than one (bootstrapping rounds), ``rounds`` holds each one's under its name.
    Writes ``out_dir/metrics.json``."""
    device = resolve_device(config.device)
    test_set = load_test_set(test, config.max_test_images, config.max_caption_words, log)
    log(f"evaluate: {len(test_set)} test images, {len(test_set.texts)} reference texts, on {device}")
    metrics: dict[str, Any] = {
        "test": {"images": len(test_set), "texts": len(test_set.texts), "skipped": test_set.skipped},
        "models": {},
        "filter": None,
        "captioner": None,
        "capfilt": None,
    }
    for name, path in models.items():
        started = time.time()
        metrics["models"][name], captions = evaluate_med(name, path, test_set, config, device)
        _write(f"{out_dir.rstrip('/')}/captions/{name}.jsonl", _caption_records(test_set, captions))
        log(f"evaluate: {name} done in {time.time() - started:.1f}s")

    truth_by_shards: dict[Any, Any] = {}
    per_round = {}
    for label, path in (capfilt_outputs or {}).items():
        output = read_capfilt_output(path)
        shards = web or (ReaderConfig(paths=found) if (found := web_shards_of(output)) else None)
        key = json.dumps(shards.model_dump(), sort_keys=True, default=str) if shards is not None else None
        if key not in truth_by_shards:  # rounds read the same web shards: their truth once
            truth_by_shards[key] = read_ground_truth(shards) if shards is not None else None
        truth = truth_by_shards[key]
        per_round[label] = {"filter": filter_metrics(output, truth, config.threshold),
                            "captioner": captioner_metrics(output, truth), "capfilt": capfilt_counts(output)}
    if per_round:
        metrics.update(next(iter(per_round.values())))
    if len(per_round) > 1:
        metrics["rounds"] = per_round

    _write(f"{out_dir.rstrip('/')}/{METRICS_FILE}", json.dumps(metrics, indent=2, sort_keys=True))
    log(format_table(metrics))
    return metrics
