from __future__ import annotations

import argparse
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForMaskedLM, BertModel

from capfilt.config import InitConfig
from capfilt.models.init import apply_init, init_text_from_bert, init_vision_from_timm, interpolate_pos_embed
from tests.models.conftest import IMAGE_SIZE

TINY = dict(patch_size=8, embed_dim=128, depth=3, num_heads=4, mlp_ratio=4.0, qkv_bias=True, num_classes=10)


def timm_vit(img_size: int = IMAGE_SIZE, **overrides) -> VisionTransformer:
    torch.manual_seed(1)
    return VisionTransformer(img_size=img_size, **{**TINY, **overrides}).eval()


# -------------------------------------------------------------------------------------------------
# Position embeddings
# -------------------------------------------------------------------------------------------------


def test_interpolate_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos, 4) is pos
    bigger = interpolate_pos_embed(pos, 6)
    assert bigger.shape == (1, 1 + 36, 8)
    assert torch.equal(bigger[:, 0], pos[:, 0])  # the class-token row is not a grid cell
    constant = torch.ones(1, 1 + 16, 8)
    assert torch.allclose(interpolate_pos_embed(constant, 6), torch.ones(1, 37, 8), atol=1e-6)
    # Rows are laid out row-major on the grid: a field varying along x only stays so.
    ramp = torch.arange(4.0).repeat(4).reshape(1, 16, 1).expand(1, 16, 8)
    out = interpolate_pos_embed(torch.cat([torch.zeros(1, 1, 8), ramp], 1), 8)[:, 1:].reshape(8, 8, 8)
    assert torch.allclose(out[0], out[5]) and out[0, -1, 0] > out[0, 0, 0]
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), 4)


# -------------------------------------------------------------------------------------------------
# timm ViT
# -------------------------------------------------------------------------------------------------


def test_timm_vit_matches_blip_vision_model(make_med):
    med, vit = make_med(), timm_vit()
    report = init_vision_from_timm(med, vit)
    assert "visual_encoder.encoder.layers.2.self_attn.qkv.weight" in report.loaded
    assert report.ignored == ["head.weight", "head.bias"]
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = vit.forward_features(pixels)
        assert torch.allclose(med.image_embeds(pixels), expected, atol=1e-5)
        # The momentum encoder starts from the same weights.
        assert torch.allclose(med.visual_encoder_m(pixel_values=pixels).last_hidden_state, expected, atol=1e-5)


def test_timm_vit_from_safetensors_file_and_other_resolution(make_med, tmp_path):
    from safetensors.torch import save_file

    vit = timm_vit(img_size=16)  # 2x2 grid; the MED wants 4x4
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    med = make_med()
    init_vision_from_timm(med.visual_encoder, path)
    position = med.visual_encoder.embeddings.position_embedding
    assert torch.equal(position, interpolate_pos_embed(vit.pos_embed, IMAGE_SIZE // 8))
    assert torch.equal(med.visual_encoder.encoder.layers[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        init_vision_from_timm(med, tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("suffix", "wrap"),
    [
        (".pth", lambda state: state),
        # timm's training checkpoints: the EMA weights are not the model trained, DDP prefixes "module."
        (".pt", lambda state: {"state_dict": {f"module.{k}": v for k, v in state.items()},
                               "state_dict_ema": {k: torch.zeros_like(v) for k, v in state.items()}, "epoch": 3}),
        (".bin", lambda state: {"model": state, "epoch": 3}),  # DeiT's
    ],
)
def test_timm_vit_from_torch_checkpoint(make_med, tmp_path, suffix, wrap):
    vit = timm_vit()
    path = tmp_path / f"vit{suffix}"
    torch.save(wrap(vit.state_dict()), path)
    med = make_med()
    report = init_vision_from_timm(med, path)
    assert report.ignored == ["head.weight", "head.bias"]
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.allclose(med.image_embeds(pixels), vit.forward_features(pixels), atol=1e-5)


def test_torch_checkpoint_with_more_than_tensors_is_not_unpickled(make_med, tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"state_dict": timm_vit().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="train.pth: holds more than tensors"):
        init_vision_from_timm(make_med(), path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        init_vision_from_timm(make_med(), tmp_path / "missing.pth")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"init_values": 1e-5}, "LayerScale"),
        ({"reg_tokens": 4}, "register tokens"),
        ({"qk_norm": True}, "qk-norm"),
        ({"qkv_bias": False}, "no qkv bias"),
        ({"class_token": False, "global_pool": "avg"}, "class token"),
        ({"depth": 4}, "too many blocks"),
        ({"num_heads": 8}, "8 heads"),
        ({"embed_dim": 64, "num_heads": 4}, "shape"),
    ],
)
def test_incompatible_timm_vit_is_refused(make_med, overrides, message):
    with pytest.raises(ValueError, match=message):
        init_vision_from_timm(make_med(), timm_vit(**overrides))


# -------------------------------------------------------------------------------------------------
# BERT
# -------------------------------------------------------------------------------------------------


def small_bert(vocab_size: int, **overrides) -> BertForMaskedLM:
    torch.manual_seed(2)
    sizes = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512, max_position_embeddings=128)
    config = BertConfig(vocab_size=vocab_size, **{**sizes, **overrides})
    return BertForMaskedLM(config).eval()


def test_bert_init_matches_bert_and_fills_decoder(make_med, tokenizer, tmp_path):
    bert_vocab = len(tokenizer) - 2  # the MED tokenizer is BERT's plus [DEC] and [ENC]
    small_bert(bert_vocab).save_pretrained(tmp_path / "bert")
    bert = BertForMaskedLM.from_pretrained(tmp_path / "bert").eval()
    med = make_med()
    med.eval()
    fresh_cross = med.text_encoder.encoder.layer[0].crossattention.self.query.weight.clone()
    fresh_mode_rows = med.text_encoder.embeddings.word_embeddings.weight[bert_vocab:].clone()

    report = init_text_from_bert(med, tmp_path / "bert")

    text = tokenizer(["a red circle left of a blue square", "two stars"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = bert.bert(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        ours = med.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        ours_m = med.text_encoder_m(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.allclose(ours_m, expected, atol=1e-5)

    layers = zip(med.text_encoder.encoder.layer, med.text_decoder.bert.encoder.layer, bert.bert.encoder.layer)
    for enc_layer, dec_layer, bert_layer in layers:
        assert torch.equal(dec_layer.attention.self.query.weight, bert_layer.attention.self.query.weight)
        assert torch.equal(dec_layer.attention.output.LayerNorm.bias, bert_layer.attention.output.LayerNorm.bias)
        assert dec_layer.attention is not enc_layer.attention
    assert torch.equal(med.text_encoder.encoder.layer[0].crossattention.self.query.weight, fresh_cross)
    assert torch.equal(med.text_encoder.embeddings.word_embeddings.weight[bert_vocab:], fresh_mode_rows)
    head = med.text_decoder.cls.predictions
    assert torch.equal(head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(head.bias[:bert_vocab], bert.cls.predictions.bias)

    assert "text_decoder.bert.encoder.layer.1.attention.self.key.weight" in report.loaded
    assert "text_encoder.encoder.layer.0.crossattention.self.query.weight" in report.fresh
    assert f"text_encoder.embeddings.word_embeddings.weight[{bert_vocab}:{len(tokenizer)}]" in report.fresh
    assert not any(".attention." in key and "crossattention" not in key for key in report.fresh)


@pytest.mark.parametrize("from_dir", [False, True])
def test_bert_model_without_mlm_head(make_med, tokenizer, tmp_path, from_dir):
    bert = BertModel(small_bert(len(tokenizer) - 2).config).eval()
    if from_dir:  # a BertModel checkpoint loads through the same from_pretrained call, head left out
        bert.save_pretrained(tmp_path / "bert")
    med = make_med()
    head_before = med.text_decoder.cls.predictions.transform.dense.weight.clone()
    report = init_text_from_bert(med, tmp_path / "bert" if from_dir else bert)
    assert torch.equal(med.text_encoder.encoder.layer[2].output.dense.weight, bert.encoder.layer[2].output.dense.weight)
    assert torch.equal(med.text_decoder.cls.predictions.transform.dense.weight, head_before)
    assert "text_decoder.cls.predictions.transform.dense.weight" in report.fresh
    assert "embeddings.token_type_embeddings.weight" in report.ignored  # folded into the positions


def test_incompatible_bert_is_refused(make_med, tokenizer):
    with pytest.raises(ValueError, match="larger than MED's"):
        init_text_from_bert(make_med(), small_bert(len(tokenizer) + 10))
    with pytest.raises(ValueError, match="num_attention_heads"):
        init_text_from_bert(make_med(), small_bert(len(tokenizer) - 2, num_attention_heads=8))


# -------------------------------------------------------------------------------------------------
# model.init: timm + BERT
# -------------------------------------------------------------------------------------------------


def test_apply_init_vision_and_text(make_med, tokenizer, tmp_path):
    vit_path = tmp_path / "vit.pth"
    torch.save(timm_vit().state_dict(), vit_path)
    bert_vocab = len(tokenizer) - 2
    small_bert(bert_vocab).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")  # its tokenizer: the token check runs and passes
    init = InitConfig(vision=str(vit_path), text=str(tmp_path / "bert"))

    med = make_med()
    report = apply_init(med, init, tokenizer)

    separately = make_med()
    vision, text = init_vision_from_timm(separately, vit_path), init_text_from_bert(separately, tmp_path / "bert")
    assert report.loaded == sorted(set(vision.loaded) | set(text.loaded))
    for (name, ours), (_, theirs) in zip(med.named_parameters(), separately.named_parameters()):
        if name in report.loaded:
            assert torch.equal(ours, theirs), name
    # Everything neither a ViT nor BERT has: cross-attention (named once, as the encoder's), the ITC/ITM
    # heads, the temperature, and the [DEC]/[ENC] rows.
    cross = [name for name, _ in med.text_encoder.named_parameters(prefix="text_encoder") if ".crossattention." in name]
    rows = f"[{bert_vocab}:{len(tokenizer)}]"
    expected = {"temp", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
                "itm_head.weight", "itm_head.bias", *cross,
                f"text_encoder.embeddings.word_embeddings.weight{rows}", f"text_decoder.cls.predictions.bias{rows}"}
    assert set(report.fresh) == expected and len(report.fresh) == len(expected)
    assert {"timm:head.weight", "timm:head.bias", "bert:embeddings.token_type_embeddings.weight"} <= set(report.ignored)
    assert all(key.startswith(("timm:", "bert:")) for key in report.ignored)

    summary = json.loads(json.dumps(report.summary()))
    assert summary == {"loaded": len(report.loaded), "ignored": len(report.ignored), "fresh": report.fresh}
    line = report.as_log_line()
    assert line.startswith(f"init: {len(report.loaded)} loaded, {len(expected)} fresh ({report.fresh[0]}, ")
    assert line.endswith(f" and {len(expected) - 5} more), {len(report.ignored)} ignored")


def test_apply_init_refuses_a_tokenizer_other_than_the_text_models(make_med, tokenizer, tmp_path):
    from transformers import BertTokenizer

    small_bert(len(tokenizer) - 2).save_pretrained(tmp_path / "bert")
    vocab = list(tokenizer.get_vocab())  # any order but the tokenizer's
    BertTokenizer(vocab={token: i for i, token in enumerate(sorted(vocab))}).save_pretrained(tmp_path / "bert")
    med = make_med()
    before = {name: p.clone() for name, p in med.named_parameters()}
    with pytest.raises(ValueError, match="model.init.text: the run's tokenizer"):
        apply_init(med, InitConfig(text=str(tmp_path / "bert")), tokenizer)
    assert all(torch.equal(p, before[name]) for name, p in med.named_parameters())  # nothing loaded
