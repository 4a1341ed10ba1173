"""Training throughput: aglcl's loop vs. transformers' Trainer, same model, data, batch and precision.

    python scripts/bench_train_throughput.py                      # SmolLM2-135M, bf16, 20 steps x 2 rounds
    python scripts/bench_train_throughput.py --model tiny --steps 50

Every example is cut to exactly --seq-len tokens, so both loops see identical batch shapes. The two
loops alternate (ours, Trainer, ours, Trainer, ...) and the ratio of the medians is reported:
ratio > 1 means aglcl is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load(model_name: str):
    from aglcl.models import build_tiny, load_causal_lm

    return build_tiny() if model_name == "tiny" else load_causal_lm(model_name)


def examples(tokenizer, seq_len: int, n: int) -> list[dict]:
    from aglcl.data.collate import encode
    from aglcl.data.offline import OfflineTask
    from aglcl.paths import conf_dir  # noqa: F401  (ensures the package is importable)

    data_dir = os.path.join(os.environ.get("AGLCL_CACHE_DIR", os.path.expanduser("~/.cache/aglcl")), "data")
    rows = OfflineTask("bbc_topic", data_dir).load("train")
    out = []
    for r in rows:
        # repeat the story so that every example overflows seq_len and is cut to exactly seq_len tokens
        enc = encode(tokenizer, ("Story: " + r["prompt"] + " ") * 4 + "\nTopic:", " " + r["answer"], seq_len)
        if len(enc["input_ids"]) == seq_len:
            out.append(enc)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} examples reach {seq_len} tokens; lower --seq-len")


def run_ours(model, tokenizer, data, args) -> float:
    from accelerate import Accelerator

    from aglcl.engine.config import TrainerConfig
    from aglcl.engine.loop import train_task
    from aglcl.methods.seqft import SeqFT

    cfg = TrainerConfig(lr=5e-5, max_steps=args.steps, batch_size=args.batch_size, precision=args.precision,
                        log_every=args.steps, max_grad_norm=1.0, scheduler="linear")
    acc = Accelerator(mixed_precision=args.precision)
    model = acc.prepare(model)
    start = time.perf_counter()
    train_task(model, tokenizer, data, SeqFT(), cfg, acc, None, task="bench")
    return time.perf_counter() - start


def run_trainer(model, tokenizer, data, args) -> float:
    from functools import partial

    from transformers import Trainer, TrainingArguments

    from aglcl.data.collate import collate

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                  learning_rate=5e-5, lr_scheduler_type="linear", max_grad_norm=1.0,
                                  bf16=args.precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                                  logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                                  remove_unused_columns=False, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data,
                          data_collator=partial(collate, pad_id=tokenizer.pad_token_id))
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged://smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    args = parser.parse_args()

    import torch
    from accelerate.state import AcceleratorState

    model, tokenizer = load(args.model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    data = examples(tokenizer, args.seq_len, args.steps * args.batch_size)
    times = {"aglcl": [], "hf_trainer": []}
    for _ in range(args.rounds):
        for name, fn in (("aglcl", run_ours), ("hf_trainer", run_trainer)):
            model.load_state_dict(init)
            torch.manual_seed(0)
            times[name].append(fn(model, tokenizer, data, args))
            AcceleratorState._reset_state(True)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"model {args.model}, {args.steps} steps x batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.precision}, torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<11} median {med:7.2f} s  {tokens / med:8.0f} tok/s  runs {[round(t, 2) for t in ts]}")
    ratio = statistics.median(times["hf_trainer"]) / statistics.median(times["aglcl"])
    print(f"throughput ratio aglcl / HF Trainer = {ratio:.3f}")


if __name__ == "__main__":
    main()
