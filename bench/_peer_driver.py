"""Data-Juicer's side of bench/peers.py. Runs in the peer environment (``.bench-peers-venv``), not capfilt's.

    .bench-peers-venv/bin/python bench/_peer_driver.py JOB.json OUT.json

Reads a job (the pairs, the exported filter and captioner, the threshold), runs Data-Juicer's own ops
through its public API (``NestedDataset`` + ``OP.run``, one process, as its default executor runs an op
with ``num_proc=1``), and writes every ITM probability, keep decision, caption and timing to OUT.json.
Imports nothing of capfilt; logs go to stderr.

Task kinds:

- ``itm``: ``image_text_matching_filter`` over (image, text) samples: compute stats, then filter.
- ``caption_filter``: ``image_captioning_mapper`` (``caption_num=k``, ``keep_candidate_mode='all'``, the
  original sample kept) then ``image_text_matching_filter`` over every sample it returns (web + k):
  the work of one CapFilt pass.

Model loading is timed apart (``load_s``): Data-Juicer loads a model on an op's first sample and frees
every model when ``run`` returns, so each op's model is loaded (``get_model``) just before its ``run``.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def log(*args) -> None:
    print("[peer]", *args, file=sys.stderr, flush=True)


def versions() -> dict[str, Any]:
    import importlib.metadata as metadata
    import platform

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    for name in ("py-data-juicer", "transformers", "torch", "torchvision", "datasets", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# What bench/README.md says about the peer, checked against the installed source on every run.
SOURCE_FACTS = {
    "ops/filter/image_text_matching_filter.py": {
        "one_pair_per_forward": r"for image_key in loaded_image_keys",
        "processor_call": r"inputs = processor\(",
        "truncation_at_max_position_embeddings": r"max_length=model\.config\.text_config\.max_position_embeddings",
        "itm_softmax": r"itm_score\.detach\(\)\.cpu\(\)\.softmax",
        "text_special_tokens_removed_only": r"text_chunk = remove_special_tokens\(chunk\)",
        "no_grad_or_inference_mode": r"no_grad|inference_mode",
        "keep_rule": r"get_keep_boolean\(itm_score, self\.min_score, self\.max_score\)",
    },
    "ops/mapper/image_captioning_mapper.py": {
        "one_generate_per_caption": r"for caption_idx in range\(self\.caption_num\)",
        "generate_call": r"model\.generate\(\*\*inputs, max_new_tokens=128, do_sample=True\)",
        "gpu_batch_size_default": r"gpu_batch_size: PositiveInt = \d+",
        "decode": r"processor\.batch_decode\(generated_ids, skip_special_tokens=True\)",
        "no_grad_or_inference_mode": r"no_grad|inference_mode",
    },
    "ops/base_op.py": {
        "filter_run_stats_then_filter": r"self\.compute_stats,",
        "models_freed_after_run": r"free_models\(\)",
        "cpu_batch_size": r"self\.batch_size = kwargs\.get\(\"batch_size\", DEFAULT_BATCH_SIZE\)",
    },
    "utils/model_utils.py": {
        "auto_processor": r"processor = transformers\.AutoProcessor\.from_pretrained",
        "model_class_from_architectures": r"class_name = config\.architectures\[0\]",
        "model_from_pretrained": r"model = model_class\.from_pretrained\(pretrained_model_name_or_path, \*\*model_params\)",
    },
    "utils/mm_utils.py": {
        "load_image": r"img = img\.convert\(\"RGB\"\)",
    },
}


def source_facts() -> dict[str, Any]:
    """Each fact: the first matching line of the installed file, or None where the pattern is absent."""
    import data_juicer

    root = Path(data_juicer.__file__).parent
    facts: dict[str, Any] = {"root": str(root)}
    for relative, patterns in SOURCE_FACTS.items():
        path = root / relative
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            facts[relative] = {"error": str(error)}
            continue
        found = {}
        for name, pattern in patterns.items():
            hit = next(((n, line.strip()) for n, line in enumerate(lines, 1) if re.search(pattern, line)), None)
            found[name] = f"line {hit[0]}: {hit[1]}" if hit else None
        facts[relative] = found
    return facts


def dj_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from data_juicer.utils.mm_utils import SpecialTokens

    return [{"key": s["key"], "text": f"{SpecialTokens.image} {s['text']} {SpecialTokens.eoc}", "images": [s["image"]]}
            for s in samples]


def _score_and_filter(op, dataset) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """Stats for every sample (``run(reduce=False)``), then the op's own filter over them (``run``)."""
    from data_juicer.utils.constant import Fields, StatsKeys
    from data_juicer.utils.model_utils import get_model

    started = time.perf_counter()
    get_model(op.model_key)  # cached in MODEL_ZOO; the op's first sample finds it there
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    with_stats = op.run(dataset, reduce=False)
    stats_s = time.perf_counter() - started
    started = time.perf_counter()
    kept = op.run(with_stats)  # stats present: compute_stats returns at once, then the filter
    filter_s = time.perf_counter() - started
    rows = with_stats.to_list()
    for row in rows:
        scores = row[Fields.stats][StatsKeys.image_text_matching_score]
        row["_score"] = float(scores[0]) if len(scores) else None
    timing = {"load_s": round(load_s, 3), "stats_s": round(stats_s, 3), "filter_s": round(filter_s, 3)}
    return timing, kept, rows


def run_itm(job: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """``repeats`` rounds (a fresh dataset each); the fastest is reported, the first round's scores kept."""
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.filter import ImageTextMatchingFilter

    rounds = []
    for _ in range(int(task.get("repeats", 1))):
        dataset = NestedDataset.from_list(dj_samples(task["samples"]))
        op = ImageTextMatchingFilter(hf_blip=job["filter"], min_score=task["threshold"], max_score=1.0, num_proc=1)
        timing, kept, rows = _score_and_filter(op, dataset)
        rounds.append((timing["stats_s"] + timing["filter_s"], timing, kept, rows))
    _, _, kept, rows = rounds[0]
    seconds, timing, _, _ = min(rounds, key=lambda r: r[0])
    return {**timing, "images": len(rows), "pairs": len(rows), "seconds": round(seconds, 3),
            "images_per_s": round(len(rows) / seconds, 3),
            "rounds_images_per_s": [round(len(rows) / r[0], 3) for r in rounds],
            "probs": {row["key"]: row["_score"] for row in rows},
            "kept": sorted(row["key"] for row in kept.to_list())}


def run_caption_filter(job: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.filter import ImageTextMatchingFilter
    from data_juicer.ops.mapper import ImageCaptioningMapper
    from data_juicer.utils.mm_utils import remove_special_tokens
    from data_juicer.utils.model_utils import get_model

    samples = task["samples"]
    dataset = NestedDataset.from_list(dj_samples(samples))
    mapper = ImageCaptioningMapper(hf_img2seq=job["captioner"], caption_num=task["k"], keep_candidate_mode="all",
                                   keep_original_sample=True, prompt=job["prompt"], num_proc=1)
    started = time.perf_counter()
    get_model(mapper.model_key)
    caption_load_s = time.perf_counter() - started
    started = time.perf_counter()
    captioned = mapper.run(dataset)
    caption_s = time.perf_counter() - started
    op = ImageTextMatchingFilter(hf_blip=job["filter"], min_score=task["threshold"], max_score=1.0, num_proc=1)
    timing, kept, rows = _score_and_filter(op, captioned)
    # Order is kept with one process: each image's original sample, then its k generated ones.
    texts: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        texts.setdefault(row["key"], []).append({"text": remove_special_tokens(row["text"]), "prob": row["_score"]})
    kept_counts: dict[str, int] = {}
    for row in kept.to_list():
        kept_counts[row["key"]] = kept_counts.get(row["key"], 0) + 1
    seconds = caption_s + timing["stats_s"] + timing["filter_s"]
    return {"k": task["k"], "images": len(samples), "pairs": len(rows), "load_s": round(caption_load_s + timing["load_s"], 3),
            "caption_s": round(caption_s, 3), "itm_s": round(timing["stats_s"] + timing["filter_s"], 3),
            "seconds": round(seconds, 3), "images_per_s": round(len(samples) / seconds, 3),
            "texts": texts, "kept_per_key": kept_counts}


def main(argv: list[str]) -> int:
    job_path, out_path = argv[1], argv[2]
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(int(job.get("threads", 1)))
    result: dict[str, Any] = {"versions": versions(), "tasks": {}}
    try:
        result["source"] = source_facts()
    except Exception as error:  # noqa: BLE001 -- a missing file is a finding, not a failure
        result["source"] = {"error": f"{type(error).__name__}: {error}"}
    runners = {"itm": run_itm, "caption_filter": run_caption_filter}
    for task in job["tasks"]:
        log(f"{task['name']}: {task['kind']} over {len(task['samples'])} samples")
        try:
            result["tasks"][task["name"]] = runners[task["kind"]](job, task)
        except Exception as error:  # noqa: BLE001 -- recorded in the JSON, the other tasks still run
            result["tasks"][task["name"]] = {"error": f"{type(error).__name__}: {error}",
                                             "traceback": traceback.format_exc()[-4000:]}
            log(traceback.format_exc())
        Path(out_path).write_text(json.dumps(result))  # what is done so far survives a later crash
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
