"""One-GPU check: bf16 step time with and without AGFT's gate, peak memory, attribution pass time.

    python scripts/gpu_check.py                 # ~0.5B Llama, randomly initialised (no download), on CUDA
    python scripts/gpu_check.py --smoke         # the tiny model on CPU, seconds: checks the script itself
    python scripts/gpu_check.py --size 1b --steps 20 --out /tmp/gpu_check.json

Every row trains the same model (random init from a config, fp32 master weights, bf16 autocast through
accelerate, fused AdamW) with ``aglcl.engine.loop.train_task`` on synthetic sequences: ``seqft`` (no gate),
then AGFT in ``update`` and ``grad`` mode with a random rank-like map on every attention/MLP matrix. The
first ``--warmup`` steps of each row are timed apart (allocator and kernel warm-up). Then one attribution
pass (``GradXWeight``: estimator, then normalise + combine + store). Last, seqft and AGFT (update) under a
one-rank DeepSpeed ZeRO-2 engine (``--no-deepspeed`` skips them; needs the ``deepspeed`` extra). Prints a
table; writes JSON to --out (default: $OUT/gpu_check.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # Llama-style configs; parameter counts with a 32k vocabulary, untied head
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
    "0.5b": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=4096),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
               intermediate_size=5632),
}


def build(size: str, device: torch.device, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, **SIZES[size])
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    return model.float()


class _Tok:
    """The two attributes train_task and the estimators use."""

    pad_token_id = 0
    eos_token_id = 2


def synthetic(n: int, length: int, answer: int, vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[-answer:]})
    return out


def rank_like_map(model) -> dict[str, torch.Tensor]:
    from aglcl.attribution.params import select_params

    gen = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=gen) for n, p in select_params(model).items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def train_row(name, model, method, data, args, accelerator, device, engine=None) -> dict:
    from aglcl.engine.config import TrainerConfig
    from aglcl.engine.loop import train_task

    cfg = TrainerConfig(lr=1e-5, max_steps=args.warmup, batch_size=args.batch, grad_accum=args.accum,
                        precision=args.precision, max_length=args.length + 8, log_every=10**6,
                        scheduler="constant")
    method.before_task(1, None, model)
    train_task(model, _Tok, data, method, cfg, accelerator, task=f"{name}-warmup", engine=engine)
    reset_peak(device)
    cfg.max_steps = args.steps
    sync(device)
    start = time.perf_counter()
    stats = train_task(model, _Tok, data, method, cfg, accelerator, task=name, engine=engine)
    sync(device)
    wall = time.perf_counter() - start
    return {"row": name, "step_ms": 1000 * wall / args.steps, "tokens_per_s": stats["tokens_per_s"],
            "peak_gb": peak_gb(device), "loss": stats["loss"]}


def attribution_row(model, data, args, device) -> dict:
    from aglcl.attribution.estimators import GradXWeight
    from aglcl.attribution.pipeline import Attribution

    est = GradXWeight(num_samples=args.attr_samples, batch_size=args.batch, correct_only=False)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    raw = est(model, data, _Tok.pad_token_id)
    sync(device)
    estimate_s = time.perf_counter() - start
    pipe = Attribution(est, normalize="rank", dtype="uint8")
    pipe.estimator = lambda *a, **k: raw  # time the rest of the pipeline on the same raw map
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pipe.after_task(1, "t", model, data, _Tok.pad_token_id, Path(tmp))
        rest_s = time.perf_counter() - start
    weights = sum(t.numel() for t in raw.values())
    return {"row": "attribution", "estimate_s": estimate_s, "normalize_store_s": rest_s,
            "samples": args.attr_samples, "attributed_weights": weights, "peak_gb": peak_gb(device)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    parser.add_argument("--size", default="0.5b", choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--attr-samples", type=int, default=32)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed ZeRO-2 rows (1 rank)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.warmup, args.batch, args.length, args.attr_samples = "tiny", 3, 1, 2, 32, 4
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from aglcl.methods.agft import AGFT
    from aglcl.methods.base import Method

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.precision)
    vocab = 260 if args.size == "tiny" else 32000
    started = time.perf_counter()
    model = accelerator.prepare(build(args.size, device, vocab))  # bf16 autocast around forward, as the runner does
    params = sum(p.numel() for p in model.parameters())
    data = synthetic(max(64, args.batch * args.accum * (args.steps + args.warmup)), args.length, 8, vocab)
    maps = rank_like_map(model)
    rows = [train_row("seqft", model, Method(), data, args, accelerator, device)]
    for mode in ("update", "grad"):
        method = AGFT(lam=1.0, mode=mode, gate_dtype="bfloat16")
        method.set_importance(maps)
        rows.append(train_row(f"agft {mode}", model, method, data, args, accelerator, device))
        del method
    rows.append(attribution_row(model, data, args, device))
    base = rows[0]["step_ms"]
    for row in rows[1:3]:
        row["overhead_pct"] = 100 * (row["step_ms"] / base - 1)
    import importlib.util

    if not args.no_deepspeed and importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed (pip install -e '.[deepspeed]'): skipping the ZeRO-2 rows")
    elif not args.no_deepspeed:  # one rank: DeepSpeed's bf16 weights, its flat partition, the gate via step hooks
        from aglcl.engine.strategy import DistributedConfig

        zero2, bare = DistributedConfig(engine="deepspeed", zero_stage=2), accelerator.unwrap_model(model)
        rows.append(train_row("seqft zero2", bare, Method(), data, args, accelerator, device, engine=zero2))
        method = AGFT(lam=1.0, mode="update", gate_dtype="bfloat16")
        method.set_importance(maps)
        rows.append(train_row("agft zero2", bare, method, data, args, accelerator, device, engine=zero2))
        rows[-1]["overhead_pct"] = 100 * (rows[-1]["step_ms"] / rows[-2]["step_ms"] - 1)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "size": args.size,
              "params_m": params / 1e6, "gated_weights_m": sum(t.numel() for t in maps.values()) / 1e6,
              "batch": args.batch, "accum": args.accum, "length": args.length, "precision": args.precision,
              "torch": torch.__version__, "rows": rows, "total_s": time.perf_counter() - started}
    print(f"\n{result['device']}  {args.size} ({params / 1e6:.0f}M params, {result['gated_weights_m']:.0f}M gated), "
          f"batch {args.batch}x{args.accum} x {args.length} tokens, {args.precision}")
    print(f"{'row':<14}{'step ms':>10}{'overhead':>10}{'tok/s':>10}{'peak GB':>9}")
    for row in [r for r in rows if "step_ms" in r]:
        overhead = f"{row['overhead_pct']:+.1f}%" if "overhead_pct" in row else "-"
        print(f"{row['row']:<14}{row['step_ms']:>10.1f}{overhead:>10}{row['tokens_per_s']:>10.0f}{row['peak_gb']:>9.2f}")
    a = rows[3]
    print(f"attribution: {a['samples']} samples, estimator {a['estimate_s']:.2f} s, normalise+store "
          f"{a['normalize_store_s']:.2f} s, peak {a['peak_gb']:.2f} GB   (total {result['total_s']:.0f} s)")
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    AcceleratorState._reset_state(True)
    return result


if __name__ == "__main__":
    main()
