"""The captioner: K synthetic captions per image from a ``BlipForConditionalGeneration``.

Nucleus sampling is written here rather than delegated to ``generate`` because CapFilt needs each
caption to be a pure function of ``(seed, key, round, k)``: the uniforms that pick each token are
drawn per row from a generator seeded by a stable hash of those four values, and each step samples
by inverse CDF over the filtered distribution. A row's caption therefore does not depend on the
batch it ran in, its position there, or the worker that ran it (same weights, device and dtype).
One caveat: GPU kernels picked by batch shape may round logits differently in the last bits (more so
in bf16), so a token whose uniform falls within that rounding of a CDF boundary can flip.

Beam search is deterministic already, so it goes through transformers' ``generate`` with every
setting passed explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Sequence

import numpy as np
import torch
from transformers import (
    BlipForConditionalGeneration,
    GenerationConfig,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from capfilt.config import CaptionSampling
from capfilt.inference.blip_forward import CaptionDecoder, vision_embeds
from capfilt.models.tokens import special_ids

# Names the noise scheme in provenance: change it whenever the mapping from
# (seed, key, round, k) to uniforms or from uniforms to tokens changes.
NOISE_SCHEME = "blake2b64(seed/key/round/k)->torch.Generator.rand;inverse-cdf-v1"

# Beam settings CaptionSampling does not expose, pinned to the reference's (transformers' old defaults).
BEAM_FIXED_SETTINGS = {"length_penalty": 1.0, "early_stopping": False, "no_repeat_ngram_size": 0}


def row_seed(seed: int, key: str, round: int, caption_index: int) -> int:
    """A 64-bit seed for one caption, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}/{key}/{round}/{caption_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def row_uniforms(seeds: Sequence[int], num_steps: int) -> torch.Tensor:
    """``[len(seeds), num_steps]`` uniforms in [0, 1), row ``i`` drawn only from ``seeds[i]``."""
    uniforms = torch.empty(len(seeds), num_steps, dtype=torch.float64)
    generator = torch.Generator(device="cpu")
    for row, seed in enumerate(seeds):
        generator.manual_seed(seed)
        uniforms[row] = torch.rand(num_steps, generator=generator, dtype=torch.float64)
    return uniforms


def build_logits_filter(
    sampling: CaptionSampling, eos_token_id: int, device: str | torch.device = "cpu"
) -> LogitsProcessorList:
    """The per-step filters in transformers' sampling order: penalties, then warpers.

    Repetition penalty counts the prompt tokens (as the reference's ``generate`` does) and
    min_length counts them too; a filter that would be a no-op is left out.
    """
    filters = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        filters.append(RepetitionPenaltyLogitsProcessor(float(sampling.repetition_penalty)))
    if sampling.min_length > 0:
        filters.append(MinLengthLogitsProcessor(sampling.min_length, eos_token_id, device=device))
    if sampling.temperature != 1.0:
        filters.append(TemperatureLogitsWarper(float(sampling.temperature)))
    if sampling.top_k is not None:
        filters.append(TopKLogitsWarper(sampling.top_k))
    if sampling.nucleus_top_p < 1.0:
        filters.append(TopPLogitsWarper(sampling.nucleus_top_p))
    return filters


def sample_inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: the first id whose cumulative probability exceeds that row's uniform.

    Each row uses only its own scores and uniform, so the choice cannot depend on the batch.
    Searching with ``right=True`` never lands on a token of probability zero.
    """
    probs = torch.softmax(scores.float(), dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return tokens.clamp_(max=scores.shape[-1] - 1)


class NucleusSampler:
    """Each row's next token from its logits and its uniform, as :func:`build_logits_filter` followed by
    :func:`sample_inverse_cdf` picks it, without sorting the vocabulary.

    That path sorts every row's whole vocabulary for top-p and runs softmax and cumsum over all of it,
    though top-k has left at most ``top_k`` candidates: at a 1,641-token vocabulary this was a third of
    caption time on the CPU (bench/README.md). Here top-p and the inverse CDF run on the ``top_k``
    candidates alone (``topk`` returns them sorted, which top-p needs). Rows where equal logits make
    the choice depend on tie order (the k-th logit tied with a token outside the candidates, or
    top-p's cut between equal logits; frequent in bfloat16) and samplers without top-k take the full
    path, so the tokens are the full path's (tests/inference/test_captioner.py).
    """

    def __init__(self, sampling: CaptionSampling, eos_token_id: int, device: str | torch.device = "cpu"):
        # The full path is adjust then truncate: build_logits_filter's own stages, in its order.
        filters = build_logits_filter(sampling, eos_token_id, device)
        truncating = (TopKLogitsWarper, TopPLogitsWarper)
        self.adjust = LogitsProcessorList(f for f in filters if not isinstance(f, truncating))
        self.truncate = LogitsProcessorList(f for f in filters if isinstance(f, truncating))
        self.top_k, self.top_p = sampling.top_k, sampling.nucleus_top_p

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        scores = self.adjust(input_ids, logits.float())
        if self.top_k is None or self.top_k >= scores.shape[-1]:
            return sample_inverse_cdf(self.truncate(input_ids, scores), uniforms)
        values, candidates = _top_k(scores, self.top_k)
        tokens, undecided = self._sample_candidates(values, candidates, uniforms)
        # Top-k keeps every token tied with the k-th; torch.sort orders equal logits as it likes, so
        # ties across top-p's cut are decided by the full path's own sort.
        undecided |= (scores >= values[:, -1:]).sum(dim=-1) > self.top_k
        if bool(undecided.any()):
            rows = undecided.nonzero().squeeze(1)
            tokens[rows] = sample_inverse_cdf(self.truncate(input_ids[rows], scores[rows]), uniforms[rows])
        return tokens

    def _sample_candidates(
        self, values: torch.Tensor, candidates: torch.Tensor, uniforms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens, and the rows whose top-p cut falls between equal logits."""
        ascending = values.flip(-1)
        undecided = torch.zeros(len(values), dtype=torch.bool, device=values.device)
        if self.top_p < 1.0:  # TopPLogitsWarper on the candidates: drop the least likely tokens up to 1 - top_p
            remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            remove[:, -1] = False
            cut = remove[:, :-1] & ~remove[:, 1:]  # the last removed position
            undecided = (cut & (ascending[:, :-1] == ascending[:, 1:])).any(dim=-1)
            ascending = ascending.masked_fill(remove, float("-inf"))
        # Back to vocabulary order: the inverse CDF walks tokens by id, as on the full path.
        ids, order = candidates.flip(-1).sort(dim=-1)
        chosen = sample_inverse_cdf(ascending.gather(-1, order), uniforms)
        return ids.gather(-1, chosen[:, None]).squeeze(1), undecided


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k)``: values descending and their ids. On the CPU numpy's introselect does it:
    torch's topk took four times as long for 128 rows of 1,641 tokens (bench/README.md). Equal
    values may come in another order; NucleusSampler does not depend on it."""
    if scores.device.type != "cpu":
        return scores.topk(k)
    array = scores.numpy()
    top = np.argpartition(array, -k, axis=-1)[:, -k:]
    values = np.take_along_axis(array, top, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return (torch.from_numpy(np.take_along_axis(values, order, axis=-1)),
            torch.from_numpy(np.take_along_axis(top, order, axis=-1)))


class Captioner:
    """Writes ``sampling.num_captions`` captions per image with a ``BlipForConditionalGeneration``."""

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        tokenizer,
        sampling: CaptionSampling,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        if sampling.num_captions < 1:
            raise ValueError(f"a captioner writes at least one caption per image; num_captions is {sampling.num_captions}")
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.ids = special_ids(tokenizer)

        prompt_ids = tokenizer(sampling.prompt, add_special_tokens=True).input_ids
        if prompt_ids and prompt_ids[-1] == self.ids["sep"]:
            prompt_ids = prompt_ids[:-1]
        # [DEC] in place of [CLS]: the decoder's mode token (capfilt.models.tokens).
        prompt_ids = [self.ids["dec"], *prompt_ids[1:]]
        if len(prompt_ids) >= sampling.max_length:
            raise ValueError(
                f"prompt {sampling.prompt!r} is {len(prompt_ids)} tokens with [DEC]; "
                f"max_length {sampling.max_length} (which counts them) leaves no room for a caption"
            )
        self.prompt_ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        self.prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()
        self.sampler = NucleusSampler(sampling, self.ids["sep"], self.device)

    def settings(self) -> dict:
        """Everything that determines the captions, for provenance."""
        settings = {
            **self.sampling.model_dump(),
            "prompt_ids": self.prompt_ids.tolist(),
            "eos_token_id": self.ids["sep"],
            "pad_token_id": self.ids["pad"],
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.sampling.method == "nucleus":
            settings["noise"] = NOISE_SCHEME
        else:
            settings.update(BEAM_FIXED_SETTINGS)
        return settings

    def generate(self, pixel_values: torch.Tensor, keys: Sequence[str], round: int = 0,
                 first_caption: int = 0) -> list[list[str]]:
        """``num_captions`` captions for each image, prompt stripped, in key order. Nucleus caption ``j`` of an
        image draws its noise from (seed, key, round, ``first_caption`` + j): an ensemble's members pass
        disjoint ranges so that their captions are independent draws, not the same noise through two models."""
        sequences = self.generate_ids(pixel_values, keys, round, first_caption)
        captions = [self._decode(row) for row in sequences.tolist()]
        k = self.sampling.num_captions
        return [captions[i * k : (i + 1) * k] for i in range(len(keys))]

    @torch.inference_mode()
    def generate_ids(self, pixel_values: torch.Tensor, keys: Sequence[str], round: int = 0,
                     first_caption: int = 0) -> torch.Tensor:
        """Token ids ``[B * K, L]``, image-major, each row the prompt then the caption, [SEP], pads."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got shape {tuple(pixel_values.shape)}")
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} keys for {pixel_values.shape[0]} images")
        for key in keys:
            if not isinstance(key, str) or not key:
                raise ValueError(f"image keys must be non-empty strings, got {key!r}")
        if len(keys) == 0:
            return self.prompt_ids.new_empty(0, len(self.prompt_ids))

        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        image_embeds = vision_embeds(self.model.vision_model, pixel_values)
        if self.sampling.method == "beam":
            return self._beam(image_embeds)
        return self._nucleus(image_embeds, keys, round, first_caption)

    def _nucleus(self, image_embeds: torch.Tensor, keys: Sequence[str], round: int, first_caption: int) -> torch.Tensor:
        k, sep, pad = self.sampling.num_captions, self.ids["sep"], self.ids["pad"]
        # Rows are image-major: row i*K + j is caption j of image i.
        num_rows = image_embeds.shape[0] * k
        num_steps = self.sampling.max_length - len(self.prompt_ids)
        seeds = [row_seed(self.sampling.seed, key, round, first_caption + j) for key in keys for j in range(k)]
        uniforms = row_uniforms(seeds, num_steps).to(self.device)

        input_ids = self.prompt_ids.expand(num_rows, -1)
        finished = torch.zeros(num_rows, dtype=torch.bool, device=self.device)
        decoder = CaptionDecoder(self.model.text_decoder, image_embeds, k, self.sampling.max_length)
        live = torch.arange(num_rows, device=self.device)  # the rows the decoder still runs, image-major
        step_ids = self.prompt_ids
        for step in range(num_steps):
            next_ids = torch.full((num_rows,), pad, dtype=torch.long, device=self.device)
            next_ids[live] = self.sampler(input_ids[live], decoder(step_ids), uniforms[live, step])
            next_ids = next_ids.masked_fill(finished, pad)
            input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
            finished |= next_ids == sep
            if bool(finished.all()):
                break
            # Captions end at different lengths: once a quarter of the images still in the decoder have
            # all their captions ended, drop them, rather than run them to the longest caption.
            image_done = finished[live].view(-1, k).all(dim=1)
            if 4 * int(image_done.sum()) >= len(image_done):
                decoder.keep_images(~image_done)
                live = live.view(-1, k)[~image_done].flatten()
            step_ids = next_ids[live]
        return input_ids

    def _beam(self, image_embeds: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        config = GenerationConfig(
            do_sample=False,
            num_beams=s.num_beams,
            num_return_sequences=s.num_captions,
            max_length=s.max_length,
            min_length=s.min_length,
            repetition_penalty=float(s.repetition_penalty),
            **BEAM_FIXED_SETTINGS,
            eos_token_id=self.ids["sep"],
            pad_token_id=self.ids["pad"],
            use_cache=True,
        )
        decoder = self.model.text_decoder
        input_ids = self.prompt_ids.expand(image_embeds.shape[0], -1).clone()
        with _clean_generation_config(decoder):
            return decoder.generate(
                input_ids=input_ids,
                encoder_hidden_states=image_embeds,
                generation_config=config,
            )

    def _decode(self, ids: list[int]) -> str:
        prompt_length = len(self.prompt_ids)
        generated = ids[prompt_length:]
        if self.ids["sep"] in generated:
            generated = generated[: generated.index(self.ids["sep"])]
        text = self.tokenizer.decode(self.prompt_ids.tolist() + generated, skip_special_tokens=True).strip()
        # Decode with the prompt so word pieces join as they do in the full caption, then cut the
        # prompt off (as the reference does). Should the tokenizer's normalisation make the decoded
        # prompt differ, decode the new tokens alone instead.
        if text.startswith(self.prompt_text):
            return text[len(self.prompt_text) :].strip()
        return self.tokenizer.decode(generated, skip_special_tokens=True).strip().removeprefix("##")


@contextlib.contextmanager
def _clean_generation_config(model):
    # generate() fills every setting left unset from model.generation_config, which for a loaded
    # checkpoint may carry its own max_length, top_k, no_repeat_ngram_size...; swap in a blank one.
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved
