"""Per-example scorers: ``scorer(prediction, reference) -> float`` in [0, 1].

Everything runs offline: ROUGE-L uses the ``rouge-score`` package directly (``evaluate.load`` fetches
scripts from the hub), with a tokenizer that makes every CJK character its own token. rouge-score's
default tokenizer drops non-ASCII text, so it scores identical Chinese strings as 0.
"""

from __future__ import annotations

import functools
import re
import string

from aglcl.errors import AglclError, choices

# Punctuation and quotes stripped from both ends before exact matching (ASCII plus common CJK/typographic).
_EDGE = string.punctuation + string.whitespace + "“”‘’«»「」『』《》〈〉【】（）。，、！？；：…·"
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f]")
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Lowercase, strip surrounding whitespace/punctuation/quotes, collapse inner whitespace."""
    return " ".join(str(text).lower().strip(_EDGE).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised prediction equals the normalised reference, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def accuracy(prediction: str, reference: str) -> float:
    """Label accuracy: the same as :func:`exact_match`."""
    return exact_match(prediction, reference)


class CJKTokenizer:
    """Lowercase; each CJK character is one token, other text splits on non-word characters."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(_CJK.sub(r" \g<0> ", str(text).lower()))


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=CJKTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (LCS-based) between prediction and reference; empty prediction -> 0.0."""
    if not str(prediction).strip():
        return 0.0
    return float(_rouge().score(str(reference), str(prediction))["rougeL"].fmeasure)


SCORERS = {"exact_match": exact_match, "accuracy": accuracy, "rouge_l": rouge_l}


def get_scorer(name: str):
    """The scorer registered as ``name``; AglclError listing the valid names otherwise."""
    try:
        return SCORERS[name]
    except KeyError:
        raise AglclError(f"unknown scorer {name!r}; choose one of {choices(SCORERS)}") from None
