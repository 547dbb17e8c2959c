"""Fine-tuning the captioner and the filter from a pretrained MED: separate copies, loadable exports."""

from __future__ import annotations

import pytest
import torch

from capfilt.config import CaptionerTrainConfig, FilterTrainConfig, ImageConfig, MedConfig, PairSource, ReaderConfig
from capfilt.stages.finetune import run_finetune_captioner, run_finetune_filter

# In the driver (train_in_driver): these tests are about what each fine-tune makes, not Ray Train's workers.
SMALL = {"image": ImageConfig(hflip_p=0.0), "steps": 3, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 3,
         "log_every": 1, "train_in_driver": True}


@pytest.fixture(scope="module")
def pretrained(tokenizer, tmp_path_factory):
    """A MED as the pretrain stage leaves it (here untrained) and the tokenizer directory."""
    from capfilt.models.med import MED, save_med

    root = tmp_path_factory.mktemp("pretrained")
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = MedConfig(preset="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1,
                                              "heads": 2, "mlp_dim": 128},
                       text={"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128}, embed_dim=32, queue_size=64)
    return str(save_med(MED.from_config(config, tokenizer), root / "med")), str(root / "tokenizer")


def _human(world) -> list[PairSource]:
    return [PairSource(kind="shards", role="human", reader=ReaderConfig(paths=world.human + "/*.parquet"))]


def test_captioner_and_filter_fine_tune_separately_and_export_loadable_models(ray_cluster, small_world,
                                                                              pretrained, tmp_path):
    from capfilt.models.export import load_captioner, load_filter
    from capfilt.models.med import load_med

    init_med, tokenizer_dir = pretrained
    start = load_med(init_med)
    messages: list[str] = []
    captioner = run_finetune_captioner(CaptionerTrainConfig(**SMALL), init_med, tokenizer_dir, _human(small_world),
                                       str(tmp_path / "captioner"), log=messages.append)
    assert captioner["steps"] == 3 and captioner["pairs"]["by_source"] == {"human": 8}
    assert sum(message.startswith("[finetune_captioner] step ") for message in messages) == 3
    tuned = load_med(captioner["med"])
    loaded = load_captioner(captioner["model"])
    decoder_bias = loaded.model.text_decoder.cls.predictions.bias
    assert torch.equal(decoder_bias, tuned.text_decoder.cls.predictions.bias)
    assert not torch.equal(decoder_bias, start.text_decoder.cls.predictions.bias)  # LM training moved it
    assert torch.equal(tuned.itm_head.weight, start.itm_head.weight)  # LM only: the ITM head is untouched
    assert loaded.image_size == 32 and loaded.special["dec"] == tuned.special["dec"]

    filter_result = run_finetune_filter(FilterTrainConfig(**SMALL), init_med, tokenizer_dir, _human(small_world),
                                        str(tmp_path / "filter"), log=lambda _: None)
    filter_med = load_med(filter_result["med"])
    loaded_filter = load_filter(filter_result["model"])
    assert torch.equal(loaded_filter.model.itm_head.weight, filter_med.itm_head.weight)
    assert not torch.equal(filter_med.itm_head.weight, start.itm_head.weight)  # ITM training moved it
    # Two copies of the pretrained MED, trained apart: they share no trained parameter.
    assert not torch.equal(filter_med.text_encoder.embeddings.word_embeddings.weight,
                           tuned.text_encoder.embeddings.word_embeddings.weight)


def test_fine_tuning_refuses_objectives_that_do_not_make_its_model(pretrained, small_world, tmp_path):
    init_med, tokenizer_dir = pretrained
    with pytest.raises(ValueError, match="captioner is the LM decoder"):
        run_finetune_captioner(CaptionerTrainConfig(objectives=["itc"], prompt=""), init_med, tokenizer_dir,
                               _human(small_world), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="filter is the ITM head"):
        run_finetune_filter(FilterTrainConfig(objectives=["lm"]), init_med, tokenizer_dir, _human(small_world),
                            str(tmp_path / "f"))
