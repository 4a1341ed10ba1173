"""LwF: learning without forgetting (Li & Hoiem, 2017), as distillation from the previous model.

    aglcl train method=lwf                                   # T = 2, α = 1
    aglcl train method=lwf method.temperature=1 method.alpha=0.5

Before every task after the first, a frozen copy of the model (the teacher: the weights after the previous
task, eval mode, ``requires_grad`` False) is kept. Each micro-batch's loss becomes

    L = L_task + α·T²·mean_t KL(softmax(z_teacher,t / T) || softmax(z_student,t / T))

over the answer positions t (those whose next token is an answer token, exactly the positions
:func:`aglcl.models.forward.lm_forward` keeps with ``logits_to_keep``). The teacher runs the model's own forward
under the same accelerate autocast wrapper as the student (or in the weights' dtype if that wrapper cannot be
re-bound to the copy). Memory: one extra copy of the model on its device while a task trains (freed at
``after_task``); compute: one extra no-grad forward per micro-batch.
"""

from __future__ import annotations

import copy
from types import MethodType

import torch
import torch.nn.functional as F

from aglcl import dist
from aglcl.data.collate import IGNORE
from aglcl.errors import AglclError
from aglcl.methods.base import Method
from aglcl.models.forward import answer_logits as _answer_logits


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float):
    """Mean over ``mask``-ed positions of KL(softmax(teacher/T) || softmax(student/T)); logits ``[B, K, V]``."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def frozen_copy(model):
    """A deep copy of ``model`` (unwrapped from DDP or a DeepSpeed engine) in eval mode with ``requires_grad``
    False: a teacher."""
    base = dist.unwrap(model)
    teacher = copy.deepcopy(base)
    # accelerate's mixed precision puts an autocast ``forward`` on the instance. A bound method is re-bound to
    # the copy (same autocast as the student); a plain closure would still call the *student*, so drop it.
    forward = teacher.__dict__.get("forward")
    if forward is not None and not (isinstance(forward, MethodType) and forward.__self__ is teacher):
        teacher.__dict__.pop("forward")
        teacher.__dict__.pop("_original_forward", None)
    return teacher.eval().requires_grad_(False)


def answer_logits(model, batch: dict):
    """Logits at the answer-predicting positions ``[B, K, V]`` and their mask ``[B, K]``, as ``lm_forward``
    selects them (:func:`aglcl.models.forward.answer_logits`)."""
    _, logits, gold = _answer_logits(model, batch)
    return logits, gold != IGNORE


class LwF(Method):
    """Distil the previous model's answer distribution into the current one."""

    supports_sharded = False  # whole-tensor state or hooks (not shard-aware yet)

    def __init__(self, temperature: float = 2.0, alpha: float = 1.0):
        if not temperature > 0:
            raise AglclError(f"method.temperature={temperature} is invalid: must be > 0")
        if not alpha >= 0:
            raise AglclError(f"method.alpha={alpha} is invalid: must be >= 0")
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.teacher = None

    def before_task(self, index, task, model) -> None:
        if index == 0 or self.alpha == 0:
            return
        self.teacher = frozen_copy(model)

    def loss(self, model, batch, outputs):
        if self.teacher is None:
            return outputs.loss
        return outputs.loss + self.alpha * self.temperature**2 * self.distillation(batch, outputs.logits)

    def distillation(self, batch: dict, student: torch.Tensor) -> torch.Tensor:
        """KL term for one micro-batch; ``student`` is ``outputs.logits`` (kept positions or the full sequence)."""
        with torch.no_grad():
            teacher, mask = answer_logits(self.teacher, batch)
        if student.size(1) == batch["input_ids"].size(1):  # a model without logits_to_keep: full logits
            keep = (batch["labels"][:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)
            student = student[:, :-1][:, keep]
        if student.shape != teacher.shape:
            raise AglclError(f"LwF: student logits {tuple(student.shape)} and teacher logits "
                             f"{tuple(teacher.shape)} do not line up")
        return distill_kl(student, teacher, mask, self.temperature)

    def after_task(self, index, task, model, data) -> None:
        self.teacher = None
