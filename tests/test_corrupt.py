"""Corrupt, truncate or refuse to store each artifact (issue #6): every fault is a one-line AglclError (or,
from the CLI, exit 2 with one stderr line and no traceback) naming the file, and nothing written before is
lost or half-replaced.

Artifacts: importance maps (``importance/*.safetensors``), ``results.json``, ``R.csv`` and matrix files,
prediction JSON Lines, and any file written through ``rundir.atomic_write`` (disk full, read-only dir).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, make_fixture_conf, refused, run_cli, tiny_overrides
from torch import nn

from aglcl import rundir
from aglcl.attribution import store as S
from aglcl.attribution.pipeline import Attribution
from aglcl.errors import UserAbort, os_error_message, user_errors
from aglcl.report.evaluate import matrix_from_run
from aglcl.report.matrix import read_matrix, write_matrix_csv


def one_line_exit(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ importance maps
class Net(nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.q = nn.Linear(d, 6)
        self.head = nn.Linear(d, 5, bias=False)


def maps_of(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


DTYPES = ("float32", "bfloat16", "uint8")


@pytest.fixture(params=DTYPES)
def saved(request, tmp_path) -> Path:
    path = S.combined_path(tmp_path)
    S.save_map(path, maps_of(Net()), dtype=request.param, metadata={"task": "combined", "tasks": "1"})
    return path


def restore(path: Path, model: nn.Module | None = None):
    return Attribution(estimator=None).restore(path.parent.parent, model or Net(), completed=1, path=path)


def both_readers_refuse(path: Path, *needles: str) -> None:
    """``load_map`` and the resume path (``Attribution.restore``) both refuse ``path``."""
    refused(lambda: S.load_map(path), path, *needles)
    refused(lambda: restore(path), path, *needles)


def test_a_good_map_restores(saved):
    maps = restore(saved)
    assert set(maps) == {"q.weight", "q.bias", "head.weight"}
    assert S.load_map(saved, expect={n: p.shape for n, p in Net().named_parameters()})[1]["tasks"] == "1"


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 40, "half", -1])
def test_truncated_map(saved, cut):
    data = saved.read_bytes()
    n = {"half": len(data) // 2}.get(cut, cut)
    saved.write_bytes(data[:n])
    both_readers_refuse(saved)


@pytest.mark.parametrize("garbage", [
    b"not a safetensors file at all",
    (10**12).to_bytes(8, "little") + b"{}",  # header longer than the file
    (20).to_bytes(8, "little") + b'{"a": [1, 2, 3]    ',  # a header that is not one
    (2).to_bytes(8, "little") + b"\xff\xfe",
    bytes(range(256)) * 4,
])
def test_garbage_map(tmp_path, garbage):
    path = tmp_path / "importance" / "combined.safetensors"
    path.parent.mkdir()
    path.write_bytes(garbage)
    both_readers_refuse(path)


def test_flipped_byte_is_caught_by_the_digest(saved):
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the file still parses
    saved.write_bytes(bytes(data))
    both_readers_refuse(saved)


def test_wrong_shape(saved):
    shapes = {n: tuple(p.shape) for n, p in Net().named_parameters()}
    refused(lambda: S.load_map(saved, expect={**shapes, "q.weight": (4, 6)}), saved, "q.weight", "(6, 4)")
    refused(lambda: restore(saved, Net(d=3)), saved, "weight' has shape", "the model's")


def test_unknown_parameter_name(tmp_path):
    path = S.combined_path(tmp_path)
    S.save_map(path, {**maps_of(Net()), "ghost.weight": torch.rand(2)}, metadata={"tasks": "1"})
    refused(lambda: restore(path), path, "ghost.weight")
    refused(lambda: S.load_map(path, expect=dict(Net().named_parameters())), path, "ghost.weight")


def _raw_file(path: Path, tensors: dict, **meta) -> Path:
    """A safetensors file written around save_map's own checks, with consistent names_hash metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"names_hash": S.names_hash(tensors), "tasks": "1", **meta}
    safetensors.torch.save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if v is not None})
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_or_inf_map(tmp_path, bad, dtype):
    tensors = {n: t.to(getattr(torch, dtype)) for n, t in maps_of(Net()).items()}
    tensors["q.bias"][2] = bad
    path = _raw_file(S.combined_path(tmp_path), tensors, dtype=dtype)
    both_readers_refuse(path, "q.bias", "NaN or inf")
    # with a digest that matches: the values themselves are refused, not the digest
    path = _raw_file(path, tensors, dtype=dtype, sha256=S.content_digest(tensors))
    both_readers_refuse(path, "q.bias", "NaN or inf")


def test_saving_nan_is_refused_and_keeps_the_old_map(saved):
    before = saved.read_bytes()
    bad = maps_of(Net())
    bad["head.weight"][0, 0] = float("nan")
    refused(lambda: S.save_map(saved, bad, metadata={}), "head.weight")
    assert saved.read_bytes() == before


@pytest.mark.parametrize("torch_dtype, meta_dtype", [
    (torch.float16, None), (torch.float64, None), (torch.int32, None), (torch.int8, None),
    (torch.float32, "uint8"), (torch.uint8, "float32"), (torch.float32, "float16"),
])
def test_wrong_dtype(tmp_path, torch_dtype, meta_dtype):
    tensors = {n: (t * 100).to(torch_dtype) for n, t in maps_of(Net()).items()}
    path = _raw_file(S.combined_path(tmp_path), tensors, dtype=meta_dtype)
    msg = refused(lambda: S.load_map(path), path)
    assert "dtype" in msg or "stored as" in msg
    refused(lambda: restore(path), path)


@pytest.mark.parametrize("scale", ["0", "abc", "0.5", ""])
def test_altered_uint8_scale(tmp_path, scale):
    path = S.combined_path(tmp_path)
    S.save_map(path, maps_of(Net()), dtype="uint8", metadata={"tasks": "1"})
    tensors = safetensors.torch.load_file(str(path))
    _raw_file(path, tensors, dtype="uint8", scale=scale)
    both_readers_refuse(path, "scale")


@pytest.mark.parametrize("tasks", ["x", "-1", "0", "1.5", ""])
def test_altered_task_count(tmp_path, tasks):
    path = S.combined_path(tmp_path)
    S.save_map(path, maps_of(Net()), metadata={"tasks": tasks})
    refused(lambda: restore(path), path, "tasks")


# --------------------------------------------------------------------------- disk full, no permission
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_temp_files(d: Path) -> None:
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("target, error", [
    ("os.fsync", errno.ENOSPC),  # the disk fills up while writing
    ("os.replace", errno.EROFS),  # the rename is refused
    ("tempfile.mkstemp", errno.EACCES),  # the directory is not writable
    ("os.fdopen", errno.EDQUOT),  # the write itself fails
])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch, target, error):
    path = tmp_path / "results.json"
    rundir.write_json(path, {"old": True})
    before = path.read_bytes()

    def fail(*_args, **_kwargs):
        raise OSError(error, os.strerror(error))

    module, name = target.split(".")
    monkeypatch.setattr({"os": os, "tempfile": rundir.tempfile}[module], name, fail)
    with pytest.raises(OSError) as info:
        rundir.write_json(path, {"new": True})
    monkeypatch.undo()
    assert path.read_bytes() == before
    _no_temp_files(tmp_path)
    assert info.value.filename == str(path)  # the message names the file meant, not a temp file
    msg = os_error_message(info.value)
    assert msg is not None and str(path) in msg and len(msg.splitlines()) == 1


def test_disk_full_keeps_maps_and_matrix(saved, monkeypatch):
    run = saved.parent.parent
    write_matrix_csv(run / rundir.R_CSV, ["a", "b"], [[0.9, 0.1], [0.5, 0.8]])
    before = snapshot(run)
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        S.save_map(saved, maps_of(Net()), metadata={})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(saved)
    with pytest.raises(OSError):
        write_matrix_csv(run / rundir.R_CSV, ["a", "b"], [[0.0, 0.0], [0.0, 0.0]])
    monkeypatch.undo()
    assert snapshot(run) == before
    _no_temp_files(saved.parent)
    _no_temp_files(run)


def test_written_files_get_normal_permissions(tmp_path):
    rundir.write_json(tmp_path / "a.json", {})
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


@pytest.mark.parametrize("exc, converted", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (PermissionError(errno.EACCES, "Permission denied", "/out/run"), True),
    (OSError(errno.EROFS, "Read-only file system", "/out/run"), True),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), False),  # may be a bug: raise
    (OSError(errno.EBADF, "Bad file descriptor"), False),
    (ValueError("a bug"), False),
])
def test_user_errors_converts_only_machine_errors(exc, converted):
    def job(_cfg):
        raise exc

    if converted:
        with pytest.raises(UserAbort) as info:
            user_errors(job)(None)
        assert len(str(info.value).splitlines()) == 1 and exc.strerror in str(info.value)
        assert exc.filename is None or exc.filename in str(info.value)
    else:
        with pytest.raises(type(exc)):
            user_errors(job)(None)


# ----------------------------------------------------------------------- results, matrix, predictions
TASKS = ["a", "b"]


def fake_run(root: Path) -> Path:
    """The files ``aglcl eval run_dir=`` reads, as ``aglcl train`` writes them, without training."""
    run = root / "run"
    rundir.write_json(run / rundir.RESULTS, {"tasks": TASKS, "metric": dict.fromkeys(TASKS, "accuracy")})
    for stage, name in enumerate(["initial", *TASKS]):
        for task in TASKS:
            records = [{"prompt": f"p{i}\u2028\x85", "reference": "x", "prediction": "x" if i else "y",
                        "score": float(bool(i))} for i in range(3)]
            rundir.write_predictions(run, stage, name, task, records)
    write_matrix_csv(run / rundir.R_CSV, TASKS, [[0.9, 0.1], [0.5, 0.8]])
    return run


def test_fake_run_reads_back(tmp_path):
    """Records holding U+2028 and U+0085 (written raw by json.dumps) come back whole."""
    tasks, R, b = matrix_from_run(fake_run(tmp_path))
    assert tasks == TASKS and b == [pytest.approx(2 / 3)] * 2 and len(R) == 2


@pytest.mark.parametrize("content", [
    "cut",  # truncated
    b"\xff\xfe{}",  # not UTF-8
    b"",  # empty
    b"[" * 50_000,  # nesting
    json.dumps({"tasks": "ab", "metric": {}}).encode(),
    json.dumps({"tasks": [], "metric": {}}).encode(),
    json.dumps({"tasks": TASKS, "metric": {"a": "accuracy"}}).encode(),  # no metric for "b"
    json.dumps({"tasks": [1, 2], "metric": {"1": "accuracy"}}).encode(),
    json.dumps(["tasks"]).encode(),
])
def test_bad_results_json(tmp_path, content):
    run = fake_run(tmp_path)
    file = run / rundir.RESULTS
    file.write_bytes(file.read_bytes()[:20] if content == "cut" else content)
    refused(lambda: matrix_from_run(run), file)


@pytest.mark.parametrize("damage, needle", [
    ("cut", ".jsonl:3"),  # the last line truncated
    ("garbage_line", ".jsonl:2"),
    ("not_utf8", ".jsonl"),
    ("not_a_record", ".jsonl"),
    ("no_prediction", ".jsonl"),
    ("bad_dir_name", "after_x"),
    ("two_dirs_one_stage", "stage 1"),
    ("missing_stage", "stages"),
])
def test_bad_predictions(tmp_path, damage, needle):
    run = fake_run(tmp_path)
    file = rundir.stage_dir(run, 1, "a") / "b.jsonl"
    lines = file.read_text(encoding="utf-8").split("\n")
    if damage == "cut":
        file.write_text("\n".join(lines[:2] + [lines[2][:15]]), encoding="utf-8")
    elif damage == "garbage_line":
        file.write_text("\n".join([lines[0], "{oops", *lines[2:]]), encoding="utf-8")
    elif damage == "not_utf8":
        file.write_bytes(b"\xff" + file.read_bytes())
    elif damage == "not_a_record":
        file.write_text("[1, 2]\n", encoding="utf-8")
    elif damage == "no_prediction":
        file.write_text(json.dumps({"reference": "x"}) + "\n", encoding="utf-8")
    elif damage == "bad_dir_name":
        (run / rundir.PREDICTIONS / "after_x").mkdir()
    elif damage == "two_dirs_one_stage":
        rundir.write_predictions(run, 1, "again", "a", [])
    elif damage == "missing_stage":
        for f in rundir.stage_dir(run, 2, "b").iterdir():
            f.unlink()
        rundir.stage_dir(run, 2, "b").rmdir()
    refused(lambda: matrix_from_run(run), needle)


@pytest.mark.parametrize("text, needle", [
    ("after,a,b\na,0.9,0.1\nb,0.5", "row 3"),  # truncated mid-row
    ("after,a,b\na,0.9,0.1\nb,0.5,zero", "'zero'"),
    ("after,a,b\na,0.9,inf\nb,0.5,0.8\n", "infinite"),
    ("after,a,a\na,0.9,0.1\na,0.5,0.8\n", "twice"),
    ("after,a,b\na,0.9,0.1\nb,0.5,0.8\x00\n", "row 3"),
    ('after,a,b\na,0.9,0.1\nb,"0.5,0.8\n', "row 3"),  # an unterminated quote swallows the rest
])
def test_malformed_matrix_csv(tmp_path, text, needle):
    file = tmp_path / "R.csv"
    file.write_text(text, encoding="utf-8")
    refused(lambda: read_matrix(file), file, needle)


@pytest.mark.parametrize("text", [
    '{"tasks": ["a", "b"], "R": [[0.9, 0.1], [0.5, 1e400]]}',  # inf
    '{"tasks": ["a", "b"], "R": [[0.9, 0.1], [0.5, ' + "9" * 400 + "]]}",  # overflows a float
    '{"tasks": ["a", "b"], "R": [[0.9, 0.1], [0.5, ' + "9" * 5000 + "]]}",  # beyond int parsing
    "[" * 100_000,
    '{"tasks": ["a", "b"], "R": [[0.9, 0.1], [0.5, 0.8]',  # truncated
])
def test_malformed_matrix_json(tmp_path, text):
    file = tmp_path / "m.json"
    file.write_text(text, encoding="utf-8")
    refused(lambda: read_matrix(file), file)


# ------------------------------------------------------------------------------------------ CLI level
@pytest.mark.integration
def test_eval_truncated_results_json(tmp_path):
    run = fake_run(tmp_path)
    (run / rundir.RESULTS).write_bytes((run / rundir.RESULTS).read_bytes()[:30])
    proc = run_cli("eval", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    one_line_exit(proc, rundir.RESULTS)
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.integration
def test_eval_broken_prediction_line(tmp_path):
    run = fake_run(tmp_path)
    file = rundir.stage_dir(run, 2, "b") / "a.jsonl"
    file.write_text(file.read_text(encoding="utf-8")[:-40], encoding="utf-8")
    proc = run_cli("eval", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    one_line_exit(proc, f"{file}:3")


@pytest.mark.integration
def test_eval_malformed_matrix(tmp_path):
    file = tmp_path / "R.csv"
    file.write_text("after,a,b\na,0.9,0.1\nb,0.5,\x00oops\n", encoding="utf-8")
    proc = run_cli("eval", f"matrix={file}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    one_line_exit(proc, file)


@pytest.mark.integration
def test_eval_on_a_full_disk_keeps_the_old_metrics(tmp_path):
    """``os.fsync`` fails with ENOSPC in the ``aglcl eval`` process: one line, old metrics.json intact."""
    matrix = tmp_path / "m.csv"
    write_matrix_csv(matrix, TASKS, [[0.9, 0.1], [0.5, 0.8]])
    out = tmp_path / "out"
    rundir.write_json(out / "metrics.json", {"old": True})
    before = snapshot(out)
    code = ("import errno, os, sys\n"
            "def full(*a):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "os.fsync = full\nfrom aglcl.cli import main\nmain(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, "eval", f"matrix={matrix}", f"hydra.run.dir={out}"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    one_line_exit(proc, "No space left on device", out / "metrics.json")
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}
    assert {k: v for k, v in snapshot(out).items() if k in before} == before
    _no_temp_files(out)


# ------------------------------------------------------------------------------------ read-only dirs
def _userns_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cli_with_readonly(ro: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``aglcl ARGS`` while ``ro`` cannot be written: chmod 0o555, or as root (who ignores permissions)
    a read-only bind mount in a user namespace; skips when neither is possible."""
    if os.geteuid() != 0:
        mode = ro.stat().st_mode
        ro.chmod(0o555)
        try:
            return run_cli(*args, cwd=cwd)
        finally:
            ro.chmod(mode)
    if not _userns_works():
        pytest.skip("running as root (permissions do not apply) and no user namespace for a read-only mount")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGLCL_OUTPUT_DIR": str(cwd / "outputs")}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(ro), sys.executable, "-m", "aglcl",
                           *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=300)


@pytest.mark.integration
def test_eval_into_a_readonly_dir(tmp_path):
    matrix = tmp_path / "m.csv"
    write_matrix_csv(matrix, TASKS, [[0.9, 0.1], [0.5, 0.8]])
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = cli_with_readonly(ro, "eval", f"matrix={matrix}", f"hydra.run.dir={ro / 'out'}", cwd=tmp_path)
    one_line_exit(proc, ro / "out")
    assert not (ro / "out").exists()


@pytest.mark.integration
def test_train_into_a_readonly_parent(tmp_path):
    conf = make_fixture_conf(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = cli_with_readonly(ro, "train", *tiny_overrides(conf, ro / "run"), cwd=tmp_path)
    one_line_exit(proc, ro / "run", "hydra.run.dir")
    assert not (ro / "run").exists()


@pytest.mark.integration
def test_train_into_a_readonly_run_dir_keeps_its_artifacts(tmp_path):
    """An earlier run's files stay byte-for-byte as they were."""
    conf = make_fixture_conf(tmp_path)
    run = fake_run(tmp_path)
    before = snapshot(run)
    proc = cli_with_readonly(run, "train", *tiny_overrides(conf, run), cwd=tmp_path)
    one_line_exit(proc, run)
    assert snapshot(run) == before


@pytest.mark.integration
def test_train_with_readonly_predictions_dir(tmp_path):
    """The run dir is writable but ``predictions/`` is not: the job itself fails at its first prediction
    file, with one line naming it; nothing lands in ``predictions/`` and no results are written."""
    conf = make_fixture_conf(tmp_path)
    run = tmp_path / "run"
    preds = run / rundir.PREDICTIONS
    preds.mkdir(parents=True)  # an empty dir: the run dir still counts as unused
    before = snapshot(preds)
    proc = cli_with_readonly(preds, "train", *tiny_overrides(conf, run), cwd=tmp_path)
    one_line_exit(proc, preds)
    assert snapshot(preds) == before
    assert not (run / rundir.RESULTS).exists() and not (run / rundir.R_CSV).exists()
