"""Score every task of the sequence after a stage: one row of R, and the predictions behind it."""

from __future__ import annotations

from pathlib import Path

from aglcl import dist, rundir


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
