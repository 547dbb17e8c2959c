from __future__ import annotations

import copy

import pytest
import torch

from capfilt.config import CaptionSampling
from capfilt.inference.blip_forward import CaptionDecoder
from capfilt.inference.captioner import (
    NOISE_SCHEME,
    Captioner,
    NucleusSampler,
    build_logits_filter,
    row_seed,
    sample_inverse_cdf,
)
from capfilt.models.tokens import special_ids

KEYS = [f"img-{i:03d}" for i in range(6)]


def nucleus(**overrides) -> CaptionSampling:
    return CaptionSampling(**{"num_captions": 2, "max_length": 16, "min_length": 6, **overrides})


def transformers_greedy(model, tokenizer, pixel_values, sampling: CaptionSampling) -> list[str]:
    """transformers' own BLIP generation, greedy, as an independent reference."""
    prompt = tokenizer([sampling.prompt] * len(pixel_values), return_tensors="pt").input_ids
    out = model.generate(
        pixel_values,
        input_ids=prompt,
        do_sample=False,
        num_beams=1,
        max_length=sampling.max_length,
        min_length=sampling.min_length,
        repetition_penalty=sampling.repetition_penalty,
    )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def with_sep_bias(model, tokenizer, bias: float):
    """A copy of ``model`` whose LM head adds ``bias`` to the [SEP] logit."""
    model = copy.deepcopy(model)
    sep = special_ids(tokenizer)["sep"]
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.bias[sep] += bias
    return model


def test_k_captions_per_image_prompt_stripped(caption_model, tokenizer, images):
    captioner = Captioner(caption_model, tokenizer, nucleus(num_captions=3))
    captions = captioner.generate(images[:2], KEYS[:2])
    assert [len(per_image) for per_image in captions] == [3, 3]
    assert all(isinstance(c, str) for per_image in captions for c in per_image)

    sequences = captioner.generate_ids(images[:2], KEYS[:2])
    assert sequences.shape[0] == 6
    assert sequences[:, :4].tolist() == [captioner.prompt_ids.tolist()] * 6
    assert captioner.prompt_ids[0].item() == special_ids(tokenizer)["dec"]
    flat = [c for per_image in captions for c in per_image]
    for row, caption in zip(sequences.tolist(), flat):
        full = tokenizer.decode(row, skip_special_tokens=True)
        assert full.startswith("a picture of")
        assert full[len("a picture of") :].strip() == caption


def test_one_vision_pass_and_cross_attention_computed_once(caption_model, tokenizer, images):
    calls = {"vision": [], "cross_key": [], "self_key": []}
    layer = caption_model.text_decoder.bert.encoder.layer[0]
    modules = {
        "vision": caption_model.vision_model.embeddings,
        "cross_key": layer.crossattention.self.key,
        "self_key": layer.attention.self.key,
    }
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: calls[name].append(args[0].shape[0] if args else 0))
        for name, module in modules.items()
    ]
    try:
        captioner = Captioner(caption_model, tokenizer, nucleus(num_captions=3, max_length=12, min_length=12))
        captioner.generate(images[:2], KEYS[:2])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls["vision"]) == 1  # one pass over the two images, not one per caption
    assert calls["cross_key"] == [2]  # image keys once per image (not per caption), reused at every step
    assert len(calls["self_key"]) == 12 - 4  # one decoder step per new token


def test_prompt_only_caption_is_empty(caption_model, tokenizer, images):
    # [SEP] dominates and min_length equals the prompt: the model stops at once, nothing but the prompt.
    model = with_sep_bias(caption_model, tokenizer, 100.0)
    captioner = Captioner(model, tokenizer, nucleus(min_length=4))
    assert captioner.generate(images[:2], KEYS[:2]) == [["", ""], ["", ""]]


def test_fixed_seed_repeats_and_inputs_vary_the_noise(caption_model, tokenizer, images):
    captioner = Captioner(caption_model, tokenizer, nucleus(num_captions=3))
    first = captioner.generate(images[:3], KEYS[:3], round=0)
    assert captioner.generate(images[:3], KEYS[:3], round=0) == first
    # The K captions of one image differ from each other.
    assert all(len(set(per_image)) > 1 for per_image in first)
    # Another key, round or seed gives other captions for the same pixels.
    assert captioner.generate(images[:3], ["x", "y", "z"], round=0) != first
    assert captioner.generate(images[:3], KEYS[:3], round=1) != first
    reseeded = Captioner(caption_model, tokenizer, nucleus(num_captions=3, seed=7))
    assert reseeded.generate(images[:3], KEYS[:3], round=0) != first


def test_row_seed_is_stable():
    # A hard-coded value: the seed must never depend on the process (PYTHONHASHSEED) or platform.
    assert row_seed(0, "img-000", 0, 0) == row_seed(0, "img-000", 0, 0)
    assert row_seed(0, "img-000", 0, 0) == 0x27E28A544AE3CD8E  # blake2b(b"0/img-000/0/0", digest_size=8), little-endian
    assert len({row_seed(0, "k", 0, 0), row_seed(1, "k", 0, 0), row_seed(0, "k", 1, 0), row_seed(0, "k", 0, 1)}) == 4


def test_captions_do_not_depend_on_batching(caption_model, tokenizer, images):
    captioner = Captioner(caption_model, tokenizer, nucleus())
    whole = dict(zip(KEYS, captioner.generate(images, KEYS, round=2)))
    # Different pixels give different captions (so the check below is not vacuous).
    assert len({tuple(c) for c in whole.values()}) == len(KEYS)

    order = [4, 1, 5, 0, 3, 2]
    for batch_size in (1, 2, 4):
        pieces = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch_keys = [KEYS[i] for i in idx]
            pieces.update(zip(batch_keys, captioner.generate(images[idx], batch_keys, round=2)))
        assert pieces == whole, f"batch size {batch_size} changed captions"


def test_tiny_top_p_is_greedy_and_matches_transformers(caption_model, tokenizer, images):
    sampling = nucleus(nucleus_top_p=1e-6, num_captions=1)
    ours = Captioner(caption_model, tokenizer, sampling).generate(images[:3], KEYS[:3])
    reference = transformers_greedy(caption_model, tokenizer, images[:3], sampling)
    assert [per_image[0] for per_image in ours] == [r[len("a picture of") :].strip() for r in reference]


def test_top_k_one_is_greedy(caption_model, tokenizer, images):
    greedy = Captioner(caption_model, tokenizer, nucleus(nucleus_top_p=1e-6)).generate(images[:3], KEYS[:3])
    assert Captioner(caption_model, tokenizer, nucleus(top_k=1)).generate(images[:3], KEYS[:3]) == greedy


def test_top_k_off_changes_the_samples(caption_model, tokenizer, images):
    top_5 = Captioner(caption_model, tokenizer, nucleus(top_k=5, nucleus_top_p=1.0)).generate(images, KEYS)
    no_top_k = Captioner(caption_model, tokenizer, nucleus(top_k=None, nucleus_top_p=1.0)).generate(images, KEYS)
    assert no_top_k != top_5


def test_temperature_changes_the_samples(caption_model, tokenizer, images):
    # A random model's next-token distribution is nearly flat, which temperature barely moves;
    # scale the LM head's features so the logits spread out.
    model = copy.deepcopy(caption_model)
    with torch.no_grad():
        model.text_decoder.cls.predictions.transform.LayerNorm.weight.mul_(30.0)
    def captions(temperature):
        sampling = nucleus(top_k=None, nucleus_top_p=1.0, temperature=temperature)
        return Captioner(model, tokenizer, sampling).generate(images, KEYS)
    greedy = Captioner(model, tokenizer, nucleus(top_k=1)).generate(images, KEYS)
    assert captions(1.0) != captions(3.0)
    # Near zero temperature is greedy (up to logit gaps below ~1e-5, which the spread makes rare).
    assert captions(1e-6) == greedy != captions(3.0)


def test_min_length_holds_back_sep(caption_model, tokenizer, images):
    sep = special_ids(tokenizer)["sep"]
    model = with_sep_bias(caption_model, tokenizer, 100.0)
    for min_length in (6, 9):
        captioner = Captioner(model, tokenizer, nucleus(min_length=min_length, max_length=16))
        sequences = captioner.generate_ids(images[:3], KEYS[:3])
        # The model wants [SEP] at every step: it comes exactly at position min_length.
        assert sequences.shape[1] == min_length + 1
        assert (sequences[:, min_length] == sep).all()
        assert not (sequences[:, :min_length] == sep).any()


def test_max_length_caps(caption_model, tokenizer, images):
    sep = special_ids(tokenizer)["sep"]
    model = with_sep_bias(caption_model, tokenizer, -100.0)
    for method in ("nucleus", "beam"):
        captioner = Captioner(model, tokenizer, nucleus(max_length=12, method=method, num_beams=2))
        sequences = captioner.generate_ids(images[:2], KEYS[:2])
        assert sequences.shape[1] == 12
        assert not (sequences == sep).any()


def filters_for(tokenizer, **overrides):
    """The step filter with every stage off except ``overrides``."""
    neutral = {"repetition_penalty": 1.0, "top_k": None, "nucleus_top_p": 1.0, "min_length": 0, "temperature": 1.0}
    return build_logits_filter(CaptionSampling(**{**neutral, **overrides}), special_ids(tokenizer)["sep"])


def test_logits_filter_steps(tokenizer):
    sep = special_ids(tokenizer)["sep"]
    vocab = 12
    scores = torch.linspace(-3.0, 3.0, vocab).unsqueeze(0)
    seen = torch.tensor([[1, 10, 10]])  # token 1 has a negative logit, token 10 a positive one
    assert len(filters_for(tokenizer)) == 0

    out = filters_for(tokenizer, repetition_penalty=1.5)(seen, scores.clone())
    assert out[0, 10] == pytest.approx(scores[0, 10].item() / 1.5)
    assert out[0, 1] == pytest.approx(scores[0, 1].item() * 1.5)
    untouched = [i for i in range(vocab) if i not in (1, 10)]
    assert torch.equal(out[0, untouched], scores[0, untouched])

    # min_length counts the prompt: with 3 tokens so far and min 4, [SEP] is impossible; with 4, allowed.
    min_length = filters_for(tokenizer, min_length=4)
    assert min_length(seen, scores.clone())[0, sep] == float("-inf")
    assert min_length(torch.tensor([[1, 10, 10, 2]]), scores.clone())[0, sep] == scores[0, sep]

    kept = torch.isfinite(filters_for(tokenizer, top_k=3)(seen, scores.clone()))[0]
    assert kept.nonzero().flatten().tolist() == [9, 10, 11]

    assert torch.allclose(filters_for(tokenizer, temperature=2.0)(seen, scores.clone()), scores / 2.0)

    kept = torch.isfinite(filters_for(tokenizer, nucleus_top_p=0.5)(seen, scores.clone()))[0]
    probs = scores.softmax(-1)[0]
    # The smallest set of most likely tokens with mass >= 0.5.
    assert probs[kept].sum() >= 0.5 and probs[kept].sum() - probs[kept].min() < 0.5
    assert kept[-1] and not kept[0]


def test_inverse_cdf_sampling():
    scores = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]] * 4)
    uniforms = torch.tensor([0.0, 0.49, 0.5, 0.999999])
    assert sample_inverse_cdf(scores, uniforms).tolist() == [0, 0, 2, 2]
    # Zero-probability tokens are never chosen, however the uniform falls.
    scores = torch.tensor([[float("-inf"), 1.0, float("-inf"), float("-inf")]])
    for u in (0.0, 0.5, 0.9999999):
        assert sample_inverse_cdf(scores, torch.tensor([u])).item() == 1


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the reference's: repetition penalty 1.1, min length, top-k 50, top-p 0.9
        {"top_k": 5, "nucleus_top_p": 0.5, "temperature": 0.7},
        {"top_k": 3, "nucleus_top_p": 1.0},
        {"top_k": None},  # top-p over the whole vocabulary: the full path
        {"top_k": 400},  # more candidates than tokens: the full path
    ],
    ids=["reference", "narrow", "top-k-only", "no-top-k", "k-above-vocab"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nucleus_sampler_picks_what_the_full_filter_picks(tokenizer, settings, dtype):
    # The sampler's shortcut (top-p and inverse CDF over the top-k candidates only) must choose the same
    # token as the whole-vocabulary filter for every row; bfloat16 logits tie often at the k-th place.
    sampling = CaptionSampling(num_captions=1, min_length=6, **settings)
    sep = special_ids(tokenizer)["sep"]
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 2000, 300
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    input_ids = torch.randint(0, vocab, (rows, 5), generator=generator)  # repeated tokens get penalised
    uniforms = torch.rand(rows, generator=generator, dtype=torch.float64)

    expected = sample_inverse_cdf(build_logits_filter(sampling, sep)(input_ids, logits.float()), uniforms)
    got = NucleusSampler(sampling, sep)(input_ids, logits, uniforms)
    assert torch.equal(got, expected)
    assert len(set(got.tolist())) > 20  # a real spread of choices, not one token everywhere
    assert sep not in got.tolist()  # min_length (6) is above the 5 tokens so far
    if dtype == torch.bfloat16 and sampling.top_k == 50:  # the tie fallback was exercised
        kth = logits.float().topk(50).values[:, -1:]
        assert ((logits.float() >= kth).sum(-1) > 50).any()


def test_beam_returns_k_best_deterministically(caption_model, tokenizer, images):
    sampling = CaptionSampling(method="beam", num_beams=3, num_captions=2, max_length=14, min_length=5)
    captioner = Captioner(caption_model, tokenizer, sampling)
    captions = captioner.generate(images[:3], KEYS[:3])
    assert [len(c) for c in captions] == [2, 2, 2]
    assert all(c[0] != c[1] for c in captions)
    assert captioner.generate(images[:3], ["other", "keys", "here"], round=5) == captions

    prompt = tokenizer([sampling.prompt] * 3, return_tensors="pt").input_ids
    reference = caption_model.generate(
        images[:3],
        input_ids=prompt,
        do_sample=False,
        num_beams=3,
        num_return_sequences=2,
        max_length=14,
        min_length=5,
        repetition_penalty=sampling.repetition_penalty,
        length_penalty=1.0,
        early_stopping=False,
    )
    expected = [t[len("a picture of") :].strip() for t in tokenizer.batch_decode(reference, skip_special_tokens=True)]
    assert [c for per_image in captions for c in per_image] == expected


@pytest.mark.parametrize("method", ["nucleus", "beam"])
def test_model_generation_config_does_not_leak(caption_model, tokenizer, images, method):
    sampling = nucleus(method=method, num_beams=3)
    clean = Captioner(caption_model, tokenizer, sampling).generate(images[:2], KEYS[:2])
    polluted = copy.deepcopy(caption_model)
    for config in (polluted.generation_config, polluted.text_decoder.generation_config):
        config.max_length = 6
        config.max_new_tokens = 1
        config.top_k = 1
        config.no_repeat_ngram_size = 1
        config.length_penalty = -5.0
        config.repetition_penalty = 3.0
    assert Captioner(polluted, tokenizer, sampling).generate(images[:2], KEYS[:2]) == clean


def test_bfloat16(caption_model, tokenizer, images):
    captioner = Captioner(copy.deepcopy(caption_model), tokenizer, nucleus(), dtype=torch.bfloat16)
    assert captioner.settings()["dtype"] == "bfloat16"
    captions = captioner.generate(images[:2], KEYS[:2])
    assert [len(c) for c in captions] == [2, 2]
    assert captioner.generate(images[:2], KEYS[:2]) == captions


def test_settings_record_every_choice(caption_model, tokenizer):
    sampling = nucleus()
    settings = Captioner(caption_model, tokenizer, sampling).settings()
    assert settings.items() >= sampling.model_dump().items()
    assert settings["noise"] == NOISE_SCHEME
    assert settings["prompt_ids"][0] == special_ids(tokenizer)["dec"]
    beam = Captioner(caption_model, tokenizer, nucleus(method="beam")).settings()
    assert beam["length_penalty"] == 1.0 and "noise" not in beam


def test_bad_input_is_named(caption_model, tokenizer, images):
    captioner = Captioner(caption_model, tokenizer, nucleus())
    with pytest.raises(ValueError, match="2 keys for 3 images"):
        captioner.generate(images[:3], KEYS[:2])
    with pytest.raises(ValueError, match="non-empty strings"):
        captioner.generate(images[:1], [7])
    with pytest.raises(ValueError, match="leaves no room"):
        Captioner(caption_model, tokenizer, CaptionSampling(max_length=4, min_length=2))
    assert captioner.generate(images[:0], []) == []


def test_images_whose_captions_ended_leave_the_batch_without_changing_any_caption(
    caption_model, tokenizer, images, monkeypatch
):
    # A [SEP] bias makes captions end at different lengths, so images finish at different steps.
    model = with_sep_bias(caption_model, tokenizer, 4.0)
    sampling = nucleus(num_captions=2, max_length=24, min_length=5)
    kept = []
    original = CaptionDecoder.keep_images
    monkeypatch.setattr(CaptionDecoder, "keep_images", lambda self, keep: kept.append(int(keep.sum())) or original(self, keep))
    captioner = Captioner(model, tokenizer, sampling)
    together = captioner.generate_ids(images, KEYS)
    assert kept, "no image left the batch early"
    lengths = [row.index(captioner.ids["sep"]) if captioner.ids["sep"] in row else len(row) for row in together.tolist()]
    assert len(set(lengths)) > 2
    # Each image alone: nothing to drop but its own rows; the tokens are the same.
    alone = [captioner.generate_ids(images[i : i + 1], KEYS[i : i + 1]) for i in range(len(KEYS))]
    width = together.shape[1]
    pad = captioner.ids["pad"]
    padded = [torch.nn.functional.pad(rows, (0, width - rows.shape[1]), value=pad) for rows in alone]
    assert torch.equal(torch.cat(padded), together)
