"""Starting MED from published-format BLIP checkpoints and from MED directories; the tokenizer check."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)

from capfilt.config import InitConfig, MedConfig
from capfilt.data.text import load_tokenizer
from capfilt.models.export import blip_config, export_captioner, export_filter
from capfilt.models.init import (
    apply_init,
    check_tokenizer_matches,
    init_from_blip,
    init_from_med,
    interpolate_pos_embed,
)
from capfilt.models.med import MED, lm_labels, save_med
from capfilt.models.tokens import itc_ids, itm_ids, lm_ids
from tests.models.conftest import IMAGE_SIZE
from tests.models.test_export import bert_uncased_like_tokenizer

LM_HEAD_TRANSFORM = [
    f"text_decoder.cls.predictions.transform.{name}"
    for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")
]


def parameters(med) -> dict[str, torch.Tensor]:
    """Every parameter under every name (shared modules under each owner), momentum copies included."""
    return {name: p.detach().clone() for name, p in med.named_parameters(remove_duplicate=False)}


def own_self_attention(module, prefix: str) -> list[str]:
    return [name for name, _ in module.named_parameters(prefix=prefix) if ".attention." in name]


def outputs(med, batch, tokenizer) -> dict[str, torch.Tensor]:
    """ITM logits, ITC features (online and momentum), LM logits and loss."""
    pixels, ids, mask, _ = batch
    dec_ids = lm_ids(ids, tokenizer)
    with torch.no_grad():
        image_embeds = med.image_embeds(pixels)
        lm = med.text_decoder(input_ids=dec_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                              labels=lm_labels(dec_ids, mask))
        text_m = med.text_encoder_m(input_ids=itc_ids(ids, tokenizer), attention_mask=mask).last_hidden_state
        return {
            "itm": med.itm_logits(image_embeds, ids, mask),
            "image_feat": med.image_features(image_embeds),
            "text_feat": med.text_features(ids, mask),
            "text_feat_m": F.normalize(med.text_proj_m(text_m[:, 0]), dim=-1),
            "lm_logits": lm.logits,
            "lm_loss": lm.loss,
        }


def export_both(med, tokenizer, root) -> tuple[str, str]:
    retrieval = export_filter(med, tokenizer, root / "filter")
    return str(retrieval), str(export_captioner(med, tokenizer, root / "captioner"))


# -------------------------------------------------------------------------------------------------
# Our exports back into a MED
# -------------------------------------------------------------------------------------------------


def test_both_checkpoints_rebuild_the_exported_med(make_med, tokenizer, batch, tmp_path):
    original = make_med(seed=0).eval()
    retrieval, captioning = export_both(original, tokenizer, tmp_path)
    med = make_med(seed=1).eval()

    report = apply_init(med, InitConfig(blip_retrieval=retrieval, blip_captioning=captioning), tokenizer)

    # BlipForImageTextRetrieval has no ITC temperature: temp is the one thing the pair cannot give.
    assert report.fresh == ["temp"] and report.ignored == []
    assert "text_encoder.encoder.layer.2.attention.self.query.weight" in report.loaded
    assert "text_decoder.bert.encoder.layer.2.attention.self.query.weight" in report.loaded
    ours, theirs = parameters(med), parameters(original)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)  # momentum encoders too
    ours, theirs = outputs(med, batch, tokenizer), outputs(original, batch, tokenizer)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name


def test_retrieval_gives_everything_encoder_and_decoder_share(make_med, tokenizer, tmp_path):
    captioner_med, filter_med = make_med(seed=0), make_med(seed=2)
    captioning = str(export_captioner(captioner_med, tokenizer, tmp_path / "captioner"))
    retrieval = str(export_filter(filter_med, tokenizer, tmp_path / "filter"))
    med = make_med(seed=1)

    report = init_from_blip(med, retrieval=retrieval, captioning=captioning)

    assert report.fresh == ["temp"]
    ours, from_captioner, from_filter = parameters(med), parameters(captioner_med), parameters(filter_med)
    decoder_own = set(own_self_attention(med.text_decoder.bert, "text_decoder.bert"))
    decoder_own |= {"text_decoder.cls.predictions.bias", "text_decoder.cls.predictions.decoder.bias"}
    decoder_own |= set(LM_HEAD_TRANSFORM)
    assert decoder_own and len(decoder_own) < len([k for k in ours if k.startswith("text_decoder.")])
    for name, value in ours.items():
        if name == "temp":
            continue
        source = from_captioner if name in decoder_own else from_filter
        assert torch.equal(value, source[name]), name
    # The ties survive: the LM head reads the (retrieval) word embeddings.
    assert med.text_decoder.cls.predictions.decoder.weight is med.text_encoder.embeddings.word_embeddings.weight


# -------------------------------------------------------------------------------------------------
# Checkpoints written by transformers, compared with transformers' own forward
# -------------------------------------------------------------------------------------------------


def transformers_checkpoint(cls, med, tokenizer, out_dir, seed: int):
    """A randomly initialised ``cls`` shaped like ``med``, saved as ``from_pretrained`` expects."""
    torch.manual_seed(seed)
    model = cls(blip_config(med)).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def test_retrieval_alone_scores_as_transformers(make_med, tokenizer, batch, tmp_path):
    med = make_med(seed=1).eval()
    model = transformers_checkpoint(BlipForImageTextRetrieval, med, tokenizer, tmp_path / "filter", seed=5)
    before = parameters(med)

    report = init_from_blip(med, retrieval=str(tmp_path / "filter"))

    pixels, ids, mask, _ = batch
    with torch.no_grad():
        image_embeds = med.image_embeds(pixels)
        itm = model(input_ids=itm_ids(ids, tokenizer), pixel_values=pixels, attention_mask=mask).itm_score
        assert torch.allclose(med.itm_logits(image_embeds, ids, mask), itm, atol=1e-5)
        itc = model(input_ids=itc_ids(ids, tokenizer), pixel_values=pixels, attention_mask=mask, use_itm_head=False)
        itc = itc.itm_score
        assert torch.allclose(med.image_features(image_embeds) @ med.text_features(ids, mask).t(), itc, atol=1e-5)
        assert torch.allclose(med.visual_encoder_m(pixel_values=pixels).last_hidden_state, image_embeds)

    fresh = {"temp", "text_decoder.cls.predictions.bias", *LM_HEAD_TRANSFORM,
             *own_self_attention(med.text_decoder.bert, "text_decoder.bert")}
    assert set(report.fresh) == fresh and len(report.fresh) == len(fresh)
    assert all(torch.equal(med.get_parameter(name), before[name]) for name in fresh)


def test_captioning_alone_captions_as_transformers(make_med, tokenizer, batch, tmp_path):
    med = make_med(seed=1).eval()
    model = transformers_checkpoint(BlipForConditionalGeneration, med, tokenizer, tmp_path / "captioner", seed=6)
    before = parameters(med)

    report = init_from_blip(med, captioning=str(tmp_path / "captioner"))

    pixels, ids, mask, _ = batch
    dec_ids = lm_ids(ids, tokenizer)
    with torch.no_grad():
        ours = med.text_decoder(input_ids=dec_ids, attention_mask=mask, encoder_hidden_states=med.image_embeds(pixels))
        theirs = model(pixel_values=pixels, input_ids=dec_ids, attention_mask=mask)
        assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)  # every position
        # Greedy captions, through the same transformers generate on both sides.
        again = export_captioner(med, tokenizer, tmp_path / "again")
        again = BlipForConditionalGeneration.from_pretrained(again).eval()
        settings = dict(max_length=8, min_length=8, num_beams=1, do_sample=False)
        captions = model.generate(pixel_values=pixels, **settings)
        assert captions.shape == (len(pixels), 8)
        assert torch.equal(again.generate(pixel_values=pixels, **settings), captions)

    # The decoder's cross-attention is the encoder's module: ITM now sees the captioner's.
    query = med.text_encoder.encoder.layer[0].crossattention.self.query.weight
    assert torch.equal(query, model.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight)
    fresh = {"temp", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "itm_head.weight",
             "itm_head.bias", *own_self_attention(med.text_encoder, "text_encoder")}
    assert set(report.fresh) == fresh and len(report.fresh) == len(fresh)
    assert all(torch.equal(med.get_parameter(name), before[name]) for name in fresh)


# -------------------------------------------------------------------------------------------------
# A checkpoint shaped like the published ones (384 px, 30524 tokens, 512 positions)
# -------------------------------------------------------------------------------------------------

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def published_style(out_dir, cls):
    config = BlipConfig(
        text_config=BlipTextConfig(vocab_size=30524, **SMALL).to_dict(),
        vision_config=BlipVisionConfig(image_size=384, patch_size=16, **SMALL).to_dict(),
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    model = cls(config)
    model.save_pretrained(out_dir)
    bert_uncased_like_tokenizer(out_dir).save_pretrained(out_dir)
    BlipImageProcessor().save_pretrained(out_dir)
    return model


@pytest.mark.parametrize("image_size", [32, 64])
def test_published_style_checkpoints_load_regridded(tmp_path, image_size):
    retrieval = published_style(tmp_path / "retrieval", BlipForImageTextRetrieval)
    published_style(tmp_path / "captioning", BlipForConditionalGeneration)
    tokenizer = load_tokenizer(tmp_path / "retrieval")
    sizes = {"width": 32, "layers": 1, "heads": 2, "mlp_dim": 64}
    config = MedConfig(preset="tiny", vision={"image_size": image_size, "patch_size": 16, **sizes},
                       text={**sizes, "dropout": 0.0}, embed_dim=32, queue_size=64)
    med = MED.from_config(config, tokenizer).eval()
    assert med.vocab_size == 30524

    report = apply_init(med, InitConfig(blip_retrieval=str(tmp_path / "retrieval"),
                                        blip_captioning=str(tmp_path / "captioning")), tokenizer)

    assert report.fresh == ["temp"]
    position = retrieval.vision_model.embeddings.position_embedding
    assert position.shape[1] == 1 + 24 * 24
    grid = image_size // 16
    assert torch.equal(med.visual_encoder.embeddings.position_embedding, interpolate_pos_embed(position, grid))
    text_positions = retrieval.text_encoder.embeddings.position_embeddings.weight
    assert torch.equal(med.text_encoder.embeddings.position_embeddings.weight, text_positions[:64])
    pixels = torch.randn(2, 3, image_size, image_size)
    text = tokenizer(["a red circle", "a dog"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(med.itm_logits(med.image_embeds(pixels), text.input_ids, text.attention_mask)).all()


# -------------------------------------------------------------------------------------------------
# Refusals
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vision": {"image_size": IMAGE_SIZE, "mlp_dim": 256}},
         "blip_retrieval vision_model.encoder.layers.0.mlp.fc1.weight has shape (256, 128), "
         "MED visual_encoder.encoder.layers.0.mlp.fc1.weight needs (512, 128)"),
        ({"text": {"dropout": 0.0, "width": 64}},
         "blip_retrieval text_encoder.embeddings.word_embeddings.weight has shape (100, 64), "
         "MED text_encoder.embeddings.word_embeddings.weight needs (100, 128)"),
        ({"vision": {"image_size": IMAGE_SIZE, "layers": 4}},
         "blip_retrieval has weights MED has no place for (more layers than MED?): vision_model.encoder.layers.3."),
        ({"text": {"dropout": 0.0, "layers": 2}},
         "blip_retrieval has no weights for MED text_encoder.encoder.layer.2."),
        ({"text": {"dropout": 0.0, "heads": 8}},
         "blip_retrieval text num_attention_heads=8, MED text num_attention_heads=4"),
        ({"vocab_size": 110},
         "blip_retrieval vocabulary (110 rows in text_encoder.embeddings.word_embeddings.weight) is larger than "
         "MED's (100 rows in text_encoder.embeddings.word_embeddings.weight)"),
    ],
)
def test_mismatched_checkpoint_is_refused_naming_weight_and_shapes(make_med, tokenizer, tmp_path, overrides, message):
    assert len(tokenizer) == 100  # the sizes in the messages
    retrieval = str(export_filter(make_med(seed=0, **overrides), tokenizer, tmp_path / "filter"))
    med = make_med(seed=1)
    before = parameters(med)
    with pytest.raises(ValueError, match=re.escape(message)):
        init_from_blip(med, retrieval=retrieval)
    assert all(torch.equal(p, before[name]) for name, p in parameters(med).items())  # checked before written


def test_smaller_vocabulary_fills_the_first_rows(make_med, tokenizer, tmp_path):
    retrieval, captioning = export_both(make_med(seed=0), tokenizer, tmp_path)
    med = make_med(seed=1, vocab_size=len(tokenizer) + 8)
    extra_rows = med.text_encoder.embeddings.word_embeddings.weight[len(tokenizer):].clone()
    report = init_from_blip(med, retrieval=retrieval, captioning=captioning)
    rows = f"[{len(tokenizer)}:{len(tokenizer) + 8}]"
    assert sorted(report.fresh) == sorted(
        ["temp", f"text_encoder.embeddings.word_embeddings.weight{rows}", f"text_decoder.cls.predictions.bias{rows}"]
    )
    assert torch.equal(med.text_encoder.embeddings.word_embeddings.weight[len(tokenizer):], extra_rows)


def test_wrong_architecture_is_refused_naming_the_class(make_med, tokenizer, tmp_path):
    retrieval, captioning = export_both(make_med(seed=0), tokenizer, tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"blip_retrieval {captioning}: config.json says "
                                                   "BlipForConditionalGeneration, expected BlipForImageTextRetrieval")):
        init_from_blip(make_med(), retrieval=captioning)
    message = "blip_captioning .*BlipForImageTextRetrieval, expected BlipForConditionalGeneration"
    with pytest.raises(ValueError, match=message):
        init_from_blip(make_med(), retrieval=retrieval, captioning=retrieval)


# -------------------------------------------------------------------------------------------------
# MED directories
# -------------------------------------------------------------------------------------------------


def test_med_directory_round_trip(make_med, tokenizer, batch, tmp_path):
    original = make_med(seed=0).eval()
    with torch.no_grad():
        for p in original.text_encoder_m.parameters():  # a trained momentum encoder lags the online one
            p.add_(0.01)
    original.idx_queue[:6] = 7
    save_med(original, tmp_path / "med")
    med = make_med(seed=1).eval()

    report = apply_init(med, InitConfig(med=str(tmp_path / "med")), tokenizer)

    assert report.fresh == [] and report.ignored == []
    assert "text_encoder_m.encoder.layer.0.attention.self.query.weight" in report.loaded
    ours, theirs = parameters(med), parameters(original)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    ours, theirs = outputs(med, batch, tokenizer), outputs(original, batch, tokenizer)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name
    assert (med.idx_queue == -1).all()  # the old run's image ids would be false positives


def test_med_directory_into_another_image_size(make_med, tmp_path):
    original = make_med(seed=0)
    save_med(original, tmp_path / "med")
    med = make_med(seed=1, vision={"image_size": 2 * IMAGE_SIZE})
    init_from_med(med, tmp_path / "med")
    expected = interpolate_pos_embed(original.visual_encoder.embeddings.position_embedding, 2 * IMAGE_SIZE // 8)
    assert torch.equal(med.visual_encoder.embeddings.position_embedding, expected)
    assert torch.equal(med.visual_encoder_m.embeddings.position_embedding, expected)
    fc1 = original.visual_encoder.encoder.layers[0].mlp.fc1.weight
    assert torch.equal(med.visual_encoder.encoder.layers[0].mlp.fc1.weight, fc1)


def test_mismatched_med_directory_is_refused(make_med, tmp_path):
    save_med(make_med(seed=0, text={"dropout": 0.0, "width": 64}), tmp_path / "narrow")
    with pytest.raises(ValueError, match=re.escape(
        "text_encoder.embeddings.word_embeddings.weight has shape (100, 64), "
        "MED text_encoder.embeddings.word_embeddings.weight needs (100, 128)"
    )):
        init_from_med(make_med(), tmp_path / "narrow")
    save_med(make_med(seed=0, vocab_size=108), tmp_path / "bigger_vocab")
    with pytest.raises(ValueError, match="vocabulary of 108 rows .* MED has 100 rows"):
        init_from_med(make_med(), tmp_path / "bigger_vocab")


# -------------------------------------------------------------------------------------------------
# The tokenizer check
# -------------------------------------------------------------------------------------------------


def bert_tokenizer(vocab: list[str]) -> BertTokenizer:
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


SOURCE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "dog", "##s"]


def test_tokenizer_of_the_source_passes(tmp_path):
    bert_tokenizer(SOURCE_VOCAB).save_pretrained(tmp_path / "bert")
    run_tokenizer = load_tokenizer(tmp_path / "bert")  # plus [DEC] and [ENC]
    assert len(run_tokenizer) == len(SOURCE_VOCAB) + 2
    check_tokenizer_matches(run_tokenizer, str(tmp_path / "bert"))
    BertConfig(vocab_size=len(SOURCE_VOCAB)).save_pretrained(tmp_path / "weights_only")  # nothing to compare with
    check_tokenizer_matches(bert_tokenizer(["[UNK]"]), str(tmp_path / "weights_only"))


def test_tokenizer_with_other_ids_is_refused_naming_tokens(tmp_path):
    source = tmp_path / "bert"
    bert_tokenizer(SOURCE_VOCAB).save_pretrained(source)
    swapped = bert_tokenizer(SOURCE_VOCAB[:2] + ["[SEP]", "[CLS]"] + SOURCE_VOCAB[4:])
    with pytest.raises(ValueError) as error:
        check_tokenizer_matches(swapped, str(source), what="model.init.blip_retrieval")
    message = str(error.value)
    assert message.startswith(f"model.init.blip_retrieval: the run's tokenizer (10 tokens) does not match {source}'s")
    assert "'[CLS]' is 2 there, 3 here" in message and "'[SEP]' is 3 there, 2 here" in message

    without_dog = bert_tokenizer([token for token in SOURCE_VOCAB if token != "dog"])
    examples = "2 tokens have other ids, e.g. 'dog' is 8 there, absent here; '##s' is 9 there, 8 here;"
    with pytest.raises(ValueError, match=examples):
        check_tokenizer_matches(without_dog, str(source))
