"""Hugging Face causal LMs behind the :class:`~offpolicy.policy.model.Policy` interface.

Needs the ``hf`` extra (``pip install 'offpolicy[hf]'``). Loads a hub id or a
local folder with ``from_pretrained``; no network is needed for a local folder.
"""

from __future__ import annotations

from typing import Sequence

import torch

from offpolicy.policy.model import CheckpointError, Policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTokenizer:
    """Adapts a ``transformers`` tokenizer to offpolicy's small tokenizer protocol."""

    def __init__(self, hf) -> None:
        self.hf = hf
        if hf.eos_token_id is None:
            raise CheckpointError("the tokenizer has no eos token; offpolicy needs one to stop generation")
        self.eos_id = int(hf.eos_token_id)
        self.pad_id = int(hf.pad_token_id) if hf.pad_token_id is not None else self.eos_id
        self.bos_id = hf.bos_token_id
        self.vocab_size = len(hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.hf.decode(ids, skip_special_tokens=True)


def _load_tokenizer(name_or_path: str):
    """The tokenizer as saved. transformers 5's AutoTokenizer picks the class from config.json's model type for
    some models (Qwen2), which rebuilds the pipeline and silently drops the spaces and newlines of a custom
    tokenizer saved as a generic fast tokenizer; such a tokenizer is loaded with the generic class."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    if get_tokenizer_config(name_or_path).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path)


def load_hf_policy(name_or_path: str, *, dtype: str = "float32") -> Policy:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError("loading Hugging Face models needs the 'hf' extra: pip install 'offpolicy[hf]'") from None
    if dtype not in DTYPES:
        raise ValueError(f"policy.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
        tokenizer = _load_tokenizer(name_or_path)
    except OSError as e:
        raise CheckpointError(f"could not load a Hugging Face model from {name_or_path!r}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(model, HFTokenizer(tokenizer), "hf")
