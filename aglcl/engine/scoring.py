"""How a task's test examples are scored (``scoring._target_`` in a task spec).

* :class:`LabelLikelihood`: classification by the log-likelihood of each label after the prompt.
* :class:`GreedyGeneration`: greedy decoding, then the task's metric against the reference.

Both return ``(predictions, scores)`` with one entry per example.
"""

from __future__ import annotations

import torch

from aglcl.data.collate import encode_answer, encode_prompt
from aglcl.metrics.scorers import get_scorer
from aglcl.models.compat import accepts


class LabelLikelihood:
    """Pick the label with the highest (optionally length-normalised) log-probability.

    Each prompt is run once; its KV cache is then repeated for the K labels, so scoring costs
    about one forward pass per example rather than K.
    """

    def __init__(self, labels: list[str] | None = None, normalize: bool = False):
        self.labels = list(labels) if labels else None
        self.normalize = normalize

    @torch.inference_mode()
    def __call__(self, model, tokenizer, task, examples, batch_size: int, max_length: int):
        labels = self.labels or task.labels
        metric = get_scorer(task.metric)
        label_ids = [encode_answer(tokenizer, task.answer_prefix + label) for label in labels]
        budget = max_length - max(len(ids) for ids in label_ids)
        lengths = torch.tensor([len(ids) for ids in label_ids], dtype=torch.float)
        predictions = []
        for start in range(0, len(examples), batch_size):
            prompts = [encode_prompt(tokenizer, ex["prompt"], budget) for ex in examples[start : start + batch_size]]
            total = label_logprobs(model, tokenizer.pad_token_id, prompts, label_ids).cpu()
            if self.normalize:
                total = total / lengths
            predictions += [labels[i] for i in total.argmax(-1).tolist()]
        scores = [metric(p, ex["answer"]) for p, ex in zip(predictions, examples)]
        return predictions, scores


def label_logprobs(model, pad_id: int, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """``(B, K)`` sums of log p(label_k | prompt_b), one prompt pass plus one short pass over labels."""
    device = next(model.parameters()).device
    B, K, P = len(prompts), len(labels), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for row, p in enumerate(prompts):  # left-pad so every prompt ends at the last position
        ids[row, P - len(p) :] = torch.tensor(p)
        mask[row, P - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    total = first[:, [lab[0] for lab in labels]]  # (B, K)
    L = max(len(lab) for lab in labels) - 1
    if L == 0:
        return total
    inputs = torch.full((K, L), pad_id, dtype=torch.long)
    targets = torch.zeros((K, L), dtype=torch.long)
    valid = torch.zeros((K, L), dtype=torch.long)
    for k, lab in enumerate(labels):
        inputs[k, : len(lab) - 1] = torch.tensor(lab[:-1])
        targets[k, : len(lab) - 1] = torch.tensor(lab[1:])
        valid[k, : len(lab) - 1] = 1
    cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.x
    cache.batch_repeat_interleave(K)  # rows: (b0,k0), (b0,k1), ...
    inputs, targets, valid = (t.repeat(B, 1).to(device) for t in (inputs, targets, valid))
    full_mask = torch.cat([mask.repeat_interleave(K, 0), valid], dim=-1)
    cont_pos = pos[:, -1:].repeat_interleave(K, 0) + 1 + torch.arange(L, device=device)
    logits = model(input_ids=inputs, attention_mask=full_mask, position_ids=cont_pos, **{"cache" if accepts(model, "cache") else "past_key_values": cache}).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return total + (logp * valid).sum(-1).view(B, K)


class GreedyGeneration:
    """Greedy decoding of up to ``max_new_tokens``; the first line of the output is the prediction."""

    def __init__(self, max_new_tokens: int = 32, first_line: bool = True):
        self.max_new_tokens = max_new_tokens
        self.first_line = first_line

    @torch.inference_mode()
    def __call__(self, model, tokenizer, task, examples, batch_size: int, max_length: int):
        metric = get_scorer(task.metric)
        device = next(model.parameters()).device
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        predictions = []
        try:
            for start in range(0, len(examples), batch_size):
                prompts = [ex["prompt"] for ex in examples[start : start + batch_size]]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                predictions += [self._clean(t) for t in texts]
        finally:
            tokenizer.padding_side = side
        scores = [metric(p, ex["answer"]) for p, ex in zip(predictions, examples)]
        return predictions, scores

    def _clean(self, text: str) -> str:
        text = text.strip()
        return text.split("\n", 1)[0].strip() if self.first_line else text
