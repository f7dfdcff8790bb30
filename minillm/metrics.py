"""Run metrics: metrics.jsonl (one JSON object per logged step), optional wandb, and a PNG of the curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

from minillm.config import WandbConfig


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` and mirrors them to wandb when enabled.

    Only the main process should create one. On resume from step S, records after S (written after
    that checkpoint by the interrupted run) are dropped so the file tells one consistent history.
    """

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self._f = open(self.path, "a")
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or Path(run_dir).name,
                                    tags=list(wandb_cfg.tags), mode=wandb_cfg.mode, config=config,
                                    dir=str(run_dir), resume="allow")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self._f.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def plot_run(run_dir: str | Path) -> Path | None:
    """Draw ``<run>/curves.png``: loss and bits per byte, learning rate, throughput, against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        return None

    def series(key):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        ax.plot(*series(key), style, label=key, markersize=3)
    ax.set(title="loss (nats/token)", xlabel="step")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(*series("val_bpb"), "o-", label="val_bpb", markersize=3)
    ax.set(title="validation bits per byte", xlabel="step")
    ax = axes[1, 0]
    ax.plot(*series("lr"), label="lr")
    ax.set(title="learning rate", xlabel="step")
    ax = axes[1, 1]
    ax.plot(*series("tokens_per_sec"), label="tokens/s")
    ax.set(title="throughput (tokens/s)", xlabel="step")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
