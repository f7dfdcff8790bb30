"""kill -9 at random moments, relaunch until done: the final state equals an uninterrupted run's, bit for
bit; then random bit flips in the newest checkpoint: every one is caught. Slow (a minute or two each):
`python -m pytest -q -n 0 -m slow -p no:cacheprovider tests/test_kill_stress.py -s` prints the counts
(-n 0: in one process, so -s reaches the terminal).

Kills are seeded (KILL_SEED) and land in three kinds of moment: any time after the launch (start-up,
resume, the first steps), during training, and while a checkpoint is being written (a ``*.tmp`` exists
in ckpt/). A kill counts as "during a checkpoint write" when it leaves a temp file behind. After every
kill the newest usable checkpoint must load and verify, and must not be older than before the kill.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_ARGS
from minillm import checkpoint as ckpt
from minillm.errors import CheckpointError
from minillm.metrics import read_records

pytestmark = pytest.mark.slow

KILL_SEED = 17
ARGS = (*TINY_ARGS, "train.eval_interval=0", "device=cpu", "model.dropout=0.1", "train.ckpt_interval=1")


def newest_step(run) -> int:
    """The step of the checkpoint a relaunch continues from (it must load and verify); 0 if none."""
    path = ckpt.latest_checkpoint(run)
    if path is None:
        return 0
    ckpt.verify_checksum(path, require=True)
    return ckpt.load_checkpoint(path, full_model=False)["train_state"]["step"]


def temps_in_ckpt(run) -> set:
    """The temp files and folders in ckpt/ (name, inode, mtime): a save is under way, or was killed."""
    d = run / "ckpt"
    try:
        names = [n for n in os.listdir(d) if n.endswith(".tmp")]
    except FileNotFoundError:
        return set()
    out = set()
    for n in names:
        try:
            st = os.stat(d / n)
        except FileNotFoundError:
            continue
        out.add((n, st.st_ino, st.st_mtime_ns))
    return out


def wait_until(p, cond, timeout=120.0, poll=0.0005) -> bool:
    """Poll ``cond`` until it holds (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            return False
        if cond():
            return True
        time.sleep(poll)
    return False


def metrics_lines(run) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_at_random(p, run, rng) -> str:
    """Wait for a moment of a randomly chosen kind and SIGKILL the job (its whole process group)."""
    kind = rng.choice(["anytime", "training", "saving"])
    if kind == "anytime":
        ok = wait_until(p, lambda t=time.time() + rng.uniform(0.0, 8.0): time.time() >= t)
    elif kind == "training":
        target = metrics_lines(run) + rng.randint(1, 4)       # a few more steps logged
        ok = wait_until(p, lambda: metrics_lines(run) >= target)
    else:
        before = temps_in_ckpt(run)
        ok = wait_until(p, lambda: bool(temps_in_ckpt(run) - before))
        time.sleep(rng.uniform(0.0, 0.003))
    if ok or p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return kind


def stress(cmd, run, env, kills: int, rng, log) -> dict:
    """Launch ``cmd`` and kill it ``kills`` times at random moments, then let it finish; returns counts."""
    counts = {"kills": 0, "during_save": 0, "finished_early": 0, "launches": 0}
    best = 0
    while True:
        counts["launches"] += 1
        left = temps_in_ckpt(run)
        with open(log, "a") as err:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            if counts["kills"] == kills:
                assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
                return counts
            kill_at_random(p, run, rng)
        if p.returncode == 0:
            counts["finished_early"] += 1
            return counts
        assert p.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        counts["kills"] += 1
        counts["during_save"] += bool(temps_in_ckpt(run) - left)   # this kill left a save half-written
        step = newest_step(run)           # the newest usable checkpoint loads, and none was lost
        assert step >= best, (step, best)
        best = step


def assert_same_final_state(a, b):
    sa, sb = (ckpt.load_checkpoint(ckpt.latest_checkpoint(r)) for r in (a, b))
    assert sa["train_state"] == sb["train_state"]
    for name, t in sa["model"].items():
        assert torch.equal(t, sb["model"][name]), name
    assert json.dumps(sa["batches"]) == json.dumps(sb["batches"]) and sa["guard"] == sb["guard"]
    if "optimizer" not in sa:  # a sharded checkpoint: its optimizer is in the shards, verified by checksum
        return
    fa, fb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    for i in fa:
        for k, v in fa[i].items():
            assert torch.equal(v, fb[i][k]) if torch.is_tensor(v) else v == fb[i][k], (i, k)


def test_kill_9_single_process_then_bit_flips(tmp_path, corpus_file, data_dir):
    env = {**os.environ, "MINILLM_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    args = (f"data.path={corpus_file}", *ARGS, "train.max_steps=30")
    straight, run = tmp_path / "straight", tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"out_dir={straight}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rng = random.Random(KILL_SEED)
    counts = stress([sys.executable, str(ROOT / "train.py"), *args, f"out_dir={run}"], run, env, 12, rng,
                    tmp_path / "stderr.log")
    print(f"\nkill -9, single process: {counts['kills']} kills survived ({counts['during_save']} during a "
          f"checkpoint write) in {counts['launches']} launches; final state bitwise equal to the uninterrupted run")
    assert_same_final_state(straight, run)
    assert [r["step"] for r in read_records(run / "metrics.jsonl")] == list(range(1, 31))
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert counts["kills"] == 12 and counts["during_save"] >= 2
    flips = bit_flips(run, random.Random(KILL_SEED), 300)
    print(f"bit flips in the newest checkpoint: {flips['caught']} of {flips['tried']} caught (refused, resume "
          f"fell back to the one before), {flips['loaded']} loaded; `latest` pointer, every single-bit flip: "
          f"{flips['pointer_ok']} of {flips['pointer_tried']} still chose the newest checkpoint")
    assert flips["caught"] == flips["tried"] and flips["pointer_ok"] == flips["pointer_tried"]


def bit_flips(run, rng, n: int) -> dict:
    """Flip one random bit of the newest checkpoint ``n`` times (restoring it between tries) and resume
    as train.resume=auto does: try the newest, fall back to the next. Then every bit of ``latest``."""
    newest = ckpt.latest_checkpoint(run)
    pristine = newest.read_bytes()
    previous = ckpt.list_checkpoints(run)[-2]
    out = {"tried": 0, "caught": 0, "loaded": 0, "pointer_tried": 0, "pointer_ok": 0}
    for _ in range(n):
        raw = bytearray(pristine)
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        newest.write_bytes(bytes(raw))
        out["tried"] += 1
        try:
            ckpt.load_checkpoint(ckpt.latest_checkpoint(run), full_model=False)
            out["loaded"] += 1
        except CheckpointError:
            ckpt.load_checkpoint(previous, full_model=False)     # the fallback is readable
            out["caught"] += 1
    newest.write_bytes(pristine)
    pointer = run / "ckpt" / "latest"
    name = pointer.read_bytes()
    for i in range(len(name) * 8):
        raw = bytearray(name)
        raw[i // 8] ^= 1 << (i % 8)
        pointer.write_bytes(bytes(raw))
        out["pointer_tried"] += 1
        out["pointer_ok"] += ckpt.latest_checkpoint(run) == newest
    pointer.write_bytes(name)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_kill_9_two_ranks(parallel, tmp_path, corpus_file, data_dir):
    env = {**os.environ, "MINILLM_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    # 60 steps: enough that five kills land before the run ends however fast the machine is (at 40, a
    # quiet machine finished after three)
    args = (f"data.path={corpus_file}", *ARGS, "train.max_steps=60", "model.dropout=0.0", f"train.parallel={parallel}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py")]
    straight, run = tmp_path / "straight", tmp_path / "run"
    r = subprocess.run([*torchrun, *args, f"out_dir={straight}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = stress([*torchrun, *args, f"out_dir={run}"], run, env, 5, random.Random(KILL_SEED + 1),
                    tmp_path / "stderr.log")
    print(f"\nkill -9, two ranks ({parallel.upper()}, torchrun, gloo): {counts['kills']} kills survived "
          f"({counts['during_save']} during a checkpoint write) in {counts['launches']} launches; final state bitwise equal")
    assert_same_final_state(straight, run)
    assert [r["step"] for r in read_records(run / "metrics.jsonl")] == list(range(1, 61))
    assert counts["kills"] == 5
    if parallel == "fsdp":
        flips = sharded_bit_flips(run, random.Random(KILL_SEED), 100)
        print(f"bit flips in the newest sharded checkpoint (any of its files): {flips['caught']} of {flips['tried']} "
              f"caught, {flips['loaded']} loaded")
        assert flips["caught"] == flips["tried"]


def sharded_bit_flips(run, rng, n: int) -> dict:
    """Flip one random bit of a random file of the newest sharded checkpoint ``n`` times (restoring it)."""
    newest = ckpt.latest_checkpoint(run)
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    out = {"tried": 0, "caught": 0, "loaded": 0}
    for _ in range(n):
        target = rng.choice(files)
        pristine = target.read_bytes()
        raw = bytearray(pristine)
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(raw))
        out["tried"] += 1
        try:
            ckpt.load_checkpoint(newest, full_model=False)
            out["loaded"] += 1
        except CheckpointError:
            out["caught"] += 1
        target.write_bytes(pristine)
    return out
