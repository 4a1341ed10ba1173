"""Typed trainer settings (``conf/trainer/*.yaml``), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from aglcl.errors import AglclError, choices

PRECISIONS = ("bf16", "fp16", "no")
EVAL_PRECISIONS = ("auto", "fp32", "bf16")
NAN_POLICIES = ("stop", "skip")


@dataclass
class TrainerConfig:
    """Optimisation settings shared by every task of a sequence. Errors name the override key."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    max_steps: int | None = 30
    epochs: float = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    precision: str = "bf16"
    seed: int = 0
    max_length: int = 128
    eval_batch_size: int = 16
    eval_precision: str = "auto"
    log_every: int = 5
    nan_policy: str = "stop"

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise AglclError(f"trainer.{key}={getattr(self, key)!r} is invalid: {what}")

        need(self.lr > 0, "lr", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null (use epochs)")
        need(self.epochs > 0, "epochs", "must be > 0")
        for key in ("batch_size", "grad_accum", "eval_batch_size", "log_every"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.max_length >= 8, "max_length", "must be >= 8")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise AglclError(f"trainer.precision={self.precision!r} is invalid; choose from: {choices(PRECISIONS)}")
        if self.eval_precision not in EVAL_PRECISIONS:
            raise AglclError(f"trainer.eval_precision={self.eval_precision!r} is invalid; choose from: "
                             f"{choices(EVAL_PRECISIONS)}")
        if self.nan_policy not in NAN_POLICIES:
            raise AglclError(f"trainer.nan_policy={self.nan_policy!r} is invalid; choose from: {choices(NAN_POLICIES)}")
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.scheduler not in names:
            raise AglclError(f"trainer.scheduler={self.scheduler!r} is invalid; choose from: {choices(names)}")
