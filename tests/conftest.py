"""Test-wide setup.

TRITON_INTERPRET must be set before triton (or any kernel module) is imported, so it is set
here, at the top of the first file pytest imports. On a machine with CUDA, export
MINILLM_TEST_GPU=1 to run the kernels compiled instead of interpreted.
"""
import os

if os.environ.get("MINILLM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns when this is unset; fused multiply-add is what the GPU build uses too.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (pyproject's -n auto: one per core): one intra-op thread per worker, and for
    # the train.py / torchrun processes its tests start, instead of every process claiming every core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def make_corpus(n_lines: int = 1500, seed: int = 0) -> str:
    """Deterministic English-like text: enough structure for a tokenizer and a model to learn."""
    rng = random.Random(seed)
    words = ("the king queen lord good night day love death sweet fair heart sword crown blood "
             "my thy thou art hath doth shall will not and but with what where when o").split()
    names = ["ROMEO", "JULIET", "KING HENRY", "NURSE", "FRIAR"]
    lines = []
    for i in range(n_lines):
        if i % 6 == 0:
            lines.append(f"{rng.choice(names)}:")
        n = rng.randint(4, 10)
        line = " ".join(rng.choice(words) for _ in range(n))
        lines.append(line[0].upper() + line[1:] + rng.choice([",", ".", "!", "?", ";"]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty, private MINILLM_DATA_DIR so tests never touch the user's cache."""
    d = tmp_path / "data_cache"
    monkeypatch.setenv("MINILLM_DATA_DIR", str(d))
    return d


def run_entry(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train.py / sample.py as a user would, in a subprocess."""
    import os
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# Tiny settings that make an end-to-end run take seconds.
TINY_ARGS = ("model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.n_embd=32",
             "model.block_size=32", "tokenizer.vocab_size=400", "train.batch_size=4",
             "train.log_interval=1", "optim.warmup_steps=2", "logger.progress=false")


def model_preset(name: str, **overrides):
    """configs/model/<name>.yaml as the entry point composes it (its ${minillm.recipe:...} keys resolved:
    without a time budget, the schema defaults), with ``overrides`` on top: a ModelConfig."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    from minillm import cli
    from minillm.config import TrainJobConfig

    cli.register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = cli.to_dataclass(compose(config_name="train", overrides=[f"model={name}"]), TrainJobConfig)
    return dataclasses.replace(cfg.model, **overrides)
