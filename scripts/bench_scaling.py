"""How a run's cost grows with the number of tasks T: the tiny model on T = 3, 6, 12 synthetic tasks.

    python scripts/bench_scaling.py                       # T = 3, 6, 12; AGFT with |g ⊙ W| attribution
    python scripts/bench_scaling.py --tasks 3,6 --steps 8 --out docs/scaling.json

Each task is a two-label classification ("Is n <word>?" with its own label pair), 24 train, 8 eval and 32
test examples. Every T runs ``aglcl train`` in this process (Hydra's compose API, as the tests do) with
``model=tiny``, then the script prints per task: training, evaluation (the stage after it, which scores every
task: the T² term) and attribution seconds, the share of wall time each takes, peak memory, and the size of
the state a run carries from task to task (the combined map; the method's checkpointed state, none for
AGFT, whose gates are rebuilt from the map: both constant in T) beside what it writes to disk per task (one
map per task, kept for reports).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = ["even", "small", "round", "prime", "odd", "large", "square", "lucky", "warm", "early", "heavy", "loud"]


def write_sequence(root: Path, T: int) -> Path:
    """A config dir with ``sequence=scaling`` over T local tasks; returns it (for ``hydra.searchpath``)."""
    conf = root / "conf" / "sequence"
    conf.mkdir(parents=True)
    lines = ["name: scaling", f"order: [{', '.join(f't{i}' for i in range(T))}]", "tasks:"]
    for i in range(T):
        word = WORDS[i % len(WORDS)]
        rows = [{"prompt": f"Is {n} {word}?", "answer": f"yes{i}" if (n * (i + 3)) % 5 < 2 else f"no{i}"}
                for n in range(64)]
        random.Random(i).shuffle(rows)
        d = root / "data" / f"t{i}"
        d.mkdir(parents=True)
        for split, part in (("train", rows[:24]), ("eval", rows[24:32]), ("test", rows[32:])):
            (d / f"{split}.json").write_text(json.dumps(part))
        lines += [f"  t{i}:", f"    source: {{_target_: aglcl.data.sources.LocalDir, path: {d}}}",
                  "    template: '{prompt} Answer:'", "    answer_prefix: ' '", "    metric: accuracy",
                  f"    labels: [yes{i}, no{i}]",
                  "    scoring: {_target_: aglcl.data.scoring.LabelLikelihood, labels: null}"]
    (conf / "scaling.yaml").write_text("\n".join(lines) + "\n")
    return root / "conf"


def run(T: int, root: Path, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from aglcl.commands.train import train
    from aglcl.paths import conf_dir

    conf, run_dir = write_sequence(root, T), root / "run"
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", f"hydra.searchpath=[file://{conf}]", "sequence=scaling",
                                          f"hydra.run.dir={run_dir}", "trainer.precision=no", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    results = train(cfg, run_dir)
    importance = run_dir / "importance"
    combined = importance / "combined.safetensors"
    checkpoint = run_dir / "checkpoint"
    last = sorted(checkpoint.iterdir())[-1] if checkpoint.is_dir() else None
    method_state = sum(p.stat().st_size for p in last.glob("method*")) if last else 0
    return {"T": T, "timings": results["timings"], "combined_map_bytes": combined.stat().st_size,
            "method_state_bytes": method_state,
            "task_maps_on_disk": len(list(importance.glob("task_*.safetensors")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="3,6,12")
    parser.add_argument("--steps", type=int, default=30, help="trainer.max_steps per task")
    parser.add_argument("--method", default="agft")
    parser.add_argument("--attribution", default="grad_x_weight")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    overrides = [f"trainer.max_steps={args.steps}", "trainer.batch_size=8", f"method={args.method}",
                 f"attribution={args.attribution}", "attribution.estimator.num_samples=8",
                 "attribution.estimator.correct_only=false"]
    rows = []
    for T in (int(t) for t in args.tasks.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(T, Path(tmp), overrides))
    print(f"tiny model, {args.steps} steps x batch 8 per task, method={args.method} attribution={args.attribution}")
    print(f"{'T':>3} {'train s/task':>12} {'eval s/stage':>12} {'last eval s':>11} {'attr s/task':>11} "
          f"{'train %':>7} {'eval %':>6} {'attr %':>6} {'wall s':>7} {'peak MiB':>8} {'map KiB':>7} "
          f"{'method KiB':>10} {'task maps':>9}")
    for r in rows:
        t = r["timings"]
        train_s, attr_s, wall = sum(t["train_s"].values()), sum(t["attribution_s"].values()), t["wall_s"]
        stages = list(t["eval_s_by_stage"].values())  # the initial model's, then one after each task
        per_stage, last = statistics.mean(stages), stages[-1]
        r["summary"] = {"train_s_per_task": train_s / r["T"], "eval_s_per_stage": per_stage, "last_eval_s": last,
                        "attribution_s_per_task": attr_s / max(len(t["attribution_s"]), 1),
                        "train_share": train_s / wall, "eval_share": t["eval_s"] / wall,
                        "attribution_share": attr_s / wall, "wall_s": wall}
        s = r["summary"]
        print(f"{r['T']:>3} {s['train_s_per_task']:>12.2f} {per_stage:>12.2f} {last:>11.2f} "
              f"{s['attribution_s_per_task']:>11.2f} {s['train_share']:>7.0%} {s['eval_share']:>6.0%} "
              f"{s['attribution_share']:>6.0%} {wall:>7.1f} {t['peak_mem_mb']:>8.0f} "
              f"{r['combined_map_bytes'] / 1024:>7.0f} {r['method_state_bytes'] / 1024:>9.0f} "
              f"{r['task_maps_on_disk']:>9}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
