"""``aglcl data``: benchmark data under ``paths.data_root``, and the offline default tasks.

    aglcl data list                          # every suite: is its data there? (and the offline tasks)
    aglcl data validate suite=trace          # load each task of a suite: counts, fields, label sets
    aglcl data validate                      # ... every suite whose data is present
    aglcl data validate sequence=mine hydra.searchpath=[file:///path/conf]   # your own conf/sequence/mine.yaml
    aglcl data validate sequence=mine sequence.tasks.t.labels=[a,b]          # sequence.* overrides apply too
    aglcl data list paths.data_root=/data/cl # look elsewhere (or set AGLCL_DATA_ROOT)
    aglcl data prepare                       # build the offline default tasks into ${paths.data_dir}
    aglcl data prepare force=true            # rebuild them
"""

import sys

import hydra

from aglcl.errors import AglclError, choices, user_errors
from aglcl.paths import conf_dir

ACTIONS = ("list", "validate", "prepare")
# ``sequence=NAME`` and ``sequence.<key>=...`` arguments: data.yaml has no sequence, so main() takes them
# out of argv and _app applies them when it composes each suite's ``train`` config.
SEQUENCE_ARGS: list[str] = []


def _quote(path: str) -> str:
    """``path`` as a quoted Hydra override value."""
    return "'" + path.replace("'", "\\'") + "'"


def suite_sequence(suite: str, data_root: str, searchpath=(), overrides=()):
    """The composed ``sequence`` node of suite ``suite`` (any conf/sequence option, also one found on
    ``searchpath``, the ``hydra.searchpath`` of the command), with ``overrides`` and ``data_root`` set."""
    from hydra import compose
    from hydra.errors import HydraException, MissingConfigException

    extra = [f"hydra.searchpath=[{','.join(_quote(str(p)) for p in searchpath)}]"] if searchpath else []
    try:
        cfg = compose(config_name="train", overrides=[f"sequence={suite}", *extra, *overrides])
    except MissingConfigException as exc:
        if exc.missing_cfg_file != f"sequence/{suite}" or exc.options is None:
            raise AglclError(str(exc)) from None
        raise AglclError(f"unknown sequence {suite!r}; choose one of {choices(exc.options)}, or add the config "
                         "dir holding sequence/<name>.yaml with hydra.searchpath=[file:///path/to/conf]") from None
    except HydraException as exc:  # e.g. a sequence.* override of a key the sequence does not have
        raise AglclError(f"sequence={suite}: {exc}") from None
    cfg.paths.data_root = data_root
    return cfg.sequence


def _offline_table(data_dir):
    import json

    from rich.table import Table

    from aglcl.data.prepare import OFFLINE_TASKS

    table = Table(title=f"Offline tasks in {data_dir}")
    for col in ("task", "prepared", "train", "eval", "test", "labels"):
        table.add_column(col)
    for name in OFFLINE_TASKS:
        meta_file = data_dir / name / "meta.json"
        if not meta_file.is_file():
            table.add_row(name, "no", "", "", "", "run `aglcl data prepare`")
            continue
        meta = json.loads(meta_file.read_text())
        counts = meta.get("counts", {})
        table.add_row(name, "yes", *(str(counts.get(s, "")) for s in ("train", "eval", "test")),
                      ", ".join(map(str, meta.get("labels", []))))
    return table


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="data")
@user_errors
def _app(cfg) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from aglcl.data.prepare import prepare_offline
    from aglcl.data.tasks import check_task

    if cfg.action not in ACTIONS:
        raise AglclError(f"unknown action '{cfg.action}'; choose from: {', '.join(ACTIONS)}")
    suites = list(cfg.suites)
    named = [a.split("=", 1)[1] for a in SEQUENCE_ARGS if a.split("=", 1)[0] == "sequence"]
    overrides = [a for a in SEQUENCE_ARGS if a.split("=", 1)[0] != "sequence"]
    only = named[-1] if named else cfg.get("suite")  # one suite (any sequence option), else every suite
    if named and cfg.get("suite") is not None and cfg.suite != only:
        raise AglclError(f"suite={cfg.suite} and sequence={only} disagree; give one of them")
    searchpath = list(HydraConfig.get().searchpath or [])
    console = Console()
    if cfg.action == "prepare":
        prepare_offline(Path(cfg.paths.data_dir), seed=cfg.seed, force=cfg.force)
        console.print(_offline_table(Path(cfg.paths.data_dir)))
        return
    data_root = str(Path(cfg.paths.data_root).expanduser().resolve())
    chosen = [only] if only else suites
    sequences = {s: suite_sequence(s, data_root, searchpath, overrides) for s in chosen}
    reports = {s: [check_task(name, spec, load=False) for name, spec in (seq.get("tasks") or {}).items()]
               for s, seq in sequences.items()}
    if cfg.action == "list":
        table = Table(title=f"Benchmark suites under {data_root}")
        for col in ("suite", "tasks", "present", "first missing file"):
            table.add_column(col, overflow="fold")  # fold long paths and keys rather than cut them off
        for suite, rows in reports.items():
            ready = [r for r in rows if not r["missing"] and not r["problems"]]
            first = next((r["missing"][0] if r["missing"] else r["problems"][0]
                          for r in rows if r["missing"] or r["problems"]), "")
            table.add_row(suite, str(len(rows)), f"{len(ready)}/{len(rows)}", escape(first))
        console.print(table)
        for suite, rows in reports.items():
            problem = next((r["problems"][0] for r in rows if r["problems"]), None)
            if problem:
                console.print(f"[bold]{suite}[/bold]: {escape(problem)}", soft_wrap=True)
        console.print(_offline_table(Path(cfg.paths.data_dir)))
        return
    # validate: load every task of each chosen suite whose data is there (all of them when suite= is given)
    table = Table(title=f"Validation of benchmark data under {data_root}")
    for col in ("suite", "task", "train", "test", "labels", "status"):
        table.add_column(col, overflow="fold")
    failed = checked = 0
    for suite, rows in reports.items():
        if not only and all(r["missing"] for r in rows):
            table.add_row(suite, "(all)", "", "", "", "no data")
            continue
        for name, spec in (sequences[suite].get("tasks") or {}).items():
            row = check_task(name, spec, load=True)
            checked += 1
            status = "; ".join(row["problems"]) or (f"missing {row['missing'][0]}" if row["missing"] else "ok")
            status = escape(status)  # messages hold [...] (e.g. labels=[yes, no]), which rich reads as markup
            failed += status != "ok"
            counts = row["counts"]
            table.add_row(suite, name, str(counts.get("train", "")), str(counts.get(spec.get("eval_split", "test"), "")),
                          "" if row["labels"] is None else str(row["labels"]), status)
    console.print(table)
    if failed:
        raise AglclError(f"{failed} of {checked} tasks failed validation (see the table above)")


def main() -> None:
    """``aglcl data <action> [overrides]``: the action word becomes the ``action=`` override."""
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and "=" not in sys.argv[1]:
        action = sys.argv.pop(1)
        if action not in ACTIONS:
            raise AglclError(f"unknown action '{action}'; choose from: {', '.join(ACTIONS)}")
        sys.argv.insert(1, f"action={action}")
    SEQUENCE_ARGS[:] = [a for a in sys.argv[1:] if a.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "sequence"]
    sys.argv[1:] = [a for a in sys.argv[1:] if a not in SEQUENCE_ARGS]
    _app()
