"""Launch plumbing: SLURM's environment, one run dir across ranks, quiet ranks > 0, progress bars.

    torchrun --nproc_per_node 8 --no-python aglcl train distributed=fsdp2 ...
    aglcl train -m hydra/launcher=slurm distributed=fsdp2 method=seqft,agft    # one SLURM job per point

* **One run dir.** Hydra names run dirs after ``${now:...}``, which each rank would read from its own
  clock. :func:`share_launch_time` makes rank 0's launch time the ``now`` of every rank, through the
  launcher's TCP store (the one ``init_process_group`` uses later), before Hydra composes the config.
* Only rank 0 writes artifacts and draws progress bars; the other ranks log warnings and errors only
  (:func:`quiet_non_main`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re

from aglcl import dist
from aglcl.dist import env_int, is_distributed, is_main_process, rank
from aglcl.errors import AglclError

log = logging.getLogger(__name__)

LAUNCH_TIME_ENV = "AGLCL_LAUNCH_TIME"  # seconds since the epoch; set it to pin the run dir's timestamp
_STORE_TIMEOUT_S = 300


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
    if "RANK" in os.environ or env_int("SLURM_NTASKS", default=1) <= 1 or "SLURM_PROCID" not in os.environ:
        return False
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
    os.environ.setdefault("MASTER_ADDR", first_host(nodes))
    os.environ.setdefault("MASTER_PORT", str(20000 + env_int("SLURM_JOB_ID", default=0) % 20000))
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
    dist._KEEP.append(store)  # rank 0 may host the server: keep it up until the other ranks have read the key
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
