from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)

from capfilt.models.export import (
    IMAGE_MEAN,
    IMAGE_STD,
    export_captioner,
    export_filter,
    load_captioner,
    load_filter,
    model_provenance,
    read_image_processor,
)
from capfilt.models.med import lm_labels
from capfilt.models.tokens import itc_ids, itm_ids, lm_ids, special_ids
from tests.models.conftest import IMAGE_SIZE, TEXTS


@pytest.fixture
def exported(make_med, tokenizer, tmp_path):
    med = make_med(lm_label_smoothing=0.1).eval()
    return med, export_captioner(med, tokenizer, tmp_path / "captioner"), export_filter(med, tokenizer, tmp_path / "filter")


@pytest.fixture
def inputs(tokenizer):
    text = tokenizer(TEXTS[:3], padding="longest", return_tensors="pt")
    torch.manual_seed(3)
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE), text.input_ids, text.attention_mask


def test_captioner_round_trip(exported, inputs, tokenizer):
    med, captioner_dir, _ = exported
    model, info = BlipForConditionalGeneration.from_pretrained(captioner_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    decoder = model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    model.eval()

    pixels, ids, mask = inputs
    dec_ids = lm_ids(ids, tokenizer)
    labels = lm_labels(dec_ids, mask)
    with torch.no_grad():
        image_embeds = med.image_embeds(pixels)
        ours = med.text_decoder(input_ids=dec_ids, attention_mask=mask, encoder_hidden_states=image_embeds, labels=labels)
        theirs = model(pixel_values=pixels, input_ids=dec_ids, attention_mask=mask, labels=labels)
    assert torch.allclose(theirs.logits, ours.logits, atol=1e-5)
    assert theirs.loss.item() == pytest.approx(ours.loss.item(), rel=1e-5)  # label smoothing travelled too
    assert model.config.text_config.label_smoothing == 0.1
    assert model.config.text_config.bos_token_id == special_ids(tokenizer)["dec"]
    # Generation starts from [DEC] and runs in plain transformers.
    generated = model.generate(pixel_values=pixels[:1], max_length=6, min_length=6)
    assert generated[0, 0].item() == special_ids(tokenizer)["dec"] and generated.shape == (1, 6)


def test_filter_round_trip(exported, inputs, tokenizer):
    med, _, filter_dir = exported
    model, info = BlipForImageTextRetrieval.from_pretrained(filter_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()

    pixels, ids, mask = inputs
    with torch.no_grad():
        image_embeds = med.image_embeds(pixels)
        itm = model(input_ids=itm_ids(ids, tokenizer), pixel_values=pixels, attention_mask=mask).itm_score
        assert torch.allclose(itm, med.itm_logits(image_embeds, ids, mask), atol=1e-5)
        itc = model(input_ids=itc_ids(ids, tokenizer), pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        assert torch.allclose(itc, med.image_features(image_embeds) @ med.text_features(ids, mask).t(), atol=1e-5)


def test_exported_processor_matches_reference_preprocessing(exported, tokenizer):
    _, captioner_dir, _ = exported
    processor = BlipProcessor.from_pretrained(captioner_dir)
    pixels = processor(images=Image.new("RGB", (50, 20), (255, 0, 0)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = [(1 - IMAGE_MEAN[0]) / IMAGE_STD[0], -IMAGE_MEAN[1] / IMAGE_STD[1], -IMAGE_MEAN[2] / IMAGE_STD[2]]
    assert torch.allclose(pixels[0, :, 5, 5], torch.tensor(expected), atol=1e-4)
    assert processor.tokenizer.convert_tokens_to_ids("[ENC]") == special_ids(tokenizer)["enc"]


def test_load_our_exports(exported, tokenizer):
    med, captioner_dir, filter_dir = exported
    captioner = load_captioner(captioner_dir)
    assert isinstance(captioner.model, BlipForConditionalGeneration) and not captioner.model.training
    assert captioner.special == special_ids(tokenizer)
    assert (captioner.image_size, captioner.image_mean, captioner.image_std) == (IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD)
    weights = (captioner_dir / "model.safetensors").read_bytes()
    assert captioner.provenance["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert captioner.provenance["source"] == str(captioner_dir) and captioner.provenance["transformers"]
    assert captioner.provenance["architectures"] == ["BlipForConditionalGeneration"]
    assert "revision" not in captioner.provenance  # a local directory has no revision: its hash identifies it
    assert model_provenance(captioner_dir) == captioner.provenance
    assert read_image_processor(captioner_dir) == {"image_size": IMAGE_SIZE, "mean": IMAGE_MEAN, "std": IMAGE_STD}

    scorer = load_filter(filter_dir, dtype=torch.bfloat16)
    assert isinstance(scorer.model, BlipForImageTextRetrieval) and not scorer.model.training
    assert scorer.model.itm_head.weight.dtype == torch.bfloat16
    assert scorer.provenance["weights_sha256"] != captioner.provenance["weights_sha256"]

    with pytest.raises(ValueError, match="not a complete BlipForImageTextRetrieval checkpoint"):
        load_filter(captioner_dir)


# -------------------------------------------------------------------------------------------------
# A checkpoint shaped like the published ones, built with transformers alone
# -------------------------------------------------------------------------------------------------


def bert_uncased_like_tokenizer(out_dir):
    """bert-base-uncased's layout: [PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103; 30522 ids."""
    words = "a red circle left of blue square two green triangles picture dog".split()
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [f"w{i}" for i in range(30522 - len(vocab))]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    assert len(tokenizer) == 30522
    return tokenizer


@pytest.mark.parametrize("cls", [BlipForConditionalGeneration, BlipForImageTextRetrieval])
def test_published_style_checkpoint_loads_through_the_same_path(cls, tmp_path):
    out_dir = tmp_path / "published"
    tokenizer = bert_uncased_like_tokenizer(out_dir)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = BlipConfig(
        text_config=BlipTextConfig(vocab_size=30524, **small).to_dict(),  # transformers' defaults: bos 30522, sep 102
        vision_config=BlipVisionConfig(image_size=32, patch_size=16, **small).to_dict(),
    )
    torch.manual_seed(0)
    cls(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    BlipImageProcessor().save_pretrained(out_dir)  # transformers' defaults: 384 px, CLIP statistics

    loaded = (load_captioner if cls is BlipForConditionalGeneration else load_filter)(out_dir)
    assert isinstance(loaded.model, cls)
    assert loaded.special == {"cls": 101, "enc": 30523, "dec": 30522, "sep": 102, "pad": 0}
    assert loaded.image_size == 384 and loaded.image_mean == pytest.approx(IMAGE_MEAN)
    assert len(loaded.provenance["weights_sha256"]) == 64


def test_exports_on_object_storage_load_through_a_local_copy_refreshed_when_they_change(
        exported, tokenizer, s3_server, tmp_path, monkeypatch):
    """A captioner or filter in a run directory on S3 (`capfilt.captioners: [{path: s3://...}]`): loaded from a
    copy under the scratch directory, fetched once, fetched again when the files at the URL change."""
    import fsspec

    med, captioner_dir, filter_dir = exported
    # The credentials as a user's environment gives them (fsspec's FSSPEC_S3_* configuration).
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.storage_options)
    monkeypatch.setenv("CAPFILT_SCRATCH_DIR", str(tmp_path / "scratch"))
    for local in (captioner_dir, filter_dir):
        for path in local.iterdir():
            s3_server.client.upload_file(str(path), s3_server.bucket, f"run/{local.name}/{path.name}")
    url = s3_server.url("run/captioner")
    loaded = load_captioner(url)
    assert loaded.provenance["source"] == url
    assert loaded.provenance["weights_sha256"] == load_captioner(captioner_dir).provenance["weights_sha256"]
    copies = list((tmp_path / "scratch").rglob("model.safetensors"))
    assert len(copies) == 1
    fetched_at = copies[0].stat().st_mtime_ns
    assert load_filter(s3_server.url("run/filter")).provenance["source"] == s3_server.url("run/filter")

    load_captioner(url)  # unchanged: the same copy
    assert copies[0].stat().st_mtime_ns == fetched_at
    # The stage was redone: other weights at the same URL are fetched, never the old copy reused.
    with torch.no_grad():
        next(med.text_decoder.parameters()).add_(1.0)
    export_captioner(med, tokenizer, tmp_path / "redone")
    s3_server.client.upload_file(str(tmp_path / "redone" / "model.safetensors"), s3_server.bucket,
                                 "run/captioner/model.safetensors")
    reloaded = load_captioner(url)
    assert reloaded.provenance["weights_sha256"] != loaded.provenance["weights_sha256"]
    assert reloaded.provenance["weights_sha256"] == hashlib.sha256(
        (tmp_path / "redone" / "model.safetensors").read_bytes()).hexdigest()
