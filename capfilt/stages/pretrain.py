"""Pretraining: a MED learns ITC + ITM + LM from image-text pairs (noisy web pairs, or CapFilt's
bootstrapped ones plus human pairs), and the tokenizer every model of the run shares.

Both functions are resumable and skip work that is complete for the same inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from capfilt.config import MedConfig, PairSource, TokenizerConfig, TrainConfig

TOKENIZER_RECORD = "_tokenizer.json"


def run_pretrain(
    train: TrainConfig,
    model: MedConfig,
    tokenizer_dir: str,
    sources: list[PairSource],
    out_dir: str,
    init_from: str | None = None,
    log: Callable[[str], None] = print,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pretrain a MED of size ``model`` (or continue from the MED directory ``init_from``) on ``sources``.

    Returns ``{"med": <save_med dir>, "steps", "pairs": {total, by_source, rejects, units}, "bad_pairs",
    "seconds", "resumed_from_step", "log"}``; the same dict, without training, when ``out_dir`` already
    holds it. ``out_dir`` may be a URL (with fsspec ``storage_options``): see
    :func:`~capfilt.training.stage.run_training_stage`.
    """
    from capfilt.training.stage import run_training_stage

    return run_training_stage("pretrain", train, sources, tokenizer_dir, out_dir, model=model,
                              init_med=init_from, log=log, storage_options=storage_options)


def prepare_tokenizer(
    config: TokenizerConfig,
    corpus_sources: Sequence[PairSource],
    out_dir: str,
    log: Callable[[str], None] = print,
) -> str:
    """The run's tokenizer in ``out_dir`` (with ``[DEC]``/``[ENC]``); returns ``out_dir``.

    ``source: train`` learns a WordPiece vocabulary from the cleaned captions of ``corpus_sources``
    (deterministic: a function of the corpus); otherwise the named hub id or directory is copied in,
    so every model of the run loads the same files. A directory already made from the same inputs is kept.
    """
    from capfilt.data.output import config_hash
    from capfilt.data.pairs import caption_corpus
    from capfilt.data.text import load_tokenizer, train_tokenizer

    inputs = {"tokenizer": config.model_dump(mode="json"),
              "corpus": [source.model_dump(mode="json") for source in corpus_sources] if config.source == "train" else None}
    record_path = Path(out_dir) / TOKENIZER_RECORD
    if record_path.exists() and json.loads(record_path.read_text()).get("hash") == config_hash(inputs):
        log(f"[tokenizer] complete in {out_dir}, skipped")
        return str(out_dir)
    if config.source == "train":
        if not corpus_sources:
            raise ValueError("tokenizer.source 'train' needs caption sources (the run's human and web shards)")
        corpus = list(caption_corpus(corpus_sources))
        if not corpus:
            raise ValueError("tokenizer.source 'train': the caption sources hold no usable caption")
        tokenizer = train_tokenizer(corpus, out_dir, vocab_size=config.vocab_size)
        log(f"[tokenizer] trained on {len(corpus)} captions: {len(tokenizer)} tokens")
    else:
        tokenizer = load_tokenizer(config.source, revision=config.revision)
        tokenizer.save_pretrained(out_dir)
        log(f"[tokenizer] {config.source}: {len(tokenizer)} tokens")
    temporary = record_path.with_name(record_path.name + ".tmp")
    temporary.write_text(json.dumps({"hash": config_hash(inputs), "inputs": inputs}, indent=2, sort_keys=True))
    os.replace(temporary, record_path)
    return str(out_dir)
