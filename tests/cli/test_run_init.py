"""`capfilt run` from pretrained weights, as users start: BLIP's pretraining from a timm ViT and a BERT model,
and a new captioner and filter fine-tuned straight from published-format BLIP checkpoints."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from capfilt.config import VisionConfig
from capfilt.models.med import load_med
from tests.cli.test_run import CAPFILT, _run

SMALL_WORLD = {"num_web": 32, "num_human": 16, "num_test": 0, "image_size": 32, "rows_per_shard": 16}
TEXT = {"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}
# In the driver (train_in_driver): what is tested is where the weights come from, not Ray Train's workers
# (tests/stages/test_pretrain.py), whose start-up would be most of these tests' time.
TRAIN = {"steps": 3, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "train_in_driver": True}
FINETUNE = {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "train_in_driver": True}


@pytest.fixture(scope="module")
def bert_and_vit(tmp_path_factory, tokenizer):
    """A BERT-style model saved with its tokenizer (the run's vocabulary) and a timm ViT checkpoint."""
    from transformers import BertConfig, BertForMaskedLM

    from capfilt.stages.pretrain_vision import timm_vit

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=128, max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    vision = VisionConfig(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_dim=128)
    save_file(timm_vit(vision, 3).state_dict(), str(root / "vit.safetensors"))
    return root / "bert", root / "vit.safetensors", vision


def test_blip_pretraining_from_a_timm_vit_and_bert(tmp_path, bert_and_vit):
    bert_dir, vit_path, vision = bert_and_vit
    pipeline = {
        "synth": SMALL_WORLD,
        "tokenizer": {"source": str(bert_dir)},
        "model": {"preset": "tiny", "vision": vision.model_dump(), "text": TEXT, "embed_dim": 32,
                  "init": {"vision": str(vit_path), "text": str(bert_dir)}},
        "pretrain": TRAIN,
        # The filter alone: one fine-tuning fewer; the round still pretrains.
        "finetune_filter": FINETUNE,
        "capfilt": {"batch_size": 8, "sampling": {"num_captions": 0}},
        "round_pretrain_start": "previous_round",
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    result = _run(path, tmp_path / "run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = tmp_path / "run"

    noisy = json.loads((run / "pretrain_noisy" / "_RESULT.json").read_text())["result"]
    fresh = noisy["init"]["fresh"]
    assert any("crossattention" in name for name in fresh)  # BLIP's cross-attention starts fresh
    assert not any(name.startswith("visual_encoder") or ".attention." in name for name in fresh)
    assert "[pretrain] starting from init:" in result.stdout
    init = load_med(run / "pretrain_noisy" / "init")
    assert init.visual_encoder.encoder.layers[0].mlp.fc1.weight.equal(load_file(vit_path)["blocks.0.mlp.fc1.weight"])
    bert = load_file(bert_dir / "model.safetensors")
    assert init.text_encoder.encoder.layer[0].intermediate.dense.weight.equal(
        bert["bert.encoder.layer.0.intermediate.dense.weight"])

    # round_pretrain_start: previous_round -> the round's pretraining continues the noisy MED.
    record = json.loads((run / "round_0" / "pretrain" / "_STAGE.json").read_text())
    assert record["identity"]["inputs"]["continue"] == "pretrain_noisy"
    bootstrapped = json.loads((run / "round_0" / "pretrain" / "_RESULT.json").read_text())["result"]
    assert "init" not in bootstrapped and not (run / "round_0" / "pretrain" / "init").exists()


def test_a_tokenizer_that_is_not_the_text_models_is_refused(tmp_path, bert_and_vit):
    bert_dir, _, _ = bert_and_vit
    pipeline = {"model": {"init": {"text": str(bert_dir)}}, "pretrain": TRAIN}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    result = subprocess.run([CAPFILT, "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "tokenizer.source 'train'" in result.stdout + result.stderr


def test_a_new_captioner_and_filter_from_published_blip_checkpoints(tmp_path, tiny_models):
    pipeline = {
        "synth": SMALL_WORLD,
        "tokenizer": {"source": tiny_models["filter"]},
        "model": {"preset": "tiny", "vision": {"image_size": 32, "patch_size": 8, **TEXT}, "text": TEXT,
                  "embed_dim": 32, "queue_size": 64,
                  "init": {"blip_retrieval": tiny_models["filter"], "blip_captioning": tiny_models["captioner"]}},
        "finetune_captioner": FINETUNE,
        "finetune_filter": FINETUNE,
        "capfilt": {"batch_size": 8, "sampling": {"max_length": 12, "min_length": 6}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    result = _run(path, tmp_path / "run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = tmp_path / "run"
    record = json.loads((run / "model_init" / "_STAGE.json").read_text())
    assert record["outputs"]["init"]["fresh"] == ["temp"]  # a complete MED: only the ITC temperature is not in them
    for kind in ("captioner", "filter"):
        stage = json.loads((run / "round_0" / f"finetune_{kind}" / "_STAGE.json").read_text())
        assert stage["identity"]["inputs"]["init"] == "model_init"
    manifest = json.loads((run / "round_0" / "capfilt" / "manifest.json").read_text())
    assert manifest["totals"]["rows_in"] == SMALL_WORLD["num_web"] + SMALL_WORLD["num_human"]
