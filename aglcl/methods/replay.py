"""Experience replay: keep a random fraction of each finished task's training examples and mix them in.

    aglcl train method=replay                                # 10% of each task kept (TRACE); whole buffer mixed in
    aglcl train method=replay method.fraction=0.01           # SEEKR's 1%
    aglcl train method=replay method.ratio=0.2               # replayed examples are 20% of each later task's mix

After task k, ``max(1, round(fraction · n_k))`` of its n_k encoded training examples (none if fraction = 0)
are drawn without replacement with ``random.Random(seed + k)`` and added to the buffer. Task t then trains on

* ``ratio: null``: its n_t examples plus the whole buffer (TRACE's replay);
* ``ratio: r`` in [0, 1): its n_t examples plus m = round(r / (1 − r) · n_t) buffer examples, so that
  m / (n_t + m) ≈ r; they are drawn with ``random.Random(seed + t)``, without replacement while m ≤ |buffer|
  and as whole copies of the buffer plus a draw for the rest otherwise.

The buffer (a few % of the tasks' token ids) is persisted as flat int64 tensors with offsets
(:func:`pack_examples`), so resumed runs replay the same examples.
"""

from __future__ import annotations

import random

import torch

from aglcl.errors import AglclError
from aglcl.methods.base import Method

FIELDS = ("input_ids", "labels")


def pack_examples(examples: list[dict], prefix: str = "buffer.") -> dict[str, torch.Tensor]:
    """Encoded examples (dicts of equal-length int lists) as ``<prefix>input_ids``, ``<prefix>labels`` (flat int64)
    and ``<prefix>offsets`` (int64, n + 1: example i spans ``offsets[i]:offsets[i+1]``); ``{}`` when empty."""
    if not examples:
        return {}
    lengths = torch.tensor([len(ex["input_ids"]) for ex in examples], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    out = {f"{prefix}{f}": torch.tensor([t for ex in examples for t in ex[f]], dtype=torch.int64) for f in FIELDS}
    out[f"{prefix}offsets"] = offsets
    return out


def unpack_examples(state: dict, prefix: str = "buffer.") -> list[dict]:
    """The inverse of :func:`pack_examples`."""
    if f"{prefix}offsets" not in state:
        return []
    bounds = state[f"{prefix}offsets"].tolist()
    flat = {f: state[f"{prefix}{f}"].tolist() for f in FIELDS}
    return [{f: flat[f][a:b] for f in FIELDS} for a, b in zip(bounds[:-1], bounds[1:])]


class Replay(Method):
    """Train each task on its examples plus examples kept from earlier tasks."""


    def __init__(self, fraction: float = 0.1, ratio: float | None = None, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise AglclError(f"method.fraction={fraction} is invalid: must be in [0, 1]")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise AglclError(f"method.ratio={ratio} is invalid: must be in [0, 1) or null (the whole buffer)")
        self.fraction, self.ratio, self.seed = float(fraction), ratio, int(seed)
        self.buffer: list[dict] = []

    def keep_count(self, n: int) -> int:
        """How many of a task's n examples the buffer keeps: ``max(1, round(fraction · n))``, 0 if fraction = 0."""
        return 0 if self.fraction == 0 or n == 0 else min(n, max(1, round(self.fraction * n)))

    def replay_count(self, n: int) -> int:
        """Buffer examples mixed into a task of n examples."""
        if self.ratio is None:
            return len(self.buffer)
        return round(self.ratio / (1.0 - self.ratio) * n) if self.buffer else 0

    def train_examples(self, index, task, examples):
        m = self.replay_count(len(examples))
        if m == 0:
            return examples
        rng = random.Random(self.seed + index)
        copies, rest = divmod(m, len(self.buffer))
        return list(examples) + self.buffer * copies + rng.sample(self.buffer, rest)

    def after_task(self, index, task, model, data) -> None:
        rng = random.Random(self.seed + index)
        self.buffer.extend(rng.sample(list(data), self.keep_count(len(data))))

    def state_dict(self) -> dict:
        return pack_examples(self.buffer)

    def load_state_dict(self, state: dict) -> None:
        self.buffer = unpack_examples(state)
