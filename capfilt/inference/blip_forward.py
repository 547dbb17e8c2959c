"""BLIP's inference forward passes, run over transformers' own modules, without the repeated work.

transformers' BLIP attention materialises its scores (eager attention, in the ViT and the text
model), grows the decoder's self-attention cache by concatenating it every step, and needs an
image's cross-attention keys and values repeated once per text row. The functions here call the
same modules with the same weights, layer for layer, but

- use ``scaled_dot_product_attention``, which fuses attention on CPUs and GPUs;
- project each image's cross-attention keys and values once, and let all texts or captions of an
  image attend to them as the queries of one attention call (no repeated copies);
- decode into self-attention buffers sized for the longest caption, and run the prompt, which every
  caption of an image shares, once per image.

Outputs equal transformers' forward up to float rounding (tests/inference/test_blip_forward.py);
bench/README.md has what each change saved.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# (layer index, that layer's BlipTextSelfAttention, hidden [n, length, width]) -> context [n, length, width]
SelfAttention = Callable[[int, torch.nn.Module, torch.Tensor], torch.Tensor]


def vision_embeds(vision_model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``BlipVisionModel(pixel_values).last_hidden_state``: pre-norm ViT layers, then the final norm."""
    hidden = vision_model.embeddings(pixel_values)
    batch, tokens, width = hidden.shape
    for layer in vision_model.encoder.layers:
        attention = layer.self_attn
        qkv = attention.qkv(layer.layer_norm1(hidden))
        query, keys, values = qkv.view(batch, tokens, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(query, keys, values)
        hidden = hidden + attention.projection(context.transpose(1, 2).reshape(batch, tokens, width))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return vision_model.post_layernorm(hidden)


def cross_attention_keys_values(text_model, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every cross-attention layer's ``(keys, values)``, ``[images, heads, tokens, head_size]``.

    They depend on the image alone, so they are projected once per image, however many texts or
    captions attend to it. ``text_model`` is a ``BlipTextModel``.
    """
    layers = []
    for layer in text_model.encoder.layer:
        attention = layer.crossattention.self
        keys = _heads(attention.key(image_embeds), attention.attention_head_size)
        values = _heads(attention.value(image_embeds), attention.attention_head_size)
        layers.append((keys, values))
    return layers


def text_hidden_states(
    text_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cross_keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``BlipTextModel(...).last_hidden_state`` in encoder mode: every token sees every unpadded one.

    With ``cross_keys_values`` (from :func:`cross_attention_keys_values`) row ``r`` also attends to
    image ``r // (rows / images)``: rows image-major, the same number per image. Without, the text
    alone (ITC). ``attention_mask`` is 1 for tokens and 0 for padding, as tokenizers return it.
    """
    head_size = text_model.encoder.layer[0].attention.self.attention_head_size
    padding = None if attention_mask is None else attention_mask.bool()[:, None, None, :]

    def self_attention(index: int, attention, hidden: torch.Tensor) -> torch.Tensor:
        query, keys, values = (_heads(project(hidden), head_size)
                               for project in (attention.query, attention.key, attention.value))
        return _merge_heads(F.scaled_dot_product_attention(query, keys, values, attn_mask=padding))

    return _text_layers(text_model, input_ids, 0, self_attention, cross_keys_values)


class CaptionDecoder:
    """Next-token logits for ``captions_per_image`` captions of each image, one step per call.

    The first call takes the prompt ``[length]`` (shared by every caption) and returns logits for each
    caption row ``[images * captions_per_image, vocab]``, image-major; every later call takes the
    token each row just received, ``[rows]``. At most ``max_length`` tokens in all (prompt included).
    ``decoder`` is a ``BlipTextLMHeadModel``. :meth:`keep_images` drops finished images between steps.
    """

    def __init__(self, decoder, image_embeds: torch.Tensor, captions_per_image: int, max_length: int):
        self.decoder = decoder
        self.text = decoder.bert
        self.images, self.captions_per_image = image_embeds.shape[0], captions_per_image
        self.rows = self.images * captions_per_image
        self.cross_keys_values = cross_attention_keys_values(self.text, image_embeds)
        attention = self.text.encoder.layer[0].attention.self
        self.head_size = attention.attention_head_size
        shape = (self.rows, attention.num_attention_heads, max_length, self.head_size)
        self.self_keys = [image_embeds.new_empty(shape) for _ in self.text.encoder.layer]
        self.self_values = [image_embeds.new_empty(shape) for _ in self.text.encoder.layer]
        self.max_length = max_length
        self.length = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.length == 0:
            if input_ids.ndim != 1 or not 0 < len(input_ids) <= self.max_length:
                raise ValueError(f"the first call takes the prompt, 1 to {self.max_length} tokens, "
                                 f"got shape {tuple(input_ids.shape)}")
            # Every caption of an image sees the same prompt and image: one row per image suffices.
            hidden = self._layers(input_ids.expand(self.images, -1))
            return self.decoder.cls(hidden[:, -1]).repeat_interleave(self.captions_per_image, dim=0)
        if input_ids.shape != (self.rows,):
            raise ValueError(f"expected one token per caption row, shape ({self.rows},), got {tuple(input_ids.shape)}")
        if self.length >= self.max_length:
            raise ValueError(f"all {self.max_length} positions are used")
        return self.decoder.cls(self._layers(input_ids[:, None])[:, -1])

    def keep_images(self, keep: torch.Tensor) -> None:
        """Go on with only the images where ``keep`` (``[images]`` bool) is true, and their caption rows.

        Once every caption of an image has ended its rows only pad; dropping them saves their share
        of every later step. Rows stay grouped by image, so the cross-attention stays grouped.
        """
        if keep.shape != (self.images,):
            raise ValueError(f"expected one flag per image, shape ({self.images},), got {tuple(keep.shape)}")
        images = keep.nonzero().squeeze(1)
        rows = (images[:, None] * self.captions_per_image + torch.arange(self.captions_per_image, device=keep.device))
        rows = rows.flatten()
        self.cross_keys_values = [(k.index_select(0, images), v.index_select(0, images)) for k, v in self.cross_keys_values]
        self.self_keys = [buffer.index_select(0, rows) for buffer in self.self_keys]
        self.self_values = [buffer.index_select(0, rows) for buffer in self.self_values]
        self.images, self.rows = len(images), len(rows)

    def _layers(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = _text_layers(self.text, input_ids, self.length, self._self_attention, self.cross_keys_values)
        self.length += input_ids.shape[1]
        return hidden

    def _self_attention(self, index: int, attention, hidden: torch.Tensor) -> torch.Tensor:
        query, keys, values = (_heads(project(hidden), self.head_size)
                               for project in (attention.query, attention.key, attention.value))
        start = self.length
        if start == 0:  # the prompt, one row per image, causal within it; each caption row inherits it
            length = hidden.shape[1]
            per_caption = (self.images, self.captions_per_image, *keys.shape[1:])
            self.self_keys[index][:, :, :length].view(per_caption).copy_(keys[:, None].expand(per_caption))
            self.self_values[index][:, :, :length].view(per_caption).copy_(values[:, None].expand(per_caption))
            return _merge_heads(F.scaled_dot_product_attention(query, keys, values, is_causal=True))
        # One new token per row: it attends to every position up to itself, so no mask.
        self.self_keys[index][:, :, start : start + 1] = keys
        self.self_values[index][:, :, start : start + 1] = values
        context = F.scaled_dot_product_attention(
            query, self.self_keys[index][:, :, : start + 1], self.self_values[index][:, :, : start + 1]
        )
        return _merge_heads(context)


def _text_layers(text_model, input_ids, start: int, self_attention: SelfAttention, cross_keys_values) -> torch.Tensor:
    """A ``BlipTextModel``'s embeddings and layers (post-norm BERT, cross-attention after self-attention)."""
    embeddings = text_model.embeddings
    end, limit = start + input_ids.shape[1], embeddings.position_embeddings.num_embeddings
    if end > limit:
        raise ValueError(f"{end} text positions, but the model has position embeddings for {limit}: "
                         f"lower max_length / max_text_length to at most {limit}")
    positions = embeddings.position_embeddings.weight[start:end]
    hidden = embeddings.LayerNorm(embeddings.word_embeddings(input_ids) + positions)
    for index, layer in enumerate(text_model.encoder.layer):
        hidden = layer.attention.output(self_attention(index, layer.attention.self, hidden), hidden)
        if cross_keys_values is not None:
            attention = layer.crossattention.self
            query = _heads(attention.query(hidden), attention.attention_head_size)
            context = _grouped_cross_attention(query, *cross_keys_values[index])
            hidden = layer.crossattention.output(_merge_heads(context), hidden)
        hidden = layer.output(layer.intermediate(hidden), hidden)
    return hidden


def _grouped_cross_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Rows ``[images * g, heads, length, d]``, image-major, against ``[images, heads, tokens, d]``:
    the ``g`` rows of an image become ``g * length`` queries of one attention call."""
    images, heads, _, head_size = keys.shape
    if query.shape[0] % images:
        raise ValueError(f"{query.shape[0]} text rows do not divide evenly among {images} images")
    group, length = query.shape[0] // images, query.shape[2]
    grouped = query.view(images, group, heads, length, head_size).transpose(1, 2)
    context = F.scaled_dot_product_attention(grouped.reshape(images, heads, group * length, head_size), keys, values)
    return context.view(images, heads, group, length, head_size).transpose(1, 2).reshape(query.shape)


def _heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """``[n, length, width]`` -> ``[n, heads, length, head_size]``."""
    return x.view(*x.shape[:2], -1, head_size).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[n, heads, length, head_size]`` -> ``[n, length, width]``."""
    return x.transpose(1, 2).flatten(2)
