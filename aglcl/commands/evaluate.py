"""``aglcl eval``: forgetting metrics (OP, BWT, FWT, forgetting, AIA, plasticity).

    aglcl eval run_dir=outputs/train/runs/<stamp>          # recompute from the run's stored predictions
    aglcl eval matrix=table.csv                            # any accuracy matrix (CSV like R.csv, or JSON)
    aglcl eval sweep_dir=outputs/train/multiruns/<stamp>   # one row per override combination, mean ± std

Each call writes ``metrics.json`` (and ``sweep.csv`` for sweeps) into its own run dir.
"""

import hydra

from aglcl.errors import user_errors
from aglcl.paths import conf_dir


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
@user_errors
def main(cfg) -> None:
    from aglcl.report.evaluate import run_eval

    run_eval(cfg)
