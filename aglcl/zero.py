"""DeepSpeed ZeRO partitions: where each parameter's elements sit in a rank's flat fp32 partition.

    torchrun --nproc_per_node 8 --no-python aglcl train distributed=deepspeed_zero2 method=agft

ZeRO (stages 2 and 3) steps a flat fp32 partition per parameter group in the engine's ``step()``.
:func:`zero2_segments` / :func:`zero3_segments` say which elements of which parameter each position of a
rank's partition holds, and :func:`build_flat` lays a per-parameter gate out on it, so AGFT can gate the
client optimizer's step (``AGFT.attach_optimizer``). Checked against hand-built layouts, and against real
ZeRO-2/3 engines (DeepSpeed's CPU accelerator, 2 processes) in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import torch

from aglcl.dist import rank, world_size
from aglcl.errors import AglclError

# A segment ``(i, p_start, p_stop, f_start)``: elements ``[p_start, p_stop)`` of flattened parameter ``i``
# sit at ``[f_start, f_start + p_stop - p_start)`` of the rank's flat partition.
Segment = tuple[int, int, int, int]


def flat_segments(numels: list[int], start: int, stop: int) -> list[Segment]:
    """Parameters flattened one after another (``numels``); the window ``[start, stop)`` of that flat
    buffer as segments, positions relative to ``start``. Padding beyond the last parameter is no segment."""
    out, offset = [], 0
    for i, n in enumerate(numels):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset, lo - start))
        offset += n
    return out


def zero2_segments(numels: list[int], world: int, rank_: int, alignment: int = 2) -> tuple[list[Segment], int]:
    """ZeRO stage 1/2: a parameter group is flattened in order and padded to a multiple of
    ``alignment * world`` elements; rank ``r`` owns the ``r``-th of ``world`` equal parts.
    Returns ``(segments, partition_size)``. ``alignment`` is DeepSpeed's ``nccl_start_alignment_factor``
    (2 by default) times 1; pass what the engine used."""
    total = sum(numels)
    unit = alignment * world
    padded = -(-total // unit) * unit
    size = padded // world
    return flat_segments(numels, rank_ * size, (rank_ + 1) * size), size


def zero3_segments(numels: list[int], world: int, rank_: int) -> tuple[list[Segment], int]:
    """ZeRO stage 3: each parameter is split on its own into ``world`` parts of ``ceil(n / world)``
    elements (the last padded); a sub-group's flat fp32 partition concatenates this rank's parts in order.
    Returns ``(segments, partition_size)``."""
    out, offset = [], 0
    for i, n in enumerate(numels):
        part = -(-n // world)
        lo, hi = min(n, rank_ * part), min(n, (rank_ + 1) * part)
        if lo < hi:
            out.append((i, lo, hi, offset))
        offset += part
    return out, offset


def build_flat(segments: list[Segment], pieces: list[torch.Tensor | None], size: int, fill: float,
               dtype=torch.float32, device=None) -> torch.Tensor:
    """A flat tensor of ``size`` laid out like a partition: ``pieces[i]`` (a per-parameter tensor, or None
    for "no gate") flattened into its segments, ``fill`` elsewhere (padding, ungated parameters)."""
    flat = torch.full((size,), fill, dtype=dtype, device=device)
    for i, p_start, p_stop, f_start in segments:
        if pieces[i] is not None:
            flat[f_start: f_start + p_stop - p_start] = pieces[i].reshape(-1)[p_start:p_stop].to(flat)
    return flat


def deepspeed_partitions(engine_optimizer) -> list[tuple[torch.Tensor, list[torch.nn.Parameter], list[Segment]]]:
    """``[(flat fp32 partition the client optimizer steps, its bit16 params in order, segments)]`` of a
    DeepSpeed ZeRO optimizer (stage 1/2: ``DeepSpeedZeroOptimizer``; stage 3: ``DeepSpeedZeroOptimizer_Stage3``).

    Reads DeepSpeed's own bookkeeping; both paths run in this repo's tests (DeepSpeed 0.19 on its CPU
    accelerator, 2 processes), where the gated weights match one process within 1e-5.
    """
    opt = engine_optimizer
    counts = getattr(opt, "partition_count", None) or world_size()  # stage 1/2: one count per group
    me = rank()
    out = []
    if hasattr(opt, "single_partition_of_fp32_groups"):  # stage 1/2
        groups = getattr(opt, "round_robin_bit16_groups", None) or opt.bit16_groups
        align = int(getattr(opt, "nccl_start_alignment_factor", 2))
        for i, (flat, params) in enumerate(zip(opt.single_partition_of_fp32_groups, groups)):
            world = int(counts[i] if isinstance(counts, (list, tuple)) else counts)
            segs, size = zero2_segments([p.numel() for p in params], world, me, align)
            if size != flat.numel():
                raise AglclError(f"DeepSpeed ZeRO partition of {flat.numel()} elements, expected {size}; "
                                 "the layout assumption does not hold for this DeepSpeed version")
            out.append((flat, list(params), segs))
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # stage 3
        world = int(counts[0] if isinstance(counts, (list, tuple)) else counts)
        for flat, params in zip(opt.fp32_partitioned_groups_flat, opt.fp16_groups):
            numels = [int(getattr(p, "ds_numel", p.numel())) for p in params]
            segs, size = zero3_segments(numels, world, me)
            if size != flat.numel():
                raise AglclError(f"DeepSpeed ZeRO-3 partition of {flat.numel()} elements, expected {size}; "
                                 "the layout assumption does not hold for this DeepSpeed version")
            out.append((flat, list(params), segs))
    else:
        raise AglclError(f"{type(opt).__name__} is not a DeepSpeed ZeRO optimizer this code knows")
    return out


def deepspeed_engine_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer behind accelerate's wrapper, or None when not under DeepSpeed."""
    inner = optimizer  # AcceleratedOptimizer -> DeepSpeedOptimizerWrapper -> ZeRO optimizer -> client optimizer
    for _ in range(4):
        if hasattr(inner, "single_partition_of_fp32_groups") or hasattr(inner, "fp32_partitioned_groups_flat"):
            return inner
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            return None
    return None
