"""Benchmark scorers against hand-computed values, answer extraction, and generation settings."""

from __future__ import annotations

import pytest
import torch

from aglcl.data.scoring import Generation, GreedyGeneration, extract_answer
from aglcl.data.tasks import Task
from aglcl.errors import AglclError
from aglcl.metrics.scorers import (
    SCORERS,
    SUITE_SCORERS,
    edit_similarity,
    exact_match_lower,
    exact_match_squad,
    exact_match_strict,
    get_scorer,
    py150_postprocess,
    rouge_l,
    rouge_l_superni,
    sari,
    sari_sentence,
    scienceqa_accuracy,
    score,
    tokenize_13a,
)


def test_exact_match_variants():
    # TRACE: the same string (outer whitespace aside), nothing else
    assert exact_match_strict(" hawkish\n", "hawkish") == 1.0
    assert exact_match_strict("Hawkish", "hawkish") == 0.0 and exact_match_strict("hawkish.", "hawkish") == 0.0
    assert exact_match_strict("", "") == 0.0  # an empty prediction never counts
    # SuperNI / O-LoRA: lowercase, ASCII punctuation removed, whitespace collapsed, articles kept
    assert exact_match_squad("  Office   Holder. ", "office holder") == 1.0
    assert exact_match_squad("the Company", "Company") == 0.0
    assert exact_match_squad("", "Company") == 0.0
    # Concept-1K: strip + lowercase only
    assert exact_match_lower(" Field of Study ", "field of study") == 1.0
    assert exact_match_lower("field of study.", "field of study") == 0.0


def test_scienceqa_accuracy():
    ref = "Answer: A\nBecause wax reduces friction."
    assert scienceqa_accuracy("Answer: A\nBecause it is slippery.", ref) == 1.0
    assert scienceqa_accuracy("Answer: B\nBecause ...", ref) == 0.0
    assert scienceqa_accuracy("A", ref) == 0.0  # no "Answer: ": a format error, scored 0
    assert scienceqa_accuracy("", ref) == 0.0


def test_edit_similarity_by_hand():
    # Indel similarity: 1 - distance / (len a + len b); "abc" -> "abd" needs 2 edits over 6 characters
    assert edit_similarity("abc", "abd") == pytest.approx(1 - 2 / 6)
    assert edit_similarity("x = 1", "x = 1") == 1.0
    assert edit_similarity("", "x = 1") == 0.0
    # TRACE's literal post-processing happens on both sides before comparing
    assert py150_postprocess("f ( <NUM_LIT:3> , '<STR_LIT>' , <NUM_LIT> , <STR_LIT:abc> )") == "f ( 3 , '' , 0 , abc )"
    assert edit_similarity("return <NUM_LIT:1>", "return 1") == 1.0


def test_rouge_l_chinese_english_and_empty():
    # LCS 3 characters of 4 on both sides
    assert rouge_l("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    assert rouge_l("", "我喜欢狗") == 0.0
    # SuperNI's ROUGE-L stems: cats ~ cat, sat == sat
    assert rouge_l_superni("The cats sat", "the cat sat") == pytest.approx(1.0)
    assert rouge_l_superni("a b", "a c") == pytest.approx(0.5)
    assert rouge_l_superni("   ", "a") == 0.0


def test_sari_published_examples():
    # Hugging Face evaluate's SARI card (the implementation TRACE calls), three references
    source = "About 95 species are currently accepted."
    refs = ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."]
    assert 100 * sari_sentence(source, "About 95 you now get in.", refs) == pytest.approx(26.953601953601954)
    assert 100 * sari_sentence(source, "About 95 species are now agreed.", refs) == pytest.approx(61.709656084656075)


def test_sari_by_hand():
    # source "a b c", output "a b", reference "a c" (see the n-gram tables below):
    #   n=1: keep P=(1+0)/2, R=1/2 -> F 0.5; deletion {c} is not good -> 0; nothing to add -> 1
    #   n=2: keep P=0 ("a b" not in ref), R=1 (nothing to keep) -> F 0; delete "b c" good -> 1; add missed "a c" -> 0
    #   n=3, n=4: nothing kept/deleted/added wrongly -> 1, 1, 1
    keep, delete, add = (0.5 + 0 + 1 + 1) / 4, (0 + 1 + 1 + 1) / 4, (1 + 0 + 1 + 1) / 4
    assert sari("a b", "a c", source="a b c") == pytest.approx((keep + delete + add) / 3)
    # a perfect edit, and an empty prediction when the reference keeps the source:
    #   keep F = 0 for n=1,2 (nothing kept) and 1 for n=3,4; deletion precision 0, 0, 1, 1; addition 1
    assert sari("a c", "a c", source="a b") == pytest.approx(1.0)
    assert sari("", "a b", source="a b") == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert tokenize_13a("Hallo, Welt. 3.5 Franken!") == "Hallo , Welt . 3.5 Franken !"


def test_score_uses_references_and_source():
    example = {"prompt": "templated", "source": "a b c", "answer": "x", "references": ["y", "a c"]}
    assert score(exact_match_squad, "A C", example) == 1.0  # best over the references
    assert score(sari, "a b", example) == pytest.approx(sari_sentence("a b c", "a b", ["y", "a c"]))  # joint refs
    assert score(exact_match_strict, "x", {"prompt": "p", "answer": "x"}) == 1.0


def test_registry_names_general_and_benchmark_scorers():
    assert set(SCORERS) == {"exact_match", "accuracy", "rouge_l"}
    assert {"exact_match_strict", "exact_match_squad", "exact_match_lower", "scienceqa_accuracy",
            "edit_similarity", "sari", "rouge_l_superni"} == set(SUITE_SCORERS)
    assert get_scorer("sari") is sari
    with pytest.raises(AglclError, match="'edit_similarity'") as e:
        get_scorer("bleu")
    assert "'rouge_l'" in str(e.value) and "\n" not in str(e.value)


def test_answer_extraction():
    assert extract_answer("  hawkish, because rates\nmore", "first_word") == "hawkish"
    assert extract_answer("支持\n因为", "first_line") == "支持"
    assert extract_answer(" Answer: B\nBecause x ", "none") == "Answer: B\nBecause x"
    assert extract_answer("The answer is 42.", "regex", r"answer is (\d+)") == "42"
    assert extract_answer("no number", "regex", r"(\d+)") == ""
    assert extract_answer("", "first_word") == ""
    with pytest.raises(AglclError, match="'first_word'"):
        Generation(extract="last_word")
    with pytest.raises(AglclError, match="scoring.pattern"):
        Generation(extract="regex")
    with pytest.raises(AglclError, match="temperature"):
        Generation(temperature=-1)


def test_generation_greedy_and_sampled_on_tiny_model():
    from aglcl.models import build_tiny

    model, tok = build_tiny(seed=3)
    model.eval()
    task = Task(name="t", template="{prompt}", answer_prefix="", metric="exact_match_strict", scoring=None)
    examples = [{"prompt": "Hello", "answer": "x"}, {"prompt": "Hi there", "answer": "y"}]
    greedy = Generation(max_new_tokens=4, extract="none")
    first, _ = greedy(model, tok, task, examples, batch_size=2, max_length=32)
    again, scores = greedy(model, tok, task, examples, batch_size=2, max_length=32)
    assert first == again and scores == [0.0, 0.0]
    torch.manual_seed(0)
    sampled, _ = Generation(max_new_tokens=4, temperature=0.1, extract="first_line")(
        model, tok, task, examples, batch_size=2, max_length=32)
    assert len(sampled) == 2 and all("\n" not in p for p in sampled)
    legacy = GreedyGeneration(max_new_tokens=4, first_line=False)
    assert (legacy.temperature, legacy.extract) == (0.0, "none")
