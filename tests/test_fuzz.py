"""Property-based fuzzing of the data loaders (issue #6): whatever bytes or records a user's files hold,
``load`` returns ``[{"prompt": str, "answer": str}, ...]`` or raises a one-line :class:`AglclError`;
never any other exception, so ``aglcl train`` never shows a traceback for bad data."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from conftest import make_fixture_conf, run_cli, tiny_overrides
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aglcl.data.sources import Files, LocalDir
from aglcl.errors import AglclError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("prompt", "answer", "input", "output", "label", "", " ", "a,b", 'q"', "ünï", "0")
EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".ndjson")

# ----------------------------------------------------------------------------------------- strategies
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6),
                                                                inner, max_size=4),
    max_leaves=12,
)
# text that trips line splitting and CSV quoting: separators, quotes, NULs, Unicode line breaks
tricky_text = st.text(
    st.sampled_from(["a", "é", " ", ",", ";", '"', "'", "\n", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x85",
                     "\u2028", "\u2029", "\x00", "{", "}", "[", "]", "\\", "\ufeff", "😀"])
    | st.characters(exclude_categories=("Cs",)),
    max_size=12,
)
records = st.dictionaries(st.sampled_from(FIELDS), json_values | tricky_text, max_size=4)
good_record = st.fixed_dictionaries({"prompt": tricky_text, "answer": tricky_text})
field_maps = st.lists(st.sampled_from(FIELDS), min_size=2, max_size=2, unique=True)


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` as written, truncated, with bytes flipped or spliced in, or duplicated."""
    how = draw(st.sampled_from(["as_is", "truncate", "flip", "splice", "double"]))
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if how == "splice":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(max_size=8)) + data[i:]
    if how == "double":
        return data + data
    return data


def _json_bytes(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _jsonl_bytes(values, sep: str) -> bytes:
    return sep.join(json.dumps(v, ensure_ascii=bool(i % 2)) for i, v in enumerate(values)).encode()


def _csv_bytes(rows, delimiter: str = ",") -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter=delimiter).writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogatepass")


json_file = st.one_of(
    st.lists(records, max_size=5).map(_json_bytes),
    json_values.map(_json_bytes),
    st.lists(good_record, max_size=4).map(_json_bytes),
).flatmap(corrupted)
jsonl_file = st.one_of(
    st.builds(_jsonl_bytes, st.lists(records | json_values, max_size=5), st.sampled_from(["\n", "\r\n"])),
    st.builds(_jsonl_bytes, st.lists(good_record, max_size=4), st.sampled_from(["\n", "\r\n", "\n\n"])),
).flatmap(corrupted)
csv_rows = st.lists(st.lists(tricky_text | st.sampled_from(FIELDS), min_size=0, max_size=4), max_size=5)
csv_file = st.one_of(
    csv_rows.map(_csv_bytes),
    st.lists(good_record, max_size=4).map(lambda rs: _csv_bytes([["prompt", "answer"]]
                                                                 + [[r["prompt"], r["answer"]] for r in rs])),
).flatmap(corrupted)
nasty_file = st.one_of(
    st.binary(max_size=64),
    st.just(b""),
    st.just(b"\xef\xbb\xbf"),  # a lone BOM
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # nesting far beyond the recursion limit
    st.integers(1, 50_000).map(lambda n: b'{"prompt":' * n + b'"x"' + b"}" * n),
    st.integers(4000, 20_000).map(lambda n: b'[{"prompt": "p", "answer": ' + b"7" * n + b"}]"),  # huge int
    st.sampled_from([b'[{"prompt": "\\ud800", "answer": "a"}]', b'{"prompt": "a", "answer": "\\udfff"}',
                     b"prompt,answer\n\x00,\x00\n", b'prompt,answer\n"unterminated,x\n',
                     b"prompt,answer\n" + b"x" * 200_000 + b",y\n", b"[NaN, Infinity]",
                     b'[{"prompt": "a", "answer": 1e400}]', b"\xff\xfe[\x00]\x00"]),
)


# ------------------------------------------------------------------------------------------- contract
def check(load, file: Path | None = None) -> list[dict] | None:
    """The loader contract: a non-empty list of string pairs, or a one-line AglclError naming ``file``."""
    try:
        out = load()
    except AglclError as exc:
        msg = str(exc)
        assert msg and msg == msg.strip() and len(msg.splitlines()) == 1, repr(msg)
        assert file is None or str(file) in msg, msg
        msg.encode("utf-8")  # printable on any stderr: no lone surrogates
        return None
    assert isinstance(out, list) and out
    for ex in out:
        assert set(ex) == {"prompt", "answer"}, ex
        assert isinstance(ex["prompt"], str) and isinstance(ex["answer"], str), ex
        (ex["prompt"] + ex["answer"]).encode("utf-8")  # can be tokenised and written to predictions
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(scratch: Path, name: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp(dir=scratch))
    (d / name).write_bytes(data)
    return d / name


# -------------------------------------------------------------------------------------------- fuzzing
@SETTINGS
@given(data=json_file | nasty_file, fields=field_maps, split=st.sampled_from(["train", "eval", "test"]))
def test_localdir_never_crashes(scratch, data, fields, split):
    file = _write(scratch, f"{split}.json", data)
    check(lambda: LocalDir(file.parent, *fields).load(split), file)


@SETTINGS
@given(data=jsonl_file | json_file | nasty_file, fields=field_maps, ext=st.sampled_from(EXTENSIONS),
       fmt=st.sampled_from(["auto", "auto", "json", "jsonl", "csv"]))
def test_files_never_crash(scratch, data, fields, ext, fmt):
    file = _write(scratch, f"data{ext}", data)
    check(lambda: Files(train=file, format=fmt, prompt_field=fields[0], answer_field=fields[1]).load("train"),
          file)


@SETTINGS
@given(data=csv_file | nasty_file, fields=field_maps, delimiter=st.sampled_from([",", ";", "\t", "|"]))
def test_csv_never_crashes(scratch, data, fields, delimiter):
    file = _write(scratch, "data.csv", data)
    check(lambda: Files(train=file, prompt_field=fields[0], answer_field=fields[1],
                        csv_delimiter=delimiter).load("train"), file)


# ---------------------------------------------------------------------- well-formed data comes back
@SETTINGS
@given(rows=st.lists(good_record, min_size=1, max_size=5), fmt=st.sampled_from(["json", "jsonl", "csv"]),
       crlf=st.booleans())
def test_well_formed_records_round_trip(scratch, rows, fmt, crlf):
    """Valid files load back exactly, whatever the strings hold (U+2028, form feeds, quotes, newlines)."""
    if fmt == "json":
        data = _json_bytes(rows)
    elif fmt == "jsonl":
        data = _jsonl_bytes(rows, "\r\n" if crlf else "\n")
    else:
        assume(all("\x00" not in r["prompt"] + r["answer"] for r in rows))  # csv cannot hold NUL
        data = _csv_bytes([["prompt", "answer"]] + [[r["prompt"], r["answer"]] for r in rows])
    assume(all("\ufeff" not in r["prompt"] for r in rows[:1]))  # a leading BOM is stripped by design
    file = _write(scratch, f"data.{fmt}", data)
    assert check(lambda: Files(train=file).load("train")) == rows


@SETTINGS
@given(rows=st.lists(good_record, min_size=1, max_size=3), fields=field_maps)
def test_field_mapping(scratch, rows, fields):
    prompt_field, answer_field = fields
    mapped = [{prompt_field: r["prompt"], answer_field: r["answer"], "other": 1} for r in rows]
    file = _write(scratch, "data.jsonl", _jsonl_bytes(mapped, "\n"))
    out = check(lambda: Files(train=file, prompt_field=prompt_field, answer_field=answer_field).load("train"))
    assert out == rows


@pytest.mark.parametrize("kwargs, needle", [
    ({"prompt_field": 3}, "prompt_field"),
    ({"answer_field": ["a"]}, "answer_field"),
    ({"csv_delimiter": ""}, "csv_delimiter"),
    ({"csv_delimiter": ";;"}, "csv_delimiter"),
    ({"train": 5}, "task.source.train"),
])
def test_bad_source_options_are_refused(tmp_path, kwargs, needle):
    with pytest.raises(AglclError, match=needle) as info:
        Files(**kwargs)
    assert len(str(info.value).splitlines()) == 1


def test_lone_surrogate_is_refused_with_the_line(tmp_path):
    file = tmp_path / "t.jsonl"
    file.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "x\\ud800y", "answer": "b"}\n')
    with pytest.raises(AglclError, match=r"t\.jsonl:2.*'prompt'"):
        Files(train=file).load("train")


def test_deep_nesting_names_the_file(tmp_path):
    file = tmp_path / "train.json"
    file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AglclError, match=r"train\.json.*nest"):
        LocalDir(tmp_path).load("train")


# ------------------------------------------------------------------------------------------ CLI level
def _write_sequence(conf: Path, source: str) -> None:
    (conf / "sequence" / "broken.yaml").write_text(
        "# aglcl train sequence=broken\nname: broken\norder: [t]\ntasks:\n  t:\n"
        f"    source: {source}\n    template: '{{prompt}}'\n    metric: accuracy\n"
        "    scoring: {_target_: aglcl.data.scoring.LabelLikelihood}\n")


@pytest.mark.parametrize("name, data, needle", [
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "deep.json"),
    ("bad.jsonl", b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff\xfe", "answer": "b"}\n', "bad.jsonl"),
])
@pytest.mark.integration
def test_train_on_malformed_file_is_one_line(tmp_path, name, data, needle):
    conf = make_fixture_conf(tmp_path)
    run = tmp_path / "run"
    (tmp_path / name).write_bytes(data)
    _write_sequence(conf, f"{{_target_: aglcl.data.sources.Files, train: {tmp_path / name}, "
                          f"test: {tmp_path / name}}}")
    overrides = [o for o in tiny_overrides(conf, run) if not o.startswith("sequence=")]
    proc = run_cli("train", *overrides, "sequence=broken", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in lines[0]
    assert not (run / "results.json").exists() and not (run / "predictions").exists()
