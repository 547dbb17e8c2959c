"""The ViT pretrained as a classifier (the demo's ImageNet): it learns, accounts for every row, and its
checkpoint is what the MED's timm path loads."""

from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capfilt.config import MedConfig, ReaderConfig, VisionPretrainConfig
from capfilt.stages.pretrain_vision import read_labelled, run_pretrain_vision, timm_vit, train_classifier

VISION = MedConfig(preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2,
                                          "mlp_dim": 128}).vision
COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 225), "green": (40, 170, 60)}


def _jpeg(colours: list[str], rng: random.Random) -> bytes:
    """Stripes of the given colours over grey noise: the classes are the colours present."""
    image = Image.new("RGB", (32, 32), (rng.randrange(100, 140),) * 3)
    for index, name in enumerate(colours):
        image.paste(COLOURS[name], (0, 11 * index, 32, 11 * index + 8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_shard(path, rows: int, multi_label: bool, faults: bool = False):
    rng = random.Random(0)
    table = {"key": [], "status": [], "caption": [], "jpg": [], "label": []}
    for index in range(rows):
        names = rng.sample(sorted(COLOURS), rng.randint(1, 2)) if multi_label else [rng.choice(sorted(COLOURS))]
        table["key"].append(f"{index:05d}")
        table["status"].append("success")
        table["caption"].append(None)
        table["jpg"].append(_jpeg(names, rng))
        table["label"].append(sorted(names) if multi_label else names[0])
    if faults:  # one failed download, one corrupt image, one unlabelled image
        table["status"][0], table["jpg"][0] = "failed_to_download", None
        table["jpg"][1] = table["jpg"][1][:40]
        table["label"][2] = [] if multi_label else None
    label_type = pa.list_(pa.string()) if multi_label else pa.string()
    schema = pa.schema([("key", pa.string()), ("status", pa.string()), ("caption", pa.string()),
                        ("jpg", pa.binary()), ("label", label_type)])
    pq.write_table(pa.Table.from_pydict(table, schema=schema), path)
    return str(path)


@pytest.mark.parametrize(("multi_label", "mixed_precision"), [(False, "off"), (True, "off"), (True, "bf16")])
def test_the_classifier_learns_the_labels(tmp_path, multi_label, mixed_precision):
    path = _write_shard(tmp_path / "labelled.parquet", 240, multi_label)
    data = read_labelled(ReaderConfig(paths=path), "label", VISION.image_size)
    assert data.classes == ["blue", "green", "red"] and data.multi_label is multi_label
    config = VisionPretrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10, holdout_fraction=0.25,
                                  label_column="label", log_every=40, mixed_precision=mixed_precision)
    untrained = train_classifier(config.model_copy(update={"steps": 1, "lr": 1e-12}), VISION, data, log=lambda line: None)
    trained = train_classifier(config, VISION, data, log=lambda line: None)
    holdout = trained["metrics"]["holdout"]
    assert 40 <= holdout["images"] <= 80
    accuracy = holdout["exact_set_accuracy" if multi_label else "top1_accuracy"]
    before = untrained["metrics"]["holdout"]["exact_set_accuracy" if multi_label else "top1_accuracy"]
    assert accuracy >= 0.9 > before
    assert trained["metrics"]["precision"] == {"off": "fp32", "bf16": "bf16 autocast"}[mixed_precision]


def test_every_row_is_trained_on_or_rejected_with_a_reason(tmp_path):
    path = _write_shard(tmp_path / "labelled.parquet", 20, multi_label=True, faults=True)
    data = read_labelled(ReaderConfig(paths=path), "label", VISION.image_size)
    assert data.rows == 20 and len(data.keys) == 17
    assert dict(data.rejects) == {"status: failed_to_download": 1, "decode_error: truncated": 1, "label_missing": 1}
    with pytest.raises(ValueError, match="no label column 'labels'"):
        read_labelled(ReaderConfig(paths=path), "labels", VISION.image_size)


def test_the_stage_writes_a_timm_checkpoint_that_the_med_loads(ray_cluster, tmp_path, tokenizer):
    from safetensors.torch import load_file

    from capfilt.models.init import init_vision_from_timm
    from capfilt.models.med import MED

    path = _write_shard(tmp_path / "labelled.parquet", 64, multi_label=True)
    config = VisionPretrainConfig(steps=6, batch_size=16, warmup_steps=2, label_column="label", cpus=1)
    result = run_pretrain_vision(config, VISION, ReaderConfig(paths=path), str(tmp_path / "stage"), log=lambda line: None)
    assert result["images"] == result["rows"] == 64 and result["classes"] == ["blue", "green", "red"]

    vit = timm_vit(VISION, 3).eval()
    vit.load_state_dict(load_file(result["vit"]))
    med = MED.from_config(MedConfig(preset="tiny", vision=VISION.model_dump(), queue_size=0), tokenizer).eval()
    report = init_vision_from_timm(med, result["vit"])
    assert report.ignored == ["head.bias", "head.weight"]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(med.image_embeds(pixels), vit.forward_features(pixels), atol=1e-5, rtol=1e-4)
