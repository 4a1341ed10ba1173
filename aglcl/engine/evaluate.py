"""Score every task of the sequence after a stage: one row of R, and the predictions behind it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from aglcl import dist, rundir


@contextlib.contextmanager
def scoring_precision(model, precision: str):
    """Score under ``trainer.eval_precision``: ``auto`` | ``fp32`` | ``bf16``.

    ``auto`` scores as training runs: under accelerate's autocast for ``trainer.precision=bf16`` (on this
    CPU 1.6-2.3x the examples/s of fp32, scripts/bench_scoring.py; the usual choice on GPUs too), in the
    weights' dtype for ``trainer.precision=no``. ``fp32`` and ``bf16`` force one: the training autocast
    accelerate puts on the model's ``forward`` is taken off while scoring (and put back on exit), and
    ``bf16`` adds a bf16 autocast of its own.
    """
    if precision == "auto":
        yield
        return
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if wrapped is not None and original is not None:
        model.forward = original
    try:
        if precision == "bf16":
            with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        if wrapped is not None and original is not None:
            model.forward = wrapped


def evaluate_all(model, tokenizer, tasks, cfg, run_dir: Path, stage: int, stage_name: str,
                 only: list[int] | None = None) -> list[float | None]:
    """Score the test split of every task (or of the 0-based tasks ``only``; the others' cells are None),
    under ``cfg.eval_precision``; write ``predictions/after_<stage>_<stage_name>/<task>.jsonl``."""
    model.eval()
    row: list[float | None] = [None] * len(tasks)
    with scoring_precision(model, cfg.eval_precision):
        for index, task in enumerate(tasks):
            if only is not None and index not in only:
                continue
            preds, scores = task.scoring(model, tokenizer, task, task.test, cfg.eval_batch_size, cfg.max_length)
            records = [{"prompt": ex["prompt"], "reference": ex["answer"], "prediction": p, "score": s}
                       for ex, p, s in zip(task.test, preds, scores)]
            if dist.is_main_process():
                rundir.write_predictions(run_dir, stage, stage_name, task.name, records)
            row[index] = sum(scores) / max(len(scores), 1)
    model.train()
    return row
