"""The filter's scores for many texts per image from a ``BlipForImageTextRetrieval``.

Each image goes through the ViT once; its token embeddings are then gathered by index for every
text that belongs to it, so the web caption and the K synthetic captions of an image share one
vision pass, and texts from different images fill the same text-encoder batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from capfilt.models.tokens import itc_ids, itm_ids


@dataclass(frozen=True)
class TextScore:
    itm_prob: float  # softmax(ITM logits)[1]: the probability that the text matches the image
    itc_sim: float  # cosine of the projected image and text [CLS] features


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

    def settings(self) -> dict:
        """Everything that determines the scores, for provenance."""
        return {
            "max_text_length": self.max_text_length,
            "itm_first_token": "[ENC]",
            "itc_first_token": "[CLS]",
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
        image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        # last_hidden_state[:, 0], not pooler_output: transformers applies post_layernorm to the
        # pooled token a second time.
        image_feats = F.normalize(self.model.vision_proj(image_embeds[:, 0]).float(), dim=-1)

        image_index = torch.tensor(image_index, device=self.device)
        itm_probs, itc_sims = [], []
        for start in range(0, len(flat_texts), self.max_texts_per_forward):
            stop = start + self.max_texts_per_forward
            itm_prob, itc_sim = self._score_texts(
                flat_texts[start:stop], image_index[start:stop], image_embeds, image_feats
            )
            itm_probs.append(itm_prob)
            itc_sims.append(itc_sim)
        itm_probs = torch.cat(itm_probs).tolist()
        itc_sims = torch.cat(itc_sims).tolist()

        scores: list[list[TextScore]] = [[] for _ in texts]
        for i, prob, sim in zip(image_index.tolist(), itm_probs, itc_sims):
            scores[i].append(TextScore(itm_prob=prob, itc_sim=sim))
        return scores

    def _score_texts(
        self, texts: list[str], image_index: torch.Tensor, image_embeds: torch.Tensor, image_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        encoder = self.model.text_encoder

        # ITM: [ENC] first, cross-attention to this text's image tokens.
        text_image_embeds = image_embeds[image_index]
        itm_out = encoder(
            input_ids=itm_ids(tokens.input_ids, self.tokenizer),
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=text_image_embeds,
            encoder_attention_mask=torch.ones(text_image_embeds.shape[:-1], dtype=torch.long, device=self.device),
        ).last_hidden_state
        itm_prob = self.model.itm_head(itm_out[:, 0]).float().softmax(dim=-1)[:, 1]

        # ITC: [CLS] first, text alone.
        itc_out = encoder(
            input_ids=itc_ids(tokens.input_ids, self.tokenizer), attention_mask=tokens.attention_mask
        ).last_hidden_state
        text_feats = F.normalize(self.model.text_proj(itc_out[:, 0]).float(), dim=-1)
        itc_sim = (image_feats[image_index] * text_feats).sum(dim=-1)
        return itm_prob, itc_sim
