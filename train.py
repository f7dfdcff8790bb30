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
    from minillm.trainer import train

    job = cli.to_dataclass(cfg, TrainJobConfig)
    job.out_dir = cli.job_dir(job.out_dir)
    cli.setup_logging(int(os.environ.get("RANK", "0")))
    with cli.user_errors():
        train(job)


if __name__ == "__main__":
    cli.precheck(CONFIG_DIR, "train", sys.argv[1:])
    main()
