"""Tokenisation for causal-LM fine-tuning: the loss falls on answer tokens only."""

from __future__ import annotations

import torch

from aglcl.models.forward import IGNORE


def encode(tokenizer, prompt: str, answer: str, max_length: int) -> dict:
    """``prompt + answer + eos`` as ids, with prompt positions masked out of ``labels``.

    A prompt that does not fit is cut in the middle, keeping its head (the instruction) and its
    tail (the answer cue, e.g. ``Topic:``).
    """
    a = encode_answer(tokenizer, answer)[: max_length // 2]
    p = encode_prompt(tokenizer, prompt, max_length - len(a))
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Answer ids followed by EOS (so a label that prefixes another is still told apart)."""
    a = tokenizer(answer, add_special_tokens=False).input_ids
    return a + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else a


def encode_prompt(tokenizer, prompt: str, budget: int) -> list[int]:
    """Prompt ids (with the tokenizer's own special tokens), cut in the middle to fit ``budget`` (>= 1)."""
    if budget < 1:  # a cut to <= 0 tokens would keep the wrong slices (p[:-k] + p[k:]): the callers' bug
        raise ValueError(f"prompt budget must be >= 1 token, got {budget}")
    p = tokenizer(prompt).input_ids
    if len(p) > budget:
        tail = min(16, budget // 4)
        p = p[: budget - tail] + (p[-tail:] if tail else [])
    return p


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a list of :func:`encode` outputs into tensors."""
    width = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[row, :n] = torch.tensor(x["input_ids"])
        labels[row, :n] = torch.tensor(x["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
