"""Fine-tuning: the weights and tokenizer a run starts from (``train.init_from``).

    load_source(cfg)                  the source as {"model": state dict, "tokenizer": Tokenizer,
                                      "model_config": dict, "step": int, "where": Path}, or None
    init_weights(model, source, cfg)  copy the source's weights into a freshly built model
    check_coverage(source, train)     warn when the source's tokenizer fits the new corpus badly

The source is a minillm run folder or checkpoint. The new run gets a fresh optimizer and schedule.
"""
from __future__ import annotations

import logging
from pathlib import Path

from minillm import checkpoint as ckpt
from minillm.config import TrainJobConfig
from minillm.model import GPT
from minillm.resume import check_compatible
from minillm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_source(cfg: TrainJobConfig) -> dict | None:
    """The run's starting point named by train.init_from, or None when it is unset."""
    if not cfg.train.init_from:
        return None
    where = ckpt.resolve_checkpoint(cfg.train.init_from)
    state = ckpt.load_checkpoint(where)
    return {"model": state["model"], "tokenizer": Tokenizer(bytes(state["tokenizer"].numpy().tobytes())),
            "model_config": state["config"]["model"], "step": state["train_state"]["step"], "where": where}


def init_weights(model: GPT, source: dict, cfg: TrainJobConfig) -> None:
    """Load the source's weights into ``model`` (RunError when the model settings differ)."""
    check_compatible(source["model_config"], cfg.model, Path(cfg.train.init_from))
    model.load_state_dict(source["model"])
    log.info("fine-tuning from %s (step %d of that run): fresh optimizer and schedule",
             cfg.train.init_from, source["step"])


def check_coverage(source: dict, train) -> None:
    """Warn when the source's tokenizer encodes the new training tokens ``train`` (1-D array of ids)
    mostly as byte-fallback pieces. Not implemented yet: issue 16 item 6."""
