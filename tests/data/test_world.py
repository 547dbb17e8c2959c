"""The generated world: checker verdicts, generated captions, and the img2dataset layout."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from capfilt.config import NoiseFractions, WorldConfig
from capfilt.data.world import (
    NOISE_TYPES,
    Background,
    Scene,
    SceneObject,
    check_caption,
    compute_key,
    encode_jpeg,
    human_captions,
    noise_counts,
    parse_caption,
    render,
    sample_scene,
    web_pair,
    write_shard,
    write_world,
)
from capfilt.data.world.lexicon import COLOUR_OF, PATTERN_OF, RELATION_OF_PHRASE, SHAPE_OF, SHAPE_OF_PLURAL
from capfilt.data.world.scene import COLOURS

# A large red circle and a small blue square on the top row; two small green triangles on the bottom
# row (bottom-left and bottom-right); a striped white background.
SCENE = Scene(
    (
        SceneObject("circle", "red", "large", 0, 0),
        SceneObject("square", "blue", "small", 0, 2),
        SceneObject("triangle", "green", "small", 2, 0),
        SceneObject("triangle", "green", "small", 2, 2),
    ),
    Background("striped", "white"),
)

TRUE_CAPTIONS = [
    "a large red circle left of a small blue square on a striped background",
    "A large crimson circle is positioned to the left of a little blue square.",
    "a picture of a red circle",
    "a picture of a red circle!!!",
    "Photo of red circle and blue square",
    "RED CIRCLE, BLUE SQUARE, STRIPED BACKGROUND",
    "two green triangles below a red circle",
    "2 green triangles",
    "green triangles",
    "The two small green triangles are beneath the large red circle.",
    "A small blue square is to the right of a large red circle, and two green triangles are below the red disc.",
    "On a striped white backdrop, there is a red disc.",
    "a blue square on a white background",
    "a green triangle left of a green triangle",
    "a red circle above a green triangle",
    "There is a big scarlet circle over two tiny emerald triangles against a lined white backdrop.",
    "one red circle",
    "a red circle with a blue square",
]

FALSE_CAPTIONS = {
    # one attribute wrong
    "a large blue circle left of a small blue square": "missing",
    "a large red square left of a small blue square": "missing",
    "a small red circle left of a small blue square": "missing",
    "a large red circle left of a large blue square": "missing",
    # relation flipped, or not true of every member
    "a red circle right of a blue square": "relation",
    "a small blue square is to the left of a large red circle": "relation",
    "two green triangles above a red circle": "relation",
    "two green triangles left of a blue square": "relation",
    # missing / extra object
    "a red circle and a yellow star": "missing",
    "a purple cross": "missing",
    # counts
    "three green triangles": "count",
    "two red circles": "count",
    "one green triangle": "count",
    "red circles": "count",
    "a red circle and a red circle": "too few distinct",
    # background
    "a red circle on a dotted background": "background",
    "a red circle on a black background": "background",
    # boilerplate, vague, background only, empty
    "IMG_2041.jpg": "unparsable",
    "click to enlarge": "unparsable",
    "stock photo": "unparsable",
    "image": "unparsable",
    "some shapes": "unparsable",
    "abstract picture": "unparsable",
    "shapes on a striped background": "vague",
    "a red shape": "vague",
    "a striped background": "no_object",
    "": "no_object",
    "a picture of": "no_object",
    # truncated
    "a red": "unparsable",
    "a red circle left of": "unparsable",
    "red circle and": "unparsable",
    "a large red circle left of a small": "unparsable",
    "a red circle left of a blue...": "unparsable",
    # repeated words and other garbled output
    "a red red circle": "unparsable",
    "a red circle circle": "unparsable",
    "a a red circle": "unparsable",
    "red circle left of left of blue square": "unparsable",
    "two red circle": "unparsable",
    "a green triangles": "unparsable",
    "circle red a": "unparsable",
    "a red circle blue square": "unparsable",
    "a red circle next to a blue square": "unparsable",
    "a red circle on a striped background on a white background": "unparsable",
}


@pytest.mark.parametrize("caption", TRUE_CAPTIONS)
def test_checker_accepts_true_captions(caption):
    result = check_caption(caption, SCENE)
    assert result.accurate, (caption, result.reason)
    assert result.reason == "ok" and 0 < result.coverage <= 1


@pytest.mark.parametrize("caption,reason", sorted(FALSE_CAPTIONS.items()))
def test_checker_rejects_false_captions(caption, reason):
    result = check_caption(caption, SCENE)
    assert not result, caption
    assert result.reason.startswith(reason), (caption, result.reason)


def test_checker_reads_the_scene_json_and_reports_coverage():
    assert check_caption("a red circle", SCENE.to_json()).coverage == pytest.approx(0.25)
    assert check_caption("a red circle left of a blue square above two green triangles", SCENE).coverage == 1.0
    assert not check_caption(None, SCENE)
    claims = parse_caption("a picture of two small green triangles right of the red circle on a white background")
    assert [m.count for m in claims.mentions] == [2, 1] and claims.mentions[1].definite
    assert claims.relations == ((0, "right", 1),) and claims.tint == "white" and claims.pattern is None


def test_checker_never_crashes_on_word_soup():
    words = list(COLOUR_OF) + list(SHAPE_OF) + list(SHAPE_OF_PLURAL) + list(PATTERN_OF)
    words += [" ".join(phrase) for phrase in RELATION_OF_PHRASE] + "a the two 3 and , with is there background .".split()
    rng = random.Random(0)
    verdicts = set()
    for _ in range(2000):
        caption = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        verdicts.add(check_caption(caption, SCENE).accurate)
    assert verdicts == {True, False}


def test_scene_json_round_trip_and_bad_json():
    rng = random.Random(1)
    for _ in range(20):
        scene = sample_scene(rng, 1, 4, 0.5)
        assert Scene.from_json(scene.to_json()) == scene
    with pytest.raises(ValueError, match="not a scene JSON"):
        Scene.from_json('{"objects": []}')
    shared_cell = SCENE.to_json().replace('"col":2,', '"col":0,', 1)
    with pytest.raises(ValueError, match="shares a cell"):
        Scene.from_json(shared_cell)


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_every_generated_web_caption_is_judged_by_its_noise_type(noise_type):
    rng = random.Random(f"test/{noise_type}")
    captions = set()
    for _ in range(60):
        scene, caption = web_pair(noise_type, rng)
        assert bool(check_caption(caption, scene)) == (noise_type == "clean"), (noise_type, caption, scene)
        captions.add(caption)
    assert len(captions) > (10 if noise_type in ("boilerplate", "vague") else 30)  # varied, not one template


def test_human_captions_are_true_distinct_and_phrased_differently_from_web():
    rng = random.Random(2)
    human_words, web_words = set(), set()
    for _ in range(80):
        scene = sample_scene(rng, 1, 3, 0.3)
        captions = human_captions(scene, rng, 5)
        assert len(captions) == 5
        for caption in captions:
            assert check_caption(caption, scene), (caption, scene)
            human_words.update(caption.lower().rstrip(".").split())
        web_words.update(web_pair("clean", rng)[1].lower().split())
    assert {"crimson", "to", "positioned", "backdrop"} <= human_words
    assert not {"crimson", "positioned", "backdrop"} & web_words


def test_rendered_objects_are_visible_at_64_px():
    rng = random.Random(3)
    for _ in range(30):
        scene = sample_scene(rng, 1, 3, 0.3)
        image = Image.open(io.BytesIO(encode_jpeg(render(scene, 64)))).convert("RGB")
        assert image.size == (64, 64)
        for obj in scene.objects:
            x = int(((obj.col + 0.5) / 3 + obj.dx) * 64)
            y = int(((obj.row + 0.5) / 3 + obj.dy) * 64)
            pixel = image.getpixel((x, y))
            assert sum(abs(a - b) for a, b in zip(pixel, COLOURS[obj.colour])) < 90, (obj, pixel)


# --------------------------------------------------------------------------------------------------
# Written shards
# --------------------------------------------------------------------------------------------------

SMALL = dict(num_web=140, num_human=12, num_test=6, image_size=64, rows_per_shard=50, failed_rows=2, corrupt_rows=2)
IMG2DATASET_COLUMNS = [
    ("caption", pa.string()),
    ("url", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
    ("jpg", pa.binary()),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    config = WorldConfig(**SMALL)
    return config, write_world(config, str(tmp_path_factory.mktemp("world")))


def _read(paths):
    return pa.concat_tables([pq.read_table(path) for path in paths])


def test_keys_follow_img2dataset():
    # img2dataset.downloader.compute_key with oom_sample_per_shard = ceil(log10(number_sample_per_shard)).
    assert compute_key(42, 1, 10_000) == "000010042"
    assert compute_key(7, 3, 1000) == "00003007"
    assert compute_key(9, 0, 50) == "0000009"


def test_layout_matches_img2dataset(world):
    config, paths = world
    assert [p.rsplit("/", 1)[1] for p in paths.shards["web"]] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    for split in ("web", "human", "test"):
        for shard_id, path in enumerate(paths.shards[split]):
            table = pq.read_table(path)
            tail = [(f.name, f.type) for f in table.schema][-len(IMG2DATASET_COLUMNS) :]
            assert tail == IMG2DATASET_COLUMNS
            rows = table.to_pylist()
            assert len(rows) == min(config.rows_per_shard, {"web": 140, "human": 12, "test": 6}[split] - shard_id * 50)
            assert [r["key"] for r in rows] == [compute_key(i, shard_id, config.rows_per_shard) for i in range(len(rows))]
            stats = json.loads(open(path.replace(".parquet", "_stats.json")).read())
            assert stats["count"] == len(rows)
            assert stats["successes"] == sum(r["status"] == "success" for r in rows)
            for row in rows:
                if row["status"] == "failed_to_download":
                    assert row["jpg"] is None and row["sha256"] is None and row["error_message"]
                    continue
                assert row["status"] == "success" and row["error_message"] is None
                assert hashlib.sha256(row["jpg"]).hexdigest() == row["sha256"]
                if row["gt_image_status"] == "ok":
                    image = Image.open(io.BytesIO(row["jpg"]))
                    assert image.format == "JPEG" and image.size == (row["width"], row["height"]) == (64, 64)
                else:
                    with pytest.raises(OSError):
                        Image.open(io.BytesIO(row["jpg"])).load()


def test_noise_and_faults_are_as_configured(world):
    config, paths = world
    web = _read(paths.shards["web"]).to_pylist()
    counts = {name: sum(r["gt_noise_type"] == name for r in web) for name in NOISE_TYPES}
    assert counts == noise_counts(config)
    fractions = {"clean": config.noise.clean, **config.noise.model_dump()}
    for name, count in counts.items():
        assert abs(count - fractions[name] * config.num_web) <= 1
    assert sum(r["gt_clean"] for r in web) == counts["clean"]
    assert sum(r["gt_image_status"] == "failed" for r in web) == config.failed_rows
    assert sum(r["gt_image_status"] == "corrupt" for r in web) == config.corrupt_rows
    manifest = json.loads(open(paths.manifest).read())
    assert manifest["splits"]["web"]["noise_counts"] == counts
    only_mismatched = NoiseFractions(
        mismatched=0.5, hard_attribute=0, hard_relation=0, boilerplate=0, truncated=0, vague=0
    )
    odd = noise_counts(WorldConfig(num_web=7, noise=only_mismatched, failed_rows=0, corrupt_rows=0))
    assert (odd["clean"], odd["mismatched"], sum(odd.values())) == (4, 3, 7)


def test_written_captions_are_judged_by_their_ground_truth(world):
    _, paths = world
    for row in _read(paths.shards["web"]).to_pylist():
        assert bool(check_caption(row["caption"], row["gt_scene"])) == row["gt_clean"], row["caption"]
    for split, refs in (("human", 1), ("test", 5)):
        for row in _read(paths.shards[split]).to_pylist():
            assert len(row["captions"]) == refs and row["caption"] == row["captions"][0]
            assert all(check_caption(caption, row["gt_scene"]) for caption in row["captions"])


def test_same_seed_gives_identical_shards(world, tmp_path):
    config, paths = world
    again = write_world(config, str(tmp_path / "again"))
    other = write_world(config.model_copy(update={"seed": 1}), str(tmp_path / "other"))
    for split in ("web", "human", "test"):
        for first, second, third in zip(paths.shards[split], again.shards[split], other.shards[split]):
            assert open(first, "rb").read() == open(second, "rb").read()
            assert open(first, "rb").read() != open(third, "rb").read()
    # A shard written alone (as a parallel worker would) is the same shard.
    alone, _ = write_shard(config, "web", 1, str(tmp_path / "alone"))
    assert open(alone, "rb").read() == open(paths.shards["web"][1], "rb").read()


def test_write_world_to_an_fsspec_url():
    config = WorldConfig(num_web=10, num_human=2, num_test=2, image_size=32, rows_per_shard=10, failed_rows=0,
                         corrupt_rows=0)
    paths = write_world(config, "memory://capfilt-world")
    assert paths.shards["web"] == ("memory://capfilt-world/web/00000.parquet",)
    import fsspec

    with fsspec.open(paths.shards["web"][0], "rb") as handle:
        assert pq.read_table(handle).num_rows == 10


def test_world_config_validation():
    with pytest.raises(ValidationError, match="sum to"):
        NoiseFractions(mismatched=0.6, hard_attribute=0.5)
    with pytest.raises(ValidationError, match="exceed num_web"):
        WorldConfig(num_web=3, failed_rows=2, corrupt_rows=2)
    with pytest.raises(ValidationError, match="extra"):
        WorldConfig(num_webs=3)
    assert NoiseFractions().clean == pytest.approx(0.55)


def test_labelled_split_has_shape_classes_only_and_images_of_its_own(tmp_path):
    config = WorldConfig(num_web=40, num_human=10, num_test=10, num_labelled=60, image_size=32, rows_per_shard=25,
                         failed_rows=0, corrupt_rows=0)
    paths = write_world(config, str(tmp_path / "world"))
    assert len(paths.shards["labelled"]) == 3
    labelled = _read(paths.shards["labelled"])
    assert "captions" not in labelled.column_names and labelled.column("caption").null_count == 60
    from capfilt.data.world import Scene

    for row in labelled.to_pylist():
        scene = Scene.from_json(row["gt_scene"])
        assert row["labels"] == sorted({obj.shape for obj in scene.objects}) and row["status"] == "success"
    # Disjoint from every other split: the labelled images are drawn from seeds of their own.
    others = {row["sha256"] for split in ("web", "human", "test") for row in _read(paths.shards[split]).to_pylist()}
    assert not others & set(labelled.column("sha256").to_pylist())
    assert json.loads(open(paths.manifest).read())["splits"]["labelled"]["rows"] == 60
    # Asking for it changes nothing in the other splits.
    without = write_world(config.model_copy(update={"num_labelled": 0}), str(tmp_path / "without"))
    assert without.shards["labelled"] == ()
    for split in ("web", "human", "test"):
        for first, second in zip(paths.shards[split], without.shards[split]):
            assert open(first, "rb").read() == open(second, "rb").read()
