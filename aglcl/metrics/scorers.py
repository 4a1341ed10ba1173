"""Per-example scorers: ``scorer(prediction, reference) -> float`` in [0, 1].

Everything runs offline: ROUGE-L uses the ``rouge-score`` package directly (``evaluate.load`` fetches
scripts from the hub), with a tokenizer that makes every CJK character its own token. rouge-score's
default tokenizer drops non-ASCII text, so it scores identical Chinese strings as 0.

General scorers (``SCORERS``): ``exact_match``, ``accuracy``, ``rouge_l``. Benchmark scorers
(``SUITE_SCORERS``) reproduce each benchmark's own answer normalisation:

==================== ===================================================================================
``exact_match_strict`` TRACE (C-STANCE, FOMC, NumGLUE): the strings must be equal (surrounding whitespace
                       is ignored); an empty prediction scores 0
``exact_match_squad``  O-LoRA / SAPT / SuperNI: lowercase, drop ASCII punctuation, collapse whitespace
                       (SQuAD's normalisation without removing articles)
``exact_match_lower``  Concept-1K: strip, then compare case-insensitively
``rouge_l_superni``    SuperNI / SAPT: ROUGE-L with rouge-score's English tokenizer and Porter stemming
``scienceqa_accuracy`` TRACE ScienceQA: the character after the first ``"Answer: "`` of prediction and
                       reference must be equal; no ``"Answer: "`` in the prediction scores 0
``edit_similarity``    TRACE Py150: ``rapidfuzz.fuzz.ratio`` after TRACE's literal post-processing,
                       divided by 100 (TRACE reports 0-100)
``sari``               TRACE 20Minuten: sentence SARI as in Hugging Face ``evaluate``'s ``sari`` (which
                       TRACE calls), divided by 100; needs the source text (``needs_source``)
==================== ===================================================================================
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

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


# ----------------------------------------------------------------------------------- benchmark scorers
@functools.lru_cache(maxsize=1)
def _rouge_stemmed():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_superni(prediction: str, reference: str) -> float:
    """SuperNI's ROUGE-L: rouge-score's default (English) tokenizer with the Porter stemmer."""
    if not str(prediction).strip():
        return 0.0
    return float(_rouge_stemmed().score(str(reference), str(prediction))["rougeL"].fmeasure)


def exact_match_strict(prediction: str, reference: str) -> float:
    """TRACE's accuracy: equal strings (outer whitespace ignored); empty prediction or reference -> 0."""
    p, r = str(prediction).strip(), str(reference).strip()
    return float(bool(p) and bool(r) and p == r)


_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SuperNI / O-LoRA normalisation: lowercase, remove ASCII punctuation, collapse whitespace."""
    return " ".join("".join(ch for ch in str(text).lower() if ch not in _PUNCT).split())


def exact_match_squad(prediction: str, reference: str) -> float:
    """Exact match after :func:`squad_normalize` (articles are kept, as in SuperNI's evaluation)."""
    return float(squad_normalize(prediction) == squad_normalize(reference))


def exact_match_lower(prediction: str, reference: str) -> float:
    """Concept-1K: ``prediction.strip().lower() == reference.strip().lower()``."""
    return float(str(prediction).strip().lower() == str(reference).strip().lower())


def scienceqa_answer(text: str) -> str:
    """The one character after the first ``"Answer: "`` (TRACE's ScienceQA parser), or ``""``."""
    text = str(text)
    at = text.find("Answer: ")
    return "" if at < 0 else text[at + 8 : at + 9]


def scienceqa_accuracy(prediction: str, reference: str) -> float:
    """TRACE ScienceQA accuracy: the answer letters of prediction and reference agree (and exist)."""
    p, r = scienceqa_answer(prediction), scienceqa_answer(reference)
    return float(bool(p) and bool(r) and p == r)


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def py150_postprocess(code: str) -> str:
    """TRACE's Py150 clean-up: bare literal placeholders become ``0`` / ``""``, ``<X_LIT:v>`` becomes ``v``."""
    code = str(code).replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def edit_similarity(prediction: str, reference: str) -> float:
    """``fuzz.ratio`` of the post-processed strings / 100 (TRACE's 0-100 scale to 0-1); empty -> 0."""
    from rapidfuzz import fuzz

    p, r = py150_postprocess(prediction), py150_postprocess(reference)
    if not str(prediction) or not str(reference):
        return 0.0
    return float(fuzz.ratio(p, r)) / 100.0


# ------------------------------------------------------------------------------------------------ SARI
# mteval-v13a tokenisation (as sacreBLEU's "13a", which Hugging Face's SARI applies after lowercasing).
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)


def tokenize_13a(text: str) -> str:
    """Tokenise like mteval-v13a: split off punctuation, keep decimals together; tokens joined by spaces."""
    line = str(text).replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _sari_ngram(src: list[str], out: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n-gram order.

    Source and output counts are multiplied by the number of references so that they compare with the
    pooled reference counts. An empty operation set scores 1 (nothing to do, nothing done wrong).
    """
    k = len(refs)
    ref_all = Counter(g for ref in refs for g in ref)
    src_c = Counter({g: c * k for g, c in Counter(src).items()})
    out_c = Counter({g: c * k for g, c in Counter(out).items()})

    kept = src_c & out_c  # kept by the system
    kept_good = kept & ref_all
    kept_ref = src_c & ref_all  # kept by the references
    keep_p = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_ref.values()) if kept_ref else 1.0

    deleted = src_c - out_c
    deleted_good = deleted - ref_all
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(out_c) - set(src_c)
    added_ref = set(ref_all) - set(src_c)
    good = len(added & set(ref_all))
    add_p = good / len(added) if added else 1.0
    add_r = good / len(added_ref) if added_ref else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(source: str, prediction: str, references: list[str]) -> float:
    """SARI of one sentence in [0, 1]: the mean over n = 1..4 of keep F1, deletion precision, addition F1.

    Texts are lowercased and 13a-tokenised first. This is the variant of Hugging Face ``evaluate``
    (Xu et al. 2016 via tensor2tensor, with its two keep-score fixes), which TRACE uses for 20Minuten;
    it is not EASSE's corpus SARI.
    """
    src, out = tokenize_13a(source.lower()).split(), tokenize_13a(prediction.lower()).split()
    refs = [tokenize_13a(r.lower()).split() for r in references]
    parts = [_sari_ngram(_ngrams(src, n), _ngrams(out, n), [_ngrams(r, n) for r in refs]) for n in (1, 2, 3, 4)]
    keep, delete, add = (sum(p[i] for p in parts) / 4 for i in range(3))
    return (keep + delete + add) / 3


def sari(prediction: str, reference: str | list[str], source: str) -> float:
    """SARI (0-1) of ``prediction`` against its reference(s), given the ``source`` it simplifies."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    return sari_sentence(str(source), str(prediction), [str(r) for r in refs])


sari.needs_source = True  # the scoring strategies pass the untemplated prompt as ``source``
sari.multi_reference = True  # several references enter one SARI (not the best of single-reference scores)

SCORERS = {"exact_match": exact_match, "accuracy": accuracy, "rouge_l": rouge_l}
SUITE_SCORERS = {
    "exact_match_strict": exact_match_strict,
    "exact_match_squad": exact_match_squad,
    "exact_match_lower": exact_match_lower,
    "rouge_l_superni": rouge_l_superni,
    "scienceqa_accuracy": scienceqa_accuracy,
    "edit_similarity": edit_similarity,
    "sari": sari,
}


def get_scorer(name: str):
    """The scorer registered as ``name``; AglclError listing the valid names otherwise."""
    scorer = SCORERS.get(name) or SUITE_SCORERS.get(name)
    if scorer is None:
        raise AglclError(
            f"unknown scorer {name!r}; choose one of {choices(SCORERS)} "
            f"or a benchmark scorer: {choices(SUITE_SCORERS)}"
        )
    return scorer


def score(scorer, prediction: str, example: dict) -> float:
    """``scorer`` on one example: the best over ``example["references"]`` when there are several
    (a ``multi_reference`` scorer such as SARI takes them all at once).

    A scorer with ``needs_source`` gets ``example["source"]`` (the untemplated prompt) too.
    """
    refs = example.get("references") or [example["answer"]]
    extra = (example.get("source", example.get("prompt", "")),) if getattr(scorer, "needs_source", False) else ()
    if getattr(scorer, "multi_reference", False):
        return scorer(prediction, list(refs), *extra)
    return max(scorer(prediction, r, *extra) for r in refs)
