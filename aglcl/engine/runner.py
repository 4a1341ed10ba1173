"""The sequence runner: ``run_train(cfg)`` is what ``aglcl train`` calls (and what tests call).

    results = run_train(cfg, run_dir)      # the content of results.json

:class:`SequenceRun` reads top to bottom, in the spirit of a torchtune recipe::

    setup()                                   check, lock the run dir, build, restore a resume, evaluate b
    for each task t of sequence.order:
        train(t)                              the method's hooks around the loop (aglcl.engine.loop)
        evaluate(t)                           a row of R, predictions saved
        after_task(t)                         the method reacts; attribution updates the importance map
        checkpoint(t)                         weights, method state and maps; state.json (the resume point)
    finish()                                  metrics, results.json, state.json says done

The runner knows no method names: behaviour comes from ``cfg.method`` (``_target_``) and its hooks
(docs/design.md, "Hook contract"). It writes ``results.json`` and the run's state; the report files (R.csv,
the heatmap, the printed tables) are :func:`aglcl.report.run.write_run`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from aglcl import dist, rundir
from aglcl.engine import checkpoint, ownership, telemetry
from aglcl.engine.evaluate import evaluate_all
from aglcl.engine.loop import encode_split, train_task
from aglcl.engine.strategy import DistributedConfig
from aglcl.engine.validate import RunConfig, build, check_train_config
from aglcl.errors import AglclError, RunInterrupted

log = logging.getLogger("aglcl")


def _enabled(node) -> bool:
    return node is not None and node.get("_target_") is not None


def _progress(console):
    """Rich progress bars on a terminal; elsewhere (CI, files, launchers) the loop logs plain lines."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from aglcl.engine.launch import use_progress_bars

    if not use_progress_bars(console):  # not a terminal, a rank > 0, or a non-basic Hydra launcher
        return contextlib.nullcontext()
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                    console=console)


@dataclass
class RunState:
    """What the run has done so far: what ``state.json`` holds, and what a resume restores."""

    names: list[str]
    R: list[list[float]] = field(default_factory=list)
    b: list[float] | None = None  # None until the initial evaluation is done
    stats: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {"train_s": {}, "eval_s": 0.0, "eval_s_by_stage": {},
                                                   "attribution_s": {}})
    task_ckpt: str | None = None  # the last task checkpoint, relative to the run dir
    step_ckpt: str | None = None  # a mid-task checkpoint to resume from, if any
    first: int = 0  # the task index this process starts at

    @classmethod
    def from_saved(cls, names: list[str], saved: dict) -> RunState:
        return cls(names, R=saved["R"], b=saved["b"], stats=saved["train"], timings=saved["timings"],
                   task_ckpt=saved.get("checkpoint"), step_ckpt=saved.get("step_checkpoint"),
                   first=saved["next_task"])

    def to_json(self, next_task: int, step_ckpt: str | None) -> dict:
        return {"next_task": next_task, "completed": self.names[:next_task], "order": self.names, "R": self.R,
                "b": self.b, "done": next_task == len(self.names), "checkpoint": self.task_ckpt,
                "step_checkpoint": step_ckpt, "train": self.stats, "timings": self.timings}


class SequenceRun:
    """One ``aglcl train`` run over ``cfg`` into ``run_dir``. Call :meth:`run`, then :meth:`close`."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run: RunConfig):
        self.cfg, self.run_dir, self.opts = cfg, Path(run_dir), run
        self.lock = ownership.RunLock(self.run_dir)
        self.accelerator = None

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything that can fail on user input, then take the run dir, then load the model."""
        from rich.console import Console
        from transformers.utils import logging as hf_logging

        from aglcl.data.scoring import check_scoring
        from aglcl.data.tasks import load_sequence

        cfg, opts = self.cfg, self.opts
        self.wall = time.perf_counter()
        telemetry.reset_peak_mem()
        hf_logging.disable_progress_bar()
        self.console = Console(stderr=True)
        self.trainer = build(cfg.trainer)
        self.tasks = load_sequence(cfg.sequence, cfg.get("limit"), opts.data_seed, split=opts.evaluation.split)
        self.names = [t.name for t in self.tasks]
        self.method = build(cfg.method)
        self.attribution = build(cfg.attribution) if _enabled(cfg.get("attribution")) else None
        if self.method.needs_importance and self.attribution is None:
            raise AglclError(f"method {type(self.method).__name__} needs importance maps; choose an attribution "
                             f"estimator, e.g. attribution=grad_x_weight (see `aglcl ls`)")
        self.engine = build(cfg.distributed) if _enabled(cfg.get("distributed")) else DistributedConfig()
        self.engine.check(self.method)
        if opts.stop_after is not None and opts.stop_after > len(self.tasks):
            raise AglclError(f"stop_after={opts.stop_after} is invalid: the sequence has {len(self.tasks)} tasks")
        self.every_steps = opts.checkpoint.every_steps or 0
        self.save_every_task = opts.checkpoint.every_task or self.every_steps > 0
        config = {**checkpoint.plain_config(cfg), "world_size": dist.world_size()}  # other ranks: another batch
        self._own_run_dir()
        saved = (checkpoint.read_state(self.run_dir, self.names, config, force=opts.resume == "force")
                 if opts.resume else None)
        self.state = RunState.from_saved(self.names, saved) if saved else RunState(self.names)
        self._build_model()
        check_scoring(self.tasks, self.tokenizer, self.trainer.max_length)  # no prompt budget left: refused
        if saved is None and dist.is_main_process():
            checkpoint.write_config(self.run_dir, config)
        if saved is not None:
            self._restore(config)
        else:
            self.write_state(0)  # a resume point before the first evaluation: a kill from here on can be resumed
        if self.state.b is None:  # a fresh run, or one stopped during its initial evaluation
            start = time.perf_counter()
            self.state.b = evaluate_all(self.bare, self.tokenizer, self.tasks, self.trainer, self.run_dir, 0,
                                        rundir.INITIAL)
            self._eval_time(rundir.INITIAL, time.perf_counter() - start)
            self.write_state(self.state.first)
        log.info("%d tasks %s, method %s, run dir %s", len(self.tasks), self.names, type(self.method).__name__,
                 self.run_dir)

    def _own_run_dir(self) -> None:
        """Refuse a run dir this run may not write, empty it for ``overwrite=true``, and lock it (rank 0)."""
        if not dist.is_main_process():
            return
        kind = ownership.check_run_dir(self.run_dir, self.opts.resume, self.opts.overwrite)
        if self.opts.overwrite and kind not in ("absent", "empty"):
            ownership.clear(self.run_dir, keep=(".hydra", *(p.name for p in self.run_dir.glob("*.log"))))
        self.lock.acquire()

    def _build_model(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg, trainer = self.cfg, self.trainer
        set_seed(trainer.seed)
        model, self.tokenizer = build(cfg.model)
        if _enabled(cfg.get("peft")):
            import warnings

            from peft import get_peft_model

            with warnings.catch_warnings():  # peft calls a deprecated transformers helper on every wrap
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model = get_peft_model(model, build(cfg.peft, _convert_="all"))
        self.log_with = cfg.logger.get("log_with")
        self.accelerator = Accelerator(mixed_precision=trainer.precision, log_with=self.log_with,
                                       project_dir=cfg.logger.get("logging_dir") or str(self.run_dir),
                                       cpu=not dist.has_accelerator(),  # CPU-only: gloo under torchrun
                                       **self.engine.accelerator_kwargs())
        if trainer.precision == "fp16" and self.accelerator.scaler is None and self.engine.engine != "deepspeed":
            log.warning("trainer.precision=fp16 has no effect on %s (accelerate runs fp32 there); use "
                        "trainer.precision=bf16", self.accelerator.device.type)
        model = self.method.setup(model, len(self.tasks), self.state.first)
        if self.state.task_ckpt:
            checkpoint.load_weights(self.run_dir / self.state.task_ckpt, model)
            checkpoint.load_method(self.run_dir / self.state.task_ckpt, self.method)
        self.model = self.engine.place_model(model, self.accelerator, trainer.precision)
        self.bare = self.accelerator.unwrap_model(self.model)  # what hooks, attribution and scoring see
        if self.log_with:
            self.accelerator.init_trackers("aglcl")
        self.encoded = {t.name: encode_split(self.tokenizer, t.train, t.answer_prefix, trainer.max_length)
                        for t in self.tasks}

    def _restore(self, config: dict) -> None:
        """Continue a saved run: its timings, its forced config, its importance map; stale temp files go."""
        state, first = self.state, self.state.first
        self.wall -= state.timings.get("wall_s", 0.0)  # wall time accumulates over resumes
        if self.opts.resume == "force" and dist.is_main_process():
            checkpoint.write_config(self.run_dir, config)  # the forced values are the run's from now on
        for stale in self.run_dir.rglob(".*.tmp") if dist.is_main_process() else []:  # writes a kill cut short
            stale.unlink(missing_ok=True)
        if self.attribution is not None and state.task_ckpt:
            path = self.run_dir / state.task_ckpt / checkpoint.IMPORTANCE
            maps = self.attribution.restore(self.run_dir, self.bare, first, path=path)
            if maps is None:
                raise AglclError(f"cannot resume: {path} is missing, but attribution is on and {first} task(s) "
                                 f"are done; was the run made with attribution=none?")
            self.method.set_importance(maps)
        where = f"step {state.step_ckpt.rsplit('_', 1)[-1]} of " if state.step_ckpt else "the start of "
        log.info("resuming %s at %stask %d (%s)", self.run_dir, where, first + 1, self.names[first])

    def write_state(self, next_task: int, step_ckpt: str | None = None) -> None:
        """Point ``state.json`` at the newest checkpoints, then delete the ones it no longer names."""
        self.state.timings["wall_s"] = time.perf_counter() - self.wall
        if not dist.is_main_process():
            return
        rundir.write_json(self.run_dir / rundir.STATE, self.state.to_json(next_task, step_ckpt))
        if self.save_every_task:
            checkpoint.prune(self.run_dir, [self.state.task_ckpt, step_ckpt])

    # -- one task ---------------------------------------------------------------------------------------
    def train(self, index: int, progress=None) -> None:
        from accelerate.utils import set_seed

        task, state = self.tasks[index], self.state
        set_seed(self.trainer.seed + index)  # per task, so a resumed run draws what an unbroken one would
        if self.attribution is not None:
            self.attribution.before_task(self.bare)
        self.method.before_task(index, task, self.bare)
        examples = self.method.train_examples(index, task, self.encoded[task.name])
        resume_from = None
        if index == state.first and state.step_ckpt:
            resume_from = self.run_dir / state.step_ckpt

        def save_step(step, stepper, scheduler, loop_state):
            self.write_state(index, checkpoint.save_step(self.run_dir, index, step, stepper, scheduler, loop_state))

        state.stats[task.name] = train_task(self.model, self.tokenizer, examples, self.method, self.trainer,
                                            self.accelerator, progress, task=task.name, step_offset=index * 10**6,
                                            checkpoint_every=self.every_steps, save_checkpoint=save_step,
                                            resume_from=resume_from, engine=self.engine)
        state.timings["train_s"][task.name] = state.stats[task.name]["train_s"]

    def evaluate(self, index: int) -> None:
        start = time.perf_counter()
        which = self.opts.evaluation.tasks_after(index + 1, len(self.tasks))  # conf/train.yaml: evaluation
        self.state.R.append(evaluate_all(self.bare, self.tokenizer, self.tasks, self.trainer, self.run_dir,
                                         index + 1, self.names[index], only=which))
        self._eval_time(self.names[index], time.perf_counter() - start)
        log.info("after %s: %s", self.names[index],
                 "  ".join(f"{n} {s:.3f}" for n, s in zip(self.names, self.state.R[-1]) if s is not None))

    def _eval_time(self, stage: str, seconds: float) -> None:
        """Record one evaluation stage's seconds (``eval_s``: the total; ``eval_s_by_stage``: each stage)."""
        self.state.timings["eval_s"] += seconds
        self.state.timings.setdefault("eval_s_by_stage", {})[stage] = seconds  # (older states lack the key)

    def after_task(self, index: int) -> None:
        task = self.tasks[index]
        self.method.after_task(index, task, self.bare, self.encoded[task.name])
        if self.attribution is not None and (index + 1 < len(self.tasks) or self.attribution.after_last):
            start = time.perf_counter()
            combined = self.attribution.after_task(index + 1, task.name, self.bare, self.encoded[task.name],
                                                   self.tokenizer.pad_token_id, self.run_dir)
            self.state.timings["attribution_s"][task.name] = time.perf_counter() - start
            self.method.set_importance(combined)

    def checkpoint(self, index: int) -> None:
        """After task ``index``: a task checkpoint (unless it was the last), then the resume point."""
        last = index + 1 == len(self.tasks)
        if self.save_every_task and not last:
            self.state.task_ckpt = checkpoint.save_task(self.run_dir, index + 1, self.bare, self.method,
                                                        self.attribution)
        elif not self.save_every_task:
            self.state.task_ckpt = None
        if not last:  # after the last task, "done" is written only once the results are
            self.write_state(index + 1)

    # -- the whole run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        stop = self.opts.stop_after
        with _progress(self.console) as progress:
            for index in range(self.state.first, len(self.tasks)):
                self.train(index, progress)
                self.evaluate(index)
                self.after_task(index)
                self.checkpoint(index)
                if stop and stop <= index + 1 < len(self.tasks):
                    log.info("stop_after=%d: stopping; continue with resume=true", stop)
                    s = self.state
                    return {"tasks": self.names, "R": s.R, "b": s.b, "metrics": {}, "stopped_after": index + 1}
        return self.finish()

    def finish(self) -> dict:
        """The metrics; ``results.json`` written, then ``state.json`` marked done."""
        from aglcl.metrics.cl import available

        state, method, evaluation = self.state, self.method, self.opts.evaluation
        metrics, unavailable = available(state.R, state.b, diagonal_only=method.diagonal_only)
        if evaluation.tasks != "all" or evaluation.every > 1:  # cells left out on purpose: say which setting
            unavailable = {k: f"{why} (evaluation.tasks={evaluation.tasks}, evaluation.every={evaluation.every})"
                           for k, why in unavailable.items()}
        state.timings["wall_s"] = time.perf_counter() - self.wall
        state.timings["peak_mem_mb"] = telemetry.peak_mem_mb(self.accelerator.device)
        ci = self._bootstrap() if evaluation.bootstrap and not method.diagonal_only else None
        results = {
            "tasks": self.names,
            "metric": {t.name: t.metric for t in self.tasks},
            "R": state.R,
            "b": state.b,
            "metrics": metrics,
            "ci": ci,  # {metric: [lo, hi]} over resampled test examples (aglcl.metrics.stats.bootstrap_run)
            "ci_method": (f"percentile bootstrap over each task's scored examples, the same draw at every stage, "
                          f"{evaluation.bootstrap} resamples, {evaluation.confidence:.0%}") if ci is not None else None,
            "unavailable": unavailable,  # {metric: why it is None}: a cell it needs was not scored
            "evaluation": {"tasks": evaluation.tasks, "every": evaluation.every, "split": evaluation.split},
            "train": state.stats,
            "timings": state.timings,
            "method": self.cfg.method.get("_target_"),
            "seed": self.trainer.seed,
            "tags": list(self.opts.tags),
            "diagonal_only": method.diagonal_only,  # separate single-task models: only plasticity is meaningful
            "versions": telemetry.versions(),
        }
        if dist.is_main_process():
            rundir.write_json(self.run_dir / rundir.RESULTS, results)
        self.write_state(len(self.tasks))
        if self.log_with:
            self.accelerator.log({f"metrics/{k}": v for k, v in metrics.items() if v is not None})
            self.accelerator.end_training()
        return results

    def _bootstrap(self) -> dict | None:
        """Each metric's CI over the run's test examples, from its stored per-example scores (rank 0; the
        others, which hold no predictions, get None)."""
        from aglcl.metrics.stats import bootstrap_run

        if not dist.is_main_process():
            return None
        stored = rundir.read_predictions(self.run_dir)
        scores = {s: {t: [r["score"] for r in recs] for t, recs in by.items()} for s, by in stored.items()}
        evaluation = self.opts.evaluation
        return bootstrap_run({s: v for s, v in scores.items() if s >= 1}, scores.get(0), self.names,
                             resamples=evaluation.bootstrap, confidence=evaluation.confidence,
                             seed=self.trainer.seed)

    def close(self) -> None:
        """Release the run dir and the accelerator (multirun jobs share this process)."""
        from accelerate.state import AcceleratorState

        self.lock.release()
        self.model = self.bare = self.accelerator = None
        AcceleratorState._reset_state(True)  # each job builds its own Accelerator


def run_train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run the whole sequence; returns the content of ``results.json`` (without writing the report files).

    The config is checked whole before anything is loaded (:mod:`aglcl.engine.validate`), and the run dir is
    held under an exclusive lock (:mod:`aglcl.engine.ownership`) for the whole run. Ctrl-C stops at once and
    raises :class:`aglcl.errors.RunInterrupted`, naming the checkpoint a ``resume=true`` continues from.
    """
    run = check_train_config(cfg)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    recipe = SequenceRun(cfg, Path(run_dir), run)
    try:
        return recipe.run()
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(Path(run_dir))) from None
    finally:
        recipe.close()


def interrupted_message(run_dir: Path) -> str:
    """One line after Ctrl-C: what the run dir keeps, and the command that continues it."""
    import json

    try:
        state = json.loads((run_dir / rundir.STATE).read_text())
    except (OSError, ValueError):
        return (f"interrupted before the run wrote a resume point; start it again (with overwrite=true, "
                f"hydra.run.dir={run_dir})")
    done, step = state.get("next_task", 0), state.get("step_checkpoint")
    where = (f"step {step.rsplit('_', 1)[-1]} of task {done + 1}" if step else
             f"the end of task {done}" if done else "the start of task 1" if state.get("b") is not None
             else "the start (its initial evaluation is redone)")
    if done and not step and not state.get("checkpoint"):
        return (f"interrupted; {run_dir} keeps no checkpoint (checkpoint.every_task=false), so the run cannot be "
                f"resumed; start it again with overwrite=true")
    return (f"interrupted; {run_dir} keeps its checkpoint at {where}: continue with the same command and "
            f"resume=true hydra.run.dir={run_dir}")
