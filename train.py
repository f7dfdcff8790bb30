"""Train a GPT: `python train.py [key=value ...]`, or `torchrun --nproc_per_node=N train.py ...`.

Configuration: configs/train.yaml and its groups (model/, data/, tokenizer/, optim/, train/, logger/);
`python train.py --help` lists them, `--cfg job` prints the composed config.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from minillm import cli
from minillm.config import TrainJobConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
cli.register_schemas()


@hydra.main(version_base=None, config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    import os
    from minillm.guards import NonFiniteError
    from minillm.signals import TrainingInterrupted
    from minillm.trainer import train

    job = cli.to_dataclass(cfg, TrainJobConfig)
    job.out_dir = cli.job_dir(job.out_dir)
    cli.setup_logging(int(os.environ.get("RANK", "0")))
    cli.log_recipe(cfg, job)  # train.time_budget_s: what the budget recipe chose
    try:
        with cli.user_errors(made_by_hydra=job.out_dir if cli.in_sweep() else None):
            train(job)
    except TrainingInterrupted as e:  # SIGTERM -> 143, SIGINT -> 130, after the checkpoint
        stopped(f"{e}; continue with the same command (train.resume=auto)", e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the loop's handler is set (data, tokenizer, model) or a second one
        stopped("stopped by SIGINT: the run continues from its last checkpoint, if it has one, and prepared data "
                "stays cached (an unfinished preparation leaves no partial files); rerun the same command "
                "(train.resume=auto)", 130)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def stopped(message: str, code: int) -> None:
    """Exit with ``code`` after a signal; the message once, from rank 0 (torchrun signals every rank)."""
    import os
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    sys.argv[1:] = cli.literal_strings(sys.argv[1:], TrainJobConfig)  # prompts, paths: exactly as the shell gave them
    cli.precheck(CONFIG_DIR, "train", sys.argv[1:])
    main()
