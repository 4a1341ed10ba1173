"""O-LoRA: orthogonal subspace learning (Wang et al., Findings of EMNLP 2023, arXiv:2310.14152).

    aglcl train method=olora peft=none                         # r = 8, α = 32, λ1 = 0.5, λ2 = 0 (the paper's)
    aglcl train method=olora method.lambda_1=0.1 method.target_modules=[q_proj,k_proj,v_proj,o_proj]

Each task ``t`` trains a fresh LoRA adapter ``task_<t>`` on ``target_modules``. The adapters of earlier tasks stay
in the forward pass but frozen, so every LoRA layer computes ``y = W x + Σ_{k<=t} B_k A_k x · α/r``. Each
micro-batch's loss is

    L = L_task + λ1·Σ_layers Σ_{k<t} Σ_ij |(A_k · A_tᵀ)_ij| + λ2·Σ_{p in A_t, B_t} ‖p‖²

The first term pushes the rows of the new down-projection A_t (the subspace the task writes into) to be orthogonal
to every earlier task's. O-LoRA's code (``uie_trainer_lora.py``) computes the same orthogonality term (its old
adapters are concatenated, which gives the same sum); its L2 term is the unsquared per-tensor norm Σ_p ‖p‖₂, here
it is the squared norm. Both are off at the published default λ2 = 0.

Adapters are PEFT's own: :meth:`setup` wraps the model with :func:`peft.get_peft_model` (adapter ``task_0``),
:meth:`before_task` adds the task's adapter with ``PeftModel.add_adapter``, activates all adapters so far with
``LoraModel.set_adapter([...], inference_mode=True)`` (all frozen) and unfreezes the new one with
``PeftModel.set_requires_grad``. The optimizer is built after ``before_task`` from the trainable parameters, so it
sees only the new adapter. On resume, :meth:`setup` re-creates ``task_0 .. task_<first-1>`` so that
``checkpoint/task_<k>/model.safetensors`` loads into them. The method therefore needs ``peft=none``.

Memory: r·(d_in + d_out) parameters per target layer per task (about 0.1% of the model per task at r = 8 on
q/v). Adapters are added after ``accelerator.prepare``; under DDP the parameter set of the wrapped model would
change, so this method is for single-process runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from aglcl import dist
from aglcl.errors import AglclError
from aglcl.methods.base import Method

PREFIX = "task_"


def adapter_name(index: int) -> str:
    """The PEFT adapter name of task ``index`` (0-based)."""
    return f"{PREFIX}{index}"


def orthogonality(old: Sequence[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """Σ_k Σ_ij |(A_k · A_newᵀ)_ij| for LoRA down-projections ``A`` of shape ``[r, d_in]``.

    Zero exactly when every row of ``new`` is orthogonal to every row of each ``old`` matrix.
    """
    if not old:
        return new.new_zeros((), dtype=torch.float32)
    stacked = torch.cat([a.to(new.device, torch.float32) for a in old])  # [Σ r_k, d_in]
    return (stacked @ new.float().T).abs().sum()


class OLoRA(Method):
    """One LoRA adapter per task, kept orthogonal (in A) to the frozen adapters of earlier tasks."""

    supports_sharded = False  # whole-tensor state or hooks (not shard-aware yet)

    def __init__(self, r: int = 8, alpha: float = 32.0, dropout: float = 0.1, target_modules=("q_proj", "v_proj"),
                 lambda_1: float = 0.5, lambda_2: float = 0.0):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AglclError(f"method.r={r!r} is invalid: must be an integer >= 1")
        if not alpha > 0:
            raise AglclError(f"method.alpha={alpha} is invalid: must be > 0")
        if not 0.0 <= dropout < 1.0:
            raise AglclError(f"method.dropout={dropout} is invalid: must be in [0, 1)")
        if not lambda_1 >= 0:
            raise AglclError(f"method.lambda_1={lambda_1} is invalid: must be >= 0")
        if not lambda_2 >= 0:
            raise AglclError(f"method.lambda_2={lambda_2} is invalid: must be >= 0")
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or ())
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise AglclError(f"method.target_modules={targets!r} is invalid: give module names, e.g. [q_proj, v_proj]")
        self.r, self.alpha, self.dropout, self.target_modules = r, float(alpha), float(dropout), targets
        self.lambda_1, self.lambda_2 = float(lambda_1), float(lambda_2)
        self._orth: list[tuple[torch.Tensor, torch.nn.Parameter]] = []  # (stacked old A's, new A) per layer
        self._new: list[torch.nn.Parameter] = []  # the new adapter's A and B

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules))

    def setup(self, model, num_tasks, first):
        from peft import PeftModel, get_peft_model

        super().setup(model, num_tasks, first)
        if dist.is_distributed():  # adapters are added after the model is wrapped for DDP: not supported
            raise AglclError("method=olora runs in one process only (it adds an adapter per task); launch without "
                             "torchrun / accelerate launch")
        if isinstance(dist.unwrap(model), PeftModel):
            raise AglclError("method=olora manages its own LoRA adapters (one per task); use peft=none")
        try:
            with warnings.catch_warnings():  # peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model = get_peft_model(model, self.lora_config(), adapter_name=adapter_name(0))
        except ValueError as exc:
            raise AglclError(f"method.target_modules={self.target_modules} does not fit the model ({exc})") from None
        for index in range(1, first):  # resume: the structure the checkpoint was saved with
            model.add_adapter(adapter_name(index), self.lora_config())
        self._activate(model, max(first, 1), trainable=None)
        return model

    @staticmethod
    def _activate(model, count: int, trainable: str | None) -> None:
        """Put adapters ``task_0 .. task_<count-1>`` in the forward pass, all frozen but ``trainable``."""
        model.base_model.set_adapter([adapter_name(k) for k in range(count)], inference_mode=True)
        if trainable is not None:
            model.set_requires_grad(trainable, requires_grad=True)

    def before_task(self, index, task, model) -> None:
        peft = dist.unwrap(model)
        name = adapter_name(index)
        if name not in peft.peft_config:
            peft.add_adapter(name, self.lora_config())
        self._activate(peft, index + 1, trainable=name)
        self._orth, self._new = [], []
        for module in peft.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or name not in lora_a:
                continue
            old = [lora_a[adapter_name(k)].weight.detach() for k in range(index) if adapter_name(k) in lora_a]
            if old:
                self._orth.append((torch.cat(old), lora_a[name].weight))
            self._new += [lora_a[name].weight, module.lora_B[name].weight]
        if not self._new:
            raise AglclError(f"method.target_modules={self.target_modules}: no LoRA layer holds adapter {name}")

    def penalty(self) -> torch.Tensor:
        """λ1·Σ_layers Σ_old |A_old · A_newᵀ| + λ2·Σ ‖new LoRA params‖² for the task being trained."""
        if not self._new:  # before the first before_task
            return torch.zeros(())
        total = self._new[0].new_zeros((), dtype=torch.float32)
        if self.lambda_1 and self._orth:
            total = total + self.lambda_1 * sum(orthogonality([old], new) for old, new in self._orth)
        if self.lambda_2:
            total = total + self.lambda_2 * sum(p.float().pow(2).sum() for p in self._new)
        return total

    def loss(self, model, batch, outputs):
        if (self.lambda_1 and self._orth) or self.lambda_2:
            return outputs.loss + self.penalty()
        return outputs.loss
