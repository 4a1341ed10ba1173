"""Several processes, one run: ranks, the shared run dir, engines, and gates on sharded weights.

    torchrun --nproc_per_node 8 --no-python aglcl train distributed=fsdp2 ...
    accelerate launch --num_processes 8 -m aglcl train distributed=ddp ...
    aglcl train -m hydra/launcher=slurm distributed=fsdp2 method=seqft,agft    # one SLURM job per point

What lives here, in the order a run meets it:

* **Ranks.** :func:`rank`, :func:`world_size`, :func:`is_main_process` read torch.distributed once it is
  up, else the launcher's environment (``RANK``/``WORLD_SIZE``, or SLURM's under ``srun``), so they are
  right before the process group exists. Only rank 0 writes artifacts and draws progress bars; the other
  ranks log warnings and errors only (:func:`quiet_non_main`).
* **One run dir.** Hydra names run dirs after ``${now:...}``, which each rank would read from its own
  clock. :func:`share_launch_time` makes rank 0's launch time the ``now`` of every rank, through the
  launcher's TCP store (the one ``init_process_group`` uses later), before Hydra composes the config.
* **Engines** (``conf/distributed/*.yaml``): :class:`DistributedConfig` turns ``none | ddp | fsdp2 |
  deepspeed`` into the keyword arguments of ``accelerate.Accelerator``.
* **Shards.** Under FSDP2 every parameter is a ``DTensor`` whose rank-local piece is ``param.to_local()``;
  gradients and AdamW's state are sharded the same way. A gate or an importance map is kept as the
  matching local piece (:func:`local_slices`, :func:`local_view`), so a step gates each local shard once.
* **Reductions** for the attribution pass (:func:`all_reduce_`, :func:`gather_full`).
* **DeepSpeed ZeRO** partition layouts live in :mod:`aglcl.engine.zero`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from dataclasses import dataclass, field

import torch

from aglcl.errors import AglclError, choices

log = logging.getLogger(__name__)

ENGINES = ("none", "ddp", "fsdp2", "deepspeed")
LAUNCH_TIME_ENV = "AGLCL_LAUNCH_TIME"  # seconds since the epoch; set it to pin the run dir's timestamp
_STORE_TIMEOUT_S = 300
_KEEP: list = []


# -- ranks -------------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_size() -> int:
    """Processes in the run (1 when not distributed)."""
    if _dist_ready():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if _dist_ready():
        return torch.distributed.get_rank()
    return _env_int("RANK", "SLURM_PROCID", default=0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


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


def quiet_non_main() -> None:
    """On ranks other than 0: warnings and errors only, and no log file of their own.

    Call it after Hydra has configured logging (i.e. inside the task function). Rank 0 is untouched.
    """
    if is_main_process():
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):  # rank 0 owns <run>/<job>.log
            root.removeHandler(handler)
            handler.close()
    for name in ("transformers", "datasets", "accelerate", "aglcl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def use_progress_bars(console) -> bool:
    """Rich bars only on rank 0, on a terminal, under Hydra's basic launcher; else plain log lines."""
    if not is_main_process() or not getattr(console, "is_terminal", False):
        return False
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            target = str(HydraConfig.get().launcher.get("_target_", ""))
            return target.endswith("BasicLauncher") or not target
    except Exception:  # noqa: BLE001 - outside a Hydra app: only the terminal matters
        pass
    return True


# -- launching ---------------------------------------------------------------------------------------------
def export_slurm_env() -> bool:
    """Under ``srun`` with several tasks (e.g. the submitit launcher with ``tasks_per_node > 1``), set the
    ``RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT`` that ``torch.distributed`` reads, unless a
    launcher (torchrun, accelerate) already did. Returns whether it set them."""
    if "RANK" in os.environ or _env_int("SLURM_NTASKS", default=1) <= 1 or "SLURM_PROCID" not in os.environ:
        return False
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
    os.environ.setdefault("MASTER_ADDR", first_host(nodes))
    os.environ.setdefault("MASTER_PORT", str(20000 + _env_int("SLURM_JOB_ID", default=0) % 20000))
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    return True


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    head = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\](.*)$", head)
    if not m:
        return head
    first = m.group(2).split(",")[0].split("-")[0]
    return f"{m.group(1)}{first}{m.group(3)}"


def _launch_store():
    """A client (or, on rank 0 without an agent store, the host) of the launcher's TCP store.

    torchrun and ``accelerate launch`` host the store in their agent (``TORCHELASTIC_USE_AGENT_STORE``)
    at ``MASTER_ADDR:MASTER_PORT``; otherwise rank 0 hosts it there, multi-tenant, exactly as
    ``init_process_group`` will (so the later process group shares it rather than clashing).
    """
    from torch.distributed import PrefixStore, TCPStore

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = _dt.timedelta(seconds=_STORE_TIMEOUT_S)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = TCPStore(host, port, None, is_master=not agent and rank() == 0, timeout=timeout,
                     multi_tenant=not agent, wait_for_workers=False)
    _KEEP.append(store)  # rank 0 may host the server: keep it up until the other ranks have read the key
    return PrefixStore("aglcl/", store)


def launch_time() -> _dt.datetime:
    """The launch time every rank agrees on: ``$AGLCL_LAUNCH_TIME``, else rank 0's clock (via the
    launcher's store), else (one process) now."""
    pinned = os.environ.get(LAUNCH_TIME_ENV)
    if pinned:
        return _dt.datetime.fromtimestamp(float(pinned))
    if not is_distributed() or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return _dt.datetime.now()
    key = f"launch_time/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = _launch_store()
        if is_main_process():
            store.set(key, repr(_dt.datetime.now().timestamp()))
        stamp = float(store.get(key).decode())
    except Exception as exc:  # noqa: BLE001 - any store failure gets the same advice
        raise AglclError(f"cannot agree on the run dir's timestamp across ranks ({exc}); set "
                         f"{LAUNCH_TIME_ENV}=$(date +%s) for every rank, or pass hydra.run.dir=...") from None
    os.environ[LAUNCH_TIME_ENV] = repr(stamp)  # multirun jobs and child processes reuse it
    return _dt.datetime.fromtimestamp(stamp)


class _Frozen(_dt.datetime):
    """``datetime`` whose ``now()`` is the shared launch time (only Hydra's ``now`` resolver sees it)."""

    moment: _dt.datetime | None = None

    @classmethod
    def now(cls, tz=None):  # noqa: D102
        return cls.moment if tz is None else cls.moment.astimezone(tz)


def share_launch_time() -> _dt.datetime | None:
    """Make Hydra's ``${now:...}`` the same on every rank, so all ranks resolve one run dir.

    Hydra re-registers ``now`` at every launch (``setup_globals``) as ``datetime.now().strftime(p)`` with
    ``datetime`` looked up in :mod:`hydra.core.utils`; that name is pointed at the shared launch time.
    A no-op (returns None) in a single process. Call before the Hydra app starts.
    """
    if not is_distributed() and LAUNCH_TIME_ENV not in os.environ:
        return None
    import hydra.core.utils as hydra_utils

    _Frozen.moment = launch_time()
    hydra_utils.datetime = _Frozen
    return _Frozen.moment


def hydra_rank_overrides() -> list[str]:
    """Overrides appended on ranks > 0: no ``.hydra/`` config copies (rank 0 writes them)."""
    return [] if is_main_process() else ["hydra.output_subdir=null"]


# -- engines -----------------------------------------------------------------------------------------------
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
    state_dict_type: str = "SHARDED_STATE_DICT"
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
        if self.state_dict_type not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
            raise AglclError(f"distributed.state_dict_type={self.state_dict_type!r} is invalid; choose from: "
                             "SHARDED_STATE_DICT, FULL_STATE_DICT")

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
        shards the data and logs. :meth:`fsdp_plugin` builds accelerate's FSDP2 plugin for code that
        prepares model and optimizer together.
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
        if self.sharded and not (getattr(method, "supports_sharded", True)
                                 and (not zero3 or getattr(method, "supports_zero3", True))):
            raise AglclError(f"method {type(method).__name__} keeps whole-tensor state or reads the weights "
                             f"outside the forward, and does not support {name} yet; use distributed=ddp"
                             + ("" if zero3 else " or deepspeed_zero2"))
        if self.engine == "deepspeed" and getattr(method, "reads_grads", False):
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

    def fsdp_plugin(self):
        """accelerate's FSDP2 plugin for these settings (model and optimizer must then be prepared together)."""
        from accelerate.utils import FullyShardedDataParallelPlugin

        policy = {"auto_wrap_policy": "transformer_based_wrap"}
        if self.layer_cls:
            policy["transformer_cls_names_to_wrap"] = list(self.layer_cls)
        return FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=self.reshard_after_forward, cpu_offload=self.cpu_offload,
            activation_checkpointing=self.activation_checkpointing, state_dict_type=self.state_dict_type,
            **policy, **self.extra)

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
