"""Run metrics: metrics.jsonl (one JSON object per logged step) and, when enabled, wandb."""
from __future__ import annotations

import json
import math
from pathlib import Path

from minillm.atomic_files import describe_write_error, write_run_file
from minillm.config import WandbConfig
from minillm.errors import CheckpointError


def strict_json(value, **kwargs) -> str:
    """json.dumps with non-finite floats written as null: Python's default writes NaN / Infinity,
    which is not JSON (RFC 8259, section 6) and which strict parsers (JSON.parse, jq) refuse."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), allow_nan=False, **kwargs)


def finite_fields(record: dict) -> dict:
    """The record without its NaN / infinite numbers (an unevaluated validation loss, a skipped step's
    loss): metrics.jsonl and wandb get numbers or nothing, so readers never meet null."""
    return {k: v for k, v in record.items() if not (isinstance(v, float) and not math.isfinite(v))}


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line torn by a crash mid-write is skipped."""
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` and mirrors them to wandb when enabled.

    Only the main process creates one. On resume from step S, records after S (written after that
    checkpoint by the interrupted run) are dropped so the file tells one consistent history.
    """

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        kept = [] if resume_step is None else [r for r in read_records(self.path) if r["step"] <= resume_step]
        # atomic; one line on failure. finite_fields: a file an older minillm wrote may hold NaN / Infinity
        write_run_file(self.path, "".join(strict_json(finite_fields(r)) + "\n" for r in kept))
        self._f = open(self.path, "a")
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or self.run_dir.name,
                                    tags=list(wandb_cfg.tags), mode=wandb_cfg.mode, config=config,
                                    dir=str(self.run_dir), resume="allow")

    def log(self, record: dict) -> None:
        """Append one record (CheckpointError, one line, when the disk is full or read-only: a torn last
        line is skipped by read_records, and the relaunch continues from the last checkpoint)."""
        record = finite_fields(record)
        try:
            self._f.write(strict_json(record) + "\n")
            self._f.flush()
        except OSError as e:
            raise CheckpointError(describe_write_error(self.path, e) + ", then relaunch the same command: it "
                                  "continues from the last checkpoint") from e
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_checkpoint_artifact(self) -> None:
        """Upload the newest checkpoint and the tokenizer as a wandb artifact of type "model"."""
        from minillm.checkpoint import latest_checkpoint
        import wandb
        path = latest_checkpoint(self.run_dir)
        if path is None or self.wandb is None:
            return
        art = wandb.Artifact(f"{self.run_dir.name}-model", type="model")
        art.add_file(str(path))
        art.add_file(str(self.run_dir / "tokenizer.model"))
        self.wandb.log_artifact(art)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
