import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from capfilt.cli import main
from capfilt.config import ReportConfig
from capfilt.reporting.reader import OutputReader
from capfilt.reporting.report import UNSCORED, Sampler, build_report
from capfilt.reporting.texts import TABLE
from capfilt.reporting.thumbnails import SourceImages, fetch_thumbnails
from tests.reporting.browser import Browser, find_chromium

HOSTILE = '<script>alert(1)</script><img src="http://example.invalid/x.png" onerror="alert(2)">'


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.fail("Chromium is not installed; the report test needs it. Run `make test-tools` "
                    "(Debian/Ubuntu: apt-get install chromium).")
    return path


def _page_facts(browser: Browser) -> dict:
    return browser.evaluate("""(() => {
        const thumbs = Array.from(document.querySelectorAll('img.thumb'));
        return {
            thumbs: thumbs.length,
            broken: thumbs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
            non_data_images: Array.from(document.images).filter(i => !i.src.startsWith('data:image/')).length,
            scripts: document.scripts.length,
            histogram_bars: document.querySelectorAll('svg.histogram rect.bar').length,
            curves: document.querySelectorAll('svg.kept-fraction polyline').length,
            cards: document.querySelectorAll('#gallery figure.card').length,
            placeholders: Array.from(document.querySelectorAll('div.thumb.missing')).map(d => d.title),
            text: document.body.innerText,
        };
    })()""")


def test_report_renders_in_headless_chromium(capfilt_output, chromium, tmp_path):
    html = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", capfilt_output.path, "-o", str(html), "--samples-per-bucket", "6"])
    assert result.exit_code == 0, result.output
    assert "report: thumbnails" in result.output  # progress went to stderr (mixed in by CliRunner)
    source = html.read_text()
    assert "<script" not in source and not re.search(r'(src|href)="(?!data:|#)', source)

    with Browser(chromium) as browser:
        browser.open(html)
        facts = _page_facts(browser)
        errors = browser.errors()
        requests = browser.requests()
        shot = browser.screenshot(tmp_path / "report.png")
    assert errors == []
    assert all(url == html.resolve().as_uri() or url.startswith("data:") for url in requests), requests
    assert facts["thumbs"] > 0 and facts["broken"] == [] and facts["non_data_images"] == 0
    assert facts["scripts"] == 0
    assert facts["histogram_bars"] >= 2 and facts["curves"] == 3  # web, synthetic and all
    assert 0 < facts["cards"] <= 6 * 11
    # The world's failed download and undecodable rows are shown as rejects with a placeholder.
    assert "status: failed_to_download" in facts["text"] and "decode_error" in facts["text"]
    assert any("decode_error" in title for title in facts["placeholders"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.width == 1280 and image.height > 900


def test_hostile_captions_are_text_and_unreachable_shards_are_placeholders(capfilt_output, output_copy, chromium, tmp_path):
    reader = OutputReader(str(output_copy))
    first = reader.files("pairs")[0]
    pairs = pq.read_table(first)
    web = pairs["source"].to_pylist().index("web")
    texts = pairs["text"].to_pylist()
    texts[web] = HOSTILE
    shards = pairs["shard"].to_pylist()
    moved = shards[web]
    shards = ["/nonexistent/capfilt/00000.parquet" if s == moved else s for s in shards]
    pairs = pairs.set_column(pairs.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    pairs = pairs.set_column(pairs.schema.get_field_index("shard"), "shard", pa.array(shards, pa.string()))
    pq.write_table(pairs, first)

    html = tmp_path / "hostile.html"
    summary = build_report(str(output_copy), str(html), ReportConfig(samples_per_bucket=100))
    assert summary["thumbnails_missing"] >= 1
    with Browser(chromium) as browser:
        browser.open(html)
        facts = _page_facts(browser)
        errors = browser.errors()
    assert errors == [] and facts["scripts"] == 0 and facts["non_data_images"] == 0
    assert HOSTILE in facts["text"]  # shown as the text it is
    assert any("source shard unreachable" in title and "/nonexistent/capfilt" in title for title in facts["placeholders"])
    assert facts["broken"] == []


def test_sampling_is_stratified_bounded_and_concentrated_in_few_shards():
    rng = np.random.default_rng(0)
    n = 20_000
    shard = np.array([f"s3://bucket/{i:05d}.parquet" for i in rng.integers(0, 200, n)], dtype=object)
    score = rng.random(n) ** 3  # most images in the low buckets, few in the top one
    score[:50] = np.nan  # web text never scored
    texts = pa.table({TABLE: np.ones(n, np.int8), "source": ["web"] * n, "decision": ["itm_below_threshold"] * n,
                      "score": pa.array(score, from_pandas=True), "stage": ["filter"] * n, "shard": shard,
                      "row": np.arange(n)})
    config = ReportConfig(samples_per_bucket=5, buckets=10, seed=1)
    gallery = Sampler(texts, config).gallery()
    assert set(gallery) == set(range(10)) | {UNSCORED}
    buckets = np.where(np.isnan(score), UNSCORED, np.minimum(np.floor(np.nan_to_num(score) * 10), 9)).astype(int)
    picked_shards = set()
    for bucket, chosen in gallery.items():
        assert chosen["images"] == int((buckets == bucket).sum())
        assert len(chosen["web_texts"]) == min(5, chosen["images"])
        assert all(buckets[i] == bucket for i in chosen["web_texts"])
        picked_shards |= {shard[i] for i in chosen["web_texts"]}
    # Random images would touch ~55 shards; walking shards in order touches far fewer.
    assert len(picked_shards) < 25
    again = Sampler(texts, config).gallery()
    assert all(np.array_equal(again[b]["web_texts"], gallery[b]["web_texts"]) for b in gallery)


def _jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_source_images_from_parquet_tar_and_captions_file(tmp_path):
    images = [_jpeg(c) for c in ("red", "green", "blue")]
    pq.write_table(pa.table({"key": ["a", "b", "c"], "caption": ["x"] * 3, "jpg": images}), tmp_path / "s.parquet",
                   row_group_size=2)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, data in enumerate(images):
            for name, payload in ((f"{i:04d}.jpg", data), (f"{i:04d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for i, data in enumerate(images):
        (tmp_path / f"img{i}.jpg").write_bytes(data)
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(f"img{i}.jpg,c{i}\n" for i in range(3)))

    source = SourceImages()
    for shard in ("s.parquet", "s.tar", "captions.csv"):
        found = source.read(str(tmp_path / shard), [2, 0])
        assert found == {0: images[0], 2: images[2]}, shard

    thumbs = fetch_thumbnails([(str(tmp_path / "s.parquet"), 1), (str(tmp_path / "missing.parquet"), 0),
                               (str(tmp_path / "s.parquet"), 7)], size=16)
    good = thumbs[(str(tmp_path / "s.parquet"), 1)]
    assert good.data_uri.startswith("data:image/jpeg;base64,") and max(good.width, good.height) == 16
    assert "unreachable" in thumbs[(str(tmp_path / "missing.parquet"), 0)].problem
    assert "not found" in thumbs[(str(tmp_path / "s.parquet"), 7)].problem
    assert json.dumps([t.problem for t in thumbs.values()])  # plain strings, safe to show


def test_report_size_stays_bounded(capfilt_output, tmp_path):
    html = tmp_path / "small.html"
    summary = build_report(capfilt_output.path, str(html), ReportConfig(samples_per_bucket=1, max_rejects_per_reason=1,
                                                                      thumbnail_size=32))
    source = html.read_text()
    reasons = len(capfilt_output.manifest["totals"]["reasons"])
    assert source.count('<figure class="card">') <= 11
    assert source.count('<tr class="example">') == reasons  # one example per reason
    assert summary["images"] <= 11 + reasons and summary["bytes"] == html.stat().st_size < 200_000


def test_images_embedded_in_the_output_need_no_source_shard(output_copy, tmp_path):
    reader = OutputReader(str(output_copy))
    source = SourceImages()
    for path in reader.files("pairs"):
        pairs = pq.read_table(path)
        rows = pairs.select(["shard", "row"]).to_pylist()
        images = [source.read(r["shard"], [r["row"]])[r["row"]] if r["shard"] else None for r in rows]
        pairs = pairs.set_column(pairs.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
        gone = ["/nonexistent/" + Path(r["shard"]).name if r["shard"] else None for r in rows]
        pairs = pairs.set_column(pairs.schema.get_field_index("shard"), "shard", pa.array(gone, pa.string()))
        pq.write_table(pairs, path)
    record = json.loads((output_copy / "_capfilt.json").read_text())
    record["fingerprint"]["capfilt"]["embed_images"] = True
    (output_copy / "_capfilt.json").write_text(json.dumps(record))

    html = tmp_path / "embedded.html"
    build_report(str(output_copy), str(html), ReportConfig(samples_per_bucket=100))
    page = html.read_text()
    cards = page.count('<figure class="card">')
    assert cards > 0 and page.count('<figure class="card"><img class="thumb" src="data:image/jpeg;base64,') == cards
