"""Degenerate tasks are refused before training, in one line naming the key: labels too long for
``trainer.max_length``, label sets that cannot score the test answers, templates without ``{prompt}``,
misread CSV and missing cells; and ``aglcl data validate`` reads sequences from ``hydra.searchpath``."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import make_fixture_conf, refused, run_cli
from omegaconf import OmegaConf

from aglcl.data.collate import encode_prompt
from aglcl.data.formats import CLBenchTask
from aglcl.data.scoring import GreedyGeneration, LabelLikelihood, check_scoring
from aglcl.data.sources import Files, HFDataset
from aglcl.data.tasks import Task, load_sequence, render
from aglcl.models import build_tiny

LONG = "a very long label indeed"  # 25 tokens after the answer prefix " " (byte-level tiny tokenizer), 26 with EOS
PARITY = [(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd") for n in range(12)]


def write_splits(root, train, test):
    """A LocalDir task: ``train`` and ``test`` as (prompt, answer) pairs; eval = test."""
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("eval", test), ("test", test)):
        (root / f"{split}.json").write_text(json.dumps([{"prompt": p, "answer": a} for p, a in rows]))
    return root


def sequence(tmp_path, train=PARITY[:8], test=PARITY[8:], scoring=None, **spec):
    source = {"_target_": "aglcl.data.sources.LocalDir", "path": str(write_splits(tmp_path / "parity", train, test))}
    task = {"source": source, "template": "{prompt} Answer:", "answer_prefix": " ", "metric": "accuracy",
            "scoring": scoring or {"_target_": "aglcl.data.scoring.LabelLikelihood", "labels": None}, **spec}
    return OmegaConf.create({"name": "t", "order": ["parity"], "tasks": {"parity": task}})


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=3)
    return model.eval(), tokenizer


def _task(answers=(LONG, "no")):
    return Task(name="t", template="{prompt}", answer_prefix=" ", metric="accuracy", scoring=LabelLikelihood(),
                train=[{"prompt": f"q{i}", "answer": a} for i, a in enumerate(answers)])


# ------------------------------------------------------------------------- 1. labels vs max_length
def test_check_scoring_refuses_a_label_that_leaves_no_prompt_budget(tiny):
    _, tok = tiny
    for max_length in (8, 26):
        refused(lambda m=max_length: check_scoring([_task()], tok, m), "task 't'", repr(LONG), "26 tokens",
                f"trainer.max_length={max_length}", "at least 27")
    check_scoring([_task()], tok, 27)  # one token of prompt is left: fine


def test_check_scoring_uses_the_scorers_own_labels_and_skips_generation(tiny):
    _, tok = tiny
    task = _task(answers=("yes", "no"))
    task.scoring = LabelLikelihood(labels=[LONG, "no"])
    refused(lambda: check_scoring([task], tok, 16), repr(LONG))
    task.scoring = GreedyGeneration()
    check_scoring([task], tok, 16)


def test_label_likelihood_refuses_instead_of_a_reshape_error(tiny):
    model, tok = tiny
    examples = [{"prompt": "Q:", "answer": "no"}]
    refused(lambda: LabelLikelihood()(model, tok, _task(), examples, 2, 26), "trainer.max_length=26")
    preds, _ = LabelLikelihood()(model, tok, _task(), examples, 2, 27)
    assert preds[0] in (LONG, "no")


def test_scorers_give_an_empty_prompt_a_start_token(tiny):
    model, tok = tiny  # the tiny tokenizer adds no BOS: "" encoded to no tokens and crashed both scorers
    examples = [{"prompt": "", "answer": "no"}]
    assert len(LabelLikelihood()(model, tok, _task(("yes", "no")), examples, 2, 32)[0]) == 1
    assert len(GreedyGeneration(max_new_tokens=2)(model, tok, _task(), examples, 2, 32)[0]) == 1


def test_encode_prompt_refuses_a_budget_below_one(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="budget"):
        encode_prompt(tok, "a prompt", 0)
    assert len(encode_prompt(tok, "a prompt", 1)) == 1


def test_a_sequence_with_too_long_labels_is_refused_by_check_scoring(tmp_path, tiny):
    _, tok = tiny
    tasks = load_sequence(sequence(tmp_path, labels=["even", "odd"]))
    refused(lambda: check_scoring(tasks, tok, 4), "task 'parity'", "'even'", "trainer.max_length=4")


# ------------------------------------------------------------------------------ 2. label sets
def test_all_empty_answers_are_refused(tmp_path):
    rows = [(p, "") for p, _ in PARITY]
    refused(lambda: load_sequence(sequence(tmp_path, rows[:8], rows[8:])), "every train answer of task 'parity'",
            "sequence.tasks.parity.source.answer_field")
    generation = {"_target_": "aglcl.data.scoring.GreedyGeneration"}  # whatever the scorer
    refused(lambda: load_sequence(sequence(tmp_path, rows[:8], rows[8:], scoring=generation)), "is empty")


def test_an_empty_label_is_refused(tmp_path):
    train = PARITY[:6] + [("Is 99 even or odd?", "")]
    refused(lambda: load_sequence(sequence(tmp_path, train)), "task 'parity'", "empty label ''",
            "sequence.tasks.parity.labels")
    refused(lambda: load_sequence(sequence(tmp_path, labels=["even", "odd", " "])), "empty label ' '")


def test_a_single_label_is_refused(tmp_path):
    evens = [r for r in PARITY if r[1] == "even"]
    refused(lambda: load_sequence(sequence(tmp_path, evens[:4], evens[4:])), "single label 'even'",
            "sequence.tasks.parity.labels")
    refused(lambda: load_sequence(sequence(tmp_path, evens[:4], evens[4:], labels=["even"])), "single label")


def test_an_inferred_label_set_must_cover_the_test_answers(tmp_path):
    train = [("Is 2 even or odd?", "even"), ("Is 3 even or odd?", "odd")]
    test = [("Is 5 even or odd?", "odd"), ("Is 5 maybe?", "maybe")]
    refused(lambda: load_sequence(sequence(tmp_path, train, test)), "task 'parity'", "test answer 'maybe'",
            "'even', 'odd'", "sequence.tasks.parity.labels=")
    (task,) = load_sequence(sequence(tmp_path, train, test, labels=["even", "odd", "maybe"]))
    assert task.labels == ["even", "odd", "maybe"]


def test_the_label_set_is_inferred_from_the_whole_train_split(tmp_path):
    (task,) = load_sequence(sequence(tmp_path, train_size=1), limit={"train": 1, "eval": None})
    assert len(task.train) == 1 and task.labels == ["even", "odd"]  # caps do not shrink the label set


def test_an_inferred_label_set_is_logged_once_per_task(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aglcl.data.tasks"):
        load_sequence(sequence(tmp_path))
    (record,) = [r for r in caplog.records if r.name == "aglcl.data.tasks"]
    assert record.levelno == logging.WARNING
    assert "'parity'" in record.getMessage() and "'even', 'odd'" in record.getMessage()
    assert "sequence.tasks.parity.labels" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aglcl.data.tasks"):
        load_sequence(sequence(tmp_path, labels=["even", "odd"]))
        load_sequence(sequence(tmp_path, scoring={"_target_": "aglcl.data.scoring.GreedyGeneration"}))
    assert not [r for r in caplog.records if r.name == "aglcl.data.tasks"]


def test_free_text_answers_are_not_taken_for_labels(tmp_path):
    rows = [(f"What is {n} plus one?", str(n + 1)) for n in range(240)]
    refused(lambda: load_sequence(sequence(tmp_path, rows[:200], rows[200:])), "200 of its 200 train answers",
            "free text", "aglcl.data.scoring.Generation")
    generation = {"_target_": "aglcl.data.scoring.GreedyGeneration"}
    assert load_sequence(sequence(tmp_path, rows[:200], rows[200:], scoring=generation))


@pytest.mark.parametrize(("labels", "needle"), [("even", "must be a list"), ({"a": 1}, "must be a list"),
                                                ([True, False], "quote the labels"), ([["even"]], "must be a string")])
def test_malformed_label_lists_are_refused(tmp_path, labels, needle):
    refused(lambda: load_sequence(sequence(tmp_path, labels=labels)), "sequence.tasks.parity.labels", needle)


def test_spec_and_scoring_labels_must_agree(tmp_path):
    scoring = {"_target_": "aglcl.data.scoring.LabelLikelihood", "labels": ["even", "odd", "other"]}
    refused(lambda: load_sequence(sequence(tmp_path, scoring=scoring, labels=["even", "odd"])), "differ")


# ------------------------------------------------------------------------------ 3. templates
@pytest.mark.parametrize("template", ["Answer:", "{options} Answer:"])
def test_a_template_without_prompt_is_refused(tmp_path, template):
    msg = refused(lambda: load_sequence(sequence(tmp_path, template=template)), "sequence.tasks.parity.template",
                  "{prompt}", "fields it may use: 'prompt'")
    assert "'answer'" not in msg


def test_template_errors_never_offer_the_answer(tmp_path):
    msg = refused(lambda: load_sequence(sequence(tmp_path, template="{prompt} {question}")), "{question}",
                  "fields it may use: 'prompt'")
    assert "answer" not in msg.split("fields")[1]
    msg = refused(lambda: render("{question}", {"prompt": "p", "answer": "a"}, "k"), "'prompt'")
    assert "'answer'" not in msg


@pytest.mark.parametrize(("template", "needle"), [("{} {prompt}", "positional"), ("{0}", "positional"),
                                                  ("{prompt.upper}", "attribute or index"),
                                                  ("{prompt[0]}", "attribute or index"), (None, "must be a string")])
def test_template_fields_must_be_plain_names(tmp_path, template, needle):
    refused(lambda: load_sequence(sequence(tmp_path, template=template)), "sequence.tasks.parity.template", needle)


def test_a_chat_template_that_drops_the_prompt_is_refused(tmp_path):
    refused(lambda: load_sequence(sequence(tmp_path, chat_template="{% for m in messages %}hi{% endfor %}")),
            "sequence.tasks.parity.chat_template", "never inserts the prompt")
    (task,) = load_sequence(sequence(tmp_path, chat_template="chatml"))
    assert task.test[0]["prompt"].startswith("<|im_start|>user")


def test_an_empty_prompt_is_refused(tmp_path):
    train = PARITY[:6] + [("", "odd")]
    refused(lambda: load_sequence(sequence(tmp_path, train, template="{prompt}")), "task 'parity' train example",
            "empty prompt", "sequence.tasks.parity.template")


# ------------------------------------------------------------------------------ 4. task spec siblings
@pytest.mark.parametrize(("spec", "needle"), [
    ({"answer_prefix": 1}, "sequence.tasks.parity.answer_prefix must be a string"),
    ({"metric": "acc"}, "sequence.tasks.parity.metric: unknown scorer 'acc'"),
    ({"eval_split": "dev"}, "sequence.tasks.parity.eval_split='dev' is invalid"),
    ({"scoring": None}, "sequence.tasks.parity.scoring is missing"),
    ({"source": {"_target_": "aglcl.data.sources.LocalDir", "pth": "x"}}, "sequence.tasks.parity.source cannot be built"),
    ({"source": {"_target_": "aglcl.data.sources.LocalDir", "path": "/nonexistent"}},
     "set sequence.tasks.parity.source.path"),
])
def test_bad_task_specs_name_the_full_key(tmp_path, spec, needle):
    seq = sequence(tmp_path)
    for k, v in spec.items():
        seq.tasks.parity[k] = v
    refused(lambda: load_sequence(seq), needle)


# ------------------------------------------------------------------------------ 5. sources
def test_a_semicolon_csv_names_csv_delimiter(tmp_path):
    (tmp_path / "d.csv").write_text("prompt;answer\nhi;there\n")
    refused(lambda: Files(train=tmp_path / "d.csv").load("train"), "d.csv:1", "';'-separated",
            "task.source.csv_delimiter=';'")
    (tmp_path / "d.tsv").write_text("prompt,answer\nhi,there\n")
    refused(lambda: Files(train=tmp_path / "d.tsv").load("train"), "task.source.format=csv",
            "task.source.csv_delimiter=','")
    assert Files(train=tmp_path / "d.csv", csv_delimiter=";").load("train") == [{"prompt": "hi", "answer": "there"}]


def test_a_semicolon_csv_in_a_sequence_names_the_full_key(tmp_path):
    (tmp_path / "d.csv").write_text("prompt;answer\nhi;there\nho;where\n")
    seq = sequence(tmp_path)
    seq.tasks.parity.source = {"_target_": "aglcl.data.sources.Files", "train": str(tmp_path / "d.csv"),
                               "test": str(tmp_path / "d.csv")}
    msg = refused(lambda: load_sequence(seq), "sequence.tasks.parity.source.csv_delimiter=';'")
    assert "prompt_field" not in msg


def test_a_missing_cell_names_the_file_row_and_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.csv").write_text("prompt,answer\nhi,1\nho,\nhu,0\n")  # pandas: a float column
    refused(lambda: HFDataset(str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache")).load("train"),
            str(tmp_path / "ds" / "train.csv"), "data row 2", "'answer'", "missing")


def test_a_nan_in_a_json_file_is_refused_with_the_file(tmp_path):
    task = tmp_path / "TC" / "t"
    task.mkdir(parents=True)
    (task / "labels.json").write_text('["a", "b"]')
    (task / "train.json").write_text('[{"sentence": "x", "label": NaN}]')
    refused(lambda: CLBenchTask(tmp_path, "TC", "t").load("train"), str(task / "train.json"), "item 0", "'label'",
            "NaN")


@pytest.mark.parametrize(("build", "needle"), [
    (lambda root, dist, rng: [{"prompt": "p"}][0]["confidence"], "unexpected layout (KeyError('confidence'))"),
    (lambda root, dist, rng: [{"prompt": f"p{i}", "answer": "pos"} for i in range(50)], "1 label(s)"),
])
def test_offline_package_data_of_another_layout_is_one_line(tmp_path, monkeypatch, build, needle):
    from aglcl.data import prepare

    monkeypatch.setattr(prepare, "_package_dir", lambda module, dist, pin: (tmp_path, "1.0.0"))
    monkeypatch.setitem(prepare.TASKS, "chat_topic", ("m", "chatterbot-corpus", "1.3.3", 5, 5, build))
    refused(lambda: prepare.prepare_offline(tmp_path / "out", tasks=["chat_topic"]), "'chatterbot-corpus'", needle,
            "pip install --no-deps chatterbot-corpus==1.3.3")
    assert not (tmp_path / "out" / "chat_topic").exists()


# ------------------------------------------------------------------------------ 6. data validate
@pytest.mark.integration
def test_data_validate_reads_sequences_from_the_searchpath(tmp_path):
    conf = make_fixture_conf(tmp_path)
    (conf / "sequence" / "broken.yaml").write_text(
        (conf / "sequence" / "fixture.yaml").read_text().replace("'{prompt} Answer:'", "'Answer:'", 1))
    proc = run_cli("data", "validate", "sequence=fixture", f"hydra.searchpath=[file://{conf}]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(" ok ") == 3 and "parity" in proc.stdout
    proc = run_cli("data", "validate", "sequence=broken", f"hydra.searchpath=[file://{conf}]", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "1 of 3 tasks failed" in lines[0], proc.stderr[-2000:]
    assert "does not use {prompt}" in " ".join(proc.stdout.split())
