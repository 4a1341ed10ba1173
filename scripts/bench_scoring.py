"""Scoring throughput (test examples per second): label likelihood and generation, short and long prompts,
fp32 against bf16 autocast, length-bucketed batches against the given order. One process, interleaved.

    python scripts/bench_scoring.py                   # SmolLM2-135M on bbc_topic stories, 3 rounds
    python scripts/bench_scoring.py --model tiny --rounds 5

Prompts are real BBC stories (the offline ``bbc_topic`` task) cut to about ``--short`` or ``--long`` tokens,
with the lengths spread over [0.5, 1] x that size (test sets are never all one length). For each prompt size
and scorer, every variant (precision x batching) runs once per round, in turn, after one warm-up round; the
median examples/s over rounds is printed with the ratio to the fp32 given-order variant, and the fraction of
predictions that differ from it. ``--out`` writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPLATE = "Classify the topic of this BBC news story.\nStory: {prompt}\nTopic:"


def _in_order(prompts, batch_size):
    return [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged://smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--short", type=int, default=30, help="prompt tokens, short set (upper end)")
    parser.add_argument("--long", type=int, default=150, help="prompt tokens, long set (upper end)")
    parser.add_argument("--new-tokens", type=int, default=8, help="generation: max_new_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from aglcl.data import scoring
    from aglcl.data.offline import OfflineTask
    from aglcl.data.tasks import Task
    from aglcl.engine.evaluate import scoring_precision
    from aglcl.models import build_tiny, load_causal_lm

    model, tok = build_tiny() if args.model == "tiny" else load_causal_lm(args.model)
    model.eval()
    data_dir = os.path.join(os.environ.get("AGLCL_CACHE_DIR", os.path.expanduser("~/.cache/aglcl")), "data")
    rows = OfflineTask("bbc_topic", data_dir).load("test")
    labels = sorted({r["answer"] for r in rows})
    task = Task(name="bbc_topic", template="{prompt}", answer_prefix=" ", metric="accuracy", scoring=None,
                expected_labels=labels)

    def story(i: int, tokens: int) -> str:
        """Stories i, i+1, ... joined, cut to ``tokens`` tokens (one story is often shorter than a long prompt)."""
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tok(rows[i % len(rows)]["prompt"] + " ", add_special_tokens=False).input_ids
            i += 1
        return tok.decode(ids[:tokens])

    def prompt_set(size: int) -> list[dict]:
        head = len(tok(TEMPLATE.format(prompt=""), add_special_tokens=False).input_ids)
        out = []
        for i, r in enumerate(rows[: args.examples]):
            tokens = max(4, int(size * (0.5 + 0.5 * ((i * 7919) % 97) / 96)) - head)  # spread over [0.5, 1]
            out.append({"prompt": TEMPLATE.format(prompt=story(i, tokens)), "answer": r["answer"]})
        return out

    scorers = {"labels": scoring.LabelLikelihood(labels=labels),
               "generation": scoring.Generation(max_new_tokens=args.new_tokens, extract="first_word")}
    variants = [(p, b) for p in ("fp32", "bf16") for b in ("order", "length")]
    real_by_length = scoring.by_length
    table = []
    print(f"model {args.model}, {args.examples} examples, batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds after a warm-up")
    for size_name, size in (("short", args.short), ("long", args.long)):
        examples = prompt_set(size)
        lengths = [len(tok(e["prompt"]).input_ids) for e in examples]
        for scorer_name, scorer in scorers.items():
            times = {v: [] for v in variants}
            preds = {}
            for round_ in range(args.rounds + 1):
                for precision, batching in variants:
                    scoring.by_length = real_by_length if batching == "length" else _in_order
                    torch.manual_seed(0)
                    start = time.perf_counter()
                    with scoring_precision(model, precision):
                        got, _ = scorer(model, tok, task, examples, batch_size=args.batch_size, max_length=512)
                    if round_:
                        times[(precision, batching)].append(time.perf_counter() - start)
                    preds[(precision, batching)] = got
            scoring.by_length = real_by_length
            base = statistics.median(times[("fp32", "order")])
            for v in variants:
                med = statistics.median(times[v])
                differ = sum(a != b for a, b in zip(preds[v], preds[("fp32", "order")])) / len(examples)
                row = {"prompts": size_name, "tokens": f"{min(lengths)}-{max(lengths)}", "scorer": scorer_name,
                       "precision": v[0], "batching": v[1], "examples_per_s": len(examples) / med,
                       "speedup_vs_fp32_order": base / med, "predictions_changed": differ}
                table.append(row)
                print(f"  {size_name:<5} ({row['tokens']:>7} tok) {scorer_name:<10} {v[0]} {v[1]:<6} "
                      f"{row['examples_per_s']:7.1f} ex/s   x{row['speedup_vs_fp32_order']:.2f}   "
                      f"predictions changed {differ:.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
