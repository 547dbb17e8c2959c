"""Token conventions, written down once.

Position 0 of every text sequence selects the mode of the shared text transformer:
- ITC (unimodal text encoder):        ``[CLS]`` at position 0, no image.
- ITM (image-grounded text encoder):  ``[ENC]`` at position 0, cross-attention to image tokens.
- LM  (image-grounded text decoder):  ``[DEC]`` at position 0, causal self-attention.

The ITM head of BLIP's published filters was trained with ``[ENC]`` first, and so is ours; the 0.5
match threshold is calibrated under that convention. transformers' ``BlipForImageTextRetrieval``
feeds whatever ids it is given (its processor gives ``[CLS]``), so capfilt never calls it with raw
processor output: training, export round-trip tests and the scorer all go through :func:`itm_ids`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the caption cleaner imports the token names in data-reading tasks that need no torch
    import torch

CLS_TOKEN = "[CLS]"
ENC_TOKEN = "[ENC]"
DEC_TOKEN = "[DEC]"
SEP_TOKEN = "[SEP]"
PAD_TOKEN = "[PAD]"
# Label id ignored by cross-entropy.
IGNORE_INDEX = -100


def special_ids(tokenizer) -> dict[str, int]:
    """The ids of the mode tokens in ``tokenizer``; raises if the tokenizer lacks one."""
    ids = {}
    for name, token in (("cls", CLS_TOKEN), ("enc", ENC_TOKEN), ("dec", DEC_TOKEN), ("sep", SEP_TOKEN), ("pad", PAD_TOKEN)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token; load it with capfilt.data.text.load_tokenizer")
        ids[name] = int(token_id)
    return ids


def _with_first(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


def itc_ids(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    return _with_first(input_ids, special_ids(tokenizer)["cls"])


def itm_ids(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    return _with_first(input_ids, special_ids(tokenizer)["enc"])


def lm_ids(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    return _with_first(input_ids, special_ids(tokenizer)["dec"])
