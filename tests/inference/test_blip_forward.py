"""The fast forward passes against transformers' own modules run the ordinary way."""

from __future__ import annotations

import pytest
import torch

from capfilt.inference.blip_forward import (
    CaptionDecoder,
    cross_attention_keys_values,
    text_hidden_states,
    vision_embeds,
)

TEXTS = ["a red circle left of a blue square", "click to enlarge", "two green triangles above a yellow star"]


def test_vision_embeds_match_transformers(caption_model, images):
    with torch.inference_mode():
        expected = caption_model.vision_model(pixel_values=images).last_hidden_state
        got = vision_embeds(caption_model.vision_model, images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_image", [True, False], ids=["itm", "itc"])
def test_text_hidden_states_match_transformers_on_padded_batches(retrieval_model, tokenizer, images, with_image):
    # Three texts of different lengths per image, image-major: padding and grouping both matter.
    tokens = tokenizer(TEXTS * 2, padding="longest", return_tensors="pt")
    assert (tokens.attention_mask == 0).any()
    encoder = retrieval_model.text_encoder
    with torch.inference_mode():
        image_embeds = retrieval_model.vision_model(pixel_values=images[:2]).last_hidden_state
        expected = encoder(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds.repeat_interleave(3, dim=0) if with_image else None,
        ).last_hidden_state
        keys_values = cross_attention_keys_values(encoder, image_embeds) if with_image else None
        got = text_hidden_states(encoder, tokens.input_ids, tokens.attention_mask, keys_values)
    real = tokens.attention_mask.bool()  # padded positions' states are never read
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    if with_image:  # each row reads its own image: against the other image the states differ
        swapped = cross_attention_keys_values(encoder, image_embeds.flip(0))
        with torch.inference_mode():
            other = text_hidden_states(encoder, tokens.input_ids, tokens.attention_mask, swapped)
        assert not torch.allclose(other[real], expected[real], atol=1e-3)


def test_caption_decoder_steps_match_transformers_full_forward(caption_model, tokenizer, images):
    captions_per_image, max_length = 3, 9
    decoder_model = caption_model.text_decoder
    prompt = torch.tensor(tokenizer("a picture of").input_ids[:-1])  # no [SEP]
    rows = 2 * captions_per_image
    generator = torch.Generator().manual_seed(0)
    new_tokens = torch.randint(5, len(tokenizer), (rows, max_length - len(prompt)), generator=generator)
    with torch.inference_mode():
        image_embeds = caption_model.vision_model(pixel_values=images[:2]).last_hidden_state
        decoder = CaptionDecoder(decoder_model, image_embeds, captions_per_image, max_length)
        sequences = prompt.expand(rows, -1)
        logits = decoder(prompt)
        for step in range(new_tokens.shape[1] + 1):
            # transformers, no cache, the whole sequence so far, the image repeated per caption row
            expected = decoder_model(
                input_ids=sequences,
                encoder_hidden_states=image_embeds.repeat_interleave(captions_per_image, dim=0),
                use_cache=False,
            ).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
            if step == new_tokens.shape[1]:
                break
            sequences = torch.cat([sequences, new_tokens[:, step : step + 1]], dim=1)
            logits = decoder(new_tokens[:, step])
        assert decoder.length == max_length
        with pytest.raises(ValueError, match="all 9 positions are used"):
            decoder(new_tokens[:, 0])


def test_caption_decoder_names_bad_input(caption_model, images):
    with torch.inference_mode():
        image_embeds = caption_model.vision_model(pixel_values=images[:2]).last_hidden_state
        decoder = CaptionDecoder(caption_model.text_decoder, image_embeds, captions_per_image=2, max_length=6)
        with pytest.raises(ValueError, match="the first call takes the prompt"):
            decoder(torch.tensor([[1, 2]]))
        with pytest.raises(ValueError, match="the first call takes the prompt, 1 to 6 tokens"):
            decoder(torch.arange(7))
        decoder(torch.tensor([1, 2]))
        with pytest.raises(ValueError, match=r"one token per caption row, shape \(4,\), got \(3,\)"):
            decoder(torch.tensor([1, 2, 3]))


def test_text_rows_must_divide_among_images(retrieval_model, tokenizer, images):
    tokens = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.inference_mode():
        image_embeds = retrieval_model.vision_model(pixel_values=images[:2]).last_hidden_state
        keys_values = cross_attention_keys_values(retrieval_model.text_encoder, image_embeds)
        with pytest.raises(ValueError, match="3 text rows do not divide evenly among 2 images"):
            text_hidden_states(retrieval_model.text_encoder, tokens.input_ids, tokens.attention_mask, keys_values)


def test_dropping_finished_images_leaves_the_other_rows_unchanged(caption_model, tokenizer, images):
    captions_per_image, max_length = 2, 8
    prompt = torch.tensor(tokenizer("a picture of").input_ids[:-1])
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, len(tokenizer), (3 * captions_per_image, max_length - len(prompt)), generator=generator)
    with torch.inference_mode():
        image_embeds = caption_model.vision_model(pixel_values=images[:3]).last_hidden_state
        whole = CaptionDecoder(caption_model.text_decoder, image_embeds, captions_per_image, max_length)
        dropping = CaptionDecoder(caption_model.text_decoder, image_embeds, captions_per_image, max_length)
        whole(prompt), dropping(prompt)
        whole(tokens[:, 0]), dropping(tokens[:, 0])
        dropping.keep_images(torch.tensor([True, False, True]))  # image 1 (rows 2, 3) is done
        kept_rows = torch.tensor([0, 1, 4, 5])
        for step in range(1, tokens.shape[1]):
            expected = whole(tokens[:, step])[kept_rows]
            torch.testing.assert_close(dropping(tokens[kept_rows, step]), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"one flag per image, shape \(2,\), got \(3,\)"):
            dropping.keep_images(torch.tensor([True, True, True]))


def test_more_positions_than_the_model_has_are_named(caption_model, retrieval_model, images):
    limit = caption_model.text_decoder.bert.embeddings.position_embeddings.num_embeddings
    with torch.inference_mode():
        image_embeds = caption_model.vision_model(pixel_values=images[:1]).last_hidden_state
        decoder = CaptionDecoder(caption_model.text_decoder, image_embeds, 1, max_length=limit + 5)
        with pytest.raises(ValueError, match=f"{limit + 1} text positions, but the model has position embeddings for {limit}"):
            decoder(torch.ones(limit + 1, dtype=torch.long))
        with pytest.raises(ValueError, match=f"position embeddings for {limit}"):
            text_hidden_states(retrieval_model.text_encoder, torch.ones(1, limit + 1, dtype=torch.long))
