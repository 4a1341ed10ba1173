"""Attention kernels on this machine: ``eager`` against ``sdpa`` for training steps and for scoring.

    python scripts/bench_attention.py                          # SmolLM2-135M, bf16, lengths 64 and 128 (the packaged data holds few longer examples)
    python scripts/bench_attention.py --lengths 128 --rounds 3

``model.attn_implementation=auto`` picks ``eager`` on a CPU from these figures. For each length, every
example is cut to exactly that many tokens, and the two kernels alternate round by round in one process
(sdpa, eager, sdpa, eager, ... after a warm-up): the per-round ratio eager / sdpa is reported as its median
with min and max (< 1: eager is faster). Training: ``--steps`` seqft steps of batch 8 (bf16 autocast, fused
AdamW). Scoring: label likelihood over 5 labels (batch 16) on the same prompts, under the same autocast.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged://smollm2-135m-instruct")
    parser.add_argument("--lengths", default="64,128")
    parser.add_argument("--steps", type=int, default=3, help="training steps per kernel per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds after one warm-up")
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator

    from aglcl.data.scoring import label_logprobs
    from aglcl.engine.config import TrainerConfig
    from aglcl.engine.loop import train_task
    from aglcl.methods.seqft import SeqFT
    from aglcl.models import build_tiny, load_causal_lm

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train_throughput import examples  # examples cut to exactly one length

    model, tok = build_tiny() if args.model == "tiny" else load_causal_lm(args.model)
    acc = Accelerator(mixed_precision="bf16")
    model = acc.prepare(model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    labels = [tok.encode(" " + w, add_special_tokens=False) + [tok.eos_token_id]
              for w in ("business", "entertainment", "politics", "sport", "tech")]
    print(f"model {args.model}, bf16 autocast, torch threads {torch.get_num_threads()}; ratio eager / sdpa per "
          f"round (median, min, max) over {args.rounds} rounds")
    for length in map(int, args.lengths.split(",")):
        data = examples(tok, length, 8 * args.steps)
        prompts = [ex["input_ids"][: length - 2] for ex in data[:16]]
        cfg = TrainerConfig(max_steps=args.steps, batch_size=8, log_every=args.steps)
        times = {kind: {"sdpa": [], "eager": []} for kind in ("train", "score")}
        for round_ in range(args.rounds + 1):
            for impl in ("sdpa", "eager"):
                model.config._attn_implementation = impl
                model.load_state_dict(init)
                start = time.perf_counter()
                train_task(model, tok, data, SeqFT(), cfg, acc, task="bench")
                mid = time.perf_counter()
                model.eval()
                with torch.no_grad():
                    label_logprobs(model, tok.pad_token_id, prompts, labels)
                end = time.perf_counter()
                model.train()
                if round_:
                    times["train"][impl].append((mid - start) / args.steps)
                    times["score"][impl].append(end - mid)
        for kind, by in times.items():
            ratios = [e / s for e, s in zip(by["eager"], by["sdpa"])]
            unit = "s/step" if kind == "train" else "s per 16 prompts"
            print(f"  {length:4d} tokens  {kind:<5}  sdpa {statistics.median(by['sdpa']):.3f} {unit}, eager "
                  f"{statistics.median(by['eager']):.3f}; eager/sdpa median {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
