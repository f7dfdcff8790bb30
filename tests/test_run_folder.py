"""A run folder that cannot be corrupted silently: checksummed checkpoints (a flipped bit is caught), an
unreadable ``latest`` pointer, a run stopped during its last step."""
import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.errors import CheckpointError
from minillm.trainer import train
from conftest import ROOT, TINY_ARGS, run_entry
from test_trainer import tiny_cfg


def flip_payload_bit(path, entry="data/0", byte=5, bit=3):
    """Flip one bit inside a tensor's bytes in a torch.save zip (torch.load does not check the CRC)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/" + entry))
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_is_refused_and_torch_alone_would_load_it(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(1000)})
    comment = zipfile.ZipFile(path).comment                         # the checksum travels inside the file
    assert comment == b"minillm-sha256:" + hashlib.sha256(path.read_bytes()[:-64]).hexdigest().encode()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_000001.pt"]
    flip_payload_bit(path)
    w = torch.load(path, weights_only=True)["w"]                    # the control: torch does not notice
    assert (w != 1).sum().item() == 1
    with pytest.raises(CheckpointError, match=r"step_000001.pt: checksum mismatch .* the checkpoint is corrupt"):
        ckpt.load_checkpoint(path)


def test_a_checkpoint_without_checksum_loads_with_one_warning(tmp_path, caplog):
    path = tmp_path / "step_000001.pt"
    torch.save({"format_version": 2, "w": torch.ones(3)}, path)    # as written by an earlier minillm
    caplog.set_level("WARNING", logger="minillm")
    for _ in range(2):
        assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.ones(3))
    assert caplog.text.count("has no checksum") == 1


def test_the_checksum_itself_cannot_be_forged_by_a_flip(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(10)})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01                                                 # a flip inside the recorded digest
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(path)


def test_a_sharded_checkpoint_is_verified_file_by_file(tmp_path):
    folder = tmp_path / "step_000004"
    (folder / "model").mkdir(parents=True)
    torch.save({"format_version": 2, "sharded": True, "x": 1}, folder / "meta.pt")
    (folder / "model" / "__0_0.distcp").write_bytes(bytes(range(200)))
    ckpt._write_sums(folder)
    assert set(ckpt._read_sums(folder / ckpt.SUMS)) == {"meta.pt", "model/__0_0.distcp"}
    assert ckpt.load_checkpoint(folder, full_model=False)["x"] == 1
    (folder / "model" / "__0_0.distcp").write_bytes(bytes(range(1, 201)))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: checksum mismatch"):
        ckpt.load_checkpoint(folder, full_model=False)
    (folder / ckpt.SUMS).write_text("")                             # meta.pt must always be listed
    with pytest.raises(CheckpointError, match=r"meta.pt: checksum mismatch"):
        ckpt.load_checkpoint(folder, full_model=False)


def test_resume_auto_falls_back_past_a_flipped_bit(tmp_path, corpus_file, data_dir, caplog):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=4, ckpt_interval=2))
    flip_payload_bit(run / "ckpt" / "step_000004.pt")
    caplog.set_level("INFO", logger="minillm")
    summary = train(tiny_cfg(run, corpus_file, max_steps=6, ckpt_interval=2, allow_changes=True))
    assert "step_000004.pt: checksum mismatch" in caplog.text and "falling back" in caplog.text
    assert "resuming from" in caplog.text and "at step 2" in caplog.text
    assert summary["step"] == 6
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert (run / "ckpt" / "abandoned" / "step_000004.pt").is_file()


def test_explicit_resume_to_an_older_checkpoint_is_honoured_when_the_newer_is_corrupt(tmp_path, corpus_file,
                                                                                        data_dir, caplog):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=4, ckpt_interval=2, keep_last=3))
    older = run / "ckpt" / "step_000002.pt"
    flip_payload_bit(run / "ckpt" / "step_000004.pt")
    caplog.set_level("INFO", logger="minillm")
    summary = train(tiny_cfg(run, corpus_file, max_steps=5, ckpt_interval=2, resume=str(older), allow_changes=True))
    assert "continuing from train.resume=" in caplog.text and "at step 2" in caplog.text
    assert summary["step"] == 5
    flip_payload_bit(run / "ckpt" / "step_000005.pt")
    with pytest.raises(CheckpointError, match=r"step_000005.pt: checksum mismatch"):  # the path itself: one line
        train(tiny_cfg(run, corpus_file, max_steps=8, resume=str(run / "ckpt" / "step_000005.pt")))


def test_sample_refuses_a_flipped_bit(tmp_path, corpus_file, data_dir):
    from minillm.run_folder import load_run
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=2))
    assert load_run(run).step == 2
    flip_payload_bit(ckpt.latest_checkpoint(run))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_run(run)


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00step", b"garbage\n", b"step_000009.pt", b"../config.json"])
def test_an_unreadable_latest_pointer_is_ignored_with_a_warning(pointer, tmp_path, caplog):
    from minillm.run_folder import newest_run
    run = tmp_path / "runs" / "a"
    for step in (1, 2):
        ckpt.save_checkpoint(run, step, {"w": torch.ones(1)})
    (run / "ckpt" / "latest").write_bytes(pointer)
    caplog.set_level("WARNING", logger="minillm")
    assert ckpt.latest_checkpoint(run).name == "step_000002.pt"
    assert "does not name a complete checkpoint" in caplog.text and "step_000002.pt" in caplog.text
    assert newest_run(tmp_path / "runs") == run
    assert ckpt.resolve_checkpoint(run).name == "step_000002.pt"


def test_sigterm_during_the_last_step_finishes_the_run_with_its_report(tmp_path, corpus_file, data_dir, monkeypatch):
    from minillm.trainer import Trainer
    real_step = Trainer.train_step

    def step_then_sigterm(self):
        if self.state.step == self.tc.max_steps - 1:      # the last step: the signal arrives while it runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, corpus_file, max_steps=3))   # no TrainingInterrupted: the run is finished
    assert summary["step"] == 3
    assert json.loads((run / "summary.json").read_text())["step"] == 3 and (run / "curves.png").is_file()
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["train_state"]["step"] == 3


def test_a_finished_run_without_its_report_gets_it_on_relaunch(tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    first = train(tiny_cfg(run, corpus_file, max_steps=3, eval_interval=3))
    (run / "summary.json").unlink()                          # killed between the last checkpoint and the report
    (run / "curves.png").unlink()
    again = train(tiny_cfg(run, corpus_file, max_steps=3, eval_interval=3))
    saved = json.loads((run / "summary.json").read_text())
    assert saved == again and saved["step"] == 3 and saved["summary_from"] == "metrics.jsonl"
    assert saved["final_val_loss"] == first["final_val_loss"] and saved["best_val_loss"] == first["best_val_loss"]
    assert (run / "curves.png").stat().st_size > 10_000
    (run / "curves.png").unlink()                            # only the picture missing: drawn again
    assert train(tiny_cfg(run, corpus_file, max_steps=3, eval_interval=3)) == saved
    assert (run / "curves.png").is_file()


HOLD_LOCK = r"""
import os, sys, time
from minillm.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
if len(sys.argv) > 2:                        # a forked worker that outlives its parent
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:
        os.write(ready_w, b"1")  # child code runs after the at-fork handlers: its copy is closed by now
        time.sleep(120)
        os._exit(0)
    os.read(ready_r, 1)          # say "held" only then: a loaded machine may schedule the child late
print("held", flush=True)
time.sleep(120)
"""


def _hold_lock(run, *extra):
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run), *extra], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    return p


def _refusal(run, pid):
    return f"error: out_dir={run} is in use by another run (pid {pid} on {socket.gethostname()}); wait for it"


def test_a_second_run_on_a_folder_in_use_exits_at_once_naming_the_first(tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"data.path={corpus_file}", f"out_dir={run}",
                              *TINY_ARGS, "train.max_steps=100000", "train.eval_interval=0", "device=cpu"],
                             cwd=ROOT, env={**os.environ, "MINILLM_DATA_DIR": str(data_dir)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = run / "metrics.jsonl", time.time() + 120
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.2)
        config = (run / "config.json").read_text()
        second = run_entry("train.py", f"data.path={corpus_file}", f"out_dir={run}", *TINY_ARGS,
                           "train.max_steps=7", "train.resume=never", "device=cpu",
                           env={"MINILLM_DATA_DIR": str(data_dir)})
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [second.stderr.strip()]          # one line, nothing else
        assert second.stderr.startswith(_refusal(run, first.pid))
        assert (run / "config.json").read_text() == config                            # nothing of it was touched
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-2000:]
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))                                   # the first run's history is whole


def test_a_killed_holder_never_blocks_the_next_run(tmp_path, corpus_file, data_dir):
    from minillm.errors import RunError
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        with pytest.raises(RunError, match=re.escape(_refusal(run, holder.pid)[len("error: "):])):
            train(tiny_cfg(run, corpus_file, max_steps=2))
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert train(tiny_cfg(run, corpus_file, max_steps=2))["step"] == 2              # the kernel released it


def test_a_forked_child_of_a_killed_run_does_not_keep_the_lock(tmp_path):
    from minillm.run_lock import RunLock
    holder = _hold_lock(tmp_path, "fork")
    child = [int(c) for c in open(f"/proc/{holder.pid}/task/{holder.pid}/children").read().split()]
    holder.kill()
    holder.wait()
    try:
        assert len(child) == 1 and os.path.exists(f"/proc/{child[0]}")            # the child lives on
        RunLock(tmp_path).acquire().release()
    finally:
        for pid in child:
            os.kill(pid, signal.SIGKILL)


def test_every_torchrun_rank_of_a_refused_job_exits_with_the_line(tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "train.py"),
               f"data.path={corpus_file}", f"out_dir={run}", *TINY_ARGS, "train.max_steps=4", "device=cpu",
               "train.dist_timeout_s=60"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                           env={**os.environ, "MINILLM_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"})
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0
    assert r.stderr.count(_refusal(run, holder.pid)) == 2, r.stderr[-3000:]          # rank 0 and rank 1
    assert "minillm/" not in r.stderr.replace(str(run), "")      # no rank's own traceback (torchrun prints its own)


def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path, corpus_file, data_dir):
    from minillm.errors import RunError
    user = tmp_path / "mine"
    user.mkdir()
    files = {"config.json": b'{"lr": 0.1, "model": "mine"}', "metrics.jsonl": b'{"step": 1}\n',
             "summary.json": b"{}", "tokenizer.model": b"my tokenizer"}
    for name, data in files.items():
        (user / name).write_bytes(data)
    for resume in ("auto", "never"):
        with pytest.raises(RunError, match=r"mine is not empty and holds no minillm run .* choose a new or empty"):
            train(tiny_cfg(user, corpus_file, max_steps=2, resume=resume))
    assert {p.name: p.read_bytes() for p in user.iterdir()} == files                # not one file added or replaced
    r = run_entry("train.py", f"data.path={corpus_file}", f"out_dir={user}", *TINY_ARGS, "train.max_steps=2",
                  "device=cpu", env={"MINILLM_DATA_DIR": str(data_dir)})
    assert r.returncode == 2 and r.stderr.startswith(f"error: out_dir={user} is not empty and holds no minillm run")
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunError, match=r"a_file is a file, not a folder"):
        train(tiny_cfg(tmp_path / "a_file", corpus_file, max_steps=2))


def test_empty_folders_and_runs_without_a_checkpoint_are_runs(tmp_path, corpus_file, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(tiny_cfg(empty, corpus_file, max_steps=2))["step"] == 2
    early = tmp_path / "early"                   # an earlier minillm's run killed before its first checkpoint
    early.mkdir()
    cfg = tiny_cfg(early, corpus_file, max_steps=2)
    (early / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (early / "tokenizer.model").write_bytes(b"partial")
    assert train(cfg)["step"] == 2


def test_a_real_sharded_checkpoint_lists_every_file_and_a_flipped_shard_is_refused(tmp_path, corpus_file, data_dir):
    run = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "train.py"),
           f"data.path={corpus_file}", f"out_dir={run}", *TINY_ARGS, "train.max_steps=2", "device=cpu",
           "train.parallel=fsdp", "train.eval_interval=0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MINILLM_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    shard = ckpt.latest_checkpoint(run)
    files = {p.relative_to(shard).as_posix() for p in shard.rglob("*") if p.is_file()} - {ckpt.SUMS}
    assert set(ckpt._read_sums(shard / ckpt.SUMS)) == files and "meta.pt" in files and len(files) > 4
    assert ckpt.load_checkpoint(shard)["train_state"]["step"] == 2
    target = max((shard / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{target.name}: checksum mismatch"):
        ckpt.load_checkpoint(shard, full_model=False)


def test_a_run_refused_on_bad_input_leaves_no_folder_behind(tmp_path):
    """Hydra creates no folder (hydra.run.dir=.), and the folders the trainer created for a run that
    failed before writing anything are removed; a folder the user made stays."""
    new = tmp_path / "runs" / "first"
    r = run_entry("train.py", "data=text", f"out_dir={new}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: data=text:"), r.stderr
    assert not (tmp_path / "runs").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    r = run_entry("train.py", "data=text", f"out_dir={mine}")
    assert r.returncode == 2 and mine.is_dir() and list(mine.iterdir()) == []


@pytest.mark.parametrize("content", [b"hello, I am notes\n", b"", bytes(range(256)) * 4])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, content):
    f = tmp_path / "notes.pt"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(f))}: not a checkpoint \(torch.save writes a "
                                              r"zip, which starts with b'PK\\x03\\x04'; this file starts with"):
        ckpt.load_checkpoint(f)
    r = run_entry("sample.py", f"ckpt={f}")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {f}: not a checkpoint"), r.stderr
