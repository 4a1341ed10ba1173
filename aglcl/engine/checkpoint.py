"""Checkpoints and resume: survive a kill -9 at any moment.

    aglcl train ... hydra.run.dir=outputs/my_run                       # a checkpoint after every task (default)
    aglcl train ... hydra.run.dir=outputs/my_run checkpoint.every_steps=50   # and every 50 optimizer steps
    aglcl train ... hydra.run.dir=outputs/my_run resume=true           # continue where it stopped
    aglcl train ... resume=force                                       # continue although the config changed
    aglcl train ... stop_after=2                                       # train two tasks, then exit (resumable)

Layout. Each checkpoint is its own directory, written completely before ``state.json`` names it::

    checkpoint/task_<k>/          after k finished tasks: model.safetensors (weights), method.safetensors
                                  (the method's tensors), importance.safetensors (the combined map)
    checkpoint/task_<k>_step_<s>/ mid-task, s optimizer steps into task k+1: model.safetensors,
                                  optimizer.pt (under FSDP2 gathered whole, keyed by parameter name),
                                  scheduler.pt, rng_rank<r>.pt, loop.json
    config.json                   the run's resolved config; a resume with other values is refused

``state.json`` (written atomically) is the single pointer: ``checkpoint`` names the last task checkpoint,
``step_checkpoint`` the mid-task one (or null). Directories it no longer names are deleted only after it
is written, so a crash at any point leaves a complete, consistent checkpoint on disk. Tensors are
safetensors; optimizer/scheduler/RNG state (torch containers of tensors and numbers) are read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from aglcl import dist, rundir
from aglcl.errors import AglclError

DIR = "checkpoint"
MODEL = "model.safetensors"
METHOD = "method.safetensors"
IMPORTANCE = "importance.safetensors"
CONFIG = "config.json"
RESUME_MODES = (False, True, "force")
# Keys that may change between a run and its resume: how to resume/checkpoint/log, and machine paths.
VOLATILE = ("resume", "stop_after", "checkpoint", "logger", "paths", "hydra")


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The whole state dict without tied duplicates (safetensors refuses shared storage). A collective under
    FSDP2 (every rank must call it; only rank 0 gets the tensors)."""
    seen, out = set(), {}
    for name, tensor in dist.full_state_dict(model).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous().cpu()
    return out


def _fresh(path: Path) -> Path:
    """An empty directory at ``path`` (a leftover from a crashed attempt is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    rundir.atomic_write(path, save(tensors))


def _save_torch(path: Path, obj) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    rundir.atomic_write(path, buffer.getvalue())


def save_task(run_dir: Path, completed: int, model, method, attribution=None) -> str:
    """Checkpoint after ``completed`` tasks; returns its path relative to the run dir (for ``state.json``)."""
    rel = f"{DIR}/task_{completed}"
    ckpt = Path(run_dir) / rel
    weights = _unique_state(model)  # every rank: a collective under FSDP2
    state = method.state_dict()  # every rank: sharded method state (EWC under FSDP2) is gathered
    if dist.is_main_process():
        _fresh(ckpt)
        _save_tensors(ckpt / MODEL, weights)
        tensors = {k: v.contiguous().cpu() for k, v in state.items() if torch.is_tensor(v)}
        if tensors:
            _save_tensors(ckpt / METHOD, tensors)
    dist.barrier()
    if attribution is not None:
        attribution.save_checkpoint(ckpt / IMPORTANCE)  # sharded maps: every rank writes its own shard
    dist.barrier()
    return rel


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _as_python_state(state):
    """``random.setstate`` wants tuples; a round trip through torch.save keeps them, this guards lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def save_step(run_dir: Path, index: int, step: int, stepper, scheduler, loop_state: dict) -> str:
    """Mid-task checkpoint ``step`` optimizer steps into task ``index`` (0-based); returns its relative path.
    The stepper writes the weights and the optimizer state (:mod:`aglcl.engine.steppers`); every rank calls."""
    rel = f"{DIR}/task_{index}_step_{step}"
    ckpt = Path(run_dir) / rel
    if dist.is_main_process():
        _fresh(ckpt)
    dist.barrier()
    stepper.save(ckpt)
    _save_torch(ckpt / _rng_file(), rng_state())  # every rank its own generators (dropout differs per device)
    if dist.is_main_process():
        _save_torch(ckpt / "scheduler.pt", scheduler.state_dict())
        rundir.write_json(ckpt / "loop.json", {"task": index, "step": step, **loop_state})
    dist.barrier()
    return rel


def save_model_and_optimizer(path: Path, model, optimizer) -> None:
    """``model.safetensors`` and ``optimizer.pt`` of a mid-task checkpoint (replicated, or gathered from
    FSDP2's shards by rank 0; every rank calls)."""
    weights = _unique_state(model)  # collectives under FSDP2: every rank gathers, rank 0 gets the tensors
    optim = dist.optimizer_state_dict(model, optimizer)
    if dist.is_main_process():
        _save_tensors(Path(path) / MODEL, weights)
        _save_torch(Path(path) / "optimizer.pt", optim)


def load_model_and_optimizer(path: Path, model, optimizer) -> None:
    """Inverse of :func:`save_model_and_optimizer` (under FSDP2 rank 0 reads the optimizer state and every
    rank keeps its shard)."""
    path = Path(path)
    load_weights(path, model)
    sharded = any(dist.is_dtensor(p) for p in model.parameters())
    optim = _load_torch(path / "optimizer.pt") if dist.is_main_process() or not sharded else {}
    try:
        dist.load_optimizer_state_dict(model, optimizer, optim)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AglclError(f"cannot resume: {path} does not match this optimizer ({exc})") from None


def _rng_file() -> str:
    return f"rng_rank{dist.rank()}.pt"


def _load_torch(path: Path):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle/zip errors of many kinds: a truncated or foreign file
        raise AglclError(f"cannot resume: {path} is missing or unreadable ({type(exc).__name__}: "
                         f"{str(exc)[:120]})") from None


def load_step(path: Path, scheduler) -> dict:
    """Restore the scheduler and RNG state of a mid-task checkpoint; returns its ``loop.json`` (the weights
    and optimizer come back through the stepper's ``load``)."""
    path = Path(path)
    try:
        loop_state = json.loads((path / "loop.json").read_text())
    except (OSError, ValueError) as exc:
        raise AglclError(f"cannot resume: {path / 'loop.json'} is missing or unreadable ({exc})") from None
    try:
        scheduler.load_state_dict(_load_torch(path / "scheduler.pt"))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AglclError(f"cannot resume: {path} does not match this schedule ({exc})") from None
    if not (path / _rng_file()).is_file():
        raise AglclError(f"cannot resume: {path / _rng_file()} is missing (was the run made on fewer ranks?)")
    set_rng_state(_load_torch(path / _rng_file()))
    return loop_state


def load_weights(path: Path, model) -> None:
    """Load ``<path>/model.safetensors`` into ``model``; refuses names, shapes or dtypes that do not match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / MODEL
    try:
        weights = load_file(file)
    except (OSError, SafetensorError) as exc:
        raise AglclError(f"cannot resume: {file} is missing or unreadable ({exc})") from None
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    wrong = [n for n, t in weights.items() if n in own and (t.shape != own[n].shape or t.dtype != own[n].dtype)]
    if unexpected or wrong:
        detail = (f"unexpected tensor '{unexpected[0]}'" if unexpected else
                  f"'{wrong[0]}' is {tuple(weights[wrong[0]].shape)} {weights[wrong[0]].dtype}, the model's "
                  f"{tuple(own[wrong[0]].shape)} {own[wrong[0]].dtype}")
        raise AglclError(f"cannot resume: {file} does not match the model ({detail}; {len(unexpected)} unexpected, "
                         f"{len(wrong)} mismatched tensors)")
    missing, _ = dist.load_full_state_dict(model, weights, strict=False)  # FSDP2: each rank keeps its shard
    absent = [n for n in missing if not _tied(own, n, weights)]  # tied duplicates are stored once
    if absent:
        raise AglclError(f"cannot resume: {file} lacks the model's tensor '{absent[0]}' ({len(absent)} missing)")


def _tied(own: dict, name: str, weights: dict) -> bool:
    """Whether ``own[name]`` shares storage with a tensor the file does hold (tied embeddings)."""
    ptr = own[name].untyped_storage().data_ptr()
    return any(own[n].untyped_storage().data_ptr() == ptr for n in weights if n in own)


def load_method(path: Path, method) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / METHOD
    if not file.is_file():
        return
    try:
        state = load_file(file)
    except (OSError, SafetensorError) as exc:
        raise AglclError(f"cannot resume: {file} is unreadable ({exc})") from None
    method.load_state_dict(state)


def prune(run_dir: Path, keep: list[str | None]) -> None:
    """Delete checkpoint directories ``state.json`` no longer names (call after writing it)."""
    root = Path(run_dir) / DIR
    names = {Path(k).name for k in keep if k}
    for entry in root.glob("*") if root.is_dir() else []:
        if entry.name not in names:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# -- the resume decision ------------------------------------------------------------------------------------
def comparable(config: dict) -> dict:
    """The resolved config without :data:`VOLATILE` keys, flattened to ``{dotted.key: value}``."""
    flat: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk({k: v for k, v in config.items() if k not in VOLATILE}, "")
    return flat


def config_diff(saved: dict, current: dict) -> list[str]:
    """``key (old -> new)`` for every key whose value differs."""
    a, b = comparable(saved), comparable(current)
    return [f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def plain_config(cfg) -> dict:
    """The resolved config without ``hydra`` and ``paths``: stored as ``config.json`` and compared on resume.

    Machine paths are not part of a run's identity: every ``${paths.<key>}`` is resolved to the placeholder
    ``<paths.<key>>``, so a run resumed on another machine (or with its data moved) is not refused for it.
    """
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    container["paths"] = {k: f"<paths.{k}>" for k in (container.get("paths") or {})}
    masked = OmegaConf.create(container)
    out = {}
    for key in masked:
        if key == "paths":
            continue
        value = masked[key]
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def write_config(run_dir: Path, config: dict) -> None:
    rundir.write_json(Path(run_dir) / CONFIG, config)


def read_state(run_dir: Path, order: list[str], config: dict | None = None, force: bool = False) -> dict:
    """``state.json`` of an unfinished run whose task order is ``order``, checked against ``config``."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.STATE
    if not path.is_file():
        raise AglclError(f"cannot resume: {path} not found; set hydra.run.dir to the run to continue")
    try:
        state = json.loads(path.read_text())
        done, next_task, saved_order = state["done"], state["next_task"], state["order"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AglclError(f"cannot resume: {path} is not a valid state file ({exc!r})") from None
    if saved_order != order:
        raise AglclError(f"cannot resume: the run's task order {saved_order} differs from sequence.order {order}")
    if done:
        raise AglclError(f"nothing to resume: {path} says all {len(order)} tasks are done")
    if next_task > 0 and not state.get("checkpoint"):
        raise AglclError(f"cannot resume: the run was made with checkpoint.every_task=false (after task {next_task})")
    if config is not None and (run_dir / CONFIG).is_file():
        try:
            saved = json.loads((run_dir / CONFIG).read_text())
        except ValueError as exc:
            raise AglclError(f"cannot resume: {run_dir / CONFIG} is not valid JSON ({exc})") from None
        diff = config_diff(saved, config)
        if diff and not force:
            raise AglclError(f"cannot resume: the config differs from the run's in {'; '.join(diff)}; "
                             f"use the run's values or resume=force")
    return state
