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


def test_the_same_global_batch_reads_the_same_windows_at_any_world_size():
    """What the resume warning promises: with the same global batch, each step (micro-steps of every rank
    together) reads the same windows whether 1 process takes 8 per step, 2 take 4 each, or 1 takes 4 twice."""
    tokens = np.arange(3000, dtype=np.uint16)
    T = 10

    def step_windows(B, world, accum, steps=12):
        ranks = [BatchSource(tokens, B, T, seed=3, rank=r, world_size=world) for r in range(world)]
        return [sorted(w for _ in range(accum) for s in ranks for w in s.next_batch()[0][:, 0].tolist())
                for _ in range(steps)]
    assert step_windows(8, 1, 1) == step_windows(4, 2, 1) == step_windows(4, 1, 2) == step_windows(2, 2, 2)
    assert step_windows(8, 1, 1) != step_windows(4, 1, 1)          # a smaller global batch reads others


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
    import json
    from dataclasses import asdict

    from minillm.config import ModelConfig, TrainJobConfig
    from minillm.distributed.process_group import DistInfo
    from minillm.errors import RunError
    from minillm.resume import check_resumable

    cfg = TrainJobConfig(model=ModelConfig(vocab_size=300))
    proto = b"tokenizer"
    base = {"config": json.loads(json.dumps(asdict(cfg))), "tokenizer": torch.frombuffer(bytearray(proto), dtype=torch.uint8)}
    data_id = {"train": {"count": 10, "crc": 1}}
    check_resumable(base, tmp_path, cfg, proto, data_id, DistInfo(), fsdp=False)
    with pytest.raises(RunError, match="a sharded checkpoint resumes only with train.parallel=fsdp"):
        check_resumable(base | {"sharded": True}, tmp_path, cfg, proto, data_id, DistInfo(), fsdp=False)
    with pytest.raises(RunError, match="a full checkpoint resumes only with train.parallel=ddp"):
        check_resumable(base, tmp_path, cfg, proto, data_id, DistInfo(), fsdp=True)
    cfg.train.parallel = "fsdp"   # asked for, but one process runs without FSDP: say so, not "use fsdp"
    with pytest.raises(RunError, match=r"a sharded checkpoint resumes under train.parallel=fsdp on 2 or more "
                                       r"processes \(torchrun --nproc_per_node=N\); one process runs without FSDP"):
        check_resumable(base | {"sharded": True}, tmp_path, cfg, proto, data_id, DistInfo(), fsdp=False)
    with pytest.raises(RunError, match="different tokenizer"):
        check_resumable(base, tmp_path, cfg, b"another", data_id, DistInfo(), fsdp=False)


def _fail_latest_once(monkeypatch, after: str):
    """Make the next update of ``latest`` after ``after`` is written fail as a full disk does."""
    import errno
    import os
    from minillm import checkpoint as ckpt
    real = ckpt._atomic_write_bytes

    def write(path, fn):
        if path.name == "latest" and (path.parent / after).exists():
            monkeypatch.setattr(ckpt, "_atomic_write_bytes", real)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, fn)
    monkeypatch.setattr(ckpt, "_atomic_write_bytes", write)


def test_a_complete_checkpoint_whose_latest_update_failed_is_used_unless_it_is_corrupt(tmp_path, monkeypatch, caplog):
    save_checkpoint(tmp_path, 2, {"w": torch.ones(100)})
    _fail_latest_once(monkeypatch, "step_000004.pt")
    with pytest.raises(CheckpointError, match=r"ckpt: no space left on the device to write latest \(14 bytes needed"):
        save_checkpoint(tmp_path, 4, {"w": torch.zeros(100)})
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000002.pt"     # the pointer did not move
    caplog.set_level("WARNING", logger="minillm")
    assert latest_checkpoint(tmp_path).name == "step_000004.pt"               # complete and verified: used
    assert "step_000004.pt is newer than step_000002.pt" in caplog.text
    path = tmp_path / "ckpt" / "step_000004.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(raw))
    assert latest_checkpoint(tmp_path).name == "step_000002.pt"               # corrupt: passed over
    path.write_bytes(b"")                                                     # empty (a lost write): passed over
    assert latest_checkpoint(tmp_path).name == "step_000002.pt"


def test_a_run_whose_latest_update_failed_resumes_from_its_newest_checkpoint_bitwise(tmp_path, corpus_file,
                                                                                       data_dir, monkeypatch, caplog):
    """Issue 17 item 9, end to end: before the fix the relaunch resumed from step 2 and set the complete
    step 4 aside in ckpt/abandoned/."""
    from minillm.trainer import train
    from test_trainer import final_params, tiny_cfg
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_cfg(straight, corpus_file, max_steps=6, ckpt_interval=2))
    _fail_latest_once(monkeypatch, "step_000004.pt")
    with pytest.raises(CheckpointError, match="continues from step_000004.pt"):
        train(tiny_cfg(run, corpus_file, max_steps=6, ckpt_interval=2))
    caplog.set_level("INFO", logger="minillm")
    assert train(tiny_cfg(run, corpus_file, max_steps=6, ckpt_interval=2))["step"] == 6
    assert f"resuming from {run / 'ckpt' / 'step_000004.pt'} at step 4" in caplog.text
    assert not (run / "ckpt" / "abandoned").exists()
    a, b = final_params(straight), final_params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_abandoned_checkpoints_are_bounded_by_keep_last(tmp_path):
    from minillm.checkpoint import set_aside_newer
    abandoned = tmp_path / "ckpt" / "abandoned"
    for resume_at in (40, 30, 20, 10):           # four restarts from ever earlier points
        for step in (resume_at + 1, resume_at + 2, resume_at + 3):
            save_checkpoint(tmp_path, step, {"step": step}, keep_last=3)
        set_aside_newer(tmp_path, resume_at, keep_last=3)
        assert len(list(abandoned.iterdir())) <= 3
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_000041.pt", "step_000042.pt", "step_000043.pt"]
    for step in (11, 12):                        # a save prunes abandoned/ to its keep_last too
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_000042.pt", "step_000043.pt"]


def test_a_flip_in_the_checksum_marker_or_the_list_of_shards_is_refused(tmp_path):
    from minillm.checkpoint import SUMS, _MARK, _write_sums
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(10)})
    raw = bytearray(path.read_bytes())
    raw[-64 - len(_MARK) + 3] ^= 0x20                                   # "minillm-sha256:" -> "minIllm-..."
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):    # not "no checksum: load unverified"
        load_checkpoint(path)
    folder = tmp_path / "step_000002"
    (folder / "model").mkdir(parents=True)
    save_checkpoint(tmp_path / "m", 2, {"format_version": 2, "sharded": True})
    (folder / "meta.pt").write_bytes((tmp_path / "m" / "ckpt" / "step_000002.pt").read_bytes())
    (folder / "model" / "__0_0.distcp").write_bytes(bytes(range(200)))
    _write_sums(folder)
    sums = (folder / SUMS).read_bytes()
    (folder / SUMS).write_bytes(sums.replace(b"  model/", b" xmodel/"))  # that line no longer parses
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: checksum mismatch .* recorded none"):
        load_checkpoint(folder, full_model=False)
