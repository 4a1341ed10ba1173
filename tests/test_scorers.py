"""Per-example scorers."""

import pytest

from aglcl.errors import AglclError
from aglcl.metrics.scorers import SCORERS, accuracy, exact_match, get_scorer, normalize, rouge_l


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("  The   Answer. ", "the answer"),
        ('"Positive"', "positive"),
        ("「体育」。", "体育"),
        ("yes!\n", "Yes"),
    ],
)
def test_exact_match_normalises(prediction, reference):
    assert exact_match(prediction, reference) == 1.0
    assert accuracy(prediction, reference) == 1.0


def test_exact_match_differs():
    assert exact_match("positive", "negative") == 0.0
    assert exact_match("new york", "newyork") == 0.0
    assert normalize(" 'A  b\tC' ") == "a b c"


def test_rouge_l_english_by_hand():
    # LCS 3; P = 3/3, R = 3/6 -> F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("cat the", "the cat") == pytest.approx(0.5)  # LCS 1 of 2
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS "a c"
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)


def test_rouge_l_chinese():
    assert rouge_l("今天天气很好", "今天天气很好") == pytest.approx(1.0)
    # one character differs: LCS 5 of 6 on both sides
    assert rouge_l("今天天气很好", "今天天气不好") == pytest.approx(5 / 6)
    assert rouge_l("我爱NLP", "我爱 nlp") == pytest.approx(1.0)


def test_rouge_l_empty_prediction():
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("   ", "今天") == 0.0


def test_registry():
    assert set(SCORERS) == {"exact_match", "accuracy", "rouge_l"}
    assert get_scorer("rouge_l") is rouge_l
    with pytest.raises(AglclError, match="'accuracy', 'exact_match', 'rouge_l'") as e:
        get_scorer("bleu")
    assert "bleu" in str(e.value)
