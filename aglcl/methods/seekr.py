"""SEEKR: selective attention-guided knowledge retention (He et al., EMNLP 2024; code: github.com/jinghan1he/SEEKR).

    aglcl train method=seekr                                 # 1% replay, logits + attention distillation
    aglcl train method=seekr method.layer_budget=8 method.head_budget=32 method.fraction=0.02

**Replay.** A :class:`aglcl.methods.replay.Replay` buffer keeps ``fraction`` of each finished task's training examples
(``max(1, round(fraction · n))``, drawn with ``Random(seed + k)``) and mixes them into later tasks (``ratio: null``: the
whole buffer once per pass, as SEEKR's loop visits its replay loader once per epoch).

**Distillation on replayed rows.** The teacher is a frozen copy of the model as it was before the current task
(:func:`aglcl.methods.lwf.frozen_copy`, as in LwF). In a micro-batch whose rows R are buffer examples, the loss is

    L = L_task + w·(KL_R − CE_R)/N + β·L_attn

where N is the number of answer tokens of the micro-batch (L_task's denominator), CE_R and KL_R are the summed
cross-entropy and KL(teacher || student) (temperature 1, :func:`aglcl.methods.lwf.distill_kl`) over R's answer
tokens. So a replayed token costs (1 − w)·CE + w·KL, SEEKR's ``(1 − w)·replay_loss + w·logits_distill_loss``, and
current-task tokens keep their plain CE. ``L_attn`` (:func:`attention_kl`) is, averaged over the selected layers,
the mean over replayed rows, selected heads and non-padding queries of KL(teacher row || student row) over the
non-padding keys, SEEKR's ``KLDivLoss(log(student + 1e-8), teacher)``. The student's attention maps come from one
extra forward of the replayed rows with eager attention and ``output_attentions`` (the attention implementation
is switched to ``eager`` for that call only, :func:`eager_attention`; the teacher copy stays eager).

**Head selection** (after every task but the last, on that task's new buffer examples, one at a time):

* task sensitivity s[l, h]: the mean over examples and (query, key) of (∂L_CE/∂A[l, h])², the squared gradient of
  the answer loss with respect to the attention map, normalised to sum 1 over the heads of each layer;
* forgettability f[l, h]: the mean of (A_before[l, h] − A_after[l, h])², the change of the task's attention maps
  while it trained (A_before from the teacher copy, A_after from the trained model);
* the importance I += s · f accumulates over tasks; the ``layer_budget`` layers with the largest Σ_h I[l, h] are kept,
  then the ``head_budget`` heads with the largest I among them are distilled (budgets are clamped to the model).

Defaults are the published ones (``scripts/exp_seq_seekr.sh``, ``training/seekr.py``): 1% replay, w = 0.5,
β = 1e3, 24 layers and 128 heads of Llama-2-7B's 32 × 32 (scale the budgets for other models; both count query
heads), every query (``attn_query_budget: 0``).

Differences from the official code: it distils replay samples towards logits and attention maps *stored* right
after each task was learnt; here the teacher is the previous model (no stored T × T maps, which grow with the
square of the length), so the distillation targets move with each task, like LwF on the replayed rows. Replayed
rows share micro-batches with the current task instead of taking separate optimizer steps. The buffer is a random
draw (the official code takes the first 1%, ``int(0.01 · n)``, possibly 0).

Persisted in each task checkpoint's ``method.safetensors``: the buffer (``buffer.*``, int64), the accumulated importance
``scores`` [L, H] and the selected ``heads`` [L, H] (bool), so a resumed run distils what an unbroken one would.
Memory: one extra copy of the model while a task trains (also during the first task: it is the "before" model for
forgettability). Compute per micro-batch with replayed rows: one teacher forward and one extra student forward of
those rows, both with eager attention.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from aglcl import dist
from aglcl.data.collate import IGNORE, collate
from aglcl.errors import AglclError
from aglcl.methods.base import Method
from aglcl.methods.lwf import distill_kl, frozen_copy
from aglcl.methods.replay import Replay
from aglcl.models.compat import accepts

EPS = 1e-8  # SEEKR's log(student + 1e-8); here a floor, so identical maps give exactly 0


def _pretrained(model):
    """The transformers model under DDP / PEFT wrappers (the one whose config picks the attention kernel)."""
    model = dist.unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention inside the block (sdpa / flash kernels return no attention maps)."""
    hf = _pretrained(model)
    previous = getattr(hf.config, "_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(previous)


def _answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is an answer token in some row (what ``aglcl.models.forward.answer_logits`` keeps)."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)


def attention_forward(model, batch: dict, keep: torch.Tensor, attentions: bool = True):
    """``(logits [B, K, V] at positions keep, attention maps: one [B, H, T, T] per layer, or None)``."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if attentions:
        inputs["output_attentions"] = True
    with eager_attention(model) if attentions else contextlib.nullcontext():
        if accepts(model, "logits_to_keep"):
            out = model(**inputs, logits_to_keep=keep)
            logits = out.logits
        else:
            out = model(**inputs)
            logits = out.logits[:, :-1][:, keep]
    maps = tuple(out.attentions or ()) if attentions else None
    if attentions and (not maps or any(m is None for m in maps)):
        raise AglclError(f"SEEKR needs attention maps, but {type(_pretrained(model)).__name__} returned none with "
                         f"eager attention and output_attentions=True; choose a model family that supports them")
    return logits, maps


def attention_kl(student, teacher, attention_mask: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Attention distillation: mean over the layers with selected heads of the mean over rows (examples) of the
    mean over (selected head, non-padding query) of KL(teacher || student) over the non-padding keys.

    ``student``/``teacher``: one ``[B, H, T, T]`` map per layer; ``attention_mask`` ``[B, T]``; ``heads`` bool ``[L, H]``.
    """
    valid = attention_mask.bool()
    pairs = (valid[:, None, :, None] & valid[:, None, None, :]).float()  # [B, 1, T(query), T(key)]
    queries = valid.sum(1).clamp(min=1).float()  # [B]
    losses = []
    for layer, row in enumerate(heads.tolist()):
        chosen = [h for h, on in enumerate(row) if on]
        if not chosen:
            continue
        index = torch.tensor(chosen, device=student[layer].device)
        s = student[layer].index_select(1, index).float()
        t = teacher[layer].index_select(1, index).float()
        kl = t * (t.clamp_min(EPS).log() - s.clamp_min(EPS).log())  # 0 where t = 0 and where t = s
        per_example = (kl * pairs).sum((1, 2, 3)) / (len(chosen) * queries)
        losses.append(per_example.mean())
    if not losses:
        return torch.zeros((), device=attention_mask.device)
    return torch.stack(losses).mean()


def select_heads(scores: torch.Tensor, layer_budget: int, head_budget: int) -> torch.Tensor:
    """Bool ``[L, H]``: the ``head_budget`` top-scored heads within the ``layer_budget`` layers of largest total score."""
    num_layers, num_heads = scores.shape
    layers = scores.sum(1).topk(min(layer_budget, num_layers)).indices
    flat = scores[layers].flatten().topk(min(head_budget, len(layers) * num_heads)).indices
    chosen = torch.zeros(num_layers, num_heads, dtype=torch.bool)
    chosen[layers[flat // num_heads].cpu(), (flat % num_heads).cpu()] = True
    return chosen


def head_scores(model, teacher, examples: list[dict], pad_id: int) -> torch.Tensor:
    """Task sensitivity × forgettability ``[L, H]`` (float32, CPU) on ``examples``, one at a time (module docstring)."""
    student = dist.unwrap(model)
    device = next(student.parameters()).device
    sensitivity = forgettability = None
    was_training = student.training
    student.eval()
    try:
        for example in examples:
            batch = {k: v.to(device) for k, v in collate([example], pad_id).items()}
            keep = _answer_positions(batch["labels"])
            with torch.enable_grad():
                logits, after = attention_forward(student, batch, keep)
                gold = batch["labels"][:, 1:][:, keep]
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), gold.reshape(-1),
                                       ignore_index=IGNORE)
                live = [i for i, m in enumerate(after) if m.requires_grad]
                grads = dict(zip(live, torch.autograd.grad(loss, [after[i] for i in live], allow_unused=True)))
            with torch.no_grad():
                _, before = attention_forward(teacher, batch, keep)
            g = torch.stack([(grads[i].float() ** 2).mean((0, 2, 3)) if grads.get(i) is not None
                             else torch.zeros(m.size(1), device=m.device) for i, m in enumerate(after)])
            d = torch.stack([((b.float() - a.detach().float()) ** 2).mean((0, 2, 3)) for a, b in zip(after, before)])
            sensitivity = g if sensitivity is None else sensitivity + g
            forgettability = d if forgettability is None else forgettability + d
    finally:
        student.train(was_training)
    sensitivity = sensitivity / len(examples)
    sensitivity = sensitivity / sensitivity.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (sensitivity * forgettability / len(examples)).float().cpu()


class SEEKR(Method):
    """Replay with logit and selected-head attention distillation from the previous model."""

    supports_sharded = False  # whole-tensor state or hooks (not shard-aware yet)

    def __init__(self, fraction: float = 0.01, ratio: float | None = None, logits_weight: float = 0.5,
                 attn_weight: float = 1e3, layer_budget: int = 24, head_budget: int = 128, seed: int = 0):
        self.replay = Replay(fraction=fraction, ratio=ratio, seed=seed)  # validates method.fraction / method.ratio
        if not 0.0 <= logits_weight <= 1.0:
            raise AglclError(f"method.logits_weight={logits_weight} is invalid: must be in [0, 1] "
                             f"(replayed tokens cost (1 − w)·CE + w·KL)")
        if not attn_weight >= 0:
            raise AglclError(f"method.attn_weight={attn_weight} is invalid: must be >= 0")
        for key, value in (("layer_budget", layer_budget), ("head_budget", head_budget)):
            if not (isinstance(value, int) and value >= 1):
                raise AglclError(f"method.{key}={value!r} is invalid: must be an integer >= 1")
        self.logits_weight, self.attn_weight = float(logits_weight), float(attn_weight)
        self.layer_budget, self.head_budget = layer_budget, head_budget
        self.scores: torch.Tensor | None = None  # accumulated importance [L, H]
        self.heads: torch.Tensor | None = None  # selected heads, bool [L, H]
        self.teacher = None
        self._keys: set[tuple[int, ...]] = set()

    # -- hooks ---------------------------------------------------------------------------------------------------
    def before_task(self, index, task, model) -> None:
        distil = bool(self.replay.buffer) and (self.logits_weight > 0 or self._attn_on())
        self.teacher = frozen_copy(model) if distil or self._scores_after(index) else None
        if self.teacher is not None:
            hf = _pretrained(self.teacher)
            if getattr(hf.config, "_attn_implementation", None) not in (None, "eager"):
                hf.set_attn_implementation("eager")
        self._keys = {tuple(ex["input_ids"]) for ex in self.replay.buffer} if distil else set()

    def train_examples(self, index, task, examples):
        return self.replay.train_examples(index, task, examples)

    def loss(self, model, batch, outputs):
        rows = self.replay_rows(batch)
        if not rows:
            return outputs.loss
        return outputs.loss + self.distillation(model, batch, outputs, rows)

    def after_task(self, index, task, model, data) -> None:
        start = len(self.replay.buffer)
        self.replay.after_task(index, task, model, data)
        new = self.replay.buffer[start:]
        if self.teacher is not None and new and self._scores_after(index):
            scores = head_scores(model, self.teacher, new, _pad_id(model))
            self.scores = scores if self.scores is None else self.scores + scores
            self.heads = select_heads(self.scores, self.layer_budget, self.head_budget)
        self.teacher, self._keys = None, set()

    # -- pieces --------------------------------------------------------------------------------------------------
    def replay_rows(self, batch: dict) -> list[int]:
        """Indices of the micro-batch rows that are buffer examples (right-padded rows, matched by their ids)."""
        if not self._keys:
            return []
        ids, lengths = batch["input_ids"].tolist(), batch["attention_mask"].sum(1).tolist()
        return [i for i, (row, n) in enumerate(zip(ids, lengths)) if tuple(row[:n]) in self._keys]

    def distillation(self, model, batch: dict, outputs, rows: list[int]) -> torch.Tensor:
        """``w·(KL_R − CE_R)/N + β·L_attn`` for the replayed ``rows`` of one micro-batch (module docstring)."""
        labels = batch["labels"]
        keep = _answer_positions(labels)
        index = torch.tensor(rows, device=labels.device)
        sub = {k: batch[k].index_select(0, index) for k in ("input_ids", "attention_mask", "labels")}
        student = outputs.logits
        if student.size(1) == labels.size(1):  # a model without logits_to_keep: full logits
            student = student[:, :-1][:, keep]
        student = student.index_select(0, index)
        gold = labels[:, 1:][:, keep].index_select(0, index)
        mask = gold != IGNORE
        attend = self._attn_on()
        with torch.no_grad():
            teacher, teacher_maps = attention_forward(self.teacher, sub, keep, attentions=attend)
        if student.shape != teacher.shape:
            raise AglclError(f"SEEKR: student logits {tuple(student.shape)} and teacher logits "
                             f"{tuple(teacher.shape)} do not line up")
        total = torch.zeros((), device=student.device)
        if self.logits_weight > 0:
            kl = distill_kl(student, teacher, mask, 1.0) * mask.sum()
            ce = F.cross_entropy(student.float().reshape(-1, student.size(-1)), gold.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum")
            tokens = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
            total = total + self.logits_weight * (kl - ce) / tokens
        if attend:
            _, student_maps = attention_forward(dist.unwrap(model), sub, keep[-1:])
            total = total + self.attn_weight * attention_kl(student_maps, teacher_maps, sub["attention_mask"],
                                                            self.heads)
        return total

    def _attn_on(self) -> bool:
        return self.attn_weight > 0 and self.heads is not None and bool(self.heads.any())

    def _scores_after(self, index: int) -> bool:
        """Heads are (re)selected after every task but the last (nothing trains after it)."""
        return self.num_tasks is None or index + 1 < self.num_tasks

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = self.replay.state_dict()
        if self.scores is not None:
            state["scores"], state["heads"] = self.scores, self.heads
        return state

    def load_state_dict(self, state: dict) -> None:
        self.replay.load_state_dict(state)
        self.scores = state["scores"].float() if "scores" in state else None
        self.heads = state["heads"].bool() if "heads" in state else None


def _pad_id(model) -> int:
    """A pad id for single-example batches (nothing is padded, so any id works)."""
    pad = getattr(getattr(_pretrained(model), "config", None), "pad_token_id", None)
    return 0 if pad is None else int(pad)
