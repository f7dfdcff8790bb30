"""The training batch source's coverage and resumability; atomic checkpoints with a latest pointer."""
import numpy as np
import pytest
import torch

from minillm.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint,
                                resolve_checkpoint, save_checkpoint)
from minillm.data.batches import BatchSource, eval_batches
from minillm.errors import CheckpointError, DataError


def test_every_window_once_per_epoch_and_ranks_disjoint():
    tokens = np.arange(1000, dtype=np.uint16)
    T, B, world = 10, 3, 2
    ranks = [BatchSource(tokens, B, T, seed=5, rank=r, world_size=world) for r in range(world)]
    n = ranks[0].n_windows
    steps = n // (B * world)
    starts = []
    for _ in range(steps):
        for s in ranks:
            x, y = s.next_batch()
            assert torch.equal(y[:, :-1], x[:, 1:])           # targets are inputs shifted by one
            starts += x[:, 0].tolist()
    assert len(starts) == len(set(starts)) == steps * B * world  # no window twice, across ranks
    offset = starts[0] % T
    assert all(s % T == offset for s in starts)
    x, _ = ranks[0].next_batch()                                # next epoch: a new offset/order
    assert ranks[0].epoch == 1


def test_sampler_state_resumes_the_same_stream():
    tokens = np.arange(5000, dtype=np.uint16)
    a = BatchSource(tokens, 4, 16, seed=1)
    for _ in range(100):
        a.next_batch()
    b = BatchSource(tokens, 4, 16, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(50):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(DataError, match="lower train.batch_size"):
        BatchSource(np.arange(20, dtype=np.uint16), 4, 16, seed=1)


def test_eval_batches_cover_every_target_once():
    tokens = np.arange(103, dtype=np.uint16)
    ys = [y[y >= 0] for x, y in eval_batches(tokens, 2, 10)]
    assert torch.equal(torch.cat(ys), torch.arange(1, 103))
    split = [y[y >= 0] for r in range(3) for _, y in eval_batches(tokens, 2, 10, rank=r, world_size=3)]
    assert sorted(torch.cat(split).tolist()) == list(range(1, 103))


def test_checkpoints_are_atomic_kept_and_found(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000020.pt", "step_000030.pt"]
    assert latest_checkpoint(tmp_path).name == "step_000030.pt"
    assert resolve_checkpoint(tmp_path) == latest_checkpoint(tmp_path)
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 30
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_checkpoint_is_named(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"step_000001.pt: cannot be read .* truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint in this folder"):
        resolve_checkpoint(tmp_path / "ckpt")


def test_stale_temp_files_are_cleared_and_abandoned_future_set_aside(tmp_path):
    from minillm.checkpoint import set_aside_newer
    for step in (300, 400):
        save_checkpoint(tmp_path, step, {"step": step})
    (tmp_path / "ckpt" / "step_000500.pt.tmp").write_bytes(b"half a checkpoint")   # a killed save
    set_aside_newer(tmp_path, 250)                  # resuming from step 250: 300 and 400 are its future
    assert list_checkpoints(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "ckpt" / "abandoned").iterdir()) == ["step_000300.pt", "step_000400.pt"]
    save_checkpoint(tmp_path, 250, {"step": 250})
    save_checkpoint(tmp_path, 260, {"step": 260})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000250.pt", "step_000260.pt"]
    assert latest_checkpoint(tmp_path).name == "step_000260.pt"
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_eval_batches_are_equal_in_number_on_every_rank():
    tokens = np.arange(45, dtype=np.uint16)         # 5 windows of 10 over 2 ranks: 3 and 2
    counts = [len(list(eval_batches(tokens, 1, 10, rank=r, world_size=2))) for r in range(2)]
    assert counts == [3, 3]
    ys = [y[y >= 0] for r in range(2) for _, y in eval_batches(tokens, 1, 10, rank=r, world_size=2)]
    assert sorted(torch.cat(ys).tolist()) == list(range(1, 45))


def test_a_format_1_checkpoint_loads_in_format_2(tmp_path):
    """Checkpoints written before the Trainer (format 1: counters and sampler at the top level) load with
    each component's state under its name, so old run folders resume (checked bitwise end to end by hand:
    a format-1 run continued by this code equals the old code continuing it)."""
    v1 = {"format_version": 1, "step": 40, "tokens_seen": 163840, "best_val_loss": 5.2, "model": {"w": torch.ones(2)},
          "sampler": {"seed": 1, "epoch": 0, "pos": 640}, "guard": {"skipped_nonfinite": 0}, "rng": [{}], "config": {}}
    torch.save(v1, tmp_path / "step_000040.pt")
    state = load_checkpoint(tmp_path / "step_000040.pt")
    assert state["format_version"] == 2
    assert state["train_state"] == {"step": 40, "tokens_seen": 163840, "best_val_loss": 5.2}
    assert state["batches"] == {"seed": 1, "epoch": 0, "pos": 640}
    assert not {"step", "tokens_seen", "best_val_loss", "sampler"} & set(state)
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["guard"] == v1["guard"]
    torch.save({**v1, "format_version": 7}, tmp_path / "step_000041.pt")
    with pytest.raises(CheckpointError, match="checkpoint format 7, this minillm reads 2"):
        load_checkpoint(tmp_path / "step_000041.pt")


def test_check_resumable_refuses_a_sharded_checkpoint_without_fsdp_and_the_reverse(tmp_path):
    """A sharded (FSDP) checkpoint resumes only under train.parallel=fsdp, a full one only without it."""
    from minillm.config import ModelConfig, TrainJobConfig
    from minillm.distributed.process_group import DistInfo
    from minillm.errors import RunError
    from minillm.resume import check_resumable

    cfg = TrainJobConfig(model=ModelConfig(vocab_size=300))
    proto = b"tokenizer"
    base = {"config": {"model": {**vars(cfg.model)}}, "tokenizer": torch.frombuffer(bytearray(proto), dtype=torch.uint8)}
    check_resumable(base, tmp_path, cfg, proto, DistInfo(), fsdp=False)
    with pytest.raises(RunError, match="a sharded checkpoint resumes only with train.parallel=fsdp"):
        check_resumable(base | {"sharded": True}, tmp_path, cfg, proto, DistInfo(), fsdp=False)
    with pytest.raises(RunError, match="a full checkpoint resumes only with train.parallel=ddp"):
        check_resumable(base, tmp_path, cfg, proto, DistInfo(), fsdp=True)
    with pytest.raises(RunError, match="different tokenizer"):
        check_resumable(base, tmp_path, cfg, b"another", DistInfo(), fsdp=False)
