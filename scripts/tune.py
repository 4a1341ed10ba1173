"""Pick a method's tuned setting from a tuning sweep on the eval split, and write it into the method's YAML.

    aglcl train -m experiment=offline_cl sweep=tune_ewc          # 4 settings, scored on the eval split
    python scripts/tune.py outputs/train/multiruns/<stamp>        # the table, and the best setting
    python scripts/tune.py outputs/train/multiruns/<stamp> --write   # ... written into conf/method/ewc.yaml

The sweep must have scored the eval split (``evaluation.split=eval``, as every ``conf/sweep/tune_*.yaml``
sets): a job that scored the test split is refused, so a tuned value never depends on test data. The
setting with the best mean ``--metric`` (default ``op``, the final average score) over the row's runs wins;
ties go to the first row. ``--write`` replaces each tuned ``method.<key>`` line of the method's YAML, with a
comment saying how the value was chosen; a tuned key outside the method (e.g. ``trainer.lr``) is printed,
to be passed on the command line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HIGHER_IS_BETTER = {"op": True, "bwt": True, "aia": True, "plasticity": True, "fwt": True, "forgetting": False}


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _method_name(sweep_dir: Path) -> str:
    """The ``method`` config choice of the sweep's jobs (Hydra's runtime choices)."""
    import yaml

    names = set()
    for hydra_file in sorted(sweep_dir.glob("*/.hydra/hydra.yaml")):
        choices = (yaml.safe_load(hydra_file.read_text(encoding="utf-8")) or {}).get("hydra", {}).get(
            "runtime", {}).get("choices", {})
        names.add(choices.get("method"))
    names.discard(None)
    if len(names) != 1:
        _fail(f"{sweep_dir}: expected one method across the jobs, found {sorted(names) or 'none'}")
    return names.pop()


def _check_eval_split(sweep_dir: Path) -> None:
    for results_file in sorted(sweep_dir.glob("*/results.json")):
        split = (json.loads(results_file.read_text(encoding="utf-8")).get("evaluation") or {}).get("split")
        if split != "eval":
            _fail(f"{results_file} scored the {split or 'test'} split; tune on the eval split "
                  "(evaluation.split=eval, as conf/sweep/tune_*.yaml sets), never on test")


def settings(row: dict) -> dict[str, str]:
    """A row's overrides as ``{key: value}``."""
    return dict(o.lstrip("+").split("=", 1) for o in row["kept"] if "=" in o)


def tuned_keys(rows: list[dict]) -> list[str]:
    """The override keys whose values differ between rows (the knobs the sweep varied)."""
    parsed = [settings(row) for row in rows]
    return sorted(k for k in {k for p in parsed for k in p} if len({p.get(k) for p in parsed}) > 1)


def best_row(rows: list[dict], metric: str) -> dict:
    """The finished row with the best mean ``metric`` (first on ties)."""
    scored = [row for row in rows if (row.get(metric) or {}).get("mean") is not None]
    if not scored:
        _fail(f"no finished job reports {metric}")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return max(scored, key=lambda row: sign * row[metric]["mean"])  # max keeps the first of equal values


def write_yaml(path: Path, settings: dict[str, str], note: str) -> list[str]:
    """Replace the top-level ``key: value`` lines of ``path`` for ``settings``; returns the keys it lacked."""
    lines = path.read_text(encoding="utf-8").splitlines()
    missing = []
    for key, value in settings.items():
        pattern = re.compile(rf"^{re.escape(key)}:\s*[^#]*?(\s*#.*)?$")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if len(hits) != 1:
            missing.append(key)
            continue
        old = lines[hits[0]].split(":", 1)[1].split("#", 1)[0].strip()
        lines[hits[0]] = f"{key}: {value}   # tuned ({note}; was {old})"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="op", choices=sorted(HIGHER_IS_BETTER))
    parser.add_argument("--write", action="store_true", help="write the best setting into the method's YAML")
    parser.add_argument("--conf-dir", type=Path, default=None, help="config dir to write into (default: aglcl's)")
    args = parser.parse_args(argv)

    from rich.console import Console

    from aglcl.errors import AglclError
    from aglcl.paths import conf_dir
    from aglcl.report.sweep import aggregate_sweep
    from aglcl.report.tables import print_whole, sweep_table

    try:
        rows = aggregate_sweep(args.sweep_dir)
    except AglclError as e:
        _fail(str(e))
    _check_eval_split(args.sweep_dir)
    method = _method_name(args.sweep_dir)
    keys = tuned_keys(rows)
    best = best_row(rows, args.metric)
    console = Console(width=200)
    for row in rows:
        row["overrides"] = ("-> " if row is best else "   ") + " ".join(
            f"{k}={v}" for k, v in settings(row).items() if k in keys)
    print_whole(console, sweep_table(rows, [args.metric, "bwt", "plasticity"],
                                     title=f"Tuning {method} on the eval split ({args.sweep_dir.name})"))
    chosen = {k: v for k, v in settings(best).items() if k in keys}
    print(f"best {args.metric} on the eval split: {' '.join(f'{k}={v}' for k, v in chosen.items())}")
    if args.write:
        path = (args.conf_dir or conf_dir()) / "method" / f"{method}.yaml"
        values = {k: sorted({settings(r).get(k, "") for r in rows}) for k in chosen}
        note = (f"scripts/tune.py: best mean eval-split {args.metric} of {', '.join(f'{k} in {v}' for k, v in values.items())}"
                f", {args.sweep_dir.name}")
        in_method = {k.split(".", 1)[1]: v for k, v in chosen.items() if k.startswith("method.")}
        missing = write_yaml(path, in_method, note)
        print(f"wrote {', '.join(k for k in in_method if k not in missing)} into {path}")
        for key in [*(f"method.{k}" for k in missing), *(k for k in chosen if not k.startswith("method."))]:
            print(f"not written (no top-level line in {path.name}): pass {key}={chosen[key]} yourself")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
