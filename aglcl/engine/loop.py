"""Training one task: AdamW, a schedule, gradient accumulation, clipping, method hooks.

Read it top to bottom: each optimizer step accumulates ``grad_accum`` micro-batches, then calls
``method.after_backward`` exactly once (gradients are final here, so a gate never compounds),
clips, checks the loss and gradient norm are finite, steps, and calls ``method.after_step``.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import torch
from torch.utils.data import DataLoader

from aglcl.data.collate import collate, encode
from aglcl.engine.strategy import DistributedConfig
from aglcl.models.forward import lm_forward

log = logging.getLogger(__name__)


def _batches(loader):
    while True:  # cycle over epochs; the loader reshuffles each pass
        yield from loader


def _release(accelerator, *objects) -> None:
    """Forget one task's optimizer, scheduler and loader (``free_memory`` would drop the model too)."""
    for attr in ("_optimizers", "_schedulers", "_dataloaders"):
        kept = [o for o in getattr(accelerator, attr, []) if all(o is not x for x in objects)]
        setattr(accelerator, attr, kept)


def encode_split(tokenizer, examples: list[dict], answer_prefix: str, max_length: int) -> list[dict]:
    return [encode(tokenizer, ex["prompt"], answer_prefix + ex["answer"], max_length) for ex in examples]


def train_task(model, tokenizer, encoded: list[dict], method, cfg, accelerator, progress=None, *, task: str,
               step_offset: int = 0, checkpoint_every: int = 0, save_checkpoint=None, resume_from=None,
               engine=None) -> dict:
    """Train on ``encoded`` examples; returns ``{"steps", "loss", "train_s", "tokens_per_s", "skipped_steps"}``.

    ``engine`` (a :class:`~aglcl.engine.strategy.DistributedConfig`, default: accelerate's own) says who
    takes the optimizer steps (:mod:`aglcl.engine.steppers`). Every ``checkpoint_every`` optimizer steps,
    ``save_checkpoint(step, stepper, scheduler, loop_state)`` is called; ``resume_from`` (a directory such
    a call wrote) continues from there: weights, optimizer, scheduler and RNG state are restored and the
    batches already consumed are skipped, so the run goes on exactly as an unbroken one would. A
    non-finite loss or gradient norm stops the task before the step is applied (``cfg.nan_policy=stop``)
    or skips that step (``skip``).
    """
    from transformers import get_scheduler

    from aglcl.engine import checkpoint
    from aglcl.errors import AglclError

    engine = engine or DistributedConfig()
    generator = torch.Generator().manual_seed(cfg.seed + step_offset)
    loader = DataLoader(encoded, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    loader = accelerator.prepare(loader)
    # Each rank's loader holds 1/W of the batches, so with W ranks an epoch is W times fewer steps.
    steps = cfg.max_steps or max(1, math.ceil(len(loader) * cfg.epochs / cfg.grad_accum))
    params = [p for p in model.parameters() if p.requires_grad]
    fused = accelerator.device.type in ("cpu", "cuda")  # one kernel for all tensors: ~3x faster steps on CPU
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    # The scheduler stays unprepared: accelerate's wrapper steps it once per process, so with W ranks a
    # schedule would run W times too fast. It is stepped once per optimizer step below.
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    stepper = engine.stepper(model, params, optimizer, accelerator, cfg, method)
    batches = _batches(loader)
    done, tokens, last, skipped, elapsed = 0, 0, float("nan"), 0, 0.0
    running = torch.zeros((), device=accelerator.device)
    if resume_from is not None:
        stepper.load(resume_from)  # weights and optimizer state
        saved = checkpoint.load_step(resume_from, scheduler)
        stepper.load_scaler_state(saved.get("scaler"))
        done, tokens, last, skipped, elapsed = (saved[k] for k in ("step", "tokens", "last", "skipped", "train_s"))
        running.fill_(saved["running"])
        for _ in range(done * cfg.grad_accum):  # the loader's own generator replays the same order
            next(batches)
        log.info("resuming task %s at step %d/%d", task, done, steps)
    bar = progress.add_task(f"train {task}", total=steps, completed=done, loss=last, tps=0.0) if progress else None

    model.train()
    start = time.perf_counter() - elapsed
    for step in range(done + 1, steps + 1):
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            with stepper.micro(sync=micro == cfg.grad_accum - 1):
                outputs = lm_forward(stepper.model, batch)
                loss = method.loss(stepper.model, batch, outputs)
                stepper.backward(loss)
            step_loss += loss.detach() / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        if stepper.step(method, step_loss):
            running += step_loss
        elif cfg.nan_policy == "stop":
            raise AglclError(f"non-finite loss or gradient at step {step} of task '{task}' (loss "
                             f"{step_loss.item():.4g}); stopped before applying it, the run dir keeps the last "
                             f"checkpoint; lower trainer.lr, or set trainer.nan_policy=skip")
        else:
            skipped += 1
            log.warning("skipping step %d of task %s: non-finite loss %.4g or gradient", step, task,
                        step_loss.item())
        scheduler.step()
        if step % cfg.log_every == 0 or step == steps:
            window = cfg.log_every if step % cfg.log_every == 0 else (step % cfg.log_every)
            last = running.item() / window
            running.zero_()
            tps = tokens / max(time.perf_counter() - start, 1e-9)
            accelerator.log({f"train/{task}/loss": last, "train/tokens_per_s": tps}, step=step_offset + step)
            if bar is not None:
                progress.update(bar, completed=step, loss=last, tps=tps)
            else:  # non-interactive (CI, log files, multirun launchers): plain log lines
                log.info("train %s step %d/%d loss %.4f %.0f tok/s", task, step, steps, last, tps)
        if checkpoint_every and save_checkpoint is not None and step % checkpoint_every == 0:
            save_checkpoint(step, stepper, scheduler, {
                "tokens": tokens, "last": last, "skipped": skipped, "running": running.item(),
                "train_s": time.perf_counter() - start, "scaler": stepper.scaler_state()})
    train_s = time.perf_counter() - start
    stepper.close()
    if bar is not None:
        progress.update(bar, completed=steps)
    _release(accelerator, stepper.optimizer, scheduler, loader)
    return {"steps": steps, "loss": last, "train_s": train_s, "tokens_per_s": tokens / max(train_s, 1e-9),
            "skipped_steps": skipped}
