"""``capfilt report``: one self-contained HTML page to calibrate the threshold and eyeball CapFilt's choices.

The page holds a summary, ITM histograms of web versus synthetic texts, the kept fraction as the
threshold varies, a gallery of images per bucket of their web text's score (each with its web and
synthetic captions, their scores and decisions), examples of every reject reason and the per-shard
accounting. Everything is inline (base64 JPEG thumbnails, CSS, SVG); there is no script and nothing is
fetched when the page is opened.

Size and time stay bounded whatever the output's size: one pass over a few light columns, then a
sample (``ReportConfig``) whose texts and images alone are read. Samples are drawn in one random order
that visits source shards one after another, so every bucket is filled from as few source shards as
possible and thumbnails cost a few shard reads, not one per image.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from html import escape
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.config import ReportConfig
from capfilt.reporting.charts import COLORS, histogram_svg, kept_fraction_svg
from capfilt.reporting.reader import FILE, ROW, OutputReader
from capfilt.reporting.texts import (
    KEPT,
    PAIRS,
    REJECTS,
    SCORED_SOURCES,
    TABLE,
    Scores,
    codes,
    load_texts,
    scores_by_source,
    value_counts,
)
from capfilt.reporting.thumbnails import Thumbnail, fetch_thumbnails

MAX_TEXT_CHARS = 400  # captions are untrusted: a megabyte of alt text must not become a megabyte of page
MAX_DETAIL_CHARS = 240
MAX_TEXTS_PER_IMAGE = 12  # CapFilt gives 1 + K per captioner; more would only mean a malformed output
UNSCORED = -1  # the bucket of images whose web text was never scored (missing, empty, excluded)


@dataclass
class Text:
    source: str
    decision: str
    score: float | None
    text: str | None
    captioner_id: str | None = None
    detail: str | None = None
    key: str | None = None


@dataclass
class Image:
    shard: str
    row: int
    key: str | None = None
    texts: list[Text] = field(default_factory=list)


def build_report(path: str, html_path: str, config: ReportConfig = ReportConfig(),
                 storage_options: dict[str, Any] | None = None,
                 progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Write the report on the output at ``path`` to ``html_path``; returns what was written."""
    started = time.time()
    progress(f"report: reading {path}")
    reader = OutputReader(path, storage_options)
    texts = load_texts(reader, extra=["shard", "row"])
    progress(f"report: {texts.num_rows:,} texts; sampling")
    sampler = Sampler(texts, config)
    gallery = sampler.gallery()
    reject_examples = sampler.reject_examples()
    chosen = sorted({i for bucket in gallery.values() for i in bucket["texts"]}
                    | {i for rows in reject_examples.values() for i in rows})
    details = _read_texts(reader, texts, np.asarray(chosen, dtype=np.int64))
    images = _images(texts, details, gallery)
    refs = {(img.shard, img.row) for bucket in images.values() for img in bucket}
    refs |= {(details[i].shard, details[i].row) for rows in reject_examples.values() for i in rows if details[i].shard}
    progress(f"report: {len(refs)} thumbnails from {len({shard for shard, _ in refs})} source shards")
    embedded = _embedded_images(reader, texts, refs) if reader.settings.get("embed_images") else {}
    thumbnails = fetch_thumbnails(refs, config.thumbnail_size, storage_options, known=embedded,
                                  progress=lambda message: progress(f"report: {message}"))
    page = Page(reader, texts, config, images, gallery, reject_examples, details, thumbnails).render()
    with open(html_path, "w", encoding="utf-8") as handle:
        handle.write(page)
    missing = sum(t.data_uri is None for t in thumbnails.values())
    progress(f"report: wrote {html_path} ({len(page.encode()) / 1e6:.2f} MB) in {time.time() - started:.1f}s")
    return {"path": html_path, "bytes": len(page.encode()), "images": len(refs), "thumbnails_missing": missing,
            "seconds": time.time() - started}


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


class Sampler:
    """Picks gallery images per score bucket and reject examples per reason, in one seeded order."""

    def __init__(self, texts: pa.Table, config: ReportConfig):
        self.texts, self.config = texts, config
        rng = np.random.default_rng(config.seed)
        shard_id, shards = codes(texts["shard"])
        rank = np.append(rng.permutation(len(shards)), len(shards))
        # Shard by shard (in a random shard order), randomly within a shard.
        self.order = np.lexsort((rng.random(texts.num_rows), rank[shard_id]))
        self.score = pc.fill_null(texts["score"], np.nan).to_numpy(zero_copy_only=False)
        self.image_id = shard_id.astype(np.int64) << 32 | pc.fill_null(texts["row"], 0).to_numpy().astype(np.int64)

    def bucket_of(self, scores: np.ndarray) -> np.ndarray:
        buckets = np.minimum(np.floor(np.nan_to_num(scores, nan=0.0) * self.config.buckets), self.config.buckets - 1)
        return np.where(np.isnan(scores), UNSCORED, buckets).astype(np.int64)

    def gallery(self) -> dict[int, dict[str, Any]]:
        """Per bucket: the number of images and the text indices of the sampled ones (web + synthetic)."""
        texts = self.texts
        is_web = pc.equal(texts["source"], "web").to_numpy(zero_copy_only=False)
        read_failure = pc.fill_null(pc.equal(texts["stage"], "read"), False).to_numpy(zero_copy_only=False)
        web = self.order[(is_web & ~read_failure)[self.order]]  # one web text per decoded web image
        buckets = self.bucket_of(self.score[web])
        chosen, out = [], {}
        for bucket in [*range(self.config.buckets), UNSCORED]:
            in_bucket = web[buckets == bucket]
            picked = in_bucket[: self.config.samples_per_bucket]
            chosen.append(picked)
            out[bucket] = {"images": int(in_bucket.size), "web_texts": picked, "texts": []}
        if not any(len(p) for p in chosen):
            return out
        # All web and synthetic texts of the chosen images.
        scored_source = pc.is_in(texts["source"], value_set=pa.array(SCORED_SOURCES)).to_numpy(zero_copy_only=False)
        wanted_ids = self.image_id[np.concatenate(chosen)]
        members = np.flatnonzero(np.isin(self.image_id, wanted_ids) & scored_source)
        bucket_of_image = {int(self.image_id[i]): b for b, bucket in out.items() for i in bucket["web_texts"]}
        for i in members:
            out[bucket_of_image[int(self.image_id[i])]]["texts"].append(int(i))
        return out

    def reject_examples(self) -> dict[str, list[int]]:
        """Per reject reason, up to ``max_rejects_per_reason`` text indices."""
        texts = self.texts
        is_reject = pc.equal(texts[TABLE], REJECTS)
        out = {}
        for reason in value_counts(texts["decision"].filter(is_reject)):
            same = pc.is_null(texts["decision"]) if reason == "null" else pc.equal(texts["decision"], reason)
            mask = pc.fill_null(pc.and_(same, is_reject), False).to_numpy(zero_copy_only=False)
            out[reason] = [int(i) for i in self.order[mask[self.order]][: self.config.max_rejects_per_reason]]
        return out


@dataclass
class TextDetail:
    text: str | None
    key: str | None
    detail: str | None
    captioner_id: str | None
    shard: str | None
    row: int | None


def _read_texts(reader: OutputReader, texts: pa.Table, indices: np.ndarray) -> dict[int, TextDetail]:
    """The heavy columns of the chosen texts, read from their row groups only."""
    out: dict[int, TextDetail] = {}
    table_of = texts[TABLE].to_numpy()
    for table, code, columns in (("pairs", PAIRS, ["text", "key", "captioner_id"]),
                                 ("rejects", REJECTS, ["text", "key", "detail", "captioner_id"])):
        picked = indices[table_of[indices] == code] if indices.size else indices
        if not picked.size:
            continue
        where = texts.select([FILE, ROW, "shard", "row"]).take(pa.array(picked))
        rows = reader.take(table, where[FILE].to_numpy(), where[ROW].to_numpy(), columns).to_pylist()
        for i, row, shard, source_row in zip(picked, rows, where["shard"].to_pylist(), where["row"].to_pylist()):
            out[int(i)] = TextDetail(row.get("text"), row.get("key"), row.get("detail"), row.get("captioner_id"),
                                     shard, source_row)
    return out


def _images(texts: pa.Table, details: dict[int, TextDetail], gallery: dict[int, dict]) -> dict[int, list[Image]]:
    """Gallery images per bucket, each with its texts: web first, then synthetic by score."""
    source = texts["source"]
    decision, score = texts["decision"], texts["score"]
    out: dict[int, list[Image]] = {}
    for bucket, chosen in gallery.items():
        by_ref: dict[tuple[str, int], Image] = {}
        for i in chosen["web_texts"]:
            d = details[int(i)]
            by_ref[(d.shard, d.row)] = Image(d.shard, d.row, d.key)
        for i in chosen["texts"]:
            d = details[i]
            image = by_ref.get((d.shard, d.row))
            if image is not None:
                image.texts.append(Text(source[i].as_py(), decision[i].as_py(), score[i].as_py(), d.text,
                                        d.captioner_id, d.detail, d.key))
        for image in by_ref.values():
            image.texts.sort(key=lambda t: (t.source != "web", -(t.score if t.score is not None else -1.0)))
        out[bucket] = list(by_ref.values())
    return out


def _embedded_images(reader: OutputReader, texts: pa.Table, refs: set[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    """Image bytes written into ``pairs`` (``embed_images``) for the wanted refs that have a pair row."""
    pairs = texts.filter(pc.equal(texts[TABLE], PAIRS)).select(["shard", "row", FILE, ROW])
    near = pc.and_(pc.is_in(pairs["shard"], value_set=pa.array(sorted({shard for shard, _ in refs}), pa.string())),
                   pc.is_in(pairs["row"], value_set=pa.array(sorted({row for _, row in refs}), pa.int64())))
    pairs = pairs.filter(pc.fill_null(near, False))  # a superset of the wanted refs, small
    position: dict[tuple[str, int], tuple[int, int]] = {}
    for shard, row, file, file_row in zip(*(pairs[name].to_pylist() for name in ("shard", "row", FILE, ROW))):
        if (shard, row) in refs:
            position.setdefault((shard, row), (file, file_row))
    if not position:
        return {}
    refs_found = list(position)
    files, rows = zip(*(position[ref] for ref in refs_found))
    images = reader.take("pairs", np.array(files), np.array(rows), ["image"])["image"].to_pylist()
    return {ref: data for ref, data in zip(refs_found, images) if data is not None}


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------

CSS = """
:root { --web: %(web)s; --synthetic: %(synthetic)s; --kept: #1a7f37; --dropped: #b42318; --muted: #667085; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2939; margin: 0; background: #f6f7f9; }
header { background: #1d2939; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .path { font-family: ui-monospace, monospace; opacity: .85; word-break: break-all; }
nav { padding: 8px 32px; background: #fff; border-bottom: 1px solid #e4e7ec; position: sticky; top: 0; z-index: 1; }
nav a { margin-right: 18px; color: #1d4ed8; text-decoration: none; }
main { padding: 8px 32px 40px; max-width: 1400px; }
section { background: #fff; border: 1px solid #e4e7ec; border-radius: 8px; padding: 4px 20px 16px; margin: 16px 0; }
h2 { font-size: 18px; margin: 14px 0 10px; }
h3 { font-size: 15px; margin: 18px 0 8px; }
h3 .count { color: var(--muted); font-weight: normal; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { text-align: left; padding: 3px 12px 3px 0; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid2 { display: flex; flex-wrap: wrap; gap: 8px 48px; align-items: flex-start; }
.problems { border-left: 4px solid var(--dropped); background: #fef3f2; padding: 8px 14px; margin: 10px 0; }
.ok { border-left: 4px solid var(--kept); background: #ecfdf3; padding: 8px 14px; margin: 10px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
svg.chart { background: #fff; max-width: 100%%; height: auto; }
svg .plot { fill: #fafafa; stroke: #d0d5dd; }
svg .grid { stroke: #eaecf0; }
svg .axis { stroke: #98a2b3; }
svg .tick { font-size: 11px; fill: #475467; }
svg .label { font-size: 12px; fill: #344054; }
svg .threshold { stroke: var(--dropped); stroke-dasharray: 4 3; stroke-width: 1.5; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 10px; }
.card { display: flex; gap: 10px; border: 1px solid #e4e7ec; border-radius: 6px; padding: 8px; margin: 0; background: #fcfcfd; }
.thumb { width: %(size)dpx; height: %(size)dpx; flex: none; object-fit: contain; background: #eaecf0; border-radius: 4px; }
div.thumb { display: flex; align-items: center; justify-content: center; text-align: center; font-size: 11px;
            color: var(--muted); padding: 4px; overflow: hidden; }
.card figcaption { min-width: 0; flex: 1; }
.meta { font-family: ui-monospace, monospace; font-size: 11px; color: var(--muted); word-break: break-all; }
ul.texts { list-style: none; padding: 0; margin: 4px 0 0; }
ul.texts li { margin: 3px 0; padding-left: 8px; border-left: 3px solid var(--dropped); }
ul.texts li.kept { border-left-color: var(--kept); }
.src { display: inline-block; font-size: 10px; text-transform: uppercase; color: #fff; border-radius: 3px; padding: 0 4px; }
.src.web { background: var(--web); } .src.synthetic { background: var(--synthetic); } .src.human { background: #7a5af8; }
.score { font-variant-numeric: tabular-nums; font-weight: 600; }
.badge { font-size: 11px; color: var(--dropped); } li.kept .badge { color: var(--kept); }
.caption { word-break: break-word; }
.none { color: var(--muted); font-style: italic; }
table.rejects td { border-top: 1px solid #f2f4f7; padding-top: 6px; }
table.rejects .thumb { width: %(small)dpx; height: %(small)dpx; }
"""


def _text(value: Any, limit: int = MAX_TEXT_CHARS) -> str:
    if value is None:
        return '<span class="none">(none)</span>'
    value = str(value)
    if len(value) > limit:
        value = value[:limit] + f"… ({len(value):,} chars)"
    return escape(value)


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _bucket_label(bucket: int, buckets: int) -> str:
    if bucket == UNSCORED:
        return "web text not scored"
    return f"web-text ITM {bucket / buckets:.2f} – {(bucket + 1) / buckets:.2f}"


class Page:
    def __init__(self, reader: OutputReader, texts: pa.Table, config: ReportConfig, images: dict[int, list[Image]],
                 gallery: dict[int, dict], reject_examples: dict[str, list[int]], details: dict[int, TextDetail],
                 thumbnails: dict[tuple[str, int], Thumbnail]):
        self.reader, self.texts, self.config = reader, texts, config
        self.images, self.gallery, self.reject_examples = images, gallery, reject_examples
        self.details, self.thumbnails = details, thumbnails
        self.statuses = reader.shard_statuses()
        self.threshold = reader.settings.get("threshold")
        self.scores = Scores(scores_by_source(texts))

    def render(self) -> str:
        css = CSS % {"web": COLORS["web"], "synthetic": COLORS["synthetic"], "size": self.config.thumbnail_size,
                     "small": max(self.config.thumbnail_size * 2 // 3, 16)}
        generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        sections = [self.summary(), self.score_charts(), self.gallery_section(), self.rejects_section(), self.shards_section()]
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>CapFilt report: {escape(self.reader.url)}</title><style>{css}</style></head><body>"
            f'<header><h1>CapFilt report</h1><div class="path">{escape(self.reader.url)}</div>'
            f"<div>generated {generated} by capfilt report</div></header>"
            '<nav><a href="#summary">Summary</a><a href="#scores">Scores</a><a href="#gallery">Gallery</a>'
            '<a href="#rejects">Rejects</a><a href="#shards">Shards</a></nav>'
            f"<main>{''.join(sections)}</main></body></html>\n"
        )

    # -- sections ----------------------------------------------------------------------------

    def summary(self) -> str:
        reader, texts = self.reader, self.texts
        settings = reader.settings
        manifest = reader.manifest or {}
        totals = reader.totals(self.statuses)
        problems = reader.problems(self.statuses)
        models = manifest.get("models") or reader.fingerprint.get("fingerprint", {}).get("models", {})
        about = [
            ("status", "finished" if reader.finished else "NOT FINISHED"),
            ("config hash", reader.fingerprint.get("hash")),
            ("threshold", f"{self.threshold} ({settings.get('keep_policy')}"
                          + (f", best {settings.get('best_n')})" if settings.get("keep_policy") == "best_n" else ")")),
            ("captioners", ", ".join(m.get("id", "?") for m in models.get("captioners", [])) or "–"),
            ("filters", ", ".join(m.get("id", "?") for m in models.get("filters", [])) or "–"),
            ("sampling", manifest.get("sampling") or "–"),
            ("round", settings.get("round")),
        ]
        rows_table = [(name, totals.get(name)) for name in
                      ("rows_in", "kept", "filtered", "rejected", "images_decoded", "texts_scored", "texts_kept",
                       "texts_dropped")]
        pairs = texts.filter(pc.equal(texts[TABLE], PAIRS))
        rejects = texts.filter(pc.equal(texts[TABLE], REJECTS))
        html = ['<section id="summary"><h2>Summary</h2>']
        if problems:
            shown = problems[:50]
            html.append('<div class="problems"><strong>Problems</strong><ul>'
                        + "".join(f"<li>{_text(p, MAX_DETAIL_CHARS)}</li>" for p in shown)
                        + (f"<li>… {len(problems) - len(shown)} more</li>" if len(problems) > len(shown) else "")
                        + "</ul></div>")
        else:
            html.append('<div class="ok">Finished; every input shard committed and reconciled.</div>')
        html.append('<div class="grid2">')
        html.append("<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{_text(v)}</td></tr>" for k, v in about) + "</table>")
        html.append('<table><tr><th>images (input rows)</th><th class="num">count</th></tr>'
                    + "".join(f'<tr><td>{escape(k)}</td><td class="num">{"–" if v is None else f"{v:,}"}</td></tr>'
                              for k, v in rows_table) + "</table>")
        html.append(_count_table("kept texts by source", value_counts(pairs["source"]), pairs.num_rows))
        html.append(_count_table("dropped texts and rejected rows by reason", value_counts(rejects["decision"]),
                                 rejects.num_rows))
        html.append("</div></section>")
        return "".join(html)

    def score_charts(self) -> str:
        by_source = self.scores.by_source
        thresholds = np.round(np.linspace(0, 1, 101), 2)
        curves = self.scores.kept_fractions(thresholds.tolist())
        series = {name: [row[name] for row in curves] for name in (*by_source, "all")}
        quantile_rows = "".join(
            f'<tr><td><span class="src {escape(source)}">{escape(source)}</span></td><td class="num">{s["count"]:,}</td>'
            + "".join(f'<td class="num">{_score(v)}</td>' for v in s["quantiles"].values()) + "</tr>"
            for source, s in self.scores.summary().items())
        labels = next(iter(self.scores.summary().values()))["quantiles"].keys()
        table_rows = self.scores.kept_fractions()
        kept_rows = "".join(
            f'<tr><td>{name}</td>'
            + "".join(f'<td class="num">{"–" if r[name] is None else f"{r[name]:.0%}"}</td>' for r in table_rows)
            + "</tr>" for name in (*by_source, "all"))
        return (
            '<section id="scores"><h2>ITM match probability</h2>'
            "<p>Every scored text, kept or dropped: the web caption and the synthetic captions of each decoded image.</p>"
            '<table><tr><th>source</th><th class="num">texts</th>'
            + "".join(f'<th class="num">{escape(label)}</th>' for label in labels) + f"</tr>{quantile_rows}</table>"
            + '<div class="charts">'
            + histogram_svg(by_source, self.config.histogram_bins, self.threshold)
            + kept_fraction_svg(thresholds, series, self.threshold)
            + "</div><h3>Kept fraction if the threshold were</h3>"
            + '<table><tr><th></th>' + "".join(f'<th class="num">{r["threshold"]}</th>' for r in table_rows) + "</tr>"
            + kept_rows + "</table></section>"
        )

    def gallery_section(self) -> str:
        html = ['<section id="gallery"><h2>Gallery by web-text score</h2>'
                f"<p>Up to {self.config.samples_per_bucket} images per bucket of their web caption's ITM probability, "
                "each with its web and synthetic captions (green: kept, red: dropped, with the reason).</p>"]
        for bucket, chosen in self.gallery.items():
            if chosen["images"] == 0:
                continue
            images = self.images.get(bucket, [])
            html.append(f'<h3>{escape(_bucket_label(bucket, self.config.buckets))} '
                        f'<span class="count">· {chosen["images"]:,} images, {len(images)} shown</span></h3><div class="cards">')
            for image in images:
                html.append(self.card(image))
            html.append("</div>")
        if all(chosen["images"] == 0 for chosen in self.gallery.values()):
            html.append('<p class="none">No decoded web images in this output.</p>')
        html.append("</section>")
        return "".join(html)

    def card(self, image: Image) -> str:
        items = []
        for t in image.texts[:MAX_TEXTS_PER_IMAGE]:
            kept = t.decision == KEPT
            items.append(
                f'<li class="{"kept" if kept else "dropped"}"><span class="src {escape(t.source)}">{escape(t.source)}</span> '
                f'<span class="score">{_score(t.score)}</span> <span class="badge">{escape(t.decision or "")}</span><br>'
                f'<span class="caption">{_text(t.text)}</span></li>')
        if len(image.texts) > MAX_TEXTS_PER_IMAGE:
            items.append(f'<li class="none">… {len(image.texts) - MAX_TEXTS_PER_IMAGE:,} more texts</li>')
        return (f'<figure class="card">{self.thumbnail(image.shard, image.row, image.key)}<figcaption>'
                f'<div class="meta">{escape(str(image.key))} · {escape(_short_shard(image.shard))}:{image.row}</div>'
                f'<ul class="texts">{"".join(items)}</ul></figcaption></figure>')

    def thumbnail(self, shard: str | None, row: int | None, key: str | None) -> str:
        thumb = self.thumbnails.get((shard, row)) if shard is not None else None
        if thumb is not None and thumb.data_uri:
            return (f'<img class="thumb" src="{thumb.data_uri}" width="{thumb.width}" height="{thumb.height}" '
                    f'alt="image {escape(str(key))}" loading="eager">')
        problem = thumb.problem if thumb is not None else "no image reference"
        short = problem.split(" (", 1)[0]  # the reason; the detail is in the tooltip
        return f'<div class="thumb missing" title="{escape(problem)}">no image:<br>{_text(short, 60)}</div>'

    def rejects_section(self) -> str:
        counts = value_counts(self.texts["decision"].filter(pc.equal(self.texts[TABLE], REJECTS)))
        html = ['<section id="rejects"><h2>Rejects by reason</h2>']
        if not counts:
            html.append('<p class="none">Nothing was rejected.</p>')
        source, stage, score = self.texts["source"], self.texts["stage"], self.texts["score"]
        for reason, count in counts.items():
            examples = self.reject_examples.get(reason, [])
            html.append(f'<h3>{escape(reason)} <span class="count">· {count:,}, {len(examples)} shown</span></h3>'
                        '<table class="rejects"><tr><th>image</th><th>key</th><th>source</th><th>stage</th>'
                        '<th class="num">score</th><th>text</th><th>detail</th></tr>')
            for i in examples:
                d = self.details[i]
                html.append(
                    f'<tr class="example"><td>{self.thumbnail(d.shard, d.row, d.key)}</td>'
                    f'<td class="meta">{escape(str(d.key))}<br>{escape(_short_shard(d.shard))}:{d.row}</td>'
                    f'<td><span class="src {escape(str(source[i].as_py()))}">{escape(str(source[i].as_py()))}</span></td>'
                    f"<td>{_text(stage[i].as_py())}</td><td class=\"num\">{_score(score[i].as_py())}</td>"
                    f'<td class="caption">{_text(d.text)}</td><td class="caption">{_text(d.detail, MAX_DETAIL_CHARS)}</td></tr>')
            html.append("</table>")
        html.append("</section>")
        return "".join(html)

    def shards_section(self) -> str:
        statuses = sorted(self.statuses, key=lambda s: not s.problems)
        listed = [s for i, s in enumerate(statuses) if s.problems or i < self.config.max_shards_listed]
        html = [f'<section id="shards"><h2>Shards</h2><p>{len(self.statuses):,} input shards, '
                f"{sum(s.committed for s in self.statuses):,} committed, "
                f"{sum(bool(s.problems) for s in self.statuses):,} with problems.</p>"
                '<table><tr><th>shard</th><th>role</th><th class="num">rows in</th><th class="num">kept</th>'
                '<th class="num">filtered</th><th class="num">rejected</th><th>reconciles</th><th>problems</th></tr>']
        for s in listed:
            c = s.as_dict()
            html.append(f'<tr><td class="meta">{escape(s.shard)}</td><td>{_text(s.role)}</td>'
                        + "".join(f'<td class="num">{"–" if c[n] is None else f"{c[n]:,}"}</td>'
                                  for n in ("rows_in", "kept", "filtered", "rejected"))
                        + f'<td>{"–" if s.reconciles is None else ("yes" if s.reconciles else "<strong>NO</strong>")}</td>'
                        f'<td>{"; ".join(_text(p, MAX_DETAIL_CHARS) for p in s.problems)}</td></tr>')
        html.append("</table>")
        if len(listed) < len(self.statuses):
            html.append(f"<p>… {len(self.statuses) - len(listed):,} more shards, all committed and reconciled.</p>")
        libraries = (self.reader.manifest or {}).get("libraries")
        if libraries:
            html.append('<p class="meta">' + escape(", ".join(f"{k} {v}" for k, v in sorted(libraries.items()))) + "</p>")
        html.append("</section>")
        return "".join(html)


def _count_table(title: str, counts: dict[str, int], total: int) -> str:
    rows = "".join(f'<tr><td>{escape(name)}</td><td class="num">{count:,}</td><td class="num">{count / total:.1%}</td></tr>'
                   for name, count in counts.items()) if total else '<tr><td class="none" colspan="3">none</td></tr>'
    return f'<table><tr><th>{escape(title)}</th><th class="num">{total:,}</th><th></th></tr>{rows}</table>'


def _short_shard(shard: str | None) -> str:
    """The last two path parts, enough to tell shards apart on a card."""
    return "/".join(str(shard).rstrip("/").split("/")[-2:]) if shard else "?"
