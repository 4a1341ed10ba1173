"""Data validation in load_sequence: label sets, split sizes, templates (one-line errors naming the key)."""

from __future__ import annotations

import pytest
from conftest import TASKS, write_task_dir
from omegaconf import OmegaConf

from aglcl.data.tasks import load_sequence
from aglcl.errors import AglclError


def _sequence(root, **spec):
    path = write_task_dir(root, "parity", TASKS["parity"])
    task = {"source": {"_target_": "aglcl.data.sources.LocalDir", "path": str(path)}, "template": "{prompt}",
            "scoring": {"_target_": "aglcl.data.scoring.LabelLikelihood", "labels": None}, **spec}
    return OmegaConf.create({"name": "t", "order": ["parity"], "tasks": {"parity": task}})


def test_declared_labels_accept_the_data(tmp_path):
    (task,) = load_sequence(_sequence(tmp_path, labels=["even", "odd"]))
    assert task.labels == ["even", "odd"]


@pytest.mark.parametrize("where", ["labels", "scoring"])
def test_an_answer_outside_the_label_set_is_refused(tmp_path, where):
    spec = ({"labels": ["even", "uneven"]} if where == "labels" else
            {"scoring": {"_target_": "aglcl.data.scoring.LabelLikelihood", "labels": ["even", "uneven"]}})
    with pytest.raises(AglclError, match=r"task 'parity' train example \d+ has answer 'odd'.*'even', 'uneven'"):
        load_sequence(_sequence(tmp_path, **spec))


@pytest.mark.parametrize(("key", "value"), [("train_size", -1), ("eval_size", 0), ("train_size", 2.5)])
def test_bad_split_sizes_name_the_key(tmp_path, key, value):
    with pytest.raises(AglclError, match=rf"sequence.tasks.parity.{key}={value!r} is invalid"):
        load_sequence(_sequence(tmp_path, **{key: value}))


def test_a_bad_cap_names_the_key(tmp_path):
    with pytest.raises(AglclError, match=r"limit.train=0 is invalid"):
        load_sequence(_sequence(tmp_path), limit={"train": 0, "eval": None})


@pytest.mark.parametrize(("template", "message"), [("{prompt} {answer}", "copy the answer"),
                                                    ("{prompt", "malformed")])
def test_bad_templates_are_refused(tmp_path, template, message):
    with pytest.raises(AglclError, match=message):
        load_sequence(_sequence(tmp_path, template=template))


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_task_names_that_would_escape_the_run_dir_are_refused(tmp_path, name):
    seq = _sequence(tmp_path)
    seq.tasks[name] = seq.tasks.pop("parity")
    seq.order = [name]
    with pytest.raises(AglclError, match="cannot be a file name"):
        load_sequence(seq)
