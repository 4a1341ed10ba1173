"""``aglcl ls``: every config group with its options, then the finished runs under ``outputs/``.

    aglcl ls
    aglcl ls paths.log_dir=/scratch/aglcl-outputs
"""

import hydra

from aglcl.errors import user_errors
from aglcl.paths import conf_dir


def config_groups(root=None) -> dict[str, list[str]]:
    """``{group: [options]}`` for every group directory under the config dir (nested groups joined by /)."""
    root = root or conf_dir()
    groups: dict[str, list[str]] = {}
    for yaml in sorted(root.rglob("*.yaml")):
        rel = yaml.relative_to(root)
        if len(rel.parts) > 1:
            groups.setdefault("/".join(rel.parts[:-1]), []).append(yaml.stem)
    return groups


def finished_runs(log_dir) -> list[dict]:
    """One dict per ``results.json`` found below ``log_dir``, newest first."""
    import json
    from pathlib import Path

    runs = []
    for f in Path(log_dir).glob("**/results.json"):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        runs.append({"run_dir": str(f.parent), "tasks": len(r.get("tasks", [])), "method": r.get("method"),
                     "seed": r.get("seed"), **{k: (r.get("metrics") or {}).get(k) for k in ("op", "bwt")},
                     "mtime": f.stat().st_mtime})
    return sorted(runs, key=lambda r: -r["mtime"])


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="ls")
@user_errors
def main(cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    groups = Table(title=f"Config groups ({conf_dir()})")
    groups.add_column("group")
    groups.add_column("options")
    for group, options in config_groups().items():
        groups.add_row(group, ", ".join(options))
    console.print(groups)
    runs = Table(title=f"Finished runs under {cfg.paths.log_dir}")
    for col in ("run dir", "tasks", "method", "seed", "OP", "BWT"):
        runs.add_column(col)
    for r in finished_runs(cfg.paths.log_dir):
        fmt = [f"{r[k]:.4f}" if isinstance(r[k], float) else "n/a" for k in ("op", "bwt")]
        runs.add_row(r["run_dir"], str(r["tasks"]), str(r["method"]), str(r["seed"]), *fmt)
    console.print(runs)
