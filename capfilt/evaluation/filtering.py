"""How well CapFilt did, from its output directory and (in the generated world) the web shards' truth.

The filter is judged as a detector of noisy web texts: the positive class is a web text that is not
clean (``gt_clean`` false), "removed" means its ITM match probability is below the CapFilt threshold,
and ROC-AUC ranks texts by ``1 - itm_prob``. Only web texts the filter scored count: those in
``pairs/`` with an ``itm_prob`` and those in ``rejects/`` with a score (``itm_below_threshold``,
``not_in_best_n``); rows rejected for status, decoding or a missing caption are not filter decisions.
Output rows are joined to the web shards by (shard, row).

The captioner is judged on every synthetic text, kept or dropped, against its image's scene. Without
ground-truth columns every truth-based number is None rather than an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.config import ReaderConfig

PAIR_COLUMNS = ["text", "source", "itm_prob", "shard", "row"]
REJECT_COLUMNS = ["text", "source", "reason", "score", "shard", "row"]
WEB, SYNTHETIC = "web", "synthetic"
CLEAN = "clean"


# -------------------------------------------------------------------------------------------------
# ROC-AUC
# -------------------------------------------------------------------------------------------------


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based position of each value's first copy
    return (first + (counts + 1) / 2.0)[inverse]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting one half
    (the Mann-Whitney U statistic); None when either class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores for {labels.shape[0]} labels")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    rank_sum = average_ranks(scores)[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


# -------------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------------


@dataclass
class CapFiltOutput:
    pairs: pa.Table  # PAIR_COLUMNS of every committed pair
    rejects: pa.Table  # REJECT_COLUMNS of every committed reject
    manifest: dict[str, Any] | None  # None until the run finished


def read_capfilt_output(path: str, storage_options: dict[str, Any] | None = None) -> CapFiltOutput:
    """The committed pairs and rejects (files no commit names are ignored) and the manifest."""
    from capfilt.data.output import MANIFEST, CommittedOutput

    out = CommittedOutput(path, storage_options)
    if not out.commits():
        raise ValueError(f"{path}: not a CapFilt output (no commit records under _commits/)")

    def read(table: str, columns: list[str]) -> pa.Table:
        parts = []
        for url in out.data_files(table):
            with fsspec.open(url, "rb", **(storage_options or {})) as handle:
                try:
                    parts.append(pq.read_table(handle, columns=columns))
                except (pa.ArrowException, KeyError) as error:
                    raise ValueError(f"{url}: not a CapFilt {table} file ({error})") from None
        if not parts:
            return pa.table({name: [] for name in columns})
        return pa.concat_tables(parts)

    manifest = out.manifest() if out.exists(MANIFEST) else None
    return CapFiltOutput(read("pairs", PAIR_COLUMNS), read("rejects", REJECT_COLUMNS), manifest)


def shard_id(url: str) -> str:
    """A shard's identity for the join: local paths resolved, so ``./web/0.parquet`` meets its absolute path."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.realpath(url.removeprefix("file://"))


@dataclass(frozen=True)
class Truth:
    noise_type: str | None
    clean: bool | None
    scene: str | None


def read_ground_truth(web: ReaderConfig) -> dict[tuple[str, int], Truth]:
    """``(shard, row) -> Truth`` for every web row; fields are None where the shards lack them."""
    from capfilt.data.shards import make_reader

    truth = {}
    for batch in make_reader(web).read():
        columns = batch.to_pydict()
        absent = [None] * batch.num_rows
        for shard, row, noise_type, clean, scene in zip(
            columns["shard"], columns["row"], columns.get("gt_noise_type", absent),
            columns.get("gt_clean", absent), columns.get("gt_scene", absent),
        ):
            truth[(shard_id(shard), row)] = Truth(noise_type, clean, scene)
    return truth


def web_shards_of(output: CapFiltOutput) -> list[str]:
    """The web input shards a finished CapFilt output records in its manifest."""
    roles = (output.manifest or {}).get("roles", {})
    return sorted(url for url, role in roles.items() if role == WEB)


def _texts(output: CapFiltOutput, source: str) -> list[dict]:
    """Texts of one source, kept and dropped, as dicts with ``text, shard, row, score, kept``."""
    rows = []
    for row in output.pairs.to_pylist():
        if row["source"] == source:
            rows.append({"text": row["text"], "shard": row["shard"], "row": row["row"], "score": row["itm_prob"], "kept": True})
    for row in output.rejects.to_pylist():
        if row["source"] == source:
            rows.append({"text": row["text"], "shard": row["shard"], "row": row["row"], "score": row["score"], "kept": False})
    return rows


# -------------------------------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------------------------------


def filter_metrics(output: CapFiltOutput, truth: dict[tuple[str, int], Truth] | None, threshold: float) -> dict[str, Any]:
    """Removal precision and recall at ``threshold``, ROC-AUC, clean texts kept; per noise type, recall and
    ROC-AUC against the clean texts."""
    scored = [row for row in _texts(output, WEB) if row["score"] is not None]
    labelled = []
    for row in scored:
        found = (truth or {}).get((shard_id(row["shard"]), row["row"]))
        if found is not None and found.clean is not None:
            labelled.append((row["score"], not found.clean, found.noise_type))
    metrics: dict[str, Any] = {
        "threshold": threshold, "web_texts_scored": len(scored), "web_texts_with_truth": len(labelled),
        "roc_auc": None, "precision": None, "recall": None, "clean_kept": None, "by_noise_type": {},
    }
    if not labelled:
        return metrics
    probs = np.array([prob for prob, _, _ in labelled], dtype=np.float64)
    noisy = np.array([is_noisy for _, is_noisy, _ in labelled])
    types = np.array([noise_type or "" for _, _, noise_type in labelled])
    removed = probs < threshold

    def fraction(numerator: np.ndarray, denominator: np.ndarray) -> float | None:
        return float(numerator.sum() / denominator.sum()) if denominator.sum() else None

    metrics.update(
        roc_auc=roc_auc(1.0 - probs, noisy),
        precision=fraction(removed & noisy, removed),
        recall=fraction(removed & noisy, noisy),
        clean_kept=fraction(~removed & ~noisy, ~noisy),
        noisy=int(noisy.sum()),
        removed=int(removed.sum()),
    )
    for noise_type in sorted(set(types[noisy].tolist())):
        of_type = noisy & (types == noise_type)
        # Recall depends on the threshold; the AUC against clean texts says whether the filter ranks this kind
        # of noise below clean texts at all (0.5: no better than chance, whatever the threshold). It also
        # carries whatever else sets the type apart from clean texts (length, objects named).
        against_clean = of_type | ~noisy
        metrics["by_noise_type"][noise_type or "unknown"] = {
            "recall": fraction(removed & of_type, of_type),
            "roc_auc_vs_clean": roc_auc(1.0 - probs[against_clean], noisy[against_clean]),
            "count": int(of_type.sum()),
            "mean_itm_prob": float(probs[of_type].mean()),
        }
    return metrics


def captioner_metrics(output: CapFiltOutput, truth: dict[tuple[str, int], Truth] | None) -> dict[str, Any]:
    """Checker accuracy of every synthetic text and of the kept ones; distinct texts per captioned image."""
    from capfilt.data.world import Scene, check_caption

    rows = [row for row in _texts(output, SYNTHETIC) if row["text"] is not None]
    per_image: dict[tuple[str, int], set[str]] = {}
    for row in rows:
        per_image.setdefault((row["shard"], row["row"]), set()).add(row["text"])
    metrics: dict[str, Any] = {
        "synthetic_texts": len(rows),
        "synthetic_kept": sum(row["kept"] for row in rows),
        "distinct_captions_per_image": float(np.mean([len(t) for t in per_image.values()])) if per_image else None,
        "synthetic_caption_accuracy": None,
        "kept_synthetic_caption_accuracy": None,
    }
    scenes: dict[str, Scene] = {}  # parsed once per image
    judged = []
    for row in rows:
        found = (truth or {}).get((shard_id(row["shard"]), row["row"]))
        if found is None or found.scene is None:
            continue
        if found.scene not in scenes:
            scenes[found.scene] = Scene.from_json(found.scene)
        scene = scenes[found.scene]
        judged.append((bool(check_caption(row["text"], scene)), row["kept"]))
    if judged:
        metrics["synthetic_caption_accuracy"] = sum(ok for ok, _ in judged) / len(judged)
        kept = [ok for ok, was_kept in judged if was_kept]
        metrics["kept_synthetic_caption_accuracy"] = sum(kept) / len(kept) if kept else None
    return metrics


def capfilt_counts(output: CapFiltOutput) -> dict[str, Any]:
    """Rows in and their outcomes (from the manifest), kept texts by source (from the pairs)."""
    totals = (output.manifest or {}).get("totals", {})
    sources = output.pairs.column("source").to_pylist()
    return {
        "input_rows": totals.get("rows_in"),
        "kept": totals.get("kept"),
        "filtered": totals.get("filtered"),
        "rejected": totals.get("rejected"),
        "kept_texts": len(sources),
        "kept_by_source": {source: sources.count(source) for source in sorted(set(sources))},
        "reasons": totals.get("reasons", {}),
    }
