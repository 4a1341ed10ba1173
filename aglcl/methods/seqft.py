"""Sequential fine-tuning: train on each task in turn with no protection (the lower bound).

    aglcl train method=seqft
"""

from aglcl.methods.base import Method


class SeqFT(Method):
    """Every hook is the base no-op."""

