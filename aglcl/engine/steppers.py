"""How one optimizer step is taken: through accelerate (one process, DDP, FSDP2) or a DeepSpeed ZeRO engine.

    aglcl train distributed=ddp               # AccelerateStepper on the prepared (DDP) model
    aglcl train distributed=deepspeed_zero2   # DeepSpeedStepper: one ZeRO engine per task

:func:`aglcl.engine.loop.train_task` gets one stepper per task from :meth:`DistributedConfig.stepper
<aglcl.engine.strategy.DistributedConfig.stepper>` and drives it the same way whatever the engine::

    for each micro-batch:  with stepper.micro(sync): loss = ...; stepper.backward(loss)
    applied = stepper.step(method, step_loss)            # False: non-finite, nothing applied
    stepper.close()                                       # end of the task

Both apply the method's gate once per optimizer step, then clip, then step, in that order.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from aglcl import dist
from aglcl.engine import checkpoint

log = logging.getLogger(__name__)


def _clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch's ``clip_grad_norm_`` factor: ``max_norm / (norm + 1e-6)``, at most 1."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


class AccelerateStepper:
    """accelerate's way: ``no_sync`` on all but the last micro-batch, ``accelerator.backward`` of the loss
    divided by ``grad_accum``, then the method's hooks, clipping, a finite check, and ``optimizer.step()``."""

    def __init__(self, model, params, optimizer, accelerator, cfg):
        self.model, self.params, self.accelerator, self.cfg = model, params, accelerator, cfg  # model: what runs forward
        self.bare = accelerator.unwrap_model(model)
        self.optimizer = optimizer  # prepared (accelerate's AcceleratedOptimizer)
        self.scaler = accelerator.scaler  # fp16: overflowing steps are the scaler's business

    def micro(self, sync: bool):
        """Forward and backward of one micro-batch: gradients are all-reduced only when ``sync``."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.cfg.grad_accum)

    def step(self, method, step_loss: torch.Tensor) -> bool:
        method.after_backward(self.bare)  # hooks see parameter names without DDP's ``module.``
        if self.cfg.max_grad_norm:
            norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        finite = torch.isfinite(step_loss)
        if self.scaler is None:  # fp16's scaler skips overflowing steps itself and lowers its scale
            norm = norm.full_tensor() if dist.is_dtensor(norm) else torch.as_tensor(norm)  # FSDP2: a DTensor
            finite &= torch.isfinite(norm.to(finite.device))
        if not bool(dist.all_reduce_(finite.to(torch.int32), op="min")):  # every rank decides alike; one sync
            self.optimizer.zero_grad(set_to_none=True)
            return False
        method.before_step(self.bare, self.optimizer)
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):  # fp16 overflow: no step to shrink
            method.after_step(self.bare, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, path) -> None:
        """Weights and optimizer state into a mid-task checkpoint directory (every rank calls)."""
        checkpoint.save_model_and_optimizer(path, self.bare, self.optimizer)

    def load(self, path) -> None:
        checkpoint.load_model_and_optimizer(path, self.bare, self.optimizer)

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def close(self) -> None:
        pass


class DeepSpeedStepper:
    """A DeepSpeed ZeRO engine (stage 1, 2 or 3) around the bare model and the task's AdamW, built per task
    and torn down at its end (hooks removed, full-precision weights put back whole), so that evaluation,
    attribution and the method's ``after_task`` see a plain replicated model between tasks, as under DDP.
    ZeRO-3 thus saves memory while a task trains, not between tasks (FSDP2 keeps everything sharded).

    * Gradients and AdamW's state live in the engine's flat fp32 partitions, one per rank; the loss is
      not divided by ``grad_accum`` (the engine scales it).
    * The method's gate acts on those partitions through step hooks on the client optimizer
      (``method.attach_optimizer``, e.g. :meth:`AGFT.attach_optimizer <aglcl.methods.agft.AGFT.attach_optimizer>`);
      clipping to ``trainer.max_grad_norm`` is a hook registered after it, over the global norm of the
      gated partitions, so the order is the one of the accelerate path: gate, clip, step.
    * A non-finite gradient norm makes the engine skip the step (DeepSpeed's overflow check);
      :meth:`step` then returns False and nothing was applied.
    * Under bf16/fp16 the engine casts the model; :meth:`close` restores each weight from its fp32 master
      copy and each buffer from before the task, so precision is not lost at task boundaries.
    """

    def __init__(self, bare, params, optimizer, accelerator, cfg, config: dict, method):
        import deepspeed

        _init_process_group()
        self.cfg, self.bare, self.params = cfg, bare, params
        self._dtypes = {id(p): p.dtype for p in bare.parameters()}  # the engine may cast them; frozen ones too
        self._device = next(bare.parameters()).device
        self._buffers = {n: b.detach().clone() for n, b in bare.named_buffers() if b.is_floating_point()}
        self.engine, self.engine_optimizer, _, _ = deepspeed.initialize(model=bare, optimizer=optimizer,
                                                                        config=config)
        self.optimizer = optimizer  # the client AdamW: what the scheduler drives and step hooks see
        self.model = self.engine  # forward through the engine: ZeRO-3 counts micro-steps there (accumulation)
        self.scaler = None
        self.method, self._before_pending = method, False
        method.attach_optimizer(self.engine_optimizer)
        self._hooks = [optimizer.register_step_pre_hook(self._clip)] if cfg.max_grad_norm else []
        self._hooks.append(optimizer.register_step_pre_hook(self._before_step))  # after the gate and the clip

    def micro(self, sync: bool):
        self.engine.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    @torch.no_grad()
    def _clip(self, optimizer, args, kwargs) -> None:
        """Clip the (already gated) partitions to ``max_grad_norm`` of the global norm over all ranks."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        sq = torch.zeros((), device=device, dtype=torch.float32)
        for g in grads:
            sq += g.float().pow(2).sum()
        coef = _clip_coef(dist.all_reduce_(sq).sqrt(), self.cfg.max_grad_norm)  # partitions are disjoint
        for g in grads:
            g.mul_(coef.to(g.dtype))

    def _before_step(self, optimizer, args, kwargs) -> None:
        """``method.before_step`` once per step, inside the engine's step, after the gate and the clip (the
        engine may step its client optimizer once per sub-group: only the first call counts)."""
        if self._before_pending:
            self._before_pending = False
            self.method.before_step(self.bare, self.optimizer)

    def step(self, method, step_loss: torch.Tensor) -> bool:
        """The hook contract under DeepSpeed: ``after_backward`` before the engine's step (gradients are
        reduced into its partitions; ``.grad`` is not populated, so methods that read it are refused),
        ``before_step`` inside it, ``after_step`` after it when the step was applied."""
        method.after_backward(self.bare)
        self._before_pending = True
        self.engine.step()
        self._before_pending = False
        applied = bool(self.engine.was_step_applied())
        if applied:
            method.after_step(self.bare, self.optimizer)
        return applied

    TAG = "engine"  # DeepSpeed's checkpoint tag inside a step checkpoint directory

    def save(self, path) -> None:
        """The engine's own checkpoint (module, fp32 partitions and AdamW state, one file per rank) under
        ``path/deepspeed``; every rank calls. A resume needs the same number of ranks (checked on resume)."""
        self.engine.save_checkpoint(str(path / "deepspeed"), tag=self.TAG, save_latest=False)

    def load(self, path) -> None:
        from aglcl.errors import AglclError

        where = path / "deepspeed" / self.TAG
        if not where.is_dir():
            raise AglclError(f"cannot resume: {where} is missing (was the step checkpoint written by another engine?)")
        try:
            loaded, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag=self.TAG,
                                                    load_lr_scheduler_states=False)
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises many kinds (assertions, pickle, OS)
            raise AglclError(f"cannot resume: {where} is unreadable or does not match ({type(exc).__name__}: "
                             f"{str(exc)[:160]})") from None
        if loaded is None:
            raise AglclError(f"cannot resume: DeepSpeed found no checkpoint in {where}")

    def scaler_state(self) -> dict | None:
        return None

    def load_scaler_state(self, state: dict | None) -> None:
        pass

    @torch.no_grad()
    def close(self) -> None:
        """Tear the engine down and leave the bare model as it was before the task, with the trained weights.

        Every weight is rebuilt whole on every rank from the engine's fp32 master (trainable weights) or by
        gathering it (frozen ones, ZeRO-3 only), one at a time (collectives: all ranks call this). Under
        ZeRO-3 the partitioned parameters are replaced by plain ones and DeepSpeed's parameter dicts undone,
        so the next task's engine partitions a fresh model.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        trainable = {id(p) for p in self.params}
        whole: dict[int, torch.Tensor] = {}
        for p in _unique_params(self.bare):
            if id(p) in trainable:
                whole[id(p)] = safe_get_full_fp32_param(p)
            elif hasattr(p, "ds_id"):  # a frozen ZeRO-3 weight: gather its bit16 value
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    whole[id(p)] = p.data.detach().clone()
        for handle in self._hooks:
            handle.remove()
        self.engine.destroy()
        for module in self.bare.modules():
            if module.__dict__.pop("_original_parameters", None) is not None:  # ZeRO-3 swapped in its own dict
                module._parameters = {k: dict.__getitem__(module._parameters, k) for k in dict.keys(module._parameters)}
        fresh: dict[int, torch.nn.Parameter] = {}
        for module in self.bare.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                value, dtype = whole.get(id(p)), self._dtypes.get(id(p), p.dtype)
                if hasattr(p, "ds_id"):  # ZeRO-3: a new plain parameter (shared ones stay shared)
                    if id(p) not in fresh:
                        fresh[id(p)] = torch.nn.Parameter(value.to(self._device, dtype), requires_grad=p.requires_grad)
                    module._parameters[name] = fresh[id(p)]
                elif value is not None:
                    p.data = value.to(p.device, dtype).clone()
                elif p.dtype != dtype:
                    p.data = p.data.to(dtype)
        buffers = dict(self.bare.named_buffers())
        for name, saved in self._buffers.items():
            buffers[name].data = saved.to(buffers[name].device)
        self.engine = self.engine_optimizer = None


def _init_process_group() -> None:
    """DeepSpeed needs a process group even in one process (e.g. ZeRO-Offload on one GPU); without a
    launcher's environment it would look for MPI. Start a one-rank group on a free local port instead."""
    import os
    import socket

    import deepspeed

    if not (dist.is_distributed() or torch.distributed.is_initialized()):  # else: wrap the launched group
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (45-75 s with ninja, and again
        # whenever the compiler flags differ between launches); gloo's collectives do the same reduce.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(auto_mpi_discovery=False)


def _unique_params(model):
    seen = set()
    for module in model.modules():
        for p in dict.values(module._parameters):  # not .items(): ZeRO-3's dict would gather on access
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield p
