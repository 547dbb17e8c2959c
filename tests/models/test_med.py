from __future__ import annotations

import datetime
import math
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from capfilt.config import MedConfig
from capfilt.models.med import (
    MED,
    alpha_at,
    itm_pairs,
    lm_labels,
    load_med,
    sample_itm_negatives,
    save_med,
    trim_padding,
)
from capfilt.models.tokens import IGNORE_INDEX, special_ids
from tests.models.conftest import IMAGE_IDS, TEXTS, tiny_config

# -------------------------------------------------------------------------------------------------
# Construction and tying
# -------------------------------------------------------------------------------------------------


def test_encoder_and_decoder_share_all_but_self_attention(make_med):
    med = make_med()
    encoder, decoder = med.text_encoder, med.text_decoder.bert
    assert decoder.embeddings is encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer):
        # Cross-attention is an "attention" module too, and must stay shared.
        for name in ("crossattention", "intermediate", "output"):
            assert getattr(dec_layer, name) is getattr(enc_layer, name)
        for enc_param, dec_param in zip(enc_layer.crossattention.parameters(), dec_layer.crossattention.parameters()):
            assert enc_param.data_ptr() == dec_param.data_ptr()
        assert dec_layer.attention is not enc_layer.attention
        for name, enc_param in enc_layer.attention.named_parameters():
            assert enc_param.data_ptr() != dict(dec_layer.attention.named_parameters())[name].data_ptr()
    head = med.text_decoder.cls.predictions
    assert head.decoder.weight is encoder.embeddings.word_embeddings.weight
    assert not hasattr(med.text_encoder, "cls")

    # The decoder's loss trains the encoder's cross-attention: it is the same module.
    text = torch.tensor([[2, 9, 3]])
    image_embeds = torch.randn(1, 5, med.config.vision.width)
    med.text_decoder(input_ids=text, encoder_hidden_states=image_embeds, labels=text).loss.backward()
    assert encoder.encoder.layer[0].crossattention.self.query.weight.grad is not None
    assert encoder.encoder.layer[0].attention.self.query.weight.grad is None


def test_sizes_follow_config(make_med, tokenizer):
    med = make_med()
    cfg = tiny_config()
    assert med.visual_encoder.config.hidden_size == cfg.vision.width
    assert med.text_encoder.config.num_attention_heads == cfg.text.heads
    assert med.text_encoder.config.hidden_dropout_prob == cfg.text.dropout
    assert med.text_decoder.config.label_smoothing == cfg.lm_label_smoothing
    assert med.text_encoder.config.vocab_size == len(tokenizer)
    assert med.text_decoder.config.bos_token_id == special_ids(tokenizer)["dec"]
    assert med.image_queue.shape == (cfg.embed_dim, cfg.queue_size)
    assert torch.allclose(med.image_queue.norm(dim=0), torch.ones(cfg.queue_size))
    assert med.temp.item() == pytest.approx(cfg.temperature_init)
    assert all(not p.requires_grad for p in med.text_encoder_m.parameters())


def test_fresh_vit_is_trainable(make_med):
    # transformers' BlipVisionConfig defaults to initializer_range 1e-10: weights near zero.
    med = make_med()
    for name, param in med.visual_encoder.named_parameters():
        if name.endswith("weight") and param.dim() > 1 or "class_embedding" in name or "position_embedding" in name:
            assert 0.01 < param.std().item() < 0.03, name


def test_base_preset_has_reference_sizes():
    import timm
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        med = MED(MedConfig(preset="base"), vocab_size=30524,
                  special={"cls": 101, "enc": 30523, "dec": 30522, "sep": 102, "pad": 0})
        vit = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=0)
        bert = BertModel(BertConfig(vocab_size=30524, max_position_embeddings=512), add_pooling_layer=False)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(med.visual_encoder) == count(vit)
    layer = med.text_encoder.encoder.layer[0]
    cross, self_attention = count(layer.crossattention), count(layer.attention)
    assert cross == self_attention  # vision width = text width in base
    token_types = 2 * 768
    assert count(med.text_encoder) == count(bert) - token_types + 12 * cross
    head = count(med.text_decoder.cls) - 768 * 30524  # the head matrix is the tied word embedding
    assert count(med.text_decoder) == count(med.text_encoder) + head  # its own self-attention replaces the encoder's
    unique = {id(p): p for m in (med.text_encoder, med.text_decoder) for p in m.parameters()}
    assert sum(p.numel() for p in unique.values()) == count(med.text_encoder) + 12 * self_attention + head


# -------------------------------------------------------------------------------------------------
# Objectives
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["itc", "itm", "lm"])
def test_each_loss_is_finite_and_decreases(make_med, batch, objective):
    med = make_med()
    if objective == "itm":
        # An uninformative head starts at ln 2 on every batch. From scratch ITM first learns the 1:2
        # match prior (entropy 0.637) and only tens of steps later to match; pairs and labels are
        # checked exactly in test_itm_pairs_and_labels.
        nn.init.zeros_(med.itm_head.weight)
        nn.init.zeros_(med.itm_head.bias)
    optimizer = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for _ in range(12):
        out = med(*batch, alpha=0.4, objectives=(objective,))
        assert set(out) == {f"loss_{objective}", "loss"}
        assert torch.isfinite(out["loss"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    if objective == "itm":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
        assert max(losses[-3:]) < 0.66, losses
    else:
        assert losses[-1] < losses[0] * 0.95, losses


ENCODER_SELF_ATTENTION = "text_encoder.encoder.layer.0.attention"
DECODER_SELF_ATTENTION = "text_decoder.bert.encoder.layer.0.attention"
LM_HEAD = "text_decoder.cls.predictions.transform"


@pytest.mark.parametrize(
    ("objective", "trained", "untouched"),
    [
        ("itc", ["visual_encoder", ENCODER_SELF_ATTENTION, "vision_proj", "text_proj", "temp"],
         ["crossattention", "itm_head", LM_HEAD]),
        ("itm", ["visual_encoder", ENCODER_SELF_ATTENTION, "crossattention", "itm_head"], [DECODER_SELF_ATTENTION, LM_HEAD]),
        ("lm", ["visual_encoder", DECODER_SELF_ATTENTION, "crossattention", LM_HEAD],
         [ENCODER_SELF_ATTENTION, "itm_head", "vision_proj"]),
    ],
)
def test_each_objective_trains_its_modules(make_med, batch, objective, trained, untouched):
    med = make_med()
    med(*batch, objectives=(objective,))["loss"].backward()
    grads = {name: p.grad for name, p in med.named_parameters(remove_duplicate=False) if p.requires_grad}
    for part in trained:
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if part in n), part
    for part in untouched:
        assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if part in n), part


def test_forward_sums_requested_losses(make_med, batch):
    out = make_med()(*batch, alpha=0.4)
    assert out["loss"].item() == pytest.approx(sum(out[f"loss_{o}"].item() for o in ("itc", "itm", "lm")), rel=1e-6)
    with pytest.raises(ValueError, match="objectives"):
        make_med()(*batch, objectives=("mlm",))
    pixels, ids, mask, _ = batch
    with pytest.raises(ValueError, match="image_ids"):
        make_med()(pixels, ids, mask, objectives=("itm",))
    assert torch.isfinite(make_med()(pixels, ids, mask, objectives=("lm",))["loss"])  # LM needs no ids


def test_temperature_is_clamped(make_med, batch):
    med = make_med()
    with torch.no_grad():
        med.temp.fill_(5.0)
    med(*batch, objectives=("itc",))
    assert med.temp.item() == pytest.approx(med.config.temperature_max)


def test_itc_targets_group_by_image_id(make_med, batch):
    # alpha = 0, one step from a fresh queue: the loss equals the hand-built soft-target loss.
    med = make_med()
    med.eval()
    pixels, ids, mask, image_ids = batch
    image_feat = med.image_features(med.image_embeds(pixels))
    text_feat = med.text_features(ids, mask)
    queue_image, queue_text = med.image_queue.clone(), med.text_queue.clone()
    loss = med.itc_loss(pixels, ids, mask, image_feat, text_feat, image_ids, alpha=0.0)
    # Momentum encoders equal the online ones at construction, so the momentum features equal these.
    all_ids = torch.cat([image_ids, torch.full((med.config.queue_size,), -1)])
    targets = (image_ids[:, None] == all_ids[None]).float()
    targets = targets / targets.sum(1, keepdim=True)
    assert targets[0, 2] == 0.5 and targets[1, 1] == 1.0
    sim_i2t = image_feat @ torch.cat([text_feat.t(), queue_text], 1) / med.temp
    sim_t2i = text_feat @ torch.cat([image_feat.t(), queue_image], 1) / med.temp
    expected = (-(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean() - (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


# -------------------------------------------------------------------------------------------------
# Queues
# -------------------------------------------------------------------------------------------------


def test_enqueue_writes_batch_features_and_wraps(make_med, batch):
    med = make_med(queue_size=12)  # 2 batches of 6
    pixels, ids, mask, image_ids = batch
    med.eval()  # no dropout anywhere: the momentum features can be recomputed
    med(*batch, objectives=("itc",))
    assert int(med.queue_ptr) == 6
    with torch.no_grad():
        image_feat_m = F.normalize(med.vision_proj_m(med.visual_encoder_m(pixel_values=pixels).last_hidden_state[:, 0]), dim=-1)
    assert torch.allclose(med.image_queue[:, :6], image_feat_m.t(), atol=1e-6)
    assert torch.equal(med.idx_queue[:6], image_ids)
    assert (med.idx_queue[6:] == -1).all()

    med._dequeue_and_enqueue(torch.ones(6, med.config.embed_dim), torch.ones(6, med.config.embed_dim), image_ids + 10)
    assert int(med.queue_ptr) == 0  # wrapped
    assert torch.equal(med.idx_queue[6:], image_ids + 10)
    med._dequeue_and_enqueue(torch.zeros(6, med.config.embed_dim), torch.zeros(6, med.config.embed_dim), image_ids + 20)
    assert int(med.queue_ptr) == 6
    assert torch.equal(med.idx_queue, torch.cat([image_ids + 20, image_ids + 10]))
    assert (med.text_queue[:, :6] == 0).all() and (med.text_queue[:, 6:] == 1).all()


def test_queue_must_be_multiple_of_global_batch(make_med, batch):
    med = make_med(queue_size=16)
    with pytest.raises(ValueError, match="multiple of the global batch size 6"):
        med(*batch, objectives=("itc",))


def test_queue_size_zero_uses_in_batch_negatives_only(make_med, batch):
    med = make_med(queue_size=0, alpha=0.0)
    med.eval()
    pixels, ids, mask, image_ids = batch
    loss = med(*batch, objectives=("itc",))["loss_itc"]
    with torch.no_grad():
        image_feat = med.image_features(med.image_embeds(pixels))
        text_feat = med.text_features(ids, mask)
    targets = (image_ids[:, None] == image_ids[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)
    expected = -(F.log_softmax(image_feat @ text_feat.t() / med.temp, 1) * targets).sum(1).mean() / 2
    expected += -(F.log_softmax(text_feat @ image_feat.t() / med.temp, 1) * targets).sum(1).mean() / 2
    assert torch.allclose(loss, expected, atol=1e-5)
    assert med.image_queue.shape[1] == 0 and int(med.queue_ptr) == 0


def test_init_gains_scale_attention_weights(tokenizer):
    def build(gain: float, cross_qk_gain: float) -> MED:
        torch.manual_seed(0)  # the same draws, so the two differ by the gains alone
        text = {"attention_init_gain": gain, "cross_attention_qk_init_gain": cross_qk_gain, "dropout": 0.0}
        return MED.from_config(tiny_config(text=text), tokenizer)

    scaled, plain = build(4.0, 8.0), build(1.0, 1.0)
    references = dict(plain.named_parameters())
    for name, weight in scaled.named_parameters():
        reference = references[name]
        in_attention = (".attention." in name or ".crossattention." in name) and name.endswith("weight")
        cross_qk = ".crossattention." in name and (".query." in name or ".key." in name) and name.endswith("weight")
        if in_attention and (".value." in name or ".output.dense." in name):
            assert torch.allclose(weight, 4.0 * reference), name
        elif cross_qk:
            assert torch.allclose(weight, 8.0 * reference), name
        else:
            assert torch.equal(weight, reference), name
    # The decoder's cross-attention is the encoder's module: scaled once, not twice.
    assert scaled.text_decoder.bert.encoder.layer[0].crossattention is scaled.text_encoder.encoder.layer[0].crossattention
    tiny, base = MedConfig(preset="tiny").text, MedConfig(preset="base").text
    assert (tiny.attention_init_gain, tiny.cross_attention_qk_init_gain) == (4.0, 8.0)
    # base loads BERT, which replaces the init anyway
    assert (base.attention_init_gain, base.cross_attention_qk_init_gain) == (1.0, 1.0)


def test_trim_padding_drops_only_trailing_pad_columns():
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    trimmed_ids, trimmed_mask = trim_padding(ids, mask)
    assert trimmed_ids.tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]] and trimmed_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    left = torch.tensor([[0, 0, 1, 2], [0, 1, 5, 2]])
    assert trim_padding(left, (left != 0).long())[0] is left  # left padding is left alone


def test_trailing_pads_change_no_output(tokenizer):
    # What makes trim_padding safe: features, ITM logits and the LM loss ignore trailing pad columns.
    torch.manual_seed(0)
    med = MED.from_config(tiny_config(text={"dropout": 0.0}), tokenizer).eval()
    pixels = torch.randn(4, 3, 32, 32)
    tokens = tokenizer(["a red circle", "two blue squares left of a star", "a cross", "a star"],
                       padding="max_length", max_length=20, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    short_ids, short_mask = trim_padding(ids, mask)
    assert short_ids.shape[1] < ids.shape[1]
    with torch.no_grad():
        embeds = med.image_embeds(pixels)
        pairs = [
            (med.text_features(ids, mask), med.text_features(short_ids, short_mask)),
            (med.itm_logits(embeds, ids, mask), med.itm_logits(embeds, short_ids, short_mask)),
            (med.lm_loss(embeds, ids, mask), med.lm_loss(embeds, short_ids, short_mask)),
        ]
    for padded, short in pairs:
        assert torch.allclose(padded, short, atol=1e-5)


def test_alpha_ramps_linearly():
    config = tiny_config(alpha=0.4, alpha_rampup_steps=100)
    assert [alpha_at(s, config) for s in (0, 50, 100, 1000)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert alpha_at(0, tiny_config(alpha=0.4)) == 0.4


# -------------------------------------------------------------------------------------------------
# ITM hard negatives
# -------------------------------------------------------------------------------------------------


def test_hard_negatives_never_same_image_or_same_text(batch):
    _, input_ids, _, image_ids = batch
    generator = torch.Generator().manual_seed(0)
    n = len(TEXTS)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for _ in range(300):
        sim = torch.randn(n, n, generator=generator) * 5
        image_for_text, text_for_image = sample_itm_negatives(sim, image_ids, input_ids, generator)
        assert (image_for_text >= 0).all() and (text_for_image >= 0).all()  # every row has a candidate here
        for i in range(n):
            for j in (image_for_text[i].item(), text_for_image[i].item()):
                assert IMAGE_IDS[i] != IMAGE_IDS[j] and TEXTS[i] != TEXTS[j], (i, j)
                seen[i, j] = True
    # Everything allowed is drawn at some point (the 1e-4 floor keeps low-similarity ones possible).
    allowed = torch.tensor([[IMAGE_IDS[i] != IMAGE_IDS[j] and TEXTS[i] != TEXTS[j] for j in range(n)] for i in range(n)])
    assert torch.equal(seen, allowed)


def test_hard_negatives_follow_similarity():
    ids = torch.arange(3)
    texts = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3]])
    sim = torch.tensor([[0.0, 10.0, -10.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    picks = [sample_itm_negatives(sim, ids, texts)[1][0].item() for _ in range(50)]
    assert picks.count(1) >= 45  # image 0's hardest text is text 1


def test_rows_without_candidates_get_none(make_med, batch):
    input_ids = torch.tensor([[2, 5, 3], [2, 5, 3], [2, 6, 3]])
    image_ids = torch.tensor([0, 1, 0])  # row 0: same text as 1, same image as 2
    image_for_text, text_for_image = sample_itm_negatives(torch.zeros(3, 3), image_ids, input_ids)
    assert image_for_text[0] == -1 and text_for_image[0] == -1
    assert image_for_text[1] == 2 and image_for_text[2] == 1

    # A batch of one image: no negative at all; ITM still gives a finite loss on the positives.
    pixels, ids, mask, _ = batch
    out = make_med()(pixels, ids, mask, torch.zeros(len(ids), dtype=torch.long), objectives=("itm",))
    assert torch.isfinite(out["loss_itm"])


def test_itm_pairs_and_labels(batch):
    _, input_ids, _, image_ids = batch
    n = len(TEXTS)
    text_rows, image_rows, labels = itm_pairs(torch.randn(n, n), image_ids, input_ids)
    assert len(labels) == 3 * n and labels.tolist() == [1] * n + [0] * 2 * n
    assert torch.equal(text_rows[:n], torch.arange(n)) and torch.equal(image_rows[:n], torch.arange(n))
    assert torch.equal(text_rows[n : 2 * n], torch.arange(n))  # each text with a negative image
    assert torch.equal(image_rows[2 * n :], torch.arange(n))  # each image with a negative text
    for t, i in zip(text_rows[n:].tolist(), image_rows[n:].tolist()):
        assert IMAGE_IDS[t] != IMAGE_IDS[i] and TEXTS[t] != TEXTS[i]

    # Rows without a candidate lose that negative only.
    ids = torch.tensor([[2, 5, 3], [2, 5, 3], [2, 6, 3]])
    text_rows, image_rows, labels = itm_pairs(torch.zeros(3, 3), torch.tensor([0, 1, 0]), ids)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert list(zip(text_rows[3:].tolist(), image_rows[3:].tolist())) == [(1, 2), (2, 1), (2, 1), (1, 2)]


# -------------------------------------------------------------------------------------------------
# LM
# -------------------------------------------------------------------------------------------------


def test_lm_labels_mask_pads_and_prompt():
    ids = torch.tensor([[30, 11, 12, 13, 14, 3, 0, 0], [30, 11, 12, 13, 15, 16, 17, 3]])
    mask = (ids != 0).long()
    labels = lm_labels(ids, mask, prompt_length=4)
    assert labels.tolist() == [[-100] * 4 + [14, 3, -100, -100], [-100] * 4 + [15, 16, 17, 3]]
    assert torch.equal(lm_labels(ids, mask)[:, 1:4], ids[:, 1:4])


def test_lm_loss_is_smoothed_next_token_loss_after_prompt(make_med, batch):
    med = make_med(lm_label_smoothing=0.1)
    med.eval()
    pixels, ids, mask, image_ids = batch
    loss = med(pixels, ids, mask, image_ids, objectives=("lm",), prompt_length=2)["loss_lm"]
    dec_ids = ids.clone()
    dec_ids[:, 0] = med.special["dec"]
    image_embeds = med.image_embeds(pixels)
    logits = med.text_decoder(input_ids=dec_ids, attention_mask=mask, encoder_hidden_states=image_embeds).logits
    targets = dec_ids.masked_fill(mask == 0, IGNORE_INDEX)
    targets[:, :2] = IGNORE_INDEX
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# -------------------------------------------------------------------------------------------------
# Checkpoints
# -------------------------------------------------------------------------------------------------


def test_save_load_round_trip(make_med, batch, tokenizer, tmp_path):
    med = make_med()
    med(*batch, objectives=("itc",))  # non-trivial queue and momentum state
    save_med(med, tmp_path / "med", tokenizer)
    loaded = load_med(tmp_path / "med")
    assert loaded.config == med.config and loaded.special == med.special
    original, restored = med.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert int(loaded.queue_ptr) == 6
    # Tying is structural, so it survives the load.
    head = loaded.text_decoder.cls.predictions.decoder.weight
    assert head is loaded.text_encoder.embeddings.word_embeddings.weight
    assert (tmp_path / "med" / "tokenizer.json").exists()

    # Re-gridding the ViT for another image size (224 px pretraining → 384 px fine-tuning).
    bigger = load_med(tmp_path / "med", image_size=64)
    assert bigger.visual_encoder.embeddings.position_embedding.shape == (1, 1 + 64, 128)
    assert bigger.visual_encoder(pixel_values=torch.randn(1, 3, 64, 64)).last_hidden_state.shape == (1, 65, 128)
    assert torch.equal(bigger.text_encoder.embeddings.word_embeddings.weight, med.text_encoder.embeddings.word_embeddings.weight)


def test_load_med_errors_name_the_file(make_med, tmp_path):
    with pytest.raises(FileNotFoundError, match="med.json"):
        load_med(tmp_path)
    save_med(make_med(), tmp_path)
    meta = (tmp_path / "med.json").read_text()
    (tmp_path / "med.json").write_text("{}")
    with pytest.raises(ValueError, match="med.json"):
        load_med(tmp_path)
    (tmp_path / "med.json").write_text(meta.replace('"width": 128', '"width": 64'))
    with pytest.raises(ValueError, match="med.safetensors"):
        load_med(tmp_path)


# -------------------------------------------------------------------------------------------------
# Distributed queue (gloo, 2 processes)
# -------------------------------------------------------------------------------------------------

_SPECIAL = {"pad": 0, "cls": 1, "sep": 2, "dec": 3, "enc": 4}


def _distributed_worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        tiny = {"layers": 1, "width": 32, "heads": 2, "mlp_dim": 64}
        config = MedConfig(
            vision={"image_size": 16, "patch_size": 8, **tiny},
            text={**tiny, "max_position_embeddings": 8},
            embed_dim=16,
            queue_size=8,
        )
        torch.manual_seed(0)  # same weights on both ranks, as DDP guarantees
        med = MED(config, vocab_size=16, special=_SPECIAL)
        torch.manual_seed(100 + rank)  # different data per rank
        pixels = torch.randn(2, 3, 16, 16)
        input_ids = torch.tensor([[1, 5 + rank, 2], [1, 7, 2]])
        image_ids = torch.tensor([10 * rank, 10 * rank + 1])
        med(pixels, input_ids, torch.ones_like(input_ids), image_ids, objectives=("itc",))

        assert int(med.queue_ptr) == 4  # the global batch, not the local one
        assert med.idx_queue[:4].tolist() == [0, 1, 10, 11]
        with torch.no_grad():
            local = F.normalize(med.vision_proj_m(med.visual_encoder_m(pixel_values=pixels).last_hidden_state[:, 0]), dim=-1)
        assert torch.allclose(med.image_queue[:, 2 * rank : 2 * rank + 2], local.t(), atol=1e-6)
        # Both ranks hold the same queue.
        others = [torch.empty_like(med.image_queue) for _ in range(world_size)]
        dist.all_gather(others, med.image_queue)
        assert torch.equal(others[0], others[1])

        small = MED(config.model_copy(update={"queue_size": 6}), vocab_size=16, special=_SPECIAL)
        try:
            small(pixels, input_ids, torch.ones_like(input_ids), image_ids, objectives=("itc",))
        except ValueError as error:
            assert "global batch size 4" in str(error), error
        else:
            raise AssertionError("queue of 6 with a global batch of 4 was accepted")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_queue_gathers_from_all_ranks():
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork (not spawn): the children reuse the parent's imports instead of re-importing transformers.
    mp.start_processes(_distributed_worker, args=(2, port), nprocs=2, join=True, start_method="fork")
