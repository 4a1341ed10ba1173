"""Rank normalisation of a whole importance map: the O(n) rank against the exact sort, in one process.

    python scripts/bench_rank.py                 # SmolLM2-135M's gated shapes (attn + mlp, 30 blocks, 106 M weights)
    python scripts/bench_rank.py --blocks 4      # a smaller map

The map is synthetic and heavy-tailed (log-normal, with a block of exact zeros per tensor), shaped like the
weights AGFT gates. Both normalisers run on the same map, alternating, ``--rounds`` times; the script prints
the median seconds of each, their ratio (exact / fast), and the largest |fast − exact| over all weights
(the uint8 store's resolution is 1/255).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aglcl.attribution.normalize import normalize

# (rows, cols) of the gated weights of one SmolLM2-135M block: q, k, v, o, gate, up, down
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    maps = {}
    for b in range(args.blocks):
        for i, shape in enumerate(SHAPES):
            t = torch.randn(shape, generator=g).mul_(2).exp_()
            t.view(-1)[: t.numel() // 10] = 0  # exact zeros, as unused rows give
            maps[f"model.layers.{b}.w{i}.weight"] = t
    n = sum(t.numel() for t in maps.values())
    times = {"exact": [], "fast": []}
    outs = {}
    for _ in range(args.rounds):
        for kind in ("exact", "fast"):
            start = time.perf_counter()
            outs[kind] = normalize(maps, "rank", "tensor", exact=kind == "exact")
            times[kind].append(time.perf_counter() - start)
    err = max(float((outs["exact"][k] - outs["fast"][k]).abs().max()) for k in maps)
    exact, fast = statistics.median(times["exact"]), statistics.median(times["fast"])
    print(f"{len(maps)} tensors, {n / 1e6:.1f} M weights, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"exact sort   median {exact:.2f} s  (min {min(times['exact']):.2f}, max {max(times['exact']):.2f})")
    print(f"O(n) rank    median {fast:.2f} s  (min {min(times['fast']):.2f}, max {max(times['fast']):.2f})")
    print(f"ratio exact / fast: {exact / fast:.2f}")
    print(f"max |fast - exact| over all weights: {err:.5f}  (1/255 = {1 / 255:.5f})")


if __name__ == "__main__":
    main()
