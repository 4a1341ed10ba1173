"""``aglcl train``: run a continual fine-tuning sequence (a Hydra app over ``conf/train.yaml``).

    aglcl train                                    # offline default experiment
    aglcl train model=tiny debug=fast              # smoke test in seconds
    aglcl train sequence.order=[chat_topic,bbc_topic,tweet_sentiment] trainer.lr=1e-4
    aglcl train -m trainer.seed=0,1,2              # multirun: outputs/train/multiruns/<stamp>/<n>
    aglcl train --cfg job                          # print the composed config and exit
"""

import hydra

from aglcl.errors import user_errors
from aglcl.paths import conf_dir


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
@user_errors
def main(cfg) -> float:
    from aglcl.engine.runner import run_train

    return run_train(cfg)["metrics"].get("op")  # the objective a sweeper (e.g. Optuna) maximises
