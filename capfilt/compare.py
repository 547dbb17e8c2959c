"""Several variants of one pipeline, run side by side, in one table: BLIP's ablations as a command.

A comparison file names a base pipeline and rows; each row is the base with a few keys overridden
(merged section by section; ``null`` removes a section)::

    name: paper
    base: demo.yaml                  # relative to this file
    rows:
      noisy: {capfilt: null}         # no CapFilt: the noisy MED alone
      filter: {capfilt: {sampling: {num_captions: 0}}}
      both: {}

Each row is a normal ``capfilt run`` in ``<run_dir>/<row>``. Rows share what they can: a stage already
complete in an earlier row's directory with the same identity and inputs is reused from there
(:func:`capfilt.runner.run_pipeline`'s ``reuse_from``), so the noisy pretraining runs once. A row's
minutes are those of every stage it needed, reused ones included: what the row costs on its own.
The table goes to ``<run_dir>/table.md`` and ``table.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import fsspec
from pydantic import Field

from capfilt.config import (
    ConfigError,
    PipelineConfig,
    Section,
    is_comparison_data,
    read_yaml_mapping,
    validate_pipeline,
    validation_problems,
)

TABLE_MD, TABLE_JSON = "table.md", "table.json"

# (header, where in metrics.json, scale shown in Markdown, digits); rows read their last model and last
# round. table.json holds the values as metrics.json does (fractions), minutes in minutes.
COLUMNS = [
    ("TR@1", ("model", "retrieval", "i2t_r1"), 100.0, 1),
    ("IR@1", ("model", "retrieval", "t2i_r1"), 100.0, 1),
    ("BLEU-4", ("model", "captioning", "bleu4"), 100.0, 1),
    ("CIDEr", ("model", "captioning", "cider"), 100.0, 1),
    ("caption acc", ("model", "captioning", "caption_accuracy"), 100.0, 1),
    ("filter AUC", ("round", "filter", "roc_auc"), 1.0, 3),
    ("synthetic acc", ("round", "captioner", "synthetic_caption_accuracy"), 1.0, 3),
    ("pairs kept", ("round", "capfilt", "kept_texts"), 1.0, 0),
    ("minutes", ("seconds", "total"), 1.0, 1),
]


class ComparisonConfig(Section):
    name: str = "comparison"
    base: str = Field(description="the pipeline YAML every row starts from; relative paths: to this file's folder")
    run_dir: str | None = Field(None, description="rows go to <run_dir>/<row>; None: runs/<name> under the cwd")
    rows: dict[str, dict[str, Any]] = Field(
        description="row name -> keys of the base pipeline to override (sections merged; null removes a section)",
        min_length=1,
    )


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on ``base``, mappings merged key by key; ``None`` deletes a key."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def is_comparison(path: str) -> bool:
    """Whether ``path`` holds a comparison (base and rows) rather than a pipeline; False when unreadable."""
    try:
        return is_comparison_data(read_yaml_mapping(path))
    except ConfigError:
        return False  # load_pipeline reports it


def load_comparison(path: str) -> tuple[ComparisonConfig, dict[str, PipelineConfig]]:
    """The comparison file and each row's validated pipeline; errors name the file, row and key."""
    from pydantic import ValidationError

    try:
        comparison = ComparisonConfig.model_validate(read_yaml_mapping(path))
    except ValidationError as error:
        problems = validation_problems(error)
        raise ConfigError(f"{path}: {len(problems)} invalid key(s):\n" + "\n".join(problems)) from None
    base_path = comparison.base
    if "://" not in base_path and not os.path.isabs(base_path) and "://" not in path:
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base_path)
    base = read_yaml_mapping(base_path)
    validate_pipeline(base, base_path)  # the base's own errors name the base file
    pipelines = {}
    for row, override in comparison.rows.items():
        try:
            pipelines[row] = PipelineConfig.model_validate(merge(base, override))
        except ValidationError as error:
            problems = "\n".join(validation_problems(error, prefix=f"rows.{row}."))
            raise ConfigError(f"{path}: row {row!r} does not give a valid pipeline:\n{problems}") from None
    return comparison, pipelines


def run_comparison(path: str, run_dir: str | None = None, log: Callable[[str], None] = print,
                   reuse_from: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Run every row (Ray already initialised), then write and return the table. Stages are reused from
    earlier rows, then from the ``reuse_from`` run directories."""
    from capfilt.runner import plan, run_pipeline

    comparison, pipelines = load_comparison(path)
    for row, pipeline in pipelines.items():
        try:
            plan(pipeline)
        except ValueError as error:
            raise ConfigError(f"{path}: row {row!r}: {error}") from None
        if pipeline.evaluate is None:
            raise ConfigError(f"{path}: row {row!r} has no evaluate section: a comparison compares metrics")
    root = run_dir or comparison.run_dir or os.path.join("runs", comparison.name)
    if "://" not in root:
        root = os.path.abspath(root)
    root = root.rstrip("/")
    done: list[str] = []
    for row, pipeline in pipelines.items():
        log(f"== row {row} ==")
        # Earlier rows first, most recent first: a stage is taken from the row it was made in.
        run_pipeline(pipeline, f"{root}/{row}", log=log, reuse_from=[*(f"{root}/{name}" for name in reversed(done)), *reuse_from])
        done.append(row)
    table = read_table(root, list(pipelines))
    fs, local = fsspec.core.url_to_fs(root)
    fs.pipe_file(f"{local}/{TABLE_JSON}", json.dumps(table, indent=2, sort_keys=True).encode())
    fs.pipe_file(f"{local}/{TABLE_MD}", format_markdown(table).encode())
    log(format_markdown(table))
    log(f"table: {root}/{TABLE_MD}, {root}/{TABLE_JSON}")
    return table


def read_table(root: str, rows: list[str]) -> dict[str, Any]:
    """One entry per row from its metrics.json: its last model (bootstrapped, else noisy) and last round."""
    fs, local = fsspec.core.url_to_fs(root)
    table: dict[str, Any] = {"columns": [header for header, *_ in COLUMNS], "rows": {}}
    for row in rows:
        metrics = json.loads(fs.cat_file(f"{local}/{row}/metrics.json"))
        models = metrics.get("models") or {}
        model = "bootstrapped" if "bootstrapped" in models else "noisy" if "noisy" in models else None
        rounds = metrics.get("rounds") or {}
        last_round = rounds[list(rounds)[-1]] if rounds else metrics
        sources = {"model": models.get(model) or {}, "round": last_round, "seconds": metrics.get("seconds") or {}}
        values = {}
        for header, (source, *keys), _, _ in COLUMNS:
            value: Any = sources[source]
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            values[header] = value / 60 if header == "minutes" and value is not None else value
        table["rows"][row] = {"model": model, "rounds": max(len(rounds), 1 if metrics.get("capfilt") else 0),
                              "values": values}
    return table


def format_markdown(table: dict[str, Any]) -> str:
    scales = {header: (scale, digits) for header, _, scale, digits in COLUMNS}
    lines = ["| row | " + " | ".join(table["columns"]) + " |", "|---|" + "---:|" * len(table["columns"])]
    for row, entry in table["rows"].items():
        cells = []
        for header in table["columns"]:
            value = entry["values"].get(header)
            scale, digits = scales[header]
            cells.append("n/a" if value is None else f"{value * scale:.{digits}f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "TR@1/IR@1: image->text / text->image recall@1 on the test split; BLEU-4, CIDEr, caption acc "
              "(the world's checker): the row's captions of the test images, beam search; all x100. filter AUC, "
              "synthetic acc (of every synthetic caption) and pairs kept (texts, human ones included): the row's "
              "last CapFilt round. minutes: every stage the row needs, shared ones included."]
    return "\n".join(lines) + "\n"
