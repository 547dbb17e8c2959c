from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForMaskedLM, BertModel

from capfilt.models.init import init_text_from_bert, init_vision_from_timm, interpolate_pos_embed
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
    assert "encoder.layers.2.self_attn.qkv.weight" in report.loaded and report.ignored == ["head.weight", "head.bias"]
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
