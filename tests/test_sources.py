"""Data sources: LocalDir, Files and HFDataset, their good paths and their one-line errors."""

import json

import pytest

from aglcl.data.sources import Files, HFDataset, LocalDir
from aglcl.errors import AglclError

ROWS = {
    "train": [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": 2}],
    "eval": [{"prompt": "p3", "answer": "a3"}],
    "test": [{"prompt": "p4", "answer": "a4"}, {"prompt": "p5", "answer": "a5"}],
}


def raises(fn, *needles):
    """Call fn, expect an AglclError whose message is one line and contains every needle."""
    with pytest.raises(AglclError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def write_local(root, rows=ROWS):
    root.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        (root / f"{split}.json").write_text(json.dumps(items), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------- LocalDir
def test_localdir_loads_all_splits(tmp_path):
    src = LocalDir(write_local(tmp_path / "task"))
    assert src.load("train") == [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "2"}]
    assert len(src.load("eval")) == 1 and len(src.load("test")) == 2
    assert "task" in src.describe()


def test_localdir_custom_fields(tmp_path):
    rows = {s: [{"input": "x", "output": "y"}] for s in ("train", "eval", "test")}
    src = LocalDir(write_local(tmp_path / "t", rows), prompt_field="input", answer_field="output")
    assert src.load("test") == [{"prompt": "x", "answer": "y"}]


def test_localdir_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    raises(lambda: LocalDir(missing).load("train"), str(missing / "train.json"))


def test_localdir_missing_file(tmp_path):
    root = write_local(tmp_path / "t")
    (root / "eval.json").unlink()
    raises(lambda: LocalDir(root).load("eval"), str(root / "eval.json"))


def test_localdir_unknown_split(tmp_path):
    raises(
        lambda: LocalDir(write_local(tmp_path / "t")).load("valid"), "'valid'", "'eval'", "'test'", "'train'"
    )


def test_localdir_bad_json(tmp_path):
    root = write_local(tmp_path / "t")
    (root / "test.json").write_text('[\n {"prompt": "a",\n  "answer": }\n]', encoding="utf-8")
    raises(lambda: LocalDir(root).load("test"), f"{root / 'test.json'}:3:", "invalid JSON")


def test_localdir_missing_field(tmp_path):
    root = write_local(
        tmp_path / "t", {**ROWS, "train": [{"prompt": "a", "answer": "b"}, {"prompt": "a", "label": "b"}]}
    )
    raises(lambda: LocalDir(root).load("train"), "item 1", "'answer'", "'prompt'", "'label'", "answer_field")


def test_localdir_bad_values(tmp_path):
    cases = {
        "null": ([{"prompt": "a", "answer": None}], "null"),
        "list": ([{"prompt": ["a"], "answer": "b"}], "'prompt'"),
        "not_object": (["just a string"], "expected an object"),
        "not_list": ({"prompt": "a", "answer": "b"}, "expected a JSON list"),
    }
    for name, (items, needle) in cases.items():
        root = write_local(tmp_path / name, {**ROWS, "train": items})
        raises(lambda root=root: LocalDir(root).load("train"), needle)


def test_localdir_empty_split(tmp_path):
    root = write_local(tmp_path / "t", {**ROWS, "test": []})
    raises(lambda: LocalDir(root).load("test"), f"split 'test' of {root} is empty")


# ---------------------------------------------------------------------------------------------- Files
def test_files_jsonl_csv_json_custom_fields(tmp_path):
    (tmp_path / "tr.jsonl").write_text('{"q": "a", "r": "b"}\n\n{"q": "c", "r": 7}\n', encoding="utf-8")
    (tmp_path / "ev.csv").write_text('q,r\n"hello, world",x\nsecond,y\n', encoding="utf-8")
    (tmp_path / "te.json").write_text(json.dumps([{"q": "z", "r": "w"}]), encoding="utf-8")
    src = Files(
        train=tmp_path / "tr.jsonl",
        eval=str(tmp_path / "ev.csv"),
        test=tmp_path / "te.json",
        prompt_field="q",
        answer_field="r",
    )
    assert src.load("train") == [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "7"}]
    assert src.load("eval") == [
        {"prompt": "hello, world", "answer": "x"},
        {"prompt": "second", "answer": "y"},
    ]
    assert src.load("test") == [{"prompt": "z", "answer": "w"}]
    assert "tr.jsonl" in src.describe()


def test_files_csv_delimiter_and_forced_format(tmp_path):
    (tmp_path / "data.txt").write_text("prompt;answer\nhi;there\n", encoding="utf-8")
    src = Files(train=tmp_path / "data.txt", format="csv", csv_delimiter=";")
    assert src.load("train") == [{"prompt": "hi", "answer": "there"}]
    raises(lambda: Files(train=tmp_path / "data.txt").load("train"), "data.txt", "format", "'csv'", "'jsonl'")


def test_files_bad_format_and_missing_split(tmp_path):
    raises(lambda: Files(format="parquet"), "'parquet'", "'auto'", "'csv'", "'json'", "'jsonl'")
    raises(lambda: Files(train=tmp_path / "a.jsonl").load("eval"), "no file for split 'eval'", "source.eval")
    raises(lambda: Files(test=tmp_path / "gone.jsonl").load("test"), "gone.jsonl")


def test_files_malformed_jsonl_line(tmp_path):
    file = tmp_path / "tr.jsonl"
    file.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n', encoding="utf-8")
    raises(lambda: Files(train=file).load("train"), f"{file}:2")


def test_files_missing_field_names_line(tmp_path):
    file = tmp_path / "tr.jsonl"
    file.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "label": "b"}\n', encoding="utf-8")
    raises(lambda: Files(train=file).load("train"), f"{file}:2", "'answer'", "'label'")
    csv_file = tmp_path / "ev.csv"
    csv_file.write_text("text,label\nx,y\n", encoding="utf-8")
    raises(lambda: Files(eval=csv_file).load("eval"), f"{csv_file}:2", "'prompt'", "'text'")


def test_files_empty_split(tmp_path):
    file = tmp_path / "te.jsonl"
    file.write_text("\n", encoding="utf-8")
    raises(lambda: Files(test=file).load("test"), "split 'test'", "empty")


# ------------------------------------------------------------------------------------------ HFDataset
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline mode for datasets and huggingface_hub, whether or not they were imported already."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets_config = pytest.importorskip("datasets.config")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return str(tmp_path / "hf_cache")


def test_hfdataset_local_jsonl_dir_offline(tmp_path, offline):
    root = tmp_path / "ds"
    root.mkdir()
    for split, file in (("train", "train"), ("eval", "validation"), ("test", "test")):
        lines = [json.dumps({"text": r["prompt"], "label": r["answer"]}) for r in ROWS[split]]
        (root / f"{file}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = HFDataset(str(root), prompt_field="text", answer_field="label", cache_dir=offline)
    assert src.load("train") == [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "2"}]
    assert src.load("eval") == [{"prompt": "p3", "answer": "a3"}]
    assert len(src.load("test")) == 2
    missing = HFDataset(
        str(root), splits={"train": "train", "eval": "dev", "test": "test"}, cache_dir=offline
    )
    raises(lambda: missing.load("eval"), "'dev'", "'train'", "'validation'", "splits.eval")
    raises(lambda: HFDataset(str(root), cache_dir=offline).load("train"), "'prompt'", "'text'")


def test_hfdataset_save_to_disk(tmp_path, offline):
    import datasets

    rows = {"prompt": ["a", "b"], "answer": ["x", "y"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    src = HFDataset(str(tmp_path / "saved"))
    assert src.load("train") == [{"prompt": "a", "answer": "x"}, {"prompt": "b", "answer": "y"}]
    raises(lambda: src.load("test"), "no split 'test'", "'train'")


def test_hfdataset_hub_offline_is_one_line(offline):
    src = HFDataset("aglcl-nonexistent-user/no-such-dataset", cache_dir=offline)
    raises(
        lambda: src.load("train"),
        "cannot load dataset 'aglcl-nonexistent-user/no-such-dataset'",
        "offline",
        "LocalDir/Files",
    )


def test_hfdataset_missing_local_dir(tmp_path, offline):
    raises(
        lambda: HFDataset(str(tmp_path / "absent"), cache_dir=offline).load("train"),
        "absent",
        "task.source.path",
    )
