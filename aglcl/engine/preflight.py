"""Hydra callbacks that check a command before Hydra creates its output dir (``conf/hydra/default.yaml``,
``conf/train.yaml``: ``hydra.callbacks``).

Hydra makes the run dir and writes ``.hydra/`` and the log file before the task function starts, so the
checks that must come before the first write run here, in ``on_run_start`` / ``on_multirun_start``:

* :class:`OutputDirCheck` (every command): the output dir is not an existing file.
* :class:`TrainPreflight` (``aglcl train``): the whole config is valid (:mod:`aglcl.engine.validate`) and the
  run dir may be written (:mod:`aglcl.engine.ownership`); ``overwrite=true`` empties it here. Under ``-m``
  every job of the basic sweeper is composed and checked before the first job starts.

Hydra turns an ``Exception`` raised by a callback into a warning, so these raise :class:`UserAbort`, which
``aglcl.cli`` prints as one line (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from aglcl.errors import AglclError, UserAbort, hydra_message


def _abort(exc: AglclError, prefix: str = "") -> UserAbort:
    return UserAbort(f"{prefix}{exc}")


class OutputDirCheck(Callback):
    """Refuse an output dir (``hydra.run.dir`` / ``hydra.sweep.dir``) that is an existing file."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _not_a_file(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _not_a_file(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _not_a_file(path: Path, key: str) -> None:
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise UserAbort(f"{key}={path}: {part} is a file, not a directory; choose another output directory")


class TrainPreflight(Callback):
    """Validate ``aglcl train``'s config and its run dir before Hydra writes anything."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from aglcl import dist
        from aglcl.engine import ownership
        from aglcl.engine.validate import check_train_config

        try:
            run = check_train_config(config, build=True)
            if not dist.is_main_process():  # rank 0 owns the run dir (and may hold its lock already)
                return
            run_dir = Path(config.hydra.run.dir)
            kind = ownership.check_run_dir(run_dir, run.resume, run.overwrite)
        except AglclError as exc:
            raise _abort(exc) from None
        if run.overwrite and kind not in ("absent", "empty"):
            ownership.clear(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from aglcl import dist
        from aglcl.engine import ownership
        from aglcl.engine.validate import check_train_config

        jobs = sweep_jobs(config)
        if jobs is None:  # another sweeper (e.g. Optuna): each job checks itself when it starts
            return
        from hydra import compose

        sweep_dir = Path(config.hydra.sweep.dir)
        per_num = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") == "${hydra.job.num}"
        search = [o for o in config.hydra.overrides.hydra if str(o).startswith("hydra.searchpath")]
        for num, overrides in enumerate(jobs):
            where = f"job {num} ({' '.join(overrides) or 'no overrides'}): "
            try:
                cfg = compose(config_name=config.hydra.job.config_name, overrides=[*search, *overrides])
                run = check_train_config(cfg, build=True)
                if per_num and dist.is_main_process():
                    ownership.check_run_dir(sweep_dir / str(num), run.resume, run.overwrite,
                                            key="the job dir")
            except AglclError as exc:
                raise _abort(exc, where) from None
            except Exception as exc:  # a composition error of one job (Hydra's own message)
                raise UserAbort(f"{where}{hydra_message(exc)}") from None


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper will launch them; None for other sweepers."""
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_") or ""
    if not sweeper.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
