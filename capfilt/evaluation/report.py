"""metrics.json as text: models side by side like the BLIP paper's Table 1, then CapFilt's summary."""

from __future__ import annotations

from typing import Any

# (header, section, key); every value is printed x100, as the paper prints them.
COLUMNS = [
    ("TR@1", "retrieval", "i2t_r1"),
    ("TR@5", "retrieval", "i2t_r5"),
    ("IR@1", "retrieval", "t2i_r1"),
    ("IR@5", "retrieval", "t2i_r5"),
    ("B@4", "captioning", "bleu4"),
    ("CIDEr", "captioning", "cider"),
    ("Acc", "captioning", "caption_accuracy"),
]


def _number(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def format_table(metrics: dict[str, Any]) -> str:
    """One row per model, then the filter, captioner and CapFilt summaries where present."""
    models = metrics.get("models") or {}
    name_width = max([len("model"), *(len(name) for name in models)])
    widths = [max(len(header), 6) for header, _, _ in COLUMNS]
    lines = [
        "TR: image->text retrieval, IR: text->image (recall@K), B@4: BLEU-4, Acc: caption accuracy; all x100",
        "  ".join(["model".ljust(name_width), *(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths))]),
    ]
    for name, result in models.items():
        cells = [_number((result.get(section) or {}).get(key), 100.0).rjust(w) for (_, section, key), w in zip(COLUMNS, widths)]
        lines.append("  ".join([name.ljust(name_width), *cells]))

    rounds = metrics.get("rounds") or {"": metrics}
    for label, result in rounds.items():
        summary = _capfilt_lines(result, f"{label}: " if label else "")
        if summary:
            lines += ["", *summary]
    return "\n".join(lines)


def _capfilt_lines(metrics: dict[str, Any], prefix: str) -> list[str]:
    """The filter's, captioner's and CapFilt's summaries of one round."""
    lines = []
    filter_ = metrics.get("filter")
    if filter_:
        lines += [
            f"{prefix}filter: ROC-AUC {_number(filter_.get('roc_auc'), digits=3)}; "
            f"removing ITM < {filter_.get('threshold', 0.5)}: "
            f"precision {_number(filter_.get('precision'), digits=3)}, recall {_number(filter_.get('recall'), digits=3)}, "
            f"clean web texts kept {_number(filter_.get('clean_kept'), digits=3)}",
        ]
        by_type = filter_.get("by_noise_type") or {}
        if by_type:
            lines.append("  by noise type, recall / ROC-AUC against clean texts: " + ", ".join(
                f"{name} {_number(v.get('recall'), digits=2)} / {_number(v.get('roc_auc_vs_clean'), digits=2)} "
                f"(n={v.get('count')})" for name, v in by_type.items()))
    captioner = metrics.get("captioner")
    if captioner:
        lines.append(
            f"{prefix}captioner: synthetic caption accuracy {_number(captioner.get('synthetic_caption_accuracy'), digits=3)}"
            f" (kept: {_number(captioner.get('kept_synthetic_caption_accuracy'), digits=3)}), "
            f"distinct captions per image {_number(captioner.get('distinct_captions_per_image'), digits=2)}"
        )
    capfilt = metrics.get("capfilt")
    if capfilt:
        sources = ", ".join(f"{source} {count}" for source, count in (capfilt.get("kept_by_source") or {}).items())
        count = {key: "n/a" if capfilt.get(key) is None else capfilt[key]
                 for key in ("input_rows", "kept", "filtered", "rejected")}
        lines.append(
            f"{prefix}capfilt: {count['input_rows']} input rows: {count['kept']} kept, {count['filtered']} filtered, "
            f"{count['rejected']} rejected; kept texts by source: {sources or 'none'}"
        )
    return lines
