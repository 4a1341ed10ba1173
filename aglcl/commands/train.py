"""``aglcl train``: run a continual fine-tuning sequence (a Hydra app over ``conf/train.yaml``).

    aglcl train                                    # offline default experiment
    aglcl train model=tiny debug=fast              # smoke test in seconds
    aglcl train sequence.order=[chat_topic,bbc_topic,tweet_sentiment] trainer.lr=1e-4
    aglcl train -m trainer.seed=0,1,2              # multirun: outputs/train/multiruns/<stamp>/<n>
    aglcl train --cfg job                          # print the composed config and exit
    torchrun --nproc_per_node 2 --no-python aglcl train distributed=ddp    # one rank per process / GPU
    accelerate launch --num_processes 8 -m aglcl train distributed=fsdp2
    aglcl train -m hydra/launcher=slurm distributed=fsdp2 method=seqft,agft trainer.seed=0,1,2
"""

import hydra

from aglcl.errors import user_errors
from aglcl.paths import conf_dir


def train(cfg, run_dir=None) -> dict:
    """Run the sequence and write its report files: what ``aglcl train`` does, callable in-process."""
    from aglcl.engine.runner import run_train
    from aglcl.report.run import write_run

    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    results = run_train(cfg, run_dir)
    write_run(results, run_dir)
    return results


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
@user_errors
def main(cfg) -> float:
    from aglcl.engine import launch

    launch.export_slurm_env()  # submitit runs this function in each SLURM task: one rank each
    launch.quiet_non_main()  # after Hydra's logging setup: ranks > 0 log warnings and errors only
    return train(cfg)["metrics"].get("op")  # the objective a sweeper (e.g. Optuna) maximises
