"""``aglcl data``: benchmark data under ``paths.data_root``, and the offline default tasks.

    aglcl data list                          # every suite: is its data there? (and the offline tasks)
    aglcl data validate suite=trace          # load each task of a suite: counts, fields, label sets
    aglcl data validate                      # ... every suite whose data is present
    aglcl data list paths.data_root=/data/cl # look elsewhere (or set AGLCL_DATA_ROOT)
    aglcl data prepare                       # build the offline default tasks into ${paths.data_dir}
    aglcl data prepare force=true            # rebuild them
"""

import sys

import hydra

from aglcl.errors import AglclError, choices, user_errors
from aglcl.paths import conf_dir

ACTIONS = ("list", "validate", "prepare")


def suite_sequence(suite: str, data_root: str):
    """The composed ``sequence`` node of suite ``suite`` (a conf/sequence option), with ``data_root`` set."""
    from hydra import compose

    cfg = compose(config_name="train", overrides=[f"sequence={suite}"])
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

    from rich.console import Console
    from rich.table import Table

    from aglcl.data.prepare import prepare_offline
    from aglcl.data.tasks import check_task

    if cfg.action not in ACTIONS:
        raise AglclError(f"unknown action '{cfg.action}'; choose from: {', '.join(ACTIONS)}")
    suites = list(cfg.suites)
    if cfg.get("suite") is not None and cfg.suite not in suites:
        raise AglclError(f"unknown suite {cfg.suite!r}; choose one of {choices(suites)}")
    console = Console()
    if cfg.action == "prepare":
        prepare_offline(Path(cfg.paths.data_dir), seed=cfg.seed, force=cfg.force)
        console.print(_offline_table(Path(cfg.paths.data_dir)))
        return
    data_root = str(Path(cfg.paths.data_root).expanduser().resolve())
    chosen = [cfg.suite] if cfg.get("suite") else suites
    reports = {s: [check_task(name, spec, load=False) for name, spec in suite_sequence(s, data_root).tasks.items()]
               for s in chosen}
    if cfg.action == "list":
        table = Table(title=f"Benchmark suites under {data_root}")
        for col in ("suite", "tasks", "present", "first missing file"):
            table.add_column(col)
        for suite, rows in reports.items():
            ready = [r for r in rows if not r["missing"] and not r["problems"]]
            first = next((r["missing"][0] if r["missing"] else r["problems"][0]
                          for r in rows if r["missing"] or r["problems"]), "")
            table.add_row(suite, str(len(rows)), f"{len(ready)}/{len(rows)}", first)
        console.print(table)
        for suite, rows in reports.items():
            problem = next((r["problems"][0] for r in rows if r["problems"]), None)
            if problem:
                console.print(f"[bold]{suite}[/bold]: {problem}", soft_wrap=True)
        console.print(_offline_table(Path(cfg.paths.data_dir)))
        return
    # validate: load every task of each chosen suite whose data is there (all of them when suite= is given)
    table = Table(title=f"Validation of benchmark data under {data_root}")
    for col in ("suite", "task", "train", "test", "labels", "status"):
        table.add_column(col)
    failed = checked = 0
    for suite, rows in reports.items():
        if not cfg.get("suite") and all(r["missing"] for r in rows):
            table.add_row(suite, "(all)", "", "", "", "no data")
            continue
        sequence = suite_sequence(suite, data_root)
        for name, spec in sequence.tasks.items():
            row = check_task(name, spec, load=True)
            checked += 1
            status = "; ".join(row["problems"]) or (f"missing {row['missing'][0]}" if row["missing"] else "ok")
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
    _app()
