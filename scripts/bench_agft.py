"""AGFT costs: per-step overhead of the gate, attribution time, and extra memory, each against seqft.

    python scripts/bench_agft.py                       # SmolLM2-135M, bf16: 9 interleaved pairs of 3 steps
    python scripts/bench_agft.py --model tiny --pairs 15

* Overhead: the same batches are trained with seqft and agft (update mode, then grad mode; random rank map on
  attention and MLP weights, λ = 1), interleaved after a warm-up: A B C A B C ... for ``--pairs`` rounds of
  ``--steps`` steps. Each round gives a ratio agft / seqft; the median ratio is reported with its min and max
  (interleaving cancels the drift a shared machine adds between whole runs).
* The gate alone: update mode's ``after_step`` on a real AdamW state, timed by itself (median), as a share of
  a seqft step: the overhead without the whole-step noise around it.
* The gate's traffic: bytes the update gate reads and writes per step (gates, weights, Adam state) and what
  that costs at this machine's measured copy bandwidth: the physical floor of the overhead.
* Attribution: one pass of each estimator at its shipped defaults (conf/attribution/*.yaml), as a
  fraction of a default task's training time (trainer.max_steps steps of the same batch size), and as a
  multiple of one plain training backward (all weights, the training loss) on each of its micro-batches.
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
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per method per round")
    parser.add_argument("--pairs", type=int, default=9, help="interleaved rounds after one warm-up round")
    parser.add_argument("--task-steps", type=int, default=30, help="steps of a default task (trainer.max_steps)")
    parser.add_argument("--estimators", default="lrp,grad_x_weight,fisher,mas,integrated_gradients")
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

    model, tok = build_tiny() if args.model == "tiny" else load_causal_lm(args.model, attn_implementation="auto")
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
    for round_ in range(args.pairs + 1):  # round 0 warms up (allocator, kernels) and is not counted
        for name in times:
            model.load_state_dict(init)
            method = make(name)
            method.before_task(1, None, model)
            start = time.perf_counter()
            train_task(model, tok, data, method, cfg, acc, task="bench")
            if round_:
                times[name].append(time.perf_counter() - start)
    print(f"model {args.model}: {args.pairs} interleaved rounds of {args.steps} steps x batch 8, bf16, "
          f"torch threads {torch.get_num_threads()}")
    base = statistics.median(times["seqft"])
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["seqft"])]
        print(f"  {name:<12} median {statistics.median(ts) / args.steps:.3f} s/step   agft/seqft per round: median "
              f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")

    method = make("agft_update")
    method.before_task(1, None, model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gate_bytes = sum(g.numel() * g.element_size() for _, g in method._gates)
    largest = max(p.numel() * 4 * 2 for p, _ in method._gates)  # denom + recovered θ_old for one tensor
    # the gate's own time: AGFT's after_step on AdamW state, timed alone (no whole-step noise around it)
    gated_params = [p for p, _ in method._gates]
    adamw = torch.optim.AdamW(gated_params, lr=1e-5)
    for p in gated_params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    adamw.step()
    for p in gated_params:
        p.grad = None
    gate_times = []
    for _ in range(args.pairs + 1):
        start = time.perf_counter()
        method.after_step(model, adamw)
        gate_times.append(time.perf_counter() - start)
    gate_s = statistics.median(gate_times[1:])
    print(f"gate alone (update mode, after_step on AdamW state, median of {args.pairs}): {gate_s * 1e3:.0f} ms "
          f"= {gate_s / (base / args.steps):.1%} of a seqft step")
    gated = sum(p.numel() for p, _ in method._gates)
    # update mode per step: read the gate, read m, v and θ to recover the step, write θ (fp32 weights and state)
    traffic = gate_bytes + gated * 4 * 4
    src, dst = torch.ones(64 * 2**20 // 4), torch.empty(64 * 2**20 // 4)  # 64 MiB each: past the caches
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    bandwidth = 10 * 2 * src.numel() * 4 / (time.perf_counter() - start)  # bytes read + written per second
    print(f"gate traffic: {traffic / 2**20:.0f} MiB per step (gates + fp32 θ, m, v read and θ written); at the "
          f"measured copy bandwidth {bandwidth / 2**30:.1f} GiB/s that is {traffic / bandwidth * 1e3:.0f} ms, "
          f"{traffic / bandwidth / (base / args.steps):.1%} of a seqft step")
    print(f"memory: params {param_bytes / 2**20:.0f} MiB, gates {gate_bytes / 2**20:.0f} MiB "
          f"({gate_bytes / param_bytes:.2f} copies), largest per-step temporary {largest / 2**20:.0f} MiB; "
          f"extra total {(gate_bytes + largest) / param_bytes:.2f} copies of the parameters")

    task_seconds = base / args.steps * args.task_steps
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for name in args.estimators.split(","):
            pipeline = instantiate(compose("train", overrides=[f"attribution={name}"]).attribution)
            est = pipeline.estimator
            pipeline.before_task(model)
            start = time.perf_counter()
            est(model, data, tok.pad_token_id)
            sec = time.perf_counter() - start
            fwd, bwd = plain_passes(model, data, est, tok.pad_token_id)
            with tempfile.TemporaryDirectory() as run_dir:  # the whole step: estimate, normalise, combine, store
                pipeline.after_task(1, "a", model, data, tok.pad_token_id, Path(run_dir))
                start = time.perf_counter()
                pipeline.after_task(2, "b", model, data, tok.pad_token_id, Path(run_dir))
                full = time.perf_counter() - start
            print(f"attribution {name:<20} estimator {sec:6.2f} s = {sec / task_seconds:.1%}, whole step "
                  f"{full:6.2f} s = {full / task_seconds:.1%} of a {args.task_steps}-step task ({task_seconds:.1f} s); "
                  f"= {sec / bwd:.2f}x the plain training backward of its {est.num_samples // est.batch_size} "
                  f"micro-batches ({bwd:.2f} s; with their forward {sec / (fwd + bwd):.2f}x)")


def plain_passes(model, data, est, pad_id) -> tuple[float, float]:
    """Seconds of a plain training forward and backward (all weights, the training loss) over the
    micro-batches the estimator draws (its seed, num_samples and batch_size), one backward per micro-batch."""
    import random

    from aglcl.data.collate import collate
    from aglcl.models.forward import lm_forward

    order = list(range(len(data)))
    random.Random(est.seed).shuffle(order)
    chosen = [data[i] for i in order[: est.num_samples]]
    fwd = bwd = 0.0
    model.train()
    for i in range(0, len(chosen), est.batch_size):
        batch = collate(chosen[i: i + est.batch_size], pad_id)
        start = time.perf_counter()
        loss = lm_forward(model, batch).loss
        mid = time.perf_counter()
        loss.backward()
        bwd += time.perf_counter() - mid
        fwd += mid - start
        model.zero_grad(set_to_none=True)
    return fwd, bwd


if __name__ == "__main__":
    main()
