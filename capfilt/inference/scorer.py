"""The filter's scores for many texts per image from a ``BlipForImageTextRetrieval``.

Each image goes through the ViT once, and the cross-attention keys and values of its tokens are
projected once per text layer, whatever the number of texts it has. ITM then runs slot by slot: the
j-th text of every image forms one batch aligned with the images, so it cross-attends to those
per-image keys and values as they are, and texts of one kind (the web caption, the first synthetic
caption, ...) share a batch and pad to similar lengths. The price: the keys and values of every text
layer are held at once for a chunk of ``max_texts_per_forward`` images (BLIP-base in bf16: about
21 MB per image).

ITC, the text alone, runs in batches of similar length, unless ``itc_similarity`` is off: it is a
second text-encoder pass per text that CapFilt's keep decision never reads (a fifth to a third of
the scoring time, measured in bench/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from capfilt.inference.blip_forward import cross_attention_keys_values, text_hidden_states, vision_embeds
from capfilt.models.tokens import itc_ids, itm_ids


@dataclass(frozen=True)
class TextScore:
    itm_prob: float  # softmax(ITM logits)[1]: the probability that the text matches the image
    itc_sim: float | None  # cosine of the projected image and text [CLS] features; None when not computed


class Scorer:
    """ITM match probability and ITC similarity of texts against their images."""

    def __init__(
        self,
        model: BlipForImageTextRetrieval,
        tokenizer,
        max_text_length: int = 35,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_texts_per_forward: int = 256,
        itc_similarity: bool = True,
    ):
        if max_text_length < 2:
            raise ValueError(f"max_text_length must leave room for [CLS] and [SEP], got {max_text_length}")
        if max_texts_per_forward < 1:
            raise ValueError(f"max_texts_per_forward must be positive, got {max_texts_per_forward}")
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.max_texts_per_forward = max_texts_per_forward
        self.itc_similarity = itc_similarity

    def settings(self) -> dict:
        """Everything that determines the scores, for provenance."""
        return {
            "max_text_length": self.max_text_length,
            "itm_first_token": "[ENC]",
            "itc_first_token": "[CLS]" if self.itc_similarity else None,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def score(self, pixel_values: torch.Tensor, texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        """Scores for ``texts[i][j]`` against image ``i``; ``texts[i]`` may be empty."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got shape {tuple(pixel_values.shape)}")
        if len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{len(texts)} text lists for {pixel_values.shape[0]} images")
        flat_texts, image_index = [], []
        for i, image_texts in enumerate(texts):
            if isinstance(image_texts, str) or not isinstance(image_texts, Sequence):
                raise TypeError(f"texts[{i}] must be a list of strings, got {type(image_texts).__name__}")
            for j, text in enumerate(image_texts):
                if not isinstance(text, str):
                    raise TypeError(f"texts[{i}][{j}] must be a string, got {type(text).__name__}")
                flat_texts.append(text)
                image_index.append(i)
        if not flat_texts:
            return [[] for _ in texts]

        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        image_embeds = vision_embeds(self.model.vision_model, pixel_values)
        token_ids = self.tokenizer(flat_texts, truncation=True, max_length=self.max_text_length).input_ids
        itm_probs = torch.empty(len(flat_texts))
        first_text = [0]  # flat index of each image's first text
        for image_texts in texts:
            first_text.append(first_text[-1] + len(image_texts))

        # ITM: slot by slot (the j-th text of every image that has one), chunk of images by chunk.
        step = self.max_texts_per_forward
        for start in range(0, len(texts), step):
            stop = min(start + step, len(texts))
            keys_values = cross_attention_keys_values(self.model.text_encoder, image_embeds[start:stop])
            for slot in range(max(len(texts[i]) for i in range(start, stop))):
                rows = [i for i in range(start, stop) if len(texts[i]) > slot]
                flat = [first_text[i] + slot for i in rows]
                if len(rows) < stop - start:
                    index = torch.tensor(rows, device=self.device) - start
                    slot_keys_values = [(keys[index], values[index]) for keys, values in keys_values]
                else:
                    slot_keys_values = keys_values
                itm_probs[flat] = self._itm([token_ids[f] for f in flat], slot_keys_values)

        itc_sims: list[float | None] = [None] * len(flat_texts)
        if self.itc_similarity:
            # The text alone, in chunks of similar length so that little of each batch is padding.
            # last_hidden_state[:, 0], not pooler_output: transformers applies post_layernorm to the
            # pooled token a second time.
            image_feats = F.normalize(self.model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
            on_device = torch.tensor(image_index, device=self.device)
            by_length = sorted(range(len(flat_texts)), key=lambda f: len(token_ids[f]))
            for start in range(0, len(by_length), step):
                flat = by_length[start : start + step]
                text_feats = self._itc([token_ids[f] for f in flat])
                sims = (image_feats[on_device[flat]] * text_feats).sum(dim=-1).tolist()
                for f, sim in zip(flat, sims):
                    itc_sims[f] = sim

        scores: list[list[TextScore]] = [[] for _ in texts]
        for i, prob, sim in zip(image_index, itm_probs.tolist(), itc_sims):
            scores[i].append(TextScore(itm_prob=prob, itc_sim=sim))
        return scores

    def _pad(self, token_ids: list[list[int]]):
        return self.tokenizer.pad({"input_ids": token_ids}, padding="longest", return_tensors="pt").to(self.device)

    def _itm(self, token_ids: list[list[int]], keys_values) -> torch.Tensor:
        """Match probability of ``token_ids[r]`` against image ``r``: [ENC] first, cross-attention to the image."""
        tokens = self._pad(token_ids)
        out = text_hidden_states(
            self.model.text_encoder, itm_ids(tokens.input_ids, self.tokenizer), tokens.attention_mask, keys_values
        )
        return self.model.itm_head(out[:, 0]).float().softmax(dim=-1)[:, 1].cpu()

    def _itc(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Projected, normalised text features: [CLS] first, the text alone."""
        tokens = self._pad(token_ids)
        out = text_hidden_states(self.model.text_encoder, itc_ids(tokens.input_ids, self.tokenizer), tokens.attention_mask)
        return F.normalize(self.model.text_proj(out[:, 0]).float(), dim=-1)
