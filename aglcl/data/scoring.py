"""How a task's test examples are scored (``scoring._target_`` in a task spec).

* :class:`LabelLikelihood`: classification by the log-likelihood of each label after the prompt.
* :class:`Generation`: greedy or sampled decoding, answer extraction (first line, first word, regex),
  then the task's metric against the reference (the best over several references, if the task has them).
* :class:`GreedyGeneration`: :class:`Generation` with greedy decoding and the first line as the answer.

Both return ``(predictions, scores)`` with one entry per example. :func:`check_scoring` refuses, before
training, a task that a scorer could not score under ``trainer.max_length`` (a label that leaves no room
for the prompt).
"""

from __future__ import annotations

import re
import reprlib

import torch

from aglcl.data.collate import encode_answer, encode_prompt
from aglcl.errors import AglclError, choices
from aglcl.metrics.scorers import get_scorer, score
from aglcl.models.compat import accepts

_short = reprlib.Repr()
_short.maxstring = 40


def check_scoring(tasks, tokenizer, max_length: int) -> None:
    """Refuse, in one line, a task whose scorer cannot run under ``max_length`` (``trainer.max_length``).

    Call it once the tokenizer is built and before anything is written: a :class:`LabelLikelihood`
    label as long as ``max_length`` (with ``answer_prefix`` and EOS) would leave the prompt no tokens.
    """
    if int(max_length) < 1:
        raise AglclError(f"trainer.max_length={max_length} is invalid: must be >= 1")
    for task in tasks:
        if isinstance(task.scoring, LabelLikelihood):
            label_ids(tokenizer, task, task.scoring.labels or task.labels, max_length)


def label_ids(tokenizer, task, labels: list[str], max_length: int) -> list[list[int]]:
    """The ids of ``answer_prefix + label`` (+ EOS) for each label; AglclError if one leaves no prompt budget."""
    if not labels:
        raise AglclError(f"task '{task.name}' has no labels to score; declare sequence.tasks.{task.name}.labels")
    ids = [encode_answer(tokenizer, task.answer_prefix + label) for label in labels]
    if any(not x for x in ids):
        raise AglclError(f"task '{task.name}' has an empty label, which cannot be scored; fix "
                         f"sequence.tasks.{task.name}.labels or the data's answers")
    longest = max(range(len(ids)), key=lambda k: len(ids[k]))
    n = len(ids[longest])
    if n >= max_length:
        raise AglclError(
            f"task '{task.name}': label {_short.repr(labels[longest])} is {n} tokens long (with answer_prefix "
            f"{task.answer_prefix!r} and EOS), which leaves no room for the prompt under trainer.max_length="
            f"{max_length}; raise trainer.max_length to at least {n + 1} (the prompt shares it) or shorten the "
            f"label (sequence.tasks.{task.name}.labels)")
    return ids


def by_length(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Batches of indices into ``prompts``, longest first, each of similar lengths: less padding than in
    the given order. The order is fixed by the lengths (ties by index), so a run reproduces."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _context(tokenizer, prompt: str, budget: int) -> list[int]:
    """:func:`encode_prompt`, or one BOS (else EOS) token for a prompt that encodes to no tokens at all."""
    ids = encode_prompt(tokenizer, prompt, budget)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ids if ids or start is None else [start]


class LabelLikelihood:
    """Pick the label with the highest (optionally length-normalised) log-probability.

    Each prompt is run once; its KV cache is then repeated for the K labels, so scoring costs
    about one forward pass per example rather than K. Prompts are batched by length (:func:`by_length`);
    predictions come back in the examples' order.
    """

    def __init__(self, labels: list[str] | None = None, normalize: bool = False):
        self.labels = list(labels) if labels else None
        self.normalize = normalize

    @torch.no_grad()  # not inference_mode: FSDP2 reuses the gathered buffers in training
    def __call__(self, model, tokenizer, task, examples, batch_size: int, max_length: int):
        labels = self.labels or task.labels
        metric = get_scorer(task.metric)
        ids = label_ids(tokenizer, task, labels, max_length)  # refuses a label that leaves no prompt budget
        budget = max_length - max(len(x) for x in ids)
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.float)
        prompts = [_context(tokenizer, ex["prompt"], budget) for ex in examples]
        predictions: list = [None] * len(examples)
        for rows in by_length(prompts, batch_size):
            total = label_logprobs(model, tokenizer.pad_token_id, [prompts[i] for i in rows], ids).cpu()
            if self.normalize:
                total = total / lengths
            for i, k in zip(rows, total.argmax(-1).tolist()):
                predictions[i] = labels[k]
        scores = [score(metric, p, ex) for p, ex in zip(predictions, examples)]
        return predictions, scores


TREE_KERNELS = ("eager", "sdpa")  # attention implementations that take a 4-D mask (the labels' tree pass)


def label_logprobs(model, pad_id: int, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """``(B, K)`` sums of log p(label_k | prompt_b): one prompt pass, then one short pass over the labels.

    The prompt pass keeps the logits of the last position only. The labels' later tokens go in one pass on
    the prompt's KV cache: on ``eager`` and ``sdpa`` attention as a tree (all K labels in one row per prompt,
    each label's tokens seeing the prompt and their own earlier tokens through a 4-D mask, at the positions
    they would have after the prompt), so the cache is not copied; on other kernels, which take no 4-D mask,
    the cache is repeated K times.
    """
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for row, p in enumerate(prompts):  # left-pad so every prompt ends at the last position
        ids[row, P - len(p) :] = torch.tensor(p)
        mask[row, P - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    keep = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}  # only the last position is read
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    total = first[:, [lab[0] for lab in labels]]  # (B, K)
    if max(len(lab) for lab in labels) == 1:
        return total
    cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.x
    cache_key = "cache" if accepts(model, "cache") else "past_key_values"
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl in TREE_KERNELS:
        return total + _tree_pass(model, cache, cache_key, impl, mask, pos, labels)
    return total + _repeated_pass(model, cache, cache_key, pad_id, mask, pos, labels)


def _tree_pass(model, cache, cache_key, impl, mask, pos, labels) -> torch.Tensor:
    """``(B, K)`` log-probabilities of every label's tokens after the first, all labels in one row per prompt."""
    device, B = mask.device, mask.shape[0]
    inputs, targets, owner, offset = [], [], [], []
    for k, lab in enumerate(labels):  # label k's token j predicts token j + 1
        inputs += lab[:-1]
        targets += lab[1:]
        owner += [k] * (len(lab) - 1)
        offset += range(len(lab) - 1)
    owner_t, offset_t = torch.tensor(owner, device=device), torch.tensor(offset, device=device)
    # a label token sees the (unpadded) prompt and its own label's tokens up to itself
    tree = (owner_t[:, None] == owner_t[None, :]) & (offset_t[None, :] <= offset_t[:, None])  # (N, N)
    seen = torch.cat([mask.bool()[:, None, :].expand(B, len(owner), -1), tree.expand(B, -1, -1)], dim=-1)
    seen = seen[:, None]  # (B, 1, N, P + N)
    if impl == "eager":  # eager attention adds its mask; sdpa takes a boolean one
        seen = torch.zeros(seen.shape, device=device).masked_fill_(~seen, torch.finfo(torch.float32).min)
    n = len(owner)
    logits = model(input_ids=torch.tensor(inputs, device=device).expand(B, n), attention_mask=seen,
                   position_ids=pos[:, -1:] + 1 + offset_t, **{cache_key: cache}).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.tensor(targets, device=device).expand(B, n).unsqueeze(-1)).squeeze(-1)
    return torch.zeros((B, len(labels)), device=device).index_add_(1, owner_t, picked)


def _repeated_pass(model, cache, cache_key, pad_id, mask, pos, labels) -> torch.Tensor:
    """As :func:`_tree_pass`, with the prompt's cache repeated K times (kernels that take no 4-D mask)."""
    device, B, K = mask.device, mask.shape[0], len(labels)
    L = max(len(lab) for lab in labels) - 1
    inputs = torch.full((K, L), pad_id, dtype=torch.long)
    targets = torch.zeros((K, L), dtype=torch.long)
    valid = torch.zeros((K, L), dtype=torch.long)
    for k, lab in enumerate(labels):
        inputs[k, : len(lab) - 1] = torch.tensor(lab[:-1])
        targets[k, : len(lab) - 1] = torch.tensor(lab[1:])
        valid[k, : len(lab) - 1] = 1
    cache.batch_repeat_interleave(K)  # rows: (b0,k0), (b0,k1), ...
    inputs, targets, valid = (t.repeat(B, 1).to(device) for t in (inputs, targets, valid))
    full_mask = torch.cat([mask.repeat_interleave(K, 0), valid], dim=-1)
    cont_pos = pos[:, -1:].repeat_interleave(K, 0) + 1 + torch.arange(L, device=device)
    logits = model(input_ids=inputs, attention_mask=full_mask, position_ids=cont_pos, **{cache_key: cache}).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * valid).sum(-1).view(B, K)


EXTRACTORS = ("none", "first_line", "first_word", "regex")


def extract_answer(text: str, how: str = "first_line", pattern: str | None = None) -> str:
    """The answer part of a generation: ``none`` (stripped text), ``first_line``, ``first_word`` or ``regex``.

    ``regex`` returns group 1 of the first match of ``pattern`` (group 0 if it has no group), or ``""``.
    """
    text = text.strip()
    if how == "none":
        return text
    if how == "first_line":
        return text.split("\n", 1)[0].strip()
    if how == "first_word":
        words = text.split()
        return words[0].strip(".,;:!?\"'") if words else ""
    if how == "regex":
        found = re.search(pattern or "", text)
        if not found:
            return ""
        return (found.group(1) if found.re.groups else found.group(0)).strip()
    raise AglclError(f"unknown answer extraction {how!r}; choose one of {choices(EXTRACTORS)}")


class Generation:
    """Decode up to ``max_new_tokens``, extract the answer, score it with the task's metric.

    ``temperature`` 0 decodes greedily; above 0 it samples (with ``top_p``), as TRACE does at 0.1.
    ``extract`` picks the scored part of the output: ``none``, ``first_line``, ``first_word`` (e.g. a
    class label) or ``regex`` (group 1 of ``pattern``). A prompt longer than ``max_length`` tokens is cut
    in the middle, as for training. Prompts are batched by length (:func:`by_length`); predictions come
    back in the examples' order. Sampling draws from torch's global RNG, which the runner seeds per task,
    so a run is reproducible.
    """

    def __init__(self, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 extract: str = "first_line", pattern: str | None = None):
        if extract not in EXTRACTORS:
            raise AglclError(f"unknown scoring.extract {extract!r}; choose one of {choices(EXTRACTORS)}")
        if extract == "regex":
            if not pattern:
                raise AglclError("scoring.extract=regex needs scoring.pattern (a regular expression)")
            try:
                re.compile(pattern)
            except re.error as e:
                raise AglclError(f"scoring.pattern {pattern!r} is not a valid regular expression: {e}") from None
        if int(max_new_tokens) < 1:
            raise AglclError(f"scoring.max_new_tokens must be at least 1, got {max_new_tokens}")
        if float(temperature) < 0:
            raise AglclError(f"scoring.temperature must be >= 0 (0: greedy), got {temperature}")
        self.max_new_tokens, self.temperature, self.top_p = int(max_new_tokens), float(temperature), float(top_p)
        self.extract, self.pattern = extract, pattern

    def _decode_kwargs(self) -> dict:
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": False}

    @torch.no_grad()  # not inference_mode: FSDP2 reuses the gathered buffers in training
    def __call__(self, model, tokenizer, task, examples, batch_size: int, max_length: int):
        if int(max_length) < 1:
            raise AglclError(f"trainer.max_length={max_length} is invalid: must be >= 1")
        metric = get_scorer(task.metric)
        device = next(model.parameters()).device
        # the prompt is cut as in training (head and tail kept), then left-padded
        everyone = [_context(tokenizer, ex["prompt"], max_length) for ex in examples]
        predictions: list = [None] * len(examples)
        for rows in by_length(everyone, batch_size):
            prompts = [everyone[i] for i in rows]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **self._decode_kwargs(),
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, t in zip(rows, texts):
                predictions[i] = extract_answer(t, self.extract, self.pattern)
        scores = [score(metric, p, ex) for p, ex in zip(predictions, examples)]
        return predictions, scores


class GreedyGeneration(Generation):
    """Greedy decoding of up to ``max_new_tokens``; the first line of the output is the prediction."""

    def __init__(self, max_new_tokens: int = 32, first_line: bool = True):
        super().__init__(max_new_tokens=max_new_tokens, temperature=0.0,
                         extract="first_line" if first_line else "none")
