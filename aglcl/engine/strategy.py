"""Which engine replicates or shards the model (``conf/distributed/<engine>.yaml``).

    aglcl train distributed=ddp                # replicated weights, gradients all-reduced per step
    aglcl train distributed=fsdp2              # weights, gradients and AdamW state sharded (FSDP2)
    aglcl train distributed=deepspeed_zero2    # one DeepSpeed ZeRO engine per task

:class:`DistributedConfig` turns ``none | ddp | fsdp2 | deepspeed`` into accelerate's arguments, places the
model, refuses what an engine cannot run (:meth:`DistributedConfig.check`) and builds each task's stepper
(:mod:`aglcl.engine.steppers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aglcl.dist import has_accelerator, unwrap
from aglcl.errors import AglclError, choices

ENGINES = ("none", "ddp", "fsdp2", "deepspeed")


@dataclass
class DistributedConfig:
    """``conf/distributed/<engine>.yaml``: which engine shards or replicates the model.

    ``none`` leaves accelerate's default (one process; plain DDP when launched with several). Every
    field names its override key in errors. :meth:`accelerator_kwargs` is what ``Accelerator(...)`` gets.
    """

    engine: str = "none"
    # ddp
    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25
    # fsdp2
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    layer_cls: list[str] | None = None  # wrap each of these modules; null: the model's _no_split_modules
    # deepspeed
    zero_stage: int = 2
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme   (stage 3 only)
    zero3_init: bool = False
    extra: dict = field(default_factory=dict)  # passed through to the plugin

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise AglclError(f"distributed.engine={self.engine!r} is invalid; choose from: {choices(ENGINES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise AglclError(f"distributed.zero_stage={self.zero_stage!r} is invalid: must be 0, 1, 2 or 3")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) not in ("none", "cpu", "nvme"):
                raise AglclError(f"distributed.{key}={getattr(self, key)!r} is invalid; choose from: none, cpu, nvme")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise AglclError("distributed.offload_param needs distributed.zero_stage=3")

    @property
    def sharded(self) -> bool:
        """Parameters live as per-rank shards (FSDP2, ZeRO-3)."""
        return self.engine == "fsdp2" or (self.engine == "deepspeed" and self.zero_stage == 3)

    def accelerator_kwargs(self) -> dict:
        """Keyword arguments for ``accelerate.Accelerator``: DDP's kwargs handler under ``ddp``.

        ``fsdp2`` and ``deepspeed`` return nothing: accelerate's plugins for both insist on preparing the
        model together with one optimizer for the whole run (and its DeepSpeed path needs a GPU), while aglcl
        builds a fresh optimizer per task. FSDP2 shards the model with :meth:`shard_model`; DeepSpeed builds
        one ZeRO engine per task (:meth:`stepper`, :meth:`deepspeed_config`). accelerate still launches,
        shards the data and logs.
        """
        if self.engine != "ddp":
            return {}
        from accelerate.utils import DistributedDataParallelKwargs

        return {"kwargs_handlers": [DistributedDataParallelKwargs(
            find_unused_parameters=self.find_unused_parameters, bucket_cap_mb=self.bucket_cap_mb, **self.extra)]}

    def check(self, method) -> None:
        """Refuse, in one line naming a way out, what this engine cannot run (before anything is written)."""
        name = f"distributed={self.engine}" + (f" (zero_stage={self.zero_stage})" if self.engine == "deepspeed" else "")
        if self.engine == "fsdp2" and self.cpu_offload and not has_accelerator():
            raise AglclError("distributed.cpu_offload=true needs a GPU (it moves the shards from the device to "
                             "host memory) and this machine has none; use distributed.cpu_offload=false")
        if self.engine == "deepspeed" and self.zero3_init:
            raise AglclError("distributed.zero3_init=true is not supported: aglcl builds the model whole and "
                             "partitions it per task; use distributed.zero3_init=false, or distributed=fsdp2")
        zero3 = self.engine == "deepspeed" and self.zero_stage == 3
        if self.sharded and not (method.supports_sharded and (not zero3 or method.supports_zero3)):
            raise AglclError(f"method {type(method).__name__} keeps whole-tensor state or reads the weights "
                             f"outside the forward, and does not support {name} yet; use distributed=ddp"
                             + ("" if zero3 else " or deepspeed_zero2"))
        if self.engine == "deepspeed" and method.reads_grads:
            raise AglclError(f"method {type(method).__name__} edits parameters' .grad, which DeepSpeed keeps in "
                             f"its own partitions; use distributed=ddp or distributed=fsdp2")

    def place_model(self, model, accelerator, precision: str = "no"):
        """The model as training sees it: DDP-wrapped by accelerate (``none``/``ddp``), FSDP2-sharded
        (:meth:`shard_model`), or on the device and bare (``deepspeed``: each task builds its engine)."""
        if self.engine == "fsdp2":
            return self.shard_model(model, precision)
        if self.engine == "deepspeed":
            return model.to(accelerator.device)
        return accelerator.prepare(model)

    def deepspeed_config(self, trainer, world: int) -> dict:
        """The DeepSpeed config of one task's engine, from these fields and the trainer's batch settings.

        Clipping is off in the engine: the stepper clips after the method's gate, as the accelerate path
        does. ``extra`` is merged last (any DeepSpeed key, e.g. ``{"zero_optimization": {...}}`` parts
        are replaced whole).
        """
        zero = {"stage": self.zero_stage}
        if self.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": self.offload_optimizer}
        if self.offload_param != "none":
            zero["offload_param"] = {"device": self.offload_param}
        precision = trainer.precision
        config = {
            "train_micro_batch_size_per_gpu": trainer.batch_size,
            "gradient_accumulation_steps": trainer.grad_accum,
            "train_batch_size": trainer.batch_size * trainer.grad_accum * world,
            "gradient_clipping": 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
            "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
        }
        return {**config, **self.extra}

    def stepper(self, model, params, optimizer, accelerator, trainer, method):
        """The object that takes this task's optimizer steps (:mod:`aglcl.engine.steppers`)."""
        from aglcl.engine import steppers

        if self.engine == "deepspeed":
            config = self.deepspeed_config(trainer, accelerator.num_processes)
            return steppers.DeepSpeedStepper(unwrap(model), params, optimizer, accelerator, trainer, config, method)
        optimizer = accelerator.prepare(optimizer)
        method.attach_optimizer(optimizer)
        return steppers.AccelerateStepper(model, params, optimizer, accelerator, trainer)

    def shard_model(self, model, precision: str = "no"):
        """FSDP2 (``engine=fsdp2``): ``fully_shard`` every block (``layer_cls``, else the model's
        ``_no_split_modules``), then the root; weights become DTensors sharded on dim 0 over all ranks.
        ``precision=bf16`` computes in bf16 and reduces gradients in fp32 (master weights stay fp32).
        Other engines: the model as is. Call after PEFT wrapping and any checkpoint load, before training.
        """
        if self.engine != "fsdp2":
            return model
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        names = set(self.layer_cls or getattr(unwrap(model), "_no_split_modules", None) or ())
        if not names:  # PEFT wraps the transformers model: look one level down
            names = set(getattr(getattr(model, "base_model", None), "model", model)._no_split_modules or ())
        if not names:
            raise AglclError("distributed.layer_cls is null and the model names no _no_split_modules; set "
                             "distributed.layer_cls=[<decoder layer class>]")
        if self.activation_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kwargs = {"reshard_after_forward": self.reshard_after_forward, **self.extra}
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if not blocks:
            raise AglclError(f"distributed.layer_cls={sorted(names)} matches no module of {type(model).__name__}")
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
