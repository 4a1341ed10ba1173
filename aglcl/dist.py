"""Ranks, collectives and sharded tensors: the bottom layer every package may import.

    from aglcl import dist
    if dist.is_main_process(): ...          # rank 0 writes artifacts
    dist.all_reduce_(t); dist.local(param)   # reductions; a DTensor's rank-local piece

* **Ranks.** :func:`rank`, :func:`world_size`, :func:`is_main_process` read torch.distributed once it is
  up, else the launcher's environment (``RANK``/``WORLD_SIZE``, or SLURM's under ``srun``), so they are
  right before the process group exists.
* **Shards.** Under FSDP2 every parameter is a ``DTensor`` whose rank-local piece is ``param.to_local()``;
  gradients and AdamW's state are sharded the same way. A gate or an importance map is kept as the
  matching local piece (:func:`local_slices`, :func:`local_view`), so a step gates each local shard once.
* **State dicts** whole or sharded (:func:`full_state_dict`, :func:`optimizer_state_dict`), and
  **reductions** for the attribution pass (:func:`all_reduce_`, :func:`gather_full`).

Launching (SLURM, one run dir across ranks) is :mod:`aglcl.engine.launch`; the engines are
:mod:`aglcl.engine.strategy`; DeepSpeed's partition layouts are :mod:`aglcl.zero`.
"""

from __future__ import annotations

import logging
import os

import torch

from aglcl.errors import AglclError

log = logging.getLogger(__name__)

_KEEP: list = []  # objects (the launch store) kept alive until shutdown()


# -- ranks -------------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_size() -> int:
    """Processes in the run (1 when not distributed)."""
    if _dist_ready():
        return torch.distributed.get_world_size()
    return env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if _dist_ready():
        return torch.distributed.get_rank()
    return env_int("RANK", "SLURM_PROCID", default=0)


def local_rank() -> int:
    return env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, the one process that writes artifacts and shows progress."""
    return rank() == 0


def barrier() -> None:
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    """Tear the process group down before the interpreter exits. A gloo group left to the interpreter's
    teardown can abort a rank at exit ("terminate called without an active exception"), which a launcher
    reports as a failed run although it finished. Local (no collective): safe on error paths too."""
    if _dist_ready():
        try:
            torch.distributed.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - best effort at exit
            log.debug("destroy_process_group failed: %s", exc)
    _KEEP.clear()


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (else accelerate is told ``cpu=True``)."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()  # pragma: no cover - torch < 2.6


def unwrap(model):
    """The module under DDP / DeepSpeed wrappers (FSDP2 modules are not wrapped: returned as is)."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    return inner


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU for ``checkpoint.save`` under FSDP2; plain ``state_dict()``
    when the model holds no DTensor. A collective (every rank calls it); with sharded weights only rank 0
    gets the tensors (the others an empty dict), so write from rank 0."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))


def load_full_state_dict(model, state: dict[str, torch.Tensor], strict: bool = False):
    """Load a whole state dict into a (possibly FSDP2-sharded) model: each rank keeps its shard."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return model.load_state_dict(state, strict=strict)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer's whole state for a checkpoint. Under FSDP2 a collective that gathers AdamW's sharded
    state keyed by parameter name (only rank 0 gets it; the others an empty dict); else ``state_dict()``."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not any(is_dtensor(p) for p in model.parameters()):
        return inner.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main_process() else {}


def load_optimizer_state_dict(model, optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state_dict`. Under FSDP2 rank 0 passes the whole state and every rank
    keeps its shard (broadcast tensor by tensor; the other ranks may pass an empty dict)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not any(is_dtensor(p) for p in model.parameters()):
        inner.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, inner, optim_state_dict=state if is_main_process() else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# -- shards ------------------------------------------------------------------------------------------------
def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def local(t):
    """The rank-local piece of a DTensor (an alias: in-place ops change the DTensor); other tensors as is."""
    return t.to_local() if is_dtensor(t) else t


def local_slices(param) -> tuple[slice, ...] | None:
    """Where this rank's piece of ``param`` sits in the full tensor (None: not sharded, the whole tensor)."""
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(int(o), int(o) + int(s)) for o, s in zip(offset, shape))


def local_view(t: torch.Tensor, param) -> torch.Tensor:
    """``t`` (a map or gate, whole or already rank-local) as the piece matching ``local(param)``."""
    slices = local_slices(param)
    if slices is None:
        return t
    local_shape = tuple(s.stop - s.start for s in slices)
    if tuple(t.shape) == local_shape:  # already local (also the unsharded case)
        return t
    if tuple(t.shape) == tuple(param.shape):
        return t[slices]
    raise AglclError(f"a map of shape {tuple(t.shape)} matches neither the parameter {tuple(param.shape)} "
                     f"nor its local shard {local_shape}")


def gather_full(piece: torch.Tensor, param) -> torch.Tensor:
    """The whole tensor from every rank's ``piece`` laid out like ``param`` (a collective: all ranks call)."""
    if not is_dtensor(param):
        return piece
    from torch.distributed.tensor import DTensor

    device = local(param).device
    dt = DTensor.from_local(piece.to(device), param.device_mesh, param.placements, run_check=False,
                            shape=param.shape, stride=param.stride())
    return dt.full_tensor()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the default group (``sum``, ``max`` or ``min``); a no-op in one process."""
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return t
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(t, op=ops[op])
    return t


def all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (same shape on all ranks)."""
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t.contiguous())
    return torch.stack(out)


def all_gather_object(obj) -> list:
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
