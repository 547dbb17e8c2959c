"""MED: BLIP's multimodal mixture of encoder-decoder, built from transformers' BLIP modules.

One ViT (``BlipVisionModel``) and one text transformer in three modes, chosen by the token at
position 0 (see :mod:`capfilt.models.tokens`):

- ITC, ``[CLS]``: ``text_encoder`` without image states; contrastive loss against the image [CLS]
  with momentum-distilled soft targets and feature queues (ALBEF / BLIP).
- ITM, ``[ENC]``: ``text_encoder`` cross-attending to the image; a 2-way match head trained on one
  positive and two hard negatives per sample.
- LM, ``[DEC]``: ``text_decoder`` (causal) cross-attending to the image; next-token loss.

Encoder and decoder share every text parameter except self-attention (the very same modules, so the
sharing survives any optimiser and any ``state_dict`` round trip).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig, BlipTextLMHeadModel, BlipTextModel, BlipVisionConfig, BlipVisionModel

from capfilt.config import MedConfig
from capfilt.models.init import interpolate_pos_embed
from capfilt.models.tokens import IGNORE_INDEX, special_ids

OBJECTIVES = ("itc", "itm", "lm")
WEIGHTS_FILE = "med.safetensors"
CONFIG_FILE = "med.json"
# Sampling weight added to every candidate negative, as the reference (keeps low-similarity ones possible).
NEGATIVE_WEIGHT_FLOOR = 1e-4


def vision_config(config: MedConfig) -> BlipVisionConfig:
    v = config.vision
    # transformers' default initializer_range for the ViT is 1e-10 (it expects pretrained weights):
    # a from-scratch ViT would start with all-zero linear layers. 0.02 is the reference ViT's init.
    return BlipVisionConfig(
        hidden_size=v.width,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        intermediate_size=v.mlp_dim,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        initializer_range=0.02,
    )


def text_config(config: MedConfig, vocab_size: int, special: dict[str, int]) -> BlipTextConfig:
    t = config.text
    return BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=t.width,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        intermediate_size=t.mlp_dim,
        max_position_embeddings=t.max_position_embeddings,
        layer_norm_eps=t.layer_norm_eps,
        hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.dropout,
        encoder_hidden_size=config.vision.width,
        is_decoder=True,  # cross-attention layers exist; they run only when image states are given
        bos_token_id=special["dec"],
        eos_token_id=special["sep"],  # generation ends on [SEP]
        sep_token_id=special["sep"],
        pad_token_id=special["pad"],
        label_smoothing=config.lm_label_smoothing,
    )


def alpha_at(step: int, config: MedConfig) -> float:
    """Weight of the momentum-distilled ITC targets at ``step``: linear ramp from 0 over ``alpha_rampup_steps``."""
    if config.alpha_rampup_steps == 0:
        return config.alpha
    return config.alpha * min(1.0, step / config.alpha_rampup_steps)


def _with_first(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    """Next-token targets: pads and the first ``prompt_length`` tokens ([DEC] + prompt) are ignored."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return labels


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns after the batch's longest text.

    Batches arrive padded to ``max_text_length`` (fixed shapes from the decoding tasks), mostly pads
    on short web captions. Trailing pads change no output (keys are masked, positions are absolute, pad
    labels are ignored) but cost a third to a half of a step's compute.
    """
    length = int(attention_mask.sum(1).max()) if attention_mask.numel() else 0
    if length >= input_ids.shape[1] or attention_mask[:, length:].any():  # left padding: keep as is
        return input_ids, attention_mask
    return input_ids[:, :length], attention_mask[:, :length]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` from every rank, concatenated in rank order (no gradient); itself in one process."""
    if _world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def sample_itm_negatives(
    sim_i2t: torch.Tensor, image_ids: torch.Tensor, input_ids: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives from the batch, drawn with weights ``softmax(sim) + 1e-4``.

    A candidate is never of the same image id (web data repeats images) nor of the same text
    (web data repeats captions): either would be a positive labelled as a negative.
    Returns ``(image_for_text, text_for_image)``: for each text the index of a negative image, for
    each image the index of a negative text; ``-1`` where the batch holds no valid candidate (tiny
    batches, or a batch of one image), and the caller drops that negative.
    """
    same_image = image_ids[:, None] == image_ids[None, :]
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)
    forbidden = same_image | same_text  # symmetric, diagonal included
    weights_i2t = (F.softmax(sim_i2t.float(), dim=1) + NEGATIVE_WEIGHT_FLOOR).masked_fill(forbidden, 0)
    weights_t2i = (F.softmax(sim_i2t.float().t(), dim=1) + NEGATIVE_WEIGHT_FLOOR).masked_fill(forbidden, 0)
    return _draw(weights_t2i, generator), _draw(weights_i2t, generator)


def itm_pairs(
    sim_i2t: torch.Tensor, image_ids: torch.Tensor, input_ids: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITM training pairs as ``(text_rows, image_rows, labels)``: every (text_i, image_i) labelled 1,
    then (text_i, hard negative image) and (hard negative text, image_i) labelled 0, skipping the
    negatives :func:`sample_itm_negatives` could not find."""
    image_for_text, text_for_image = sample_itm_negatives(sim_i2t, image_ids, input_ids, generator)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    has_image, has_text = image_for_text >= 0, text_for_image >= 0
    text_rows = torch.cat([rows, rows[has_image], text_for_image[has_text]])
    image_rows = torch.cat([rows, image_for_text[has_image], rows[has_text]])
    labels = (torch.arange(len(text_rows), device=rows.device) < len(rows)).long()
    return text_rows, image_rows, labels


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    picks = torch.full((weights.shape[0],), -1, dtype=torch.long, device=weights.device)
    valid = weights.sum(1) > 0
    if valid.any():
        picks[valid] = torch.multinomial(weights[valid], 1, generator=generator).squeeze(1)
    return picks


class MED(nn.Module):
    """ViT + text encoder/decoder (tied), ITC projections, ITM head, momentum encoders and queues."""

    def __init__(self, config: MedConfig, vocab_size: int, special: dict[str, int]):
        super().__init__()
        missing = {"cls", "enc", "dec", "sep", "pad"} - set(special)
        if missing:
            raise ValueError(f"special ids lack {sorted(missing)}; build them with capfilt.models.tokens.special_ids")
        too_big = {name: i for name, i in special.items() if i >= vocab_size}
        if too_big:
            raise ValueError(f"special ids {too_big} do not fit vocab_size {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.special = dict(special)

        self.visual_encoder = BlipVisionModel(vision_config(config))
        text = text_config(config, vocab_size, special)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text)
        self._tie_encoder_decoder()
        self._scale_attention_init(config.text.attention_init_gain, config.text.cross_attention_qk_init_gain)

        width, embed_dim = config.text.width, config.embed_dim
        self.vision_proj = nn.Linear(config.vision.width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)  # class 1 = match
        self.temp = nn.Parameter(torch.tensor(config.temperature_init))

        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for module in self._momentum_models():
            module.requires_grad_(False)

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((config.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @classmethod
    def from_config(cls, config: MedConfig, tokenizer) -> "MED":
        vocab_size = config.vocab_size or len(tokenizer)
        if vocab_size < len(tokenizer):
            raise ValueError(f"MedConfig.vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        return cls(config, vocab_size, special_ids(tokenizer))

    def _tie_encoder_decoder(self) -> None:
        # As BLIP's tie_encoder_decoder_weights(..., '/attention'): share everything but self-attention.
        # Whole modules are shared, so a layer's cross-attention (an `attention`-named module too) stays tied.
        decoder = self.text_decoder.bert
        decoder.embeddings = self.text_encoder.embeddings
        for enc_layer, dec_layer in zip(self.text_encoder.encoder.layer, decoder.encoder.layer):
            dec_layer.crossattention = enc_layer.crossattention
            dec_layer.intermediate = enc_layer.intermediate
            dec_layer.output = enc_layer.output
        # The LM head's output matrix is the (now shared) word embedding matrix, as transformers ties it.
        self.text_decoder.cls.predictions.decoder.weight = decoder.embeddings.word_embeddings.weight

    @torch.no_grad()
    def _scale_attention_init(self, gain: float, cross_qk_gain: float) -> None:
        """Scale the text towers' attention value/output weights (self and cross) by ``gain`` and the
        cross-attention query/key weights by ``cross_qk_gain``.

        Weights loaded later (a checkpoint, BERT) replace these; only from-scratch training sees them.
        """
        layers = list(self.text_encoder.encoder.layer) + list(self.text_decoder.bert.encoder.layer)
        attentions = {id(m): m for layer in layers for m in (layer.attention, layer.crossattention)}
        for attention in attentions.values():  # cross-attention is shared: scale it once
            attention.self.value.weight.mul_(gain)
            attention.output.dense.weight.mul_(gain)
        for layer in self.text_encoder.encoder.layer:  # the decoder's cross-attention is the same module
            layer.crossattention.self.query.weight.mul_(cross_qk_gain)
            layer.crossattention.self.key.weight.mul_(cross_qk_gain)

    def _momentum_pairs(self):
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.text_encoder, self.text_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_proj, self.text_proj_m),
        ]

    def _momentum_models(self):
        return [momentum for _, momentum in self._momentum_pairs()]

    @torch.no_grad()
    def copy_params(self) -> None:
        """Reset the momentum encoders to the online ones (after loading pretrained weights)."""
        for online, momentum in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.copy_(p)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for online, momentum in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1.0 - m)

    # ---------------------------------------------------------------------------------------------
    # Features
    # ---------------------------------------------------------------------------------------------

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All ViT tokens, [CLS] first (``pooler_output`` would LayerNorm the [CLS] twice)."""
        return self.visual_encoder(pixel_values=pixel_values).last_hidden_state

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoder ([CLS] first, no image), projected and L2-normalised."""
        ids = _with_first(input_ids, self.special["cls"])
        hidden = self.text_encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Image-grounded text encoder ([ENC] first) → 2-way logits, class 1 = match."""
        ids = _with_first(input_ids, self.special["enc"])
        hidden = self.text_encoder(
            input_ids=ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state
        return self.itm_head(hidden[:, 0])

    # ---------------------------------------------------------------------------------------------
    # Objectives
    # ---------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        alpha: float = 0.0,
        objectives: tuple[str, ...] = OBJECTIVES,
        prompt_length: int = 0,
    ) -> dict[str, torch.Tensor]:
        """The requested losses (``loss_itc``, ``loss_itm``, ``loss_lm``) and their sum ``loss``.

        ``input_ids`` are tokenizer output ([CLS] first); each objective puts its own mode token at
        position 0. ``image_ids`` (int64, >= 0; needed by ITC and ITM): rows with the same id show the
        same image. Images must be ``config.vision.image_size`` square (see :func:`load_med` to re-grid).
        """
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown or not objectives:
            raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, got {tuple(objectives)}")
        if image_ids is None and ("itc" in objectives or "itm" in objectives):
            raise ValueError("ITC and ITM need image_ids (same id = same image) for their targets and negatives")
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        image_embeds = self.image_embeds(pixel_values)
        losses = {}
        if "itc" in objectives or "itm" in objectives:
            with torch.no_grad():
                self.temp.clamp_(self.config.temperature_min, self.config.temperature_max)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(input_ids, attention_mask)
        if "itc" in objectives:
            losses["loss_itc"] = self.itc_loss(
                pixel_values, input_ids, attention_mask, image_feat, text_feat, image_ids, alpha
            )
        if "itm" in objectives:
            losses["loss_itm"] = self.itm_loss(image_embeds, input_ids, attention_mask, image_feat, text_feat, image_ids)
        if "lm" in objectives:
            losses["loss_lm"] = self.lm_loss(image_embeds, input_ids, attention_mask, prompt_length)
        losses["loss"] = sum(losses.values())
        return losses

    def itc_loss(self, pixel_values, input_ids, attention_mask, image_feat, text_feat, image_ids, alpha) -> torch.Tensor:
        """Contrastive loss against batch + queue; positives are all entries with the same image id."""
        self._check_queue(image_feat.shape[0])
        if (image_ids < 0).any():
            raise ValueError("image_ids must be >= 0 (-1 marks empty queue slots)")
        with torch.no_grad():
            self._momentum_update()
            image_hidden_m = self.visual_encoder_m(pixel_values=pixel_values).last_hidden_state
            image_feat_m = F.normalize(self.vision_proj_m(image_hidden_m[:, 0]), dim=-1)
            ids = _with_first(input_ids, self.special["cls"])
            text_hidden_m = self.text_encoder_m(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            text_feat_m = F.normalize(self.text_proj_m(text_hidden_m[:, 0]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)  # queue may be empty
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)

            ids_all = torch.cat([image_ids, self.idx_queue.clone()])
            positives = (image_ids[:, None] == ids_all[None, :]).float()
            targets = positives / positives.sum(1, keepdim=True)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets

        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, image_ids)
        return (loss_i2t + loss_t2i) / 2

    def itm_loss(self, image_embeds, input_ids, attention_mask, image_feat, text_feat, image_ids) -> torch.Tensor:
        """Cross-entropy of the match head on each positive and its hard negatives (see :func:`itm_pairs`)."""
        with torch.no_grad():
            sim_i2t = image_feat @ text_feat.t() / self.temp
            text_rows, image_rows, labels = itm_pairs(sim_i2t, image_ids, input_ids)
        logits = self.itm_logits(image_embeds[image_rows], input_ids[text_rows], attention_mask[text_rows])
        return F.cross_entropy(logits, labels)

    def lm_loss(self, image_embeds, input_ids, attention_mask, prompt_length: int = 0) -> torch.Tensor:
        """Captioning loss of the decoder ([DEC] first), label smoothing from the config."""
        ids = _with_first(input_ids, self.special["dec"])
        out = self.text_decoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            labels=lm_labels(ids, attention_mask, prompt_length),
        )
        return out.loss

    # ---------------------------------------------------------------------------------------------
    # Queues
    # ---------------------------------------------------------------------------------------------

    def _check_queue(self, local_batch: int) -> None:
        if self.config.queue_size == 0:
            return
        world = _world_size()
        if self.config.queue_size % (local_batch * world):
            raise ValueError(
                f"queue_size {self.config.queue_size} must be a multiple of the global batch size "
                f"{local_batch * world} (batch {local_batch} x world size {world})"
            )

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor) -> None:
        if self.config.queue_size == 0:
            return
        image_feat, text_feat, image_ids = (concat_all_gather(t) for t in (image_feat, text_feat, image_ids))
        batch = image_feat.shape[0]
        if self.config.queue_size % batch:  # _check_queue catches it first; this guards direct calls
            raise ValueError(f"queue_size {self.config.queue_size} must be a multiple of the global batch size {batch}")
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr : ptr + batch] = image_feat.t()
        self.text_queue[:, ptr : ptr + batch] = text_feat.t()
        self.idx_queue[ptr : ptr + batch] = image_ids
        self.queue_ptr[0] = (ptr + batch) % self.config.queue_size


# -------------------------------------------------------------------------------------------------
# Checkpoints (pretraining and fine-tuning state; exports live in capfilt.models.export)
# -------------------------------------------------------------------------------------------------


def save_med(med: MED, out_dir: str | Path, tokenizer=None) -> Path:
    """``med.safetensors`` (shared tensors stored once) + ``med.json``; the tokenizer too if given."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(med, str(out_dir / WEIGHTS_FILE))
    meta = {
        "config": med.config.model_dump(mode="json", exclude={"init"}),  # where it started is history, not architecture
        "vocab_size": med.vocab_size,
        "special": med.special,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_med(model_dir: str | Path, image_size: int | None = None) -> MED:
    """A MED saved by :func:`save_med`; ``image_size`` re-grids the ViT position embedding (224 → 384)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a MED directory written by save_med")
    try:
        meta = json.loads(config_path.read_text())
        config = MedConfig.model_validate(meta["config"])
        vocab_size, special = int(meta["vocab_size"]), {k: int(v) for k, v in meta["special"].items()}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config_path}: not a valid MED config ({error})") from error
    if image_size is not None and image_size != config.vision.image_size:
        config = config.model_copy(update={"vision": config.vision.model_copy(update={"image_size": image_size})})
        config = MedConfig.model_validate(config.model_dump())  # re-run the image/patch size check
    med = MED(config, vocab_size, special)

    state = load_file(str(weights_path))
    expected = med.state_dict()
    grid = config.vision.image_size // config.vision.patch_size
    for key in ("visual_encoder.embeddings.position_embedding", "visual_encoder_m.embeddings.position_embedding"):
        if key in state and state[key].shape != expected[key].shape:
            state[key] = interpolate_pos_embed(state[key], grid)
    try:
        missing, unexpected = med.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{weights_path}: does not match its {CONFIG_FILE}: {error}") from None
    # save_model stores a shared tensor under one name; its aliases are "missing" but were loaded.
    loaded = {expected[k].data_ptr() for k in state if k in expected}
    missing = [k for k in missing if expected[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not match its {CONFIG_FILE} (missing {missing}, unexpected {unexpected})")
    return med
