"""The sequence runner: ``run_train(cfg)`` is what ``aglcl train`` calls (and what tests call).

For each task of ``sequence.order``: train it, evaluate every task (a row of R), let the method
react (``after_task``), record ``state.json``. The initial model is evaluated first (``b``, for FWT).
The runner knows no method names: behaviour comes from ``cfg.method`` (``_target_``) and its hooks.
"""

from __future__ import annotations

import logging
import platform
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from aglcl.engine import checkpoint, ownership, rundir
from aglcl.engine import distributed as dist
from aglcl.engine.loop import encode_split, train_task
from aglcl.errors import AglclError, RunInterrupted

log = logging.getLogger("aglcl")


def _enabled(node) -> bool:
    return node is not None and node.get("_target_") is not None


def _reset_peak_mem() -> None:
    """Start a fresh peak-memory count for this run (multirun jobs share one process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set
    except OSError:
        pass


def _peak_mem_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the peak resident set since :func:`_reset_peak_mem`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-lifetime peak (KiB on Linux)


def _versions() -> dict:
    import accelerate
    import peft
    import transformers

    import aglcl

    return {"aglcl": aglcl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}


def _progress(console):
    """Rich progress bars on a terminal; elsewhere (CI, files, launchers) the loop logs plain lines."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not dist.use_progress_bars(console):  # not a terminal, a rank > 0, or a non-basic Hydra launcher
        return contextlib.nullcontext()
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                    console=console)


def evaluate_all(model, tokenizer, tasks, cfg, run_dir: Path, stage: int, stage_name: str) -> list[float]:
    """Score every task's test split; write ``predictions/after_<stage>_<stage_name>/<task>.jsonl``."""
    model.eval()
    row = []
    for task in tasks:
        preds, scores = task.scoring(model, tokenizer, task, task.test, cfg.eval_batch_size, cfg.max_length)
        records = [{"prompt": ex["prompt"], "reference": ex["answer"], "prediction": p, "score": s}
                   for ex, p, s in zip(task.test, preds, scores)]
        if dist.is_main_process():
            rundir.write_predictions(run_dir, stage, stage_name, task.name, records)
        row.append(sum(scores) / max(len(scores), 1))
    model.train()
    return row


def _plain_config(cfg: DictConfig) -> dict:
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


def run_train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run the whole sequence; returns the content of ``results.json``.

    The config is checked whole before anything is loaded (:mod:`aglcl.engine.validate`), and the run dir is
    held under an exclusive lock (:mod:`aglcl.engine.ownership`) for the whole run. Ctrl-C stops at once and
    raises :class:`aglcl.errors.RunInterrupted`, naming the checkpoint a ``resume=true`` continues from.
    """
    from aglcl.engine.validate import check_train_config

    run = check_train_config(cfg)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    lock = ownership.RunLock(run_dir)
    try:
        return _run_train(cfg, run_dir, run, lock)
    except KeyboardInterrupt:
        raise RunInterrupted(_interrupted_message(run_dir)) from None
    finally:
        lock.release()


def _interrupted_message(run_dir: Path) -> str:
    """One line after Ctrl-C: what the run dir keeps, and the command that continues it."""
    import json

    try:
        state = json.loads((run_dir / rundir.STATE).read_text())
    except (OSError, ValueError):
        return f"interrupted before the run wrote a resume point; start it again (with overwrite=true, hydra.run.dir={run_dir})"
    done, step = state.get("next_task", 0), state.get("step_checkpoint")
    where = (f"step {step.rsplit('_', 1)[-1]} of task {done + 1}" if step else
             f"the end of task {done}" if done else "the start of task 1" if state.get("b") is not None
             else "the start (its initial evaluation is redone)")
    if done and not step and not state.get("checkpoint"):
        return (f"interrupted; {run_dir} keeps no checkpoint (checkpoint.every_task=false), so the run cannot be "
                f"resumed; start it again with overwrite=true")
    return f"interrupted; {run_dir} keeps its checkpoint at {where}: continue with the same command and resume=true hydra.run.dir={run_dir}"


def _run_train(cfg: DictConfig, run_dir: Path, run, lock) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from hydra.utils import instantiate
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from aglcl.data.tasks import load_sequence
    from aglcl.engine.scoring import check_scoring
    from aglcl.metrics.cl import compute_all
    from aglcl.report.matrix import write_matrix_csv
    from aglcl.report.plots import plot_heatmap
    from aglcl.report.tables import matrix_table, metrics_table

    wall = time.perf_counter()
    _reset_peak_mem()
    hf_logging.disable_progress_bar()
    console = Console(stderr=True)

    # Everything that can fail on user input is built before the first write.
    trainer = instantiate(cfg.trainer)
    tasks = load_sequence(cfg.sequence, cfg.get("limit"), run.data_seed)
    names = [t.name for t in tasks]
    method = instantiate(cfg.method)
    attribution = instantiate(cfg.attribution) if _enabled(cfg.get("attribution")) else None
    if getattr(method, "needs_importance", False) and attribution is None:
        raise AglclError(f"method {type(method).__name__} needs importance maps; choose an attribution "
                         f"estimator, e.g. attribution=grad_x_weight (see `aglcl ls`)")
    engine = instantiate(cfg.distributed) if _enabled(cfg.get("distributed")) else dist.DistributedConfig()
    every_steps = run.checkpoint.every_steps or 0
    engine.check(method)
    save_every_task = run.checkpoint.every_task or every_steps > 0
    resume = run.resume
    if run.stop_after is not None and run.stop_after > len(tasks):
        raise AglclError(f"stop_after={run.stop_after} is invalid: the sequence has {len(tasks)} tasks")
    config = {**_plain_config(cfg), "world_size": dist.world_size()}  # a resume on other ranks changes the batch
    if dist.is_main_process():  # the run dir's owner, before anything is written into it
        kind = ownership.check_run_dir(run_dir, resume, run.overwrite)
        if run.overwrite and kind not in ("absent", "empty"):
            ownership.clear(run_dir, keep=(".hydra", *(p.name for p in run_dir.glob("*.log"))))
        lock.acquire()
    state = checkpoint.read_state(run_dir, names, config, force=resume == "force") if resume else None
    first = state["next_task"] if state is not None else 0
    set_seed(trainer.seed)
    model, tokenizer = instantiate(cfg.model)
    check_scoring(tasks, tokenizer, trainer.max_length)  # a label that leaves no prompt budget: refused now
    if _enabled(cfg.get("peft")):
        import warnings

        from peft import get_peft_model

        with warnings.catch_warnings():  # peft calls a deprecated transformers helper on every wrap
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, instantiate(cfg.peft, _convert_="all"))
    log_with = cfg.logger.get("log_with")
    accelerator = Accelerator(mixed_precision=trainer.precision, log_with=log_with,
                              project_dir=cfg.logger.get("logging_dir") or str(run_dir),
                              cpu=not dist.has_accelerator(),  # CPU-only: MULTI_CPU (gloo) under torchrun, not 1 process
                              **engine.accelerator_kwargs())
    if trainer.precision == "fp16" and accelerator.scaler is None and engine.engine != "deepspeed":
        log.warning("trainer.precision=fp16 has no effect on %s (accelerate runs fp32 there); use "
                    "trainer.precision=bf16", accelerator.device.type)
    model = method.setup(model, len(tasks), first)
    task_ckpt = state.get("checkpoint") if state is not None else None
    if isinstance(task_ckpt, str):
        checkpoint.load_weights(run_dir / task_ckpt, model)
        checkpoint.load_method(run_dir / task_ckpt, method)
    model = engine.place_model(model, accelerator, trainer.precision)
    if log_with:
        accelerator.init_trackers("aglcl")
    encoded = {t.name: encode_split(tokenizer, t.train, t.answer_prefix, trainer.max_length) for t in tasks}
    stop_after = run.stop_after

    bare = accelerator.unwrap_model(model)  # hooks and scoring see parameter names without DDP's ``module.``
    if state is None:
        R, b, stats = [], None, {}
        timings: dict = {"train_s": {}, "eval_s": 0.0, "attribution_s": {}}
        if dist.is_main_process():
            checkpoint.write_config(run_dir, config)
    else:
        R, b, stats, timings = state["R"], state["b"], state["train"], state["timings"]
        wall -= timings.get("wall_s", 0.0)  # wall time accumulates over resumes
        if resume == "force" and dist.is_main_process():
            checkpoint.write_config(run_dir, config)  # the forced values are the run's from now on
        for stale in run_dir.rglob(".*.tmp") if dist.is_main_process() else []:  # writes a kill interrupted
            stale.unlink(missing_ok=True)
        if attribution is not None and isinstance(task_ckpt, str):
            path = run_dir / task_ckpt / checkpoint.IMPORTANCE
            maps = attribution.restore(run_dir, model, first, path=path)
            if maps is None:
                raise AglclError(f"cannot resume: {path} is missing, but attribution is on and {first} task(s) "
                                 f"are done; was the run made with attribution=none?")
            method.set_importance(maps)
        where = f"step {state['step_checkpoint'].rsplit('_', 1)[-1]} of " if state.get("step_checkpoint") else "the start of "
        log.info("resuming %s at %stask %d (%s)", run_dir, where, first + 1, names[first])

    def write_state(next_task: int, step_ckpt: str | None = None) -> None:
        """Point ``state.json`` at the newest checkpoints, then delete the ones it no longer names."""
        timings["wall_s"] = time.perf_counter() - wall
        if not dist.is_main_process():
            return
        rundir.write_json(run_dir / rundir.STATE, {
            "next_task": next_task, "completed": names[:next_task], "order": names, "R": R, "b": b,
            "done": next_task == len(tasks), "checkpoint": task_ckpt, "step_checkpoint": step_ckpt,
            "train": stats, "timings": timings})
        if save_every_task:
            checkpoint.prune(run_dir, [task_ckpt, step_ckpt])

    if state is None:
        write_state(0)  # a resume point before the first evaluation: a kill from here on can be resumed
    if b is None:  # a fresh run, or one stopped during its initial evaluation
        start = time.perf_counter()
        b = evaluate_all(bare, tokenizer, tasks, trainer, run_dir, 0, rundir.INITIAL)
        timings["eval_s"] += time.perf_counter() - start
        write_state(first)
    log.info("%d tasks %s, method %s, run dir %s", len(tasks), names, type(method).__name__, run_dir)

    with _progress(console) as progress:
        for index in range(first, len(tasks)):
            task = tasks[index]
            set_seed(trainer.seed + index)  # per task, so a resumed run draws what an unbroken one would
            if attribution is not None:
                attribution.before_task(model)
            method.before_task(index, task, bare)
            examples = method.train_examples(index, task, encoded[task.name])
            resume_from = None
            if state is not None and index == first and state.get("step_checkpoint"):
                resume_from = run_dir / state["step_checkpoint"]

            def save_step(step, stepper, scheduler, loop_state, index=index):
                rel = checkpoint.save_step(run_dir, index, step, stepper, scheduler, loop_state)
                write_state(index, rel)

            stats[task.name] = train_task(model, tokenizer, examples, method, trainer, accelerator,
                                          progress, task=task.name, step_offset=index * 10**6,
                                          checkpoint_every=every_steps, save_checkpoint=save_step,
                                          resume_from=resume_from, engine=engine)
            timings["train_s"][task.name] = stats[task.name]["train_s"]
            start = time.perf_counter()
            R.append(evaluate_all(bare, tokenizer, tasks, trainer, run_dir, index + 1, task.name))
            timings["eval_s"] += time.perf_counter() - start
            method.after_task(index, task, bare, encoded[task.name])
            if attribution is not None and (index + 1 < len(tasks) or attribution.after_last):
                start = time.perf_counter()
                combined = attribution.after_task(index + 1, task.name, model, encoded[task.name],
                                                  tokenizer.pad_token_id, run_dir)
                timings["attribution_s"][task.name] = time.perf_counter() - start
                method.set_importance(combined)
            if save_every_task and index + 1 < len(tasks):
                task_ckpt = checkpoint.save_task(run_dir, index + 1, bare, method, attribution)
            elif not save_every_task:
                task_ckpt = None
            if index + 1 < len(tasks):  # after the last task, "done" is written only once the results are
                write_state(index + 1)
            log.info("after %s: %s", task.name, "  ".join(f"{n} {s:.3f}" for n, s in zip(names, R[-1])))
            if stop_after and index + 1 >= stop_after and index + 1 < len(tasks):
                log.info("stop_after=%d: stopping; continue with resume=true", stop_after)
                AcceleratorState._reset_state(True)
                return {"tasks": names, "R": R, "b": b, "metrics": {}, "stopped_after": index + 1}

    diagonal_only = bool(getattr(method, "diagonal_only", False))
    metrics = compute_all(R, b, diagonal_only=diagonal_only)
    timings["wall_s"] = time.perf_counter() - wall
    timings["peak_mem_mb"] = _peak_mem_mb(accelerator.device)
    results = {
        "tasks": names,
        "metric": {t.name: t.metric for t in tasks},
        "R": R,
        "b": b,
        "metrics": metrics,
        "train": stats,
        "timings": timings,
        "method": cfg.method.get("_target_"),
        "seed": trainer.seed,
        "tags": list(cfg.get("tags") or []),
        "diagonal_only": diagonal_only,  # rows are separate single-task models: only plasticity is meaningful
        "versions": _versions(),
    }
    if dist.is_main_process():
        write_matrix_csv(run_dir / rundir.R_CSV, names, R)
        plot_heatmap(names, R, run_dir / rundir.HEATMAP, title=f"R ({results['method']}, seed {trainer.seed})")
        rundir.write_json(run_dir / rundir.RESULTS, results)
    write_state(len(tasks))
    if dist.is_main_process():
        console.print(matrix_table(names, R, b))
        console.print(metrics_table(metrics))
    if diagonal_only and dist.is_main_process():
        console.print(f"{type(method).__name__} is a single-task reference: only R's diagonal (plasticity) is "
                      "meaningful; the other metrics are left empty.")
    if log_with:
        accelerator.log({f"metrics/{k}": v for k, v in metrics.items() if v is not None})
        accelerator.end_training()
    del model, accelerator
    AcceleratorState._reset_state(True)  # multirun jobs share this process; each builds its own Accelerator
    return results
