"""AGFT's gate under each multi-process engine: seconds per optimizer step with and without it.

    torchrun --nproc_per_node 2 scripts/bench_engines.py                    # CPU (gloo), a 4-layer random Llama
    torchrun --nproc_per_node 8 scripts/bench_engines.py --hidden 2048 --layers 16 --precision bf16   # a GPU node

For every engine (ddp, fsdp2, deepspeed ZeRO-2, ZeRO-3), seqft and AGFT (update mode, a random map on the
attention and MLP weights, λ = 1) train the same batches for ``--steps`` optimizer steps, in alternating rounds;
rank 0 prints the median seconds per step and the ratio AGFT / seqft (1.00 = the gate costs nothing). The
first round of every engine is a warm-up and is not counted. Times include the engine's per-task setup
(DeepSpeed builds and tears down an engine per task), amortised over the steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ENGINES = {"ddp": {"engine": "ddp"}, "fsdp2": {"engine": "fsdp2"},
           "zero2": {"engine": "deepspeed", "zero_stage": 2}, "zero3": {"engine": "deepspeed", "zero_stage": 3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="ddp,fsdp2,zero2,zero3")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds per method (plus one warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from aglcl import dist
    from aglcl.data.collate import encode
    from aglcl.engine.config import TrainerConfig
    from aglcl.engine.loop import train_task
    from aglcl.engine.strategy import DistributedConfig
    from aglcl.methods.agft import AGFT
    from aglcl.methods.seqft import SeqFT
    from aglcl.models import build_tiny

    accelerator = Accelerator(cpu=not dist.has_accelerator())
    heads = max(4, args.hidden // 64)
    cfg = TrainerConfig(max_steps=args.steps, batch_size=args.batch_size, precision=args.precision, lr=1e-4,
                        log_every=args.steps, scheduler="constant")
    rows = []
    for name in args.engines.split(","):
        spec = DistributedConfig(**ENGINES[name])
        times: dict[str, list[float]] = {"seqft": [], "agft": []}
        for round_ in range(args.rounds + 1):
            for method_name in ("seqft", "agft"):
                torch.manual_seed(0)
                model, tok = build_tiny(hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                                        num_kv_heads=heads // 2, intermediate_size=4 * args.hidden)
                data = [encode(tok, f"question {i} " + "x" * (i % 17), f" answer {i % 5}", 96) for i in range(256)]
                gen = torch.Generator().manual_seed(1)
                maps = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()
                        if n.endswith("proj.weight")}
                method = SeqFT()
                if method_name == "agft":
                    method = AGFT(lam=1.0, mode="update")
                    method.set_importance(maps)
                model = spec.place_model(model.to(accelerator.device), accelerator, args.precision)
                method.before_task(1, None, accelerator.unwrap_model(model))
                dist.barrier()
                start = time.perf_counter()
                train_task(model, tok, data, method, cfg, accelerator, task="bench", engine=spec)
                dist.barrier()
                if round_:
                    times[method_name].append((time.perf_counter() - start) / args.steps)
                del model
        seq, agft = statistics.median(times["seqft"]), statistics.median(times["agft"])
        rows.append((name, seq, agft, agft / seq))
    if dist.is_main_process():
        print(f"{dist.world_size()} processes, hidden {args.hidden}, {args.layers} layers, batch {args.batch_size}"
              f"/rank, {args.steps} steps x {args.rounds} rounds, precision {args.precision}")
        print(f"{'engine':8} {'seqft s/step':>13} {'agft s/step':>12} {'agft/seqft':>11}")
        for name, seq, agft, ratio in rows:
            print(f"{name:8} {seq:13.4f} {agft:12.4f} {ratio:11.2f}")
    AcceleratorState._reset_state(True)


if __name__ == "__main__":
    main()
