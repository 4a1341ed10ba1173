"""Forward passes that score answer tokens only: what training, attribution and distillation share.

    out = lm_forward(model, batch)                  # out.loss: mean cross-entropy on answer tokens
    out, logits, gold = answer_logits(model, batch)  # logits only where an answer token is predicted

``batch`` is :func:`aglcl.data.collate.collate`'s: ``input_ids``, ``attention_mask`` and ``labels`` with
:data:`IGNORE` on prompt and padding positions.
"""

from __future__ import annotations

import torch.nn.functional as F

from aglcl.models.compat import accepts

IGNORE = -100  # the label of positions that carry no loss (transformers' convention)


def answer_logits(model, batch: dict):
    """``(outputs, logits [B, K, V], gold [B, K])`` at the K positions that predict an answer token.

    Only those positions go through the LM head (``logits_to_keep``) when the model accepts it, which
    skips most of the vocabulary projection for prompt-heavy tasks; else the full logits are sliced.
    ``gold`` is -100 where a row has no answer token at that position.
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if accepts(model, "logits_to_keep"):
        out = model(**inputs, logits_to_keep=keep)
        return out, out.logits, targets[:, keep]
    out = model(**inputs)
    return out, out.logits[:, :-1][:, keep], targets[:, keep]


def lm_forward(model, batch: dict):
    """Forward pass whose ``.loss`` is the mean cross-entropy on answer tokens (see :func:`answer_logits`)."""
    out, logits, gold = answer_logits(model, batch)
    logits = logits.float()
    out.loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), gold.reshape(-1), ignore_index=IGNORE)
    return out
