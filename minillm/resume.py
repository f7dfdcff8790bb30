"""Which checkpoint a run continues from, and whether it fits the run as configured now.

    train.resume=auto    the run folder's newest readable checkpoint (a corrupt newest one falls back
                         to the one before, with a warning); none: a fresh run
    train.resume=never   a fresh run; a folder that already holds checkpoints is refused
    train.resume=PATH    that checkpoint file or run folder, unless this run has already gone past it
                         (the same command relaunched, e.g. by torchrun --max-restarts) and its newer
                         checkpoint is readable; a corrupt PATH is one line

"Readable" includes the checksum written with every checkpoint (minillm/checkpoint.py).

A checkpoint continues only the run that wrote it: the same model (``check_compatible``), tokenizer,
prepared data (the token files' counts and checksums, so an edited corpus is caught and a moved one
is not) and the settings that shape training (``SHAPING``: seed, optim.*, steps, spike filter, and the
global batch: batch_size x grad_accum_steps x processes, so moving to another number of processes
with the same global batch is no change). A difference is refused in one line naming every key with its old and new value, unless
``train.allow_changes=true``: then it is logged and the run folder keeps every config it has had.

Rank 0 chooses; the other ranks load the checkpoint it chose, never one of their own choosing.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig, TrainJobConfig, plain
from minillm.distributed import process_group as dist
from minillm.errors import CheckpointError, RunError

log = logging.getLogger(__name__)


def load_resume_state(cfg: TrainJobConfig, run_dir: Path, info: dist.DistInfo,
                      full_model: bool = True) -> tuple[dict | None, Path | None]:
    """(checkpoint state, its path) to continue from, or (None, None) for a fresh run (a collective)."""
    if info.enabled and not info.is_main:
        chosen = dist.broadcast_object(None, info)
        return (ckpt.load_checkpoint(chosen, full_model=full_model), Path(chosen)) if chosen else (None, None)
    state, path = _choose_checkpoint(cfg, run_dir, full_model)
    if info.enabled:
        dist.broadcast_object(str(path) if path else "", info)
    return state, path


def _resume_candidates(cfg: TrainJobConfig, run_dir: Path) -> list[Path]:
    mode = cfg.train.resume
    if mode == "never":
        if ckpt.list_checkpoints(run_dir):
            raise RunError(f"out_dir={run_dir} already holds a run; choose a new out_dir (e.g. "
                           f"out_dir={suggest_out_dir(run_dir)}), or train.resume=auto to continue it "
                           "(nothing was overwritten)")
        return []
    latest = ckpt.latest_checkpoint(run_dir)
    if mode == "auto":
        older = [p for p in reversed(ckpt.list_checkpoints(run_dir)) if p != latest]
        return ([latest] if latest else []) + older
    start = ckpt.resolve_checkpoint(mode)
    if latest is not None and latest.resolve() != start.resolve() and ckpt.step_of(latest) > ckpt.step_of(start):
        return [latest, start]  # the run has moved on: its newer checkpoint, or PATH if that one is corrupt
    return [start]


def _choose_checkpoint(cfg: TrainJobConfig, run_dir: Path, full_model: bool) -> tuple[dict | None, Path | None]:
    candidates = _resume_candidates(cfg, run_dir)
    for i, path in enumerate(candidates):
        try:
            state = ckpt.load_checkpoint(path, full_model=full_model)
        except CheckpointError as e:
            if cfg.train.resume == "auto":
                nxt = candidates[i + 1].name if i + 1 < len(candidates) else "none left"
                log.warning("warning: %s; falling back to the previous checkpoint (%s)", e, nxt)
            elif i == len(candidates) - 1:
                raise  # train.resume=PATH itself is unusable
            else:  # the run's newer checkpoint is corrupt: PATH comes next
                log.warning("warning: %s; continuing from train.resume=%s instead", e, cfg.train.resume)
            continue
        if cfg.train.resume not in ("auto", "never") and i == 0 and len(candidates) > 1:
            log.warning("warning: %s holds a newer checkpoint (%s) than train.resume=%s; continuing from it "
                        "(a relaunched run goes on; to continue from train.resume's step instead, give a new "
                        "out_dir)", run_dir, path.name, cfg.train.resume)
        elif i > 0 and cfg.train.resume == "auto":
            log.warning("warning: resuming from %s, the newest complete checkpoint", path)
        return state, path
    if candidates:
        raise RunError(f"out_dir={run_dir}: no checkpoint there can be read; move the folder aside or "
                       "use train.resume=never with a new out_dir")
    return None, None


# Keys (or key prefixes) of the flattened config whose change reshapes the run's trajectory. optim.fused
# only picks AdamW's implementation. The batch is compared as the global batch (check_settings), data
# and tokenizer by what they produce (check_resumable).
SHAPING = ("seed", "optim.", "train.max_steps", "train.time_budget_s", "train.spike_zscore", "train.spike_window")
NOT_SHAPING = ("optim.fused",)


def flatten(config: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def setting_changes(saved: dict, current: dict, saved_world: int = 1, world: int = 1) -> dict[str, tuple]:
    """{key: (checkpoint's value, configured value)} for every SHAPING key that differs, and for the
    global batch in sequences (batch_size x grad_accum_steps x processes). Keys the checkpoint
    predates are not compared."""
    old, new = flatten(saved), flatten(current)
    changes = {k: (old[k], v) for k, v in new.items()
               if k in old and old[k] != v and k.startswith(SHAPING) and k not in NOT_SHAPING}
    batch = [c["train"]["batch_size"] * c["train"]["grad_accum_steps"] * w
             for c, w in ((saved, saved_world), (current, world))]
    if batch[0] != batch[1]:
        changes["global batch (batch_size x grad_accum_steps x processes)"] = tuple(batch)
    return changes


def describe_changes(changes: dict[str, tuple]) -> str:
    """``optim.lr 0.003 -> 0.001, ...`` (the data's descriptions unquoted)."""
    show = lambda k, v: v if k.startswith("data (") else repr(v)  # noqa: E731
    return ", ".join(f"{k} {show(k, old)} -> {show(k, new)}" for k, (old, new) in changes.items())


def check_compatible(saved: dict, current: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming every differing field
    with its old and new value (RunError)."""
    defaults = asdict(ModelConfig())  # a key added after the checkpoint was written has its default there
    diffs = {f"model.{key}": (saved.get(key, defaults.get(key)), value) for key, value in asdict(current).items()
             if key not in ("name", "dropout") and saved.get(key, defaults.get(key)) != value}  # dropout may change
    if diffs:
        raise RunError(f"{where}: the checkpoint's model differs from the config: {describe_changes(diffs)}; "
                       "use the checkpoint's model settings to continue it, or a new out_dir")


def suggest_out_dir(out_dir: str | Path) -> str:
    """A free sibling of out_dir to suggest when it holds another run: out/a-tiny -> out/a-tiny-2 (or -3,
    ... whichever is free; out/a-tiny-2 -> out/a-tiny-3)."""
    path = Path(out_dir)
    stem, n = re.fullmatch(r"(.+?)(?:-(\d+))?", path.name).groups()
    k = int(n) + 1 if n else 2
    while path.with_name(f"{stem}-{k}").exists():
        k += 1
    return str(path.with_name(f"{stem}-{k}"))


def check_resumable(state: dict, where: Path, cfg: TrainJobConfig, tokenizer_proto: bytes, data_id: dict,
                    info: dist.DistInfo, fsdp: bool) -> dict[str, tuple]:
    """Refuse (RunError) a checkpoint of another tokenizer, model or sharding, or (unless
    train.allow_changes) other training settings or data; warn on a new world size. Returns the
    changes allowed, {key: (old, new)}. The tokenizer comes first: a new one changes model.vocab_size."""
    if _saved_tokenizer(state) != tokenizer_proto:
        raise RunError(_other_tokenizer(where, state["config"], cfg))
    check_compatible(state["config"]["model"], cfg.model, where)
    changes = check_settings(state, where, cfg, data_id, info.world_size)
    if state.get("world_size", 1) != info.world_size:
        # the global batch is the same (check_settings): each step reads the same windows, split another way
        log.warning("warning: %s was written by %d processes, now %d; each step reads the same batches as it "
                    "would have, shared out anew, and dropout's random streams restart from rank 0's", where,
                    state.get("world_size", 1), info.world_size)
    if bool(state.get("sharded")) != fsdp:
        raise RunError(_sharding_mismatch(where, bool(state.get("sharded")), cfg, info))
    return changes


def _sharding_mismatch(where: Path, sharded: bool, cfg: TrainJobConfig, info: dist.DistInfo) -> str:
    """Why a checkpoint's sharding does not fit the run: FSDP runs on 2 or more processes only."""
    if sharded and cfg.train.parallel == "fsdp" and not info.enabled:
        return (f"{where}: a sharded checkpoint resumes under train.parallel=fsdp on 2 or more processes "
                "(torchrun --nproc_per_node=N); one process runs without FSDP (any checkpoint loads in sample.py)")
    kind, needs = ("sharded", "fsdp") if sharded else ("full", "ddp")
    return f"{where}: a {kind} checkpoint resumes only with train.parallel={needs} (any checkpoint loads in sample.py)"


def check_tokenizer_settings(state: dict, where: Path, cfg: TrainJobConfig) -> None:
    """Before any data is prepared: refuse (RunError) a resume whose tokenizer would differ for a reason
    the config already shows: another tokenizer.path file, or changed tokenizer.* settings (which train
    another tokenizer). Saves a tokenizer training and an encoding of the corpus that would only end in
    check_resumable's refusal. An edited corpus is caught there, after preparation."""
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path).expanduser()  # as preparation reads it
        if path.is_file() and path.read_bytes() != _saved_tokenizer(state):
            raise RunError(f"{where}: tokenizer.path={cfg.tokenizer.path} holds another sentencepiece model than the "
                           f"one this run was trained with; continue it with its own, tokenizer.path="
                           f"{Path(cfg.out_dir) / 'tokenizer.model'}, or start a new run with "
                           f"out_dir={suggest_out_dir(cfg.out_dir)}")
    elif _tokenizer_keys_changed(state["config"], cfg, prefixes=("tokenizer.",)):
        raise RunError(_other_tokenizer(where, state["config"], cfg))


def _saved_tokenizer(state: dict) -> bytes:
    """The sentencepiece model a checkpoint was trained with (stored as a uint8 tensor)."""
    return bytes(state["tokenizer"].numpy().tobytes())


def _other_tokenizer(where: Path, saved: dict, cfg: TrainJobConfig) -> str:
    return (f"{where}: was trained with a different tokenizer than the settings give now "
            f"({_tokenizer_cause(saved, cfg)}); continue it with its own tokenizer, "
            f"tokenizer.path={Path(cfg.out_dir) / 'tokenizer.model'} (then a changed corpus can be "
            f"allowed with train.allow_changes=true), or start a new run with "
            f"out_dir={suggest_out_dir(cfg.out_dir)}")


def _tokenizer_keys_changed(saved: dict, cfg: TrainJobConfig,
                            prefixes: tuple[str, ...] = ("data.", "tokenizer.")) -> dict[str, tuple]:
    """{key: (old, new)} for the data / tokenizer settings that differ from the checkpoint's (those that
    only set how many threads or workers do the work excepted)."""
    old, new = flatten(saved), flatten(plain(cfg))
    return {k: (old[k], v) for k, v in new.items() if k.startswith(prefixes) and k in old and old[k] != v
            and k not in ("data.num_workers", "tokenizer.num_threads")}


def _tokenizer_cause(saved: dict, cfg: TrainJobConfig) -> str:
    """Why the tokenizer differs: the data.* / tokenizer.* keys that changed, else an edited corpus (the
    tokenizer is trained on the training split, so any edit there retrains it)."""
    keys = _tokenizer_keys_changed(saved, cfg)
    return describe_changes(keys) if keys else "the corpus was edited?"


def check_settings(state: dict, where: Path, cfg: TrainJobConfig, data_id: dict, world: int) -> dict[str, tuple]:
    """The SHAPING settings, global batch and prepared data of the checkpoint against the run's: refused
    in one line (RunError) when they differ, unless train.allow_changes; then logged. Returns them."""
    changes = setting_changes(state["config"], plain(cfg), state.get("world_size", 1),
                              world)
    saved_data = state.get("data")
    if saved_data is not None and saved_data != data_id:
        changes["data (prepared tokens)"] = (_describe_data(saved_data), _describe_data(data_id))
    if not changes:
        return changes
    if not cfg.train.allow_changes:
        raise RunError(f"{where}: the run was trained with other settings: {describe_changes(changes)}; "
                       "rerun with the checkpoint's values to continue it, or pass train.allow_changes=true "
                       f"to continue with the new ones (logged; every config is kept), or start a new run "
                       f"with out_dir={suggest_out_dir(cfg.out_dir)}")
    log.warning("warning: continuing %s with changed settings (train.allow_changes=true): %s", where,
                describe_changes(changes))
    return changes


def _describe_data(data_id: dict) -> str:
    return ", ".join(f"{split} {d['count']} tokens crc {d['crc']:08x}" for split, d in sorted(data_id.items()))


def check_not_past(step: int, max_steps: int, where: Path, cfg: TrainJobConfig) -> None:
    """Refuse (RunError) a run whose checkpoint is already past train.max_steps as now configured (lowered
    with train.allow_changes): a run cannot be shortened, and calling it finished would report a final
    evaluation that never ran. (A time budget's saved plan is kept at a resume, so it never lands here.)"""
    if step > max_steps:
        raise RunError(f"{where}: the run is at step {step}, past train.max_steps={max_steps}; a run cannot be "
                       f"shortened: set train.max_steps >= {step} to continue it, or train a new run with "
                       f"out_dir={suggest_out_dir(cfg.out_dir)}")


def check_same_optimizer(state: dict, where: Path, cfg: TrainJobConfig) -> None:
    """Refuse (RunError) to continue a run's optimizer state with another optimizer."""
    saved = state["config"].get("optim", {}).get("name", cfg.optim.name)
    if saved != cfg.optim.name:
        raise RunError(f"{where}: was trained with optim.name={saved}, the config says {cfg.optim.name}; "
                       f"resume with optim={saved}, or start from its weights with train.init_from and a new out_dir")
