"""Benchmark suites: format loaders on fixture files, sequences and their order presets, prompts, the
missing-data error, ``aglcl data list|validate`` and a 2-task TRACE run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aglcl.data.formats import CLBenchTask, Concept1KTask, SuperNITask, TraceTask, parse_concept1k
from aglcl.data.tasks import apply_chat_template, check_task, load_sequence, resolve_order
from aglcl.errors import AglclError
from aglcl.paths import conf_dir

SUITES = ("trace", "standard_cl", "standard_cl5", "long_sequence", "superni", "concept1k")
TRACE_TASKS = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")


def raises(fn, *needles):
    with pytest.raises(AglclError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- fixtures
def write_trace(root: Path) -> Path:
    """Every TRACE task as ``root/TRACE/<task>/{train,eval,test}.json``, a few records each."""
    answers = {"C-STANCE": ["支持", "反对", "中立"], "FOMC": ["dovish", "hawkish", "neutral"]}
    for task in TRACE_TASKS:
        labels = answers.get(task, [f"{task} answer {i}" for i in range(3)])
        rows = [{"prompt": f"{task} question {i}\nAnswer:", "answer": labels[i % 3]} for i in range(6)]
        for split, part in (("train", rows[:4]), ("eval", rows[4:5]), ("test", rows[4:])):
            dump(root / "TRACE" / task / f"{split}.json", part)
    return root


def write_clbench(root: Path, task_type="TC", name="dbpedia", labels=("Company", "Artist")) -> Path:
    folder = root / "CL_Benchmark" / task_type / name
    rows = [{"sentence": f"text {i}", "label": labels[i % len(labels)]} for i in range(4)]
    for split in ("train", "dev", "test"):
        dump(folder / f"{split}.json", rows)
    dump(folder / "labels.json", list(labels))
    return folder


def superni_task(instances, definition="Classify the sentiment."):
    return {"Definition": [definition], "Positive Examples": [{"input": "great", "output": "POS", "explanation": "x"}],
            "Negative Examples": [], "Instances": instances}


def write_superni(root: Path, name="task363_sst2_polarity_classification") -> Path:
    folder = root / "SuperNI" / name
    instances = [{"id": f"{name}-{i}", "input": f"sentence {i}", "output": ["POS" if i % 2 else "NEG"]} for i in range(4)]
    for split in ("train", "dev", "test"):
        dump(folder / f"{split}.json", superni_task(instances))
    return folder


CONCEPT_TXT = """(Web3, IsA, Internet)
Q1: What is Web3?
A1: internet
Q2: Web3 is a kind of what?
Q2: internet
(Web3, UsedFor, Apps)
Q1: What is Web3 used for?
A1: apps
Q2: What does Web3 serve?
Q2: dapps
(Kubernetes, IsA, Orchestrator)
Q1: What is Kubernetes?
A1: orchestrator
Q2: Kubernetes is what kind of tool?
Q2: orchestrator
"""


def write_concept1k(root: Path) -> Path:
    (root / "concept_1k").mkdir(parents=True, exist_ok=True)
    (root / "concept_1k" / "dataset.txt").write_text(CONCEPT_TXT, encoding="utf-8")
    dump(root / "concept_1k_task2" / "continual_config.json",
         {"NUM_TASK": 2, "NUM_CONCEPT": 2, "CONCEPT_LIST": ["Kubernetes", "Web3"], "CUR_CLASS": [[0], [1]]})
    return root


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# --------------------------------------------------------------------------------------------- loaders
def test_trace_loader_and_malformed_record(tmp_path):
    write_trace(tmp_path)
    src = TraceTask(tmp_path / "TRACE", "FOMC")
    assert src.missing() == [] and len(src.load("train")) == 4 and src.load("test")[0]["answer"] == "hawkish"
    bad = tmp_path / "TRACE" / "FOMC" / "train.json"
    dump(bad, [{"prompt": "a", "answer": "dovish"}, {"prompt": "b"}])
    raises(lambda: src.load("train"), str(bad), "item 1", "'answer'")


def test_trace_missing_names_files_place_and_source(tmp_path):
    msg = raises(lambda: TraceTask(tmp_path / "TRACE", "FOMC").load("train"),
                 "train.json", "test.json", str(tmp_path / "TRACE" / "FOMC"), "github.com/BeyonderXX/TRACE")
    assert "paths.data_root" in msg
    assert TraceTask(tmp_path / "TRACE", "FOMC").missing()


def test_clbench_loader_prompt_and_malformed_record(tmp_path):
    folder = write_clbench(tmp_path)
    src = CLBenchTask(tmp_path / "CL_Benchmark", "TC", "dbpedia")
    ex = src.load("eval")[0]  # eval reads dev.json
    assert ex["prompt"] == "text 0" and ex["answer"] == "Company" and ex["options"] == "Company, Artist"
    assert ex["instruction"].startswith("What is the topic of the following paragraph?")
    instruction_file = dump(tmp_path / "instruction_config.json",
                            {"TC": [{"instruction_type": "zero-shot", "instruction": "Topic?\n"}]})
    assert CLBenchTask(tmp_path / "CL_Benchmark", "TC", "dbpedia", str(instruction_file)).load("test")[0]["instruction"] == "Topic?\n"
    dump(folder / "train.json", [{"sentence": "ok", "label": "Artist"}, {"sentence": "no label here"}])
    raises(lambda: src.load("train"), str(folder / "train.json"), "item 1", "'label'")
    (folder / "labels.json").unlink()
    raises(lambda: src.load("test"), "labels.json", "github.com/cmnfriend/O-LoRA")
    raises(lambda: CLBenchTask(tmp_path, "XX", "y"), "'XX'", "'TC'", "'SC'")


def test_superni_loader_and_malformed_record(tmp_path):
    folder = write_superni(tmp_path)
    src = SuperNITask(tmp_path / "SuperNI", folder.name, num_pos_examples=1)
    ex = src.load("test")[1]
    assert ex["prompt"] == "sentence 1" and ex["answer"] == "POS" and ex["references"] == ["POS"]
    assert ex["definition"] == "Classify the sentiment." and ex["examples"].startswith("Positive Example 1 -\nInput: great")
    bad = superni_task([{"id": "x", "input": "fine", "output": ["NEG"]}, {"id": "y", "input": "broken"}])
    dump(folder / "train.json", bad)
    raises(lambda: src.load("train"), "Instances item 1", "'output'")
    dump(folder / "train.json", {"Instances": []})
    raises(lambda: src.load("train"), "'Definition'")
    raises(lambda: SuperNITask(tmp_path / "SuperNI", "task999_none").load("train"), "train.json", "circle-hit/SAPT")


def test_concept1k_from_released_text_and_config(tmp_path):
    write_concept1k(tmp_path)
    instances, skipped = parse_concept1k(tmp_path / "concept_1k" / "dataset.txt")
    assert len(instances) == 2 and skipped == 1  # the (Web3, UsedFor) answers differ: skipped, as upstream
    first, second = Concept1KTask(tmp_path, 0, num_tasks=2), Concept1KTask(tmp_path, 1, num_tasks=2)
    assert first.load("train") == [{"prompt": "What is Kubernetes?", "answer": "orchestrator"}]
    assert second.load("test") == [{"prompt": "Web3 is a kind of what?", "answer": "internet"}]
    raises(lambda: Concept1KTask(tmp_path, 5, num_tasks=2).load("train"), "task=5")


def test_concept1k_processed_layout_and_malformed_line(tmp_path):
    data = {"0": {s: {"input": [f"q {s}"], "target": [f"a {s}"]} for s in ("train", "dev", "test")}}
    dump(tmp_path / "concept_1k_task1" / "continual_data.json", data)
    assert Concept1KTask(tmp_path, 0, num_tasks=1).load("eval") == [{"prompt": "q dev", "answer": "a dev"}]
    write_concept1k(tmp_path)
    txt = tmp_path / "concept_1k" / "dataset.txt"
    txt.write_text(CONCEPT_TXT.replace("A1: apps", "Answer one: apps"), encoding="utf-8")
    raises(lambda: parse_concept1k(txt), f"{txt}:8", "unrecognised line")
    raises(lambda: Concept1KTask(tmp_path / "none", 0).load("train"), "dataset.txt", "continual_config.json",
           "zzz47zzz/codebase-for-incremental-learning-with-llm")


# ------------------------------------------------------------------------------------------- sequences
@pytest.mark.parametrize("suite", SUITES)
def test_sequence_composes_and_every_order_resolves(suite):
    cfg = _compose(f"sequence={suite}")
    seq = cfg.sequence
    assert seq.orders and seq.order in seq.orders
    for preset, tasks in seq.orders.items():
        order = resolve_order(_compose(f"sequence={suite}", f"order={preset}").sequence)
        assert order == list(tasks) and set(order) <= set(seq.tasks), preset
    for name, spec in seq.tasks.items():
        resolved = OmegaConf.to_container(spec, resolve=True)  # every interpolation resolves
        assert resolved["source"]["_target_"].startswith("aglcl.data.formats."), name


def test_published_orders():
    trace = _compose("sequence=trace").sequence.orders
    assert list(trace.order2) == ["NumGLUE-cm", "NumGLUE-ds", "FOMC", "20Minuten", "C-STANCE", "Py150",
                                  "MeetingBank", "ScienceQA"]
    std = _compose("sequence=standard_cl").sequence.orders
    assert [list(std[k]) for k in ("order1", "order2", "order3")] == [
        ["dbpedia", "amazon", "yahoo", "agnews"], ["dbpedia", "amazon", "agnews", "yahoo"],
        ["yahoo", "amazon", "agnews", "dbpedia"]]
    long = _compose("sequence=long_sequence").sequence.orders
    assert list(long.order4)[:4] == ["mnli", "cb", "wic", "copa"] and list(long.order6)[-3:] == ["multirc", "boolq", "wic"]
    superni = _compose("sequence=superni").sequence.orders
    assert superni.order1[0] == "task1572_samsum_summary" and superni.order2[0] == "task748_glucose_reverse_cause_event_detection"
    assert sorted(superni.order1) == sorted(superni.order2) and len(superni.order2) == 15


def test_order_errors_are_one_line():
    raises(lambda: resolve_order(_compose("sequence=standard_cl", "order=order9").sequence),
           "'order9'", "'order1'", "'order2'", "'order3'")
    raises(lambda: resolve_order(_compose("sequence=offline", "order=order2").sequence), "no order presets")
    assert resolve_order(_compose("sequence=trace", "sequence.order=[FOMC,Py150]").sequence) == ["FOMC", "Py150"]


def test_prompts_follow_the_published_templates(tmp_path):
    write_clbench(tmp_path)
    write_superni(tmp_path)
    write_concept1k(tmp_path)
    root = f"paths.data_root={tmp_path}"
    [dbpedia] = load_sequence(_compose("sequence=standard_cl", root, "sequence.order=[dbpedia]").sequence)
    assert dbpedia.test[0]["prompt"] == ("What is the topic of the following paragraph? Choose one from the option.\n"
                                         "Option: Company, Artist \ntext 0\nAnswer:")
    assert dbpedia.labels == ["Company", "Artist"] and dbpedia.test[0]["source"] == "text 0"  # labels.json
    [sst2] = load_sequence(_compose("sequence=superni", root, "sequence.order=[task363_sst2_polarity_classification]").sequence)
    assert sst2.test[0]["prompt"] == ("Definition: Classify the sentiment.\n\nNow complete the following example -\n"
                                      "Input: sentence 0\nOutput: ")
    [c1k] = load_sequence(_compose("sequence=concept1k", root, "sequence.num_tasks=2", "sequence.order=[concept_01]").sequence)
    assert c1k.train[0]["prompt"] == "Question: What is Kubernetes?\n Short Answer:" and c1k.answer_prefix == " "
    [chat] = load_sequence(_compose("sequence=standard_cl", root, "sequence.order=[dbpedia]",
                                    "sequence.chat_template=chatml").sequence)
    assert chat.test[0]["prompt"].startswith("<|im_start|>user\nWhat is the topic") and chat.test[0]["prompt"].endswith(
        "Answer:<|im_end|>\n<|im_start|>assistant\n")


def test_chat_templates():
    assert apply_chat_template(None, "hi", "k") == "hi"
    assert apply_chat_template("llama2", "hi", "k") == "[INST] hi [/INST]"
    jinja = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
    assert apply_chat_template(jinja, "hi {x}", "k") == "<user>hi {x}<bot>"
    raises(lambda: apply_chat_template("vicuna", "hi", "sequence.tasks.t"), "'vicuna'", "'chatml'", "'llama3'")


def test_trace_subsampling_and_check_task(tmp_path):
    write_trace(tmp_path)
    seq = _compose("sequence=trace", f"paths.data_root={tmp_path}", "sequence.train_size=2", "sequence.eval_size=1",
                   "sequence.order=[FOMC]").sequence
    [fomc] = load_sequence(seq)
    assert len(fomc.train) == 2 and len(fomc.test) == 1 and fomc.labels == ["dovish", "hawkish", "neutral"]
    row = check_task("FOMC", seq.tasks.FOMC, load=True)
    assert row["problems"] == [] and row["counts"] == {"train": 4, "test": 2} and row["labels"] == 3
    dump(tmp_path / "TRACE" / "FOMC" / "test.json", [{"prompt": "p", "answer": "bullish"}])
    row = check_task("FOMC", seq.tasks.FOMC, load=True)
    assert "outside the label set" in row["problems"][0] and "'bullish'" in row["problems"][0]


# ------------------------------------------------------------------------------------------------- CLI
@pytest.mark.integration
def test_data_list_and_validate_cli(tmp_path):
    write_trace(tmp_path / "data")
    proc = run_cli("data", "list", f"paths.data_root={tmp_path / 'data'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "8/8" in proc.stdout and "0/4" in proc.stdout and "O-LoRA" in proc.stdout
    proc = run_cli("data", "validate", "suite=trace", f"paths.data_root={tmp_path / 'data'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" ok ") == 8


@pytest.mark.integration
def test_missing_data_is_one_line_error(tmp_path):
    proc = run_cli("train", "model=tiny", "sequence=trace", f"paths.data_root={tmp_path / 'nowhere'}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in ("train.json", "test.json", str(tmp_path / "nowhere" / "TRACE" / "C-STANCE"), "BeyonderXX/TRACE"):
        assert needle in lines[0], (needle, lines[0])


def test_train_sequence_trace_two_tasks_on_tiny(tmp_path):
    from aglcl.commands.train import train

    write_trace(tmp_path / "data")
    run = tmp_path / "run"
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", "sequence=trace", "method=seqft", "attribution=none",
                                          f"paths.data_root={tmp_path / 'data'}", "sequence.order=[C-STANCE,FOMC]",
                                          "trainer.max_steps=2", "trainer.batch_size=4", "trainer.precision=no"])
    results = train(cfg, run)
    assert results["tasks"] == ["C-STANCE", "FOMC"] and len(results["R"]) == 2 and len(results["R"][0]) == 2
    assert results["metric"] == {"C-STANCE": "exact_match_strict", "FOMC": "exact_match_strict"}
    assert (run / "predictions").is_dir() and (run / "R.csv").is_file()
