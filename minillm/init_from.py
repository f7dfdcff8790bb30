"""Fine-tuning: the weights and tokenizer a run starts from (``train.init_from``).

    load_source(cfg)                  the source as {"model": state dict, "tokenizer": Tokenizer,
                                      "model_config": dict, "step": int, "where": Path}, or None;
                                      sets cfg.model's shape from the source
    init_weights(model, source, cfg)  copy the source's weights into a freshly built model
    check_coverage(source, train)     warn when the source's tokenizer fits the new corpus badly

The source is a minillm run folder or checkpoint, or a transformers folder (Llama, Qwen3 or GPT-2 with
a sentencepiece tokenizer.model; minillm/hf_import.py). The new run gets a fresh optimizer and schedule.

The model's shape comes from the source, so no ``model.*`` setting needs repeating: every model field
still at ModelConfig's default (n_kv_head: equal to n_head; vocab_size: unset) takes the source's value,
and those that changed are logged. A field set to another value must equal the source's (RunError naming
it: the weights could not load otherwise). ``model.dropout`` is never taken: it stays the config's.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig, TokenizerConfig, TrainJobConfig
from minillm.errors import RunError
from minillm.hf_import import is_hf_folder, load_hf_source
from minillm.model import GPT
from minillm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
BYTE_FALLBACK_WARN = 0.20   # warn above this share of byte-fallback tokens in the new corpus
_KEEP = ("dropout",)        # model settings the fine-tuning run chooses itself


def load_source(cfg: TrainJobConfig) -> dict | None:
    """The run's starting point named by train.init_from, or None when it is unset. Sets cfg.model's
    shape and tokenizer settings from the source (see the module docstring and use_source_tokenizer);
    RunError for a conflicting model setting or a tokenizer.path, CheckpointError / ExportError (one line) for a
    source that cannot be read or mapped."""
    if not cfg.train.init_from:
        return None
    path = Path(cfg.train.init_from).expanduser()
    if is_hf_folder(path):
        source = load_hf_source(path)
    else:
        where = ckpt.resolve_checkpoint(path)
        state = ckpt.load_checkpoint(where)
        source = {"model": state["model"], "tokenizer": Tokenizer(bytes(state["tokenizer"].numpy().tobytes())),
                  "model_config": state["config"]["model"], "step": state["train_state"]["step"], "where": where,
                  "tokenizer_config": state["config"].get("tokenizer")}
    take_model_shape(cfg.model, source["model_config"], source["where"])
    use_source_tokenizer(cfg, source.get("tokenizer_config") or {"vocab_size": source["tokenizer"].vocab_size})
    return source


def use_source_tokenizer(cfg: TrainJobConfig, saved: dict) -> None:
    """With train.init_from the source's tokenizer encodes the new corpus (its ids are what the weights
    know), so tokenizer.* settings cannot apply: tokenizer.path is refused (RunError), other settings that
    differ from the source's (``saved``: its config's tokenizer section; for a transformers folder only its
    vocabulary size, the rest taken as the defaults) are a warning, and cfg.tokenizer becomes the source's, so config.json records the truth."""
    if cfg.tokenizer.path:
        raise RunError(f"train.init_from={cfg.train.init_from}: fine-tuning uses the source's tokenizer, so "
                       f"tokenizer.path={cfg.tokenizer.path} cannot apply; drop it (or train a new model with it)")
    default = asdict(TokenizerConfig())
    base = {k: saved.get(k, v) for k, v in default.items()}
    unused = [f"tokenizer.{k}={getattr(cfg.tokenizer, k)!r}" for k in default
              if k != "num_threads" and getattr(cfg.tokenizer, k) != base[k]]
    if unused:
        log.warning("warning: fine-tuning uses the tokenizer of train.init_from=%s; not used: %s",
                    cfg.train.init_from, ", ".join(unused))
    cfg.tokenizer = TokenizerConfig(**{**base, "num_threads": cfg.tokenizer.num_threads})


def _is_default(current: ModelConfig, key: str, default: ModelConfig) -> bool:
    """Whether ``current.key`` still has ModelConfig's default (so the user did not choose it)."""
    if key == "n_kv_head":
        return current.n_kv_head == current.n_head  # the default: as many as the query heads
    return getattr(current, key) == getattr(default, key)


def take_model_shape(current: ModelConfig, saved: dict, where: Path) -> None:
    """Set every model field of ``current`` still at its default to the source's value ``saved[key]``
    (a key missing there: ModelConfig's default, as resume does), logging those that change; RunError
    for a field the config sets to another value than the source's."""
    default, taken, keys = ModelConfig(), [], [f.name for f in fields(ModelConfig) if f.name not in _KEEP]
    chosen = {k: not _is_default(current, k, default) for k in keys}  # before any field changes
    conflicts = []
    for key in keys:
        value = saved.get(key, getattr(default, key))
        if key == "n_kv_head" and saved.get(key) is None:  # a config saved before n_kv_head was resolved: n_head
            value = saved.get("n_head", current.n_head)
        if getattr(current, key) == value or (chosen[key] and key == "name"):
            continue
        if chosen[key]:
            conflicts.append((key, value, getattr(current, key)))
            continue
        setattr(current, key, value)
        taken.append(f"{key}={value}")
    if conflicts:  # every one at once, not the first of several
        listed = ", ".join(f"model.{k}={v!r} but the config says {c!r}" for k, v, c in conflicts)
        raise RunError(f"train.init_from={where}: the source has {listed}; leave those model settings unset "
                       "(the source's are taken) or set them to the source's values")
    if taken:
        log.info("fine-tuning: model settings taken from %s: %s", where, ", ".join(taken))


def init_weights(model: GPT, source: dict, cfg: TrainJobConfig) -> None:
    """Load the source's weights into ``model`` (built from cfg.model after load_source set its shape)."""
    for key, value in source["model_config"].items():  # load_source made them equal; a caller may not have
        if key not in _KEEP and key != "name" and value is not None and getattr(cfg.model, key, value) != value:
            raise RunError(f"train.init_from={source['where']}: the source has model.{key}={value!r} but the "
                           f"config says {getattr(cfg.model, key)!r}; leave model.{key} unset")
    model.load_state_dict(source["model"])
    log.info("fine-tuning from %s (step %d of that run): fresh optimizer and schedule",
             cfg.train.init_from, source["step"])


def byte_fallback_share(tok: Tokenizer, ids: np.ndarray, max_tokens: int = 1 << 24) -> float:
    """Fraction (0..1) of ``ids`` (1-D token ids) that are byte-fallback pieces <0xNN> of ``tok``.
    Above ``max_tokens`` ids, 16 evenly spaced windows of max_tokens/16 ids are counted instead."""
    mask, n = tok.byte_fallback_mask(), len(ids)
    if n == 0:
        return 0.0
    width = max(1, max_tokens // 16)
    starts = [0] if n <= max_tokens else np.linspace(0, n - width, 16).astype(np.int64).tolist()
    hits = total = 0
    for a in starts:
        part = np.asarray(ids[a:a + (n if n <= max_tokens else width)])
        hits, total = hits + int(mask[part].sum()), total + len(part)
    return hits / total


def check_coverage(source: dict, train) -> None:
    """Warn when the source's tokenizer encodes the new training tokens ``train`` (1-D array of ids)
    mostly as byte-fallback pieces: over BYTE_FALLBACK_WARN (20%) of them, as an English tokenizer
    does on Chinese. The warning gives the measured percentage."""
    share = byte_fallback_share(source["tokenizer"], train)
    if share > BYTE_FALLBACK_WARN:
        log.warning("warning: the tokenizer of train.init_from=%s encodes %.1f%% of the new training tokens as "
                    "byte fallbacks (<0xNN>): it covers this corpus badly, so each token carries little text "
                    "and the context holds little; consider a tokenizer trained on this kind of text (a new run)",
                    source["where"], 100 * share)
