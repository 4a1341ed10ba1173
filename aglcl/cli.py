"""The ``aglcl`` command: ``aglcl <subcommand> [hydra overrides...]``.

Examples::

    aglcl train                                   # the offline default experiment
    aglcl train model=tiny debug=fast             # seconds, on a random tiny Llama
    aglcl train -m method=seqft,agft trainer.seed=0,1,2
    aglcl train --cfg job                         # print the composed config
    aglcl eval run_dir=outputs/train/runs/<stamp>
    aglcl eval matrix=paper_table.csv
    aglcl eval sweep_dir=outputs/train/multiruns/<stamp>
    aglcl ls                                      # config options and finished runs
    aglcl data prepare                            # build the offline tasks into the cache

Several processes (one per GPU)::

    torchrun --nproc_per_node 8 --no-python aglcl train distributed=fsdp2 ...
    accelerate launch --num_processes 8 -m aglcl train distributed=ddp ...

Every rank resolves the same run dir (rank 0's launch time, shared before Hydra starts); only rank 0
writes Hydra's ``.hydra/`` copies, artifacts and progress (aglcl/dist.py).

User errors print one line on stderr and exit with status 2 (``aglcl`` alone prints the usage, status 2);
Ctrl-C prints one line saying how to resume and exits with 130. Set AGLCL_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("aglcl.commands.train", "train a model on a task sequence (Hydra app)"),
    "eval": ("aglcl.commands.evaluate", "forgetting metrics of a run, an accuracy matrix or a sweep"),
    "ls": ("aglcl.commands.ls", "list config options and finished runs"),
    "data": ("aglcl.commands.data", "prepare | list the offline task data"),
}


def _usage() -> str:
    lines = ["usage: aglcl <command> [overrides...]   (aglcl <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines) + "\n\n" + (__doc__ or "").split("Examples::")[1].split("User errors")[0].rstrip()


def _fail(cmd: str, message: str) -> None:
    prefix = f"aglcl {cmd}" if cmd else "aglcl"
    print(f"{prefix}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a missing subcommand is a usage error
        print(_usage(), file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    cmd = argv[0]
    if cmd not in COMMANDS:
        _fail("", f"unknown command '{cmd}'; choose from: {', '.join(COMMANDS)}")
    debug = os.environ.get("AGLCL_DEBUG") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's errors reach us, then print them as one line
    from aglcl.errors import AglclError, RunInterrupted, UserAbort, hydra_message, os_error_message

    try:
        module = importlib.import_module(COMMANDS[cmd][0])
        sys.argv = [f"aglcl-{cmd}", *argv[1:], *_rank_setup(cmd, argv[1:])]
        module.main()
    except (AglclError, UserAbort) as exc:
        if debug:
            raise
        _fail(cmd, str(exc))
    except (RunInterrupted, KeyboardInterrupt) as exc:  # Ctrl-C: one line, the shell's status for SIGINT
        if debug:
            raise
        print(f"aglcl {cmd}: {exc or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if not debug and os_error_message(exc) is not None:  # e.g. Hydra creating a read-only run dir
            _fail(cmd, os_error_message(exc))
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if debug or not isinstance(exc, (HydraException, OmegaConfBaseException)):
            raise
        cause = exc
        while cause is not None and not isinstance(cause, AglclError):
            cause = cause.__cause__  # e.g. a config's __post_init__ error wrapped by instantiate()
        _fail(cmd, str(cause) if cause is not None else hydra_message(exc))
    finally:
        if "torch" in sys.modules:  # a multi-process run: close the process group before exit
            from aglcl import dist

            dist.shutdown()


def _rank_setup(cmd: str, args: list[str]) -> list[str]:
    """Under a multi-process launch of ``train``: one shared launch time (so one run dir) and, on ranks
    > 0, no ``.hydra/`` copies. Returns the overrides to append. Nothing happens in a single process."""
    if cmd != "train" or any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in args):
        return []
    from aglcl import dist
    from aglcl.engine import launch

    launch.export_slurm_env()  # srun with several tasks: RANK/WORLD_SIZE from SLURM
    if not dist.is_distributed():
        return []
    launch.share_launch_time()
    return launch.hydra_rank_overrides()


if __name__ == "__main__":
    main()
