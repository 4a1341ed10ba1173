"""AGFT costs: per-step overhead of the gate, attribution time, and extra memory, each against seqft.

    python scripts/bench_agft.py                       # SmolLM2-135M, bf16, 12 steps x 2 rounds
    python scripts/bench_agft.py --model tiny --steps 30

* Overhead: the same batches are trained with seqft, agft update mode and agft grad mode (random
  rank map on attention and MLP weights, λ = 1), alternating rounds; the ratio of medians is reported.
* Attribution: one pass of each estimator at its shipped defaults (conf/attribution/*.yaml), as a
  fraction of a default task's training time (trainer.max_steps steps of the same batch size).
* Memory: bytes the method keeps (gates) plus the largest per-step temporary, over the parameter bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged://smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task-steps", type=int, default=30, help="steps of a default task (trainer.max_steps)")
    parser.add_argument("--estimators", default="grad_x_weight,fisher,lrp")
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from aglcl.attribution.normalize import normalize
    from aglcl.attribution.params import select_params
    from aglcl.data.offline import OfflineTask
    from aglcl.engine.config import TrainerConfig
    from aglcl.engine.loop import encode_split, train_task
    from aglcl.methods.agft import AGFT
    from aglcl.methods.seqft import SeqFT
    from aglcl.models import build_tiny, load_causal_lm
    from aglcl.paths import conf_dir

    model, tok = build_tiny() if args.model == "tiny" else load_causal_lm(args.model)
    acc = Accelerator(mixed_precision="bf16")
    model = acc.prepare(model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    data_dir = os.path.join(os.environ.get("AGLCL_CACHE_DIR", os.path.expanduser("~/.cache/aglcl")), "data")
    task = OfflineTask("bbc_topic", data_dir)
    template = "Classify the topic of this BBC news story.\nStory: {prompt}\nTopic:"
    examples = [{"prompt": template.format(**ex), "answer": ex["answer"]} for ex in task.load("train")[:256]]
    data = encode_split(tok, examples, " ", 128)
    cfg = TrainerConfig(max_steps=args.steps, batch_size=8, log_every=args.steps)

    selected = select_params(model)
    gen = torch.Generator().manual_seed(0)
    rbar = normalize({n: torch.rand(p.shape, generator=gen) for n, p in selected.items()}, "rank")

    def make(name):
        if name == "seqft":
            return SeqFT()
        method = AGFT(lam=1.0, mode=name.split("_")[1])
        method.set_importance(rbar)
        return method

    times = {"seqft": [], "agft_update": [], "agft_grad": []}
    for _ in range(args.rounds):
        for name in times:
            model.load_state_dict(init)
            method = make(name)
            method.before_task(1, None, model)
            start = time.perf_counter()
            train_task(model, tok, data, method, cfg, acc, task="bench")
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["seqft"])
    print(f"model {args.model}: {args.steps} steps x batch 8, bf16, torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<12} median {med:7.2f} s  ({med / args.steps:.3f} s/step)  overhead {med / base - 1:+.1%}  "
              f"runs {[round(t, 2) for t in ts]}")

    method = make("agft_update")
    method.before_task(1, None, model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gate_bytes = sum(g.numel() * g.element_size() for _, g in method._gates)
    largest = max(p.numel() * 4 * 2 for p, _ in method._gates)  # denom + recovered θ_old for one tensor
    print(f"memory: params {param_bytes / 2**20:.0f} MiB, gates {gate_bytes / 2**20:.0f} MiB "
          f"({gate_bytes / param_bytes:.2f} copies), largest per-step temporary {largest / 2**20:.0f} MiB; "
          f"extra total {(gate_bytes + largest) / param_bytes:.2f} copies of the parameters")

    task_seconds = base / args.steps * args.task_steps
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for name in args.estimators.split(","):
            pipeline = instantiate(compose("train", overrides=[f"attribution={name}"]).attribution)
            pipeline.before_task(model)
            start = time.perf_counter()
            pipeline.estimator(model, data, tok.pad_token_id)
            sec = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as run_dir:  # the whole step: estimate, normalise, combine, store
                pipeline.after_task(1, "a", model, data, tok.pad_token_id, Path(run_dir))
                start = time.perf_counter()
                pipeline.after_task(2, "b", model, data, tok.pad_token_id, Path(run_dir))
                full = time.perf_counter() - start
            print(f"attribution {name:<14} estimator {sec:6.2f} s = {sec / task_seconds:.1%}, whole step "
                  f"{full:6.2f} s = {full / task_seconds:.1%} of a {args.task_steps}-step task ({task_seconds:.1f} s)")


if __name__ == "__main__":
    main()
