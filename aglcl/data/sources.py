"""Where a task's examples come from: a TRACE-style directory, loose files, or a Hugging Face dataset.

Every source has ``load(split) -> list[dict]`` returning ``{"prompt": str, "answer": str}`` examples for a
split named ``"train"``, ``"eval"`` or ``"test"``, and ``describe() -> str``. Problems with the data raise
:class:`aglcl.errors.AglclError` with a one-line message naming the file, the line or item, and the field.

    LocalDir("data/C-STANCE")                                   # train.json, eval.json, test.json
    Files(train="tr.jsonl", eval="dev.csv", prompt_field="input", answer_field="output")
    HFDataset("ag_news", splits={"train": "train", "eval": "test", "test": "test"}, answer_field="label")
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import re
import reprlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from aglcl.errors import AglclError, choices

SPLITS = ("train", "eval", "test")
KEY = "task.source"  # the config key that holds a task's source; error messages name its fields
FORMATS = ("auto", "csv", "json", "jsonl")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv"}
_SHOWN_FIELDS = 12  # a missing-field message lists at most this many of the fields present
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel = 40, 40, 3  # bounded repr, whatever the nesting


# --------------------------------------------------------------------------------------------- helpers
def check_split(split: str) -> str:
    if split not in SPLITS:
        raise AglclError(f"unknown split {split!r}; choose one of {choices(SPLITS)}")
    return split


def check_field_name(value, key: str) -> str:
    """A ``prompt_field``/``answer_field`` option: must be a string (a JSON key or a CSV column)."""
    if not isinstance(value, str):
        raise AglclError(f"{KEY}.{key} must be a field name (a string), got {type(value).__name__} "
                         f"{_short.repr(value)}")
    return value


def _path(value, key: str) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise AglclError(f"{KEY}.{key} must be a path, got {type(value).__name__} {_short.repr(value)}")
    return Path(value).expanduser()


def is_missing(value) -> bool:
    """A missing cell: ``None`` (JSON null, an empty cell read by pandas) or a float NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _value(record: dict, field: str, where: str, key: str) -> str:
    if field not in record:
        names = sorted(map(str, record))
        present = choices(names[:_SHOWN_FIELDS]) + (", ..." if len(names) > _SHOWN_FIELDS else "")
        raise AglclError(f"{where}: missing field {field!r} (fields present: {present or 'none'}); "
                         f"set {KEY}.{key}")
    value = record[field]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. a "\ud800" escape in JSON: no tokenizer or file takes it
            raise AglclError(f"{where}: field {field!r} holds an invalid character at position {e.start} "
                             f"(a lone surrogate {_short.repr(e.object[e.start:e.end])}); expected valid "
                             "Unicode text") from None
        return value
    if is_missing(value):
        raise AglclError(f"{where}: field {field!r} is {'null' if value is None else 'NaN'} (a missing value); "
                         "expected a string")
    raise AglclError(
        f"{where}: field {field!r} is a {type(value).__name__} ({_short.repr(value)}); expected a string"
    )


def to_examples(
    records: Iterable[tuple[str, Any]], prompt_field: str, answer_field: str, empty: str
) -> list[dict]:
    """Turn ``(where, record)`` pairs into examples; ``where`` locates a record in error messages.

    ``empty`` is the message raised when there are no records at all.
    """
    out = []
    for where, record in records:
        if not isinstance(record, dict):
            raise AglclError(
                f"{where}: expected an object with fields {prompt_field!r} and {answer_field!r}, "
                f"got a {type(record).__name__}"
            )
        prompt = _value(record, prompt_field, where, "prompt_field")
        out.append({"prompt": prompt, "answer": _value(record, answer_field, where, "answer_field")})
    if not out:
        raise AglclError(empty)
    return out


def read_text(file: Path) -> str:
    """A UTF-8 file's text (BOM dropped, line ends kept); AglclError naming the file if it cannot be read."""
    try:
        with file.open(encoding="utf-8-sig", newline="") as f:  # keep "\r" in quoted CSV fields as it is
            return f.read()
    except FileNotFoundError:
        raise AglclError(f"file not found: {file}") from None
    except UnicodeDecodeError as e:
        raise AglclError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise AglclError(f"cannot read {file}: {e.strerror or e}") from None


def _loads(text: str, where: str, what: str = "JSON", hint: str = "") -> Any:
    """``json.loads`` whose every failure is a one-line AglclError located at ``where`` (file or file:line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = f"{e.lineno}:{e.colno}" if what == "JSON" else str(e.colno)
        hint = hint if e.msg == "Extra data" else ""
        raise AglclError(f"{where}:{line}: invalid {what}: {e.msg}{hint}") from None
    except RecursionError:
        raise AglclError(f"{where}: invalid {what}: nested too deeply (lists or objects inside each other "
                         "hundreds of levels deep)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise AglclError(f"{where}: invalid {what}: {str(e).split(':')[0]}") from None


def read_json_list(file: Path) -> Iterator[tuple[str, Any]]:
    data = _loads(read_text(file), str(file), hint=" (it looks like JSON Lines: set format=jsonl)")
    if not isinstance(data, list):
        raise AglclError(f"{file}: expected a JSON list of objects, got a {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{file}: item {i}", record


def read_jsonl(file: Path) -> Iterator[tuple[str, Any]]:
    # JSON strings hold no raw \r or \n, but they may hold U+2028, form feeds, ... where splitlines() cuts
    for lineno, line in enumerate(re.split(r"\r\n|\r|\n", read_text(file)), 1):
        if not line.strip():
            continue
        yield f"{file}:{lineno}", _loads(line, f"{file}:{lineno}", "JSON line")


def _delimiter_hint(file: Path, text: str, header: list[str], need: tuple[str, ...], delimiter: str,
                    option: str) -> None:
    """Refuse a header that lacks a ``need`` field but holds them all when split by another delimiter."""
    if not header or all(f in header for f in need):
        return
    first = text.splitlines()[0] if text else ""
    for other in (",", ";", "\t", "|"):
        if other != delimiter and all(f in next(csv.reader([first], delimiter=other), []) for f in need):
            raise AglclError(f"{file}:1: the header has no field {next(f for f in need if f not in header)!r} "
                             f"when split by {delimiter!r}, but it is {other!r}-separated; set {option}={other!r}")


def read_csv(file: Path, delimiter: str = ",", need: tuple[str, ...] = (), option: str = "") -> Iterator[tuple[str, Any]]:
    """``(where, record)`` per row. ``need``: the fields the caller reads; a header that holds them only when
    split by another delimiter is refused, naming ``option`` (default ``task.source.csv_delimiter``) to set."""
    # newline="": quoted fields may hold line breaks, and only \n, \r and \r\n end a row
    text = read_text(file)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        _delimiter_hint(file, text, reader.fieldnames or [], need, delimiter,
                        option or f"{KEY}.csv_delimiter")
        for record in reader:
            if None in record or None in record.values():
                cells = len(record) - 1 + len(record[None]) if None in record else sum(
                    v is not None for v in record.values())
                raise AglclError(f"{file}:{reader.line_num}: row has {cells} cells, the header has "
                                 f"{len(reader.fieldnames or [])}")
            yield f"{file}:{reader.line_num}", record
    except csv.Error as e:
        raise AglclError(f"{file}:{reader.line_num}: malformed CSV: {e}") from None


# --------------------------------------------------------------------------------------------- sources
class LocalDir:
    """TRACE's layout: ``train.json``, ``eval.json`` and ``test.json`` in one directory, each a JSON list."""

    def __init__(self, path: str | os.PathLike, prompt_field: str = "prompt", answer_field: str = "answer"):
        self.path = _path(path, "path")
        self.prompt_field = check_field_name(prompt_field, "prompt_field")
        self.answer_field = check_field_name(answer_field, "answer_field")

    def load(self, split: str) -> list[dict]:
        file = self.path / f"{check_split(split)}.json"
        if not self.path.is_dir():
            raise AglclError(f"data directory not found: {self.path} (expected {file}); set {KEY}.path")
        if not file.is_file():
            raise AglclError(
                f"missing split file {file} (a LocalDir needs {choices(s + '.json' for s in SPLITS)})"
            )
        empty = f"split {split!r} of {self.path} is empty ({file} holds no records)"
        return to_examples(read_json_list(file), self.prompt_field, self.answer_field, empty)

    def describe(self) -> str:
        return f"LocalDir({self.path})"


class Files:
    """One JSONL, JSON (a list) or CSV file per split; the format comes from the extension unless set."""

    def __init__(
        self,
        train: str | os.PathLike | None = None,
        eval: str | os.PathLike | None = None,
        test: str | os.PathLike | None = None,
        format: str = "auto",
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        csv_delimiter: str = ",",
    ):
        if format not in FORMATS:
            raise AglclError(f"unknown {KEY}.format {format!r}; choose one of {choices(FORMATS)}")
        if not (isinstance(csv_delimiter, str) and len(csv_delimiter) == 1 and csv_delimiter not in '\r\n"'):
            raise AglclError(f"{KEY}.csv_delimiter must be one character (not a quote or a line break), got "
                             f"{_short.repr(csv_delimiter)}")
        self.files = {
            s: None if p is None else _path(p, s) for s, p in zip(SPLITS, (train, eval, test), strict=True)
        }
        self.format, self.csv_delimiter = format, csv_delimiter
        self.prompt_field = check_field_name(prompt_field, "prompt_field")
        self.answer_field = check_field_name(answer_field, "answer_field")

    def _format(self, file: Path) -> str:
        if self.format != "auto":
            return self.format
        fmt = _EXTENSIONS.get(file.suffix.lower())
        if fmt is None:
            raise AglclError(
                f"cannot tell the format of {file} from its extension {file.suffix or '(none)'!r}; "
                f"set {KEY}.format to one of {choices(f for f in FORMATS if f != 'auto')}"
            )
        return fmt

    def load(self, split: str) -> list[dict]:
        file = self.files[check_split(split)]
        if file is None:
            raise AglclError(f"no file for split {split!r}: set {KEY}.{split}")
        if not file.is_file():
            raise AglclError(f"file for split {split!r} not found: {file}; check {KEY}.{split}")
        fmt = self._format(file)
        if fmt == "csv":
            tsv = file.suffix.lower() == ".tsv" and self.format == "auto"
            option = f"{KEY}.format=csv and {KEY}.csv_delimiter" if tsv else f"{KEY}.csv_delimiter"
            records = read_csv(file, "\t" if tsv else self.csv_delimiter, (self.prompt_field, self.answer_field),
                               option)
        else:
            records = read_jsonl(file) if fmt == "jsonl" else read_json_list(file)
        empty = f"split {split!r} ({file}) is empty"
        return to_examples(records, self.prompt_field, self.answer_field, empty)

    def describe(self) -> str:
        return "Files(" + ", ".join(f"{s}={p}" for s, p in self.files.items() if p is not None) + ")"


class HFDataset:
    """A dataset through ``datasets.load_dataset``: a hub id, or a local directory of data files.

    ``splits`` maps our split names to the dataset's. Note that ``datasets`` reads a local file named
    ``eval.*`` as its *test* split; name the validation file ``validation.*`` (or ``dev.*``).
    A directory written by ``save_to_disk`` is read with ``load_from_disk``.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        revision: str | None = None,
        splits: dict | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
    ):
        self.path, self.name, self.revision, self.cache_dir = str(path), name, revision, cache_dir
        self.splits = (
            dict(splits) if splits is not None else {"train": "train", "eval": "validation", "test": "test"}
        )
        self.prompt_field = check_field_name(prompt_field, "prompt_field")
        self.answer_field = check_field_name(answer_field, "answer_field")
        self.trust_remote_code = trust_remote_code

    def _fail(self, e: Exception) -> AglclError:
        from datasets import config
        from datasets.exceptions import DatasetNotFoundError

        offline = bool(
            getattr(config, "HF_HUB_OFFLINE", False) or getattr(config, "HF_DATASETS_OFFLINE", False)
        )
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        if isinstance(e, ConnectionError) or (isinstance(e, FileNotFoundError) and offline):
            return AglclError(
                f"cannot load dataset {self.path!r}: {reason}; it is not in the local cache and the hub is "
                "unreachable (offline). Point task.source to local files (LocalDir/Files) or run once online."
            )
        if isinstance(e, DatasetNotFoundError | FileNotFoundError):
            return AglclError(
                f"cannot load dataset {self.path!r}: {reason}; check {KEY}.path (a hub id or a local "
                "directory), or point task.source to local files (LocalDir/Files)"
            )
        return AglclError(f"cannot load dataset {self.path!r}: {reason}")

    def _load_split(self, hf_split: str):
        import datasets

        datasets.disable_progress_bars()  # "Generating train split" bars on stderr would break one-line errors
        local = Path(self.path).expanduser()
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if hf_split not in data:
                    raise ValueError(f'Unknown split "{hf_split}". Should be one of {list(data)}.')
                return data[hf_split]
            return data  # a single saved Dataset serves every split
        if self.path.startswith(("/", "./", "../", "~")) and not local.exists():
            raise AglclError(f"local dataset directory not found: {local}; check {KEY}.path")
        kwargs = {"cache_dir": self.cache_dir} if self.cache_dir else {}
        if (
            self.trust_remote_code
            and "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters
        ):
            kwargs["trust_remote_code"] = (
                True  # datasets >= 4 runs no dataset scripts and has no such argument
            )
        return datasets.load_dataset(self.path, self.name, split=hf_split, revision=self.revision, **kwargs)

    def load(self, split: str) -> list[dict]:
        if check_split(split) not in self.splits:
            raise AglclError(f"split {split!r} is not mapped for {self.path!r}; set {KEY}.splits.{split}")
        hf_split = self.splits[split]
        try:
            data = self._load_split(hf_split)
        except AglclError:
            raise
        except ValueError as e:
            found = re.search(r"Unknown split \"?'?([^\"']*)\"?'?\. Should be one of (\[.*\])", str(e))
            if not found:
                raise self._fail(e) from None
            available = re.findall(r"'([^']*)'", found.group(2))
            raise AglclError(
                f"dataset {self.path!r} has no split {hf_split!r} (for {split!r}); available splits: "
                f"{choices(available)}; set {KEY}.splits.{split}"
            ) from None
        except Exception as e:  # datasets raises many kinds; none should surface as a traceback
            raise self._fail(e) from None
        where = f"dataset {self.path!r} split {hf_split!r}"
        files = self._files(hf_split)
        at = (lambda i: f"{files[0]}: data row {i + 1}") if len(files) == 1 else (lambda i: f"{where} row {i}")
        for field in (self.prompt_field, self.answer_field):  # before a row of a column that it made numbers
            if field in getattr(data, "column_names", ()):
                bad = next((i for i, v in enumerate(data[field]) if is_missing(v)), None)
                if bad is not None:
                    raise AglclError(f"{at(bad)}: field {field!r} is missing (an empty cell, or NA, NaN, null ..., "
                                     "which datasets reads as missing); every example needs one")
        records = ((at(i), row) for i, row in enumerate(data))
        return to_examples(
            records, self.prompt_field, self.answer_field, f"split {split!r} of {where} is empty"
        )

    def _files(self, hf_split: str) -> list[str]:
        """The local data files of split ``hf_split``, to name in errors; [] for a hub or a saved dataset."""
        local = Path(self.path).expanduser()
        if not local.is_dir() or (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            return []
        try:
            import datasets

            kwargs = {"cache_dir": self.cache_dir} if self.cache_dir else {}
            data_files = datasets.load_dataset_builder(str(local), self.name, **kwargs).config.data_files or {}
        except Exception:  # only for a better message: never fail because of it
            return []
        return next(([str(f) for f in v] for k, v in data_files.items() if str(k) == hf_split), [])

    def describe(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("name", self.name), ("revision", self.revision)) if v)
        return f"HFDataset({self.path}{extra})"
