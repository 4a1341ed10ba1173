"""Per-task checkpoints and resume.

    aglcl train ... hydra.run.dir=outputs/my_run                  # checkpoint.every_task=true (default)
    aglcl train ... hydra.run.dir=outputs/my_run resume=true      # continue after the last finished task
    aglcl train ... stop_after=2                                  # train two tasks, then exit (resumable)

After each task the run dir holds ``checkpoint/model.safetensors`` (the weights), ``checkpoint/
method.safetensors`` (the method's tensors, if any) and ``state.json`` (R and b so far, the next task).
Importance maps are read back from ``importance/combined.safetensors``. Every file is written
atomically, so a crash leaves the previous task's checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aglcl.engine import rundir
from aglcl.errors import AglclError

DIR = "checkpoint"
MODEL = "model.safetensors"
METHOD = "method.safetensors"


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous().cpu()
    return out


def save(run_dir: Path, model, method) -> None:
    from safetensors.torch import save

    ckpt = Path(run_dir) / DIR
    rundir.atomic_write(ckpt / MODEL, save(_unique_state(model)))
    tensors = {k: v.contiguous().cpu() for k, v in method.state_dict().items() if torch.is_tensor(v)}
    if tensors:
        rundir.atomic_write(ckpt / METHOD, save(tensors))


def load(run_dir: Path, model, method) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(run_dir) / DIR
    try:
        weights = load_file(ckpt / MODEL)
    except (OSError, SafetensorError) as exc:
        raise AglclError(f"cannot resume: {ckpt / MODEL} is missing or unreadable ({exc})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    own = set(model.state_dict())
    if unexpected or not set(missing) <= own - set(weights):
        raise AglclError(f"cannot resume: {ckpt / MODEL} does not match the model "
                         f"({len(unexpected)} unexpected, {len(missing)} missing tensors)")
    if (ckpt / METHOD).is_file():
        method.load_state_dict(load_file(ckpt / METHOD))


def read_state(run_dir: Path, order: list[str]) -> dict:
    """``state.json`` of an unfinished run whose task order is ``order``."""
    path = Path(run_dir) / rundir.STATE
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
    if not state.get("checkpoint"):
        raise AglclError(f"cannot resume: the run was made with checkpoint.every_task=false (after task {next_task})")
    return state
