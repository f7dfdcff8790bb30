"""DDP with torchrun on CPU (gloo): equality with one process, two "nodes" on loopback, restarts."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_ARGS
from minillm import checkpoint as ckpt
from minillm.distributed.restart_store import attempt_namespace
from minillm.errors import RunError
from minillm.trainer import derive_grad_accum

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
COMMON = (*TINY_ARGS, "train.eval_interval=3", "device=cpu", "model.dropout=0.0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, env, extra_torchrun=(), nproc=2, wait=True):
    cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", *extra_torchrun, str(ROOT / "train.py"), *args]
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return err


def single(args, env):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def params(run):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["model"]


def assert_same_training(a, b):
    # Same global batch, same seed: the gradients differ only in fp32 summation order (DDP's
    # all-reduce of two half-batch means vs one mean over the full batch), ~1e-7 relative per step;
    # AdamW turns that into parameter differences far below 1e-5 over a few steps.
    la, lb = [r["train_loss"] for r in records(a)], [r["train_loss"] for r in records(b)]
    assert len(la) == len(lb)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-5)
    pa, pb = params(a), params(b)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def env(data_dir):
    return {"MINILLM_DATA_DIR": str(data_dir)}


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, corpus_file, env):
    one, two = tmp_path / "one", tmp_path / "two"
    single([f"data.path={corpus_file}", f"out_dir={one}", *COMMON, "train.max_steps=6", "train.batch_size=8"], env)
    err = launch([f"data.path={corpus_file}", f"out_dir={two}", *COMMON, "train.max_steps=6",
                  "train.batch_size=4"], env)
    assert "distributed: 2 processes (gloo, DDP), global batch 8 sequences" in err
    assert_same_training(one, two)
    # A 2-process checkpoint continues in 1 process (with a warning) and finishes.
    err = single([f"data.path={corpus_file}", f"out_dir={two}", *COMMON, "train.max_steps=9",
                  "train.batch_size=8", "train.allow_changes=true"], env)   # the same global batch: no change
    assert "changed settings (train.allow_changes=true): train.max_steps 6 -> 9" in err
    assert "written by 2 processes, now 1" in err and records(two)[-1]["step"] == 9


@pytest.mark.slow  # ~16 s; the default run covers torchrun restarts and DDP on one node
def test_two_nodes_on_loopback(tmp_path, corpus_file, env):
    run, ref = tmp_path / "multinode", tmp_path / "ref"
    port = free_port()
    args = [f"data.path={corpus_file}", f"out_dir={run}", *COMMON, "train.max_steps=4", "train.batch_size=4"]
    single([f"data.path={corpus_file}", f"out_dir={ref}", *COMMON, "train.max_steps=4", "train.batch_size=8"], env)
    nodes = [launch(args, env, ("--nnodes=2", f"--node_rank={i}", "--rdzv_backend=c10d",
                                f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=minillm-test"), nproc=1, wait=False)
             for i in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert_same_training(ref, run)


def _attempt(store_port: int, world: int, budget_s: float, **env) -> list[str | None]:
    """Start one "attempt" of ``world`` workers against a shared store, as a restarted torchrun does;
    each one's stdout, or None (and its stderr on ours) if it failed or did not finish in ``budget_s``."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store_port), "WORLD_SIZE": str(world),
            "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1", **env}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist_worker.py")], cwd=ROOT, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(world)]
    deadline, outs = time.time() + budget_s, []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += "\n(killed: over the time budget)"
        if p.returncode != 0:
            print(f"rank {r} of {world}:\n{err[-2000:]}", file=sys.stderr)
        outs.append(out if p.returncode == 0 else None)
    return outs


def _agent_store() -> torch.distributed.TCPStore:
    """A TCPStore like the one torchrun's agent holds for all attempts of a job."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True)


def _namespaces(port: int, world: int, late: set[int], timeout_s: float = 10, ranks=None) -> tuple[dict, dict]:
    """One attempt of attempt_namespace with a thread per rank (all, or those in ``ranks``); ranks in
    ``late`` start 0.5 s late. Returns each rank's namespace and each failed rank's error."""
    out, errors = {}, {}

    def rank(r):
        if r in late:
            time.sleep(0.5)
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        try:
            out[r] = attempt_namespace(store, r, world, timedelta(seconds=timeout_s), "127.0.0.1:%d" % port)
        except TimeoutError as e:
            errors[r] = str(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (range(world) if ranks is None else ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors


def test_every_attempt_agrees_on_a_namespace_no_earlier_attempt_used():
    server, used = _agent_store(), set()
    for world, late in [(2, set()),        # a fresh store
                        (3, {0}),          # rank 0 late: every hello is fresh when it reads them
                        (3, {1, 2}),       # the others late: rank 0 first reads the dead attempt's hellos
                        (2, {1})]:         # the world shrinks
        out, errors = _namespaces(server.port, world, late)
        assert not errors and sorted(out) == list(range(world)), (world, late, errors)
        assert len(set(out.values())) == 1 and not used & set(out.values()), (world, late, out)
        used |= set(out.values())


def test_a_missing_rank_is_named_after_the_timeout():
    server = _agent_store()
    assert not _namespaces(server.port, 3, late=set())[1]        # an attempt that completes
    # Rank 2 never comes back: its old hello is still there and gets answered, but never confirmed.
    out, errors = _namespaces(server.port, 3, late=set(), timeout_s=1, ranks=(0, 1))
    assert re.fullmatch(r"rank 0: ranks \[2\] did not join within 1 s .* at 127\.0\.0\.1:\d+", errors[0])
    assert list(out) == [1]                                       # rank 1 was answered
    # A store nobody else wrote to: rank 0 waits for the hellos themselves; rank 1 alone waits for rank 0.
    empty = _agent_store()
    _, errors = _namespaces(empty.port, 2, late=set(), timeout_s=1, ranks=(0,))
    assert errors[0].startswith("rank 0: ranks [1] did not join within 1 s")
    _, errors = _namespaces(empty.port, 2, late=set(), timeout_s=1, ranks=(1,))
    assert errors[1].startswith("rank 1: rank 0 did not answer within 1 s")


def test_a_restarted_process_group_ignores_the_keys_of_the_killed_one():
    # The same through init_process_group in real processes: rank 0 joining 3 s late would make the
    # others read its dead predecessor's gloo address (torch alone fails this ~3 times in 4).
    server = _agent_store()
    assert _attempt(server.port, 2, 60, DIE="1") == ["sum 3\n"] * 2            # dies without teardown
    assert _attempt(server.port, 3, 30, DIE="1", DELAY_RANK0="3") == ["sum 6\n"] * 3
    assert _attempt(server.port, 2, 30, DELAY_RANK0="3") == ["sum 3\n"] * 2


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_keeps_the_killed_attempts_keys(tmp_path, rdzv):
    # The premise of minillm/distributed/restart_store.py, checked on the installed torch: a restarted attempt
    # sees the keys its predecessor wrote into the agent's store. If this fails, torch gives each
    # attempt a clean store and minillm/distributed/restart_store.py can go.
    r = subprocess.run([*TORCHRUN, "--nproc_per_node=1", "--max-restarts=1", "--monitor-interval=0.1",
                        f"--rdzv_backend={rdzv}", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                        str(ROOT / "tests" / "store_probe.py")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "agent store True, stale key seen True" in r.stdout, r.stdout + r.stderr[-3000:]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


# The two-node and FSDP variants take ~20 s and ~40 s on 2 cores: in the slow tier (`pytest -m slow`).
@pytest.mark.parametrize("nodes,parallel", [(1, "ddp"), pytest.param(2, "ddp", marks=pytest.mark.slow),
                                            pytest.param(1, "fsdp", marks=pytest.mark.slow)],
                         ids=["one-node", "two-nodes", "one-node-fsdp"])
def test_killed_rank_restarts_and_resumes(tmp_path, corpus_file, env, nodes, parallel):
    # Two ranks, on one torchrun or on two "nodes" (one torchrun each, c10d rendezvous on loopback;
    # there the agents' restart counts differ after the kill, see minillm/distributed/restart_store.py); with
    # FSDP the restart resumes from a sharded checkpoint.
    run, port = tmp_path / "run", free_port()
    args = [f"data.path={corpus_file}", f"out_dir={run}", *COMMON, "train.max_steps=300",
            "train.ckpt_interval=5", "train.eval_interval=0", "train.batch_size=4", f"train.parallel={parallel}"]
    rdzv = ("--max-restarts=3", "--monitor-interval=0.2", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=restart-test")
    agents = [launch(args, env, (*rdzv, f"--nnodes={nodes}", f"--node_rank={i}"), nproc=2 // nodes, wait=False)
              for i in range(nodes)]
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 12):
        time.sleep(0.05)
    workers = _children(agents[-1].pid)
    assert len(workers) == 2 // nodes, workers
    os.kill(max(workers), signal.SIGKILL)                # one rank dies mid-run
    try:
        errs = [p.communicate(timeout=240)[1] for p in agents]
    finally:
        for p in agents:  # on a timeout, leave no workers behind
            for pid in _children(p.pid):
                os.kill(pid, signal.SIGKILL)
            p.kill()
    for p, err in zip(agents, errs):
        assert p.returncode == 0, err[-3000:]
    assert "resuming from" in errs[0]
    steps = [r["step"] for r in records(run)]
    assert steps == list(range(1, 301))                  # one consistent history after the restart
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["train_state"]["step"] == 300


def test_global_batch_in_tokens():
    assert derive_grad_accum(8 * 32 * 2 * 4, batch_size=8, block_size=32, world_size=2) == 4
    with pytest.raises(RunError, match=r"train.global_batch_tokens=1000 is not a multiple of .* = 512"):
        derive_grad_accum(1000, batch_size=8, block_size=32, world_size=2)


def test_fsdp_matches_ddp_and_its_sharded_checkpoint_round_trips(tmp_path, corpus_file, env):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    # constant lr after warmup, so stopping at 4 of 4 then continuing equals running 6 straight
    args = (f"data.path={corpus_file}", *COMMON, "train.batch_size=4", "optim.schedule=constant")
    launch([*args, f"out_dir={ddp}", "train.max_steps=6"], env)
    launch([*args, f"out_dir={fsdp}", "train.max_steps=4", "train.parallel=fsdp"], env)
    shard = ckpt.latest_checkpoint(fsdp)
    assert shard.is_dir() and (shard / "meta.pt").is_file() and (shard / "model" / ".metadata").is_file()
    err = launch([*args, f"out_dir={fsdp}", "train.max_steps=6", "train.parallel=fsdp", "train.allow_changes=true"], env)
    assert "resuming from" in err and "step 4" in err
    assert_same_training(ddp, fsdp)   # sharded compute and a sharded resume give DDP's numbers
    # The sharded checkpoint loads in a single process for sampling, with DDP's weights.
    from minillm.run_folder import load_run
    loaded = load_run(fsdp)
    for name, t in loaded.model.state_dict().items():
        torch.testing.assert_close(t, params(ddp)[name], rtol=1e-4, atol=1e-5, msg=name)
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={fsdp}", "max_new_tokens=10"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0 and len(r.stdout) > 5, r.stderr


def test_a_signal_to_one_rank_stops_all_with_143_and_uneven_eval_works(tmp_path, corpus_file, env):
    run = tmp_path / "run"
    # eval_tokens=40 with block_size 32: two windows, so the two ranks evaluate unequal shares.
    p = launch([f"data.path={corpus_file}", f"out_dir={run}", *COMMON, "train.max_steps=100000",
                "train.batch_size=4", "train.eval_tokens=40", "train.eval_interval=2", "train.dist_timeout_s=60"],
               env, wait=False)
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.05)
    workers = sorted(_children(p.pid))
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)              # only one rank hears it
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "exitcode  : 143" in err, err[-3000:]
    last = records(run)[-1]["step"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["train_state"]["step"] == last
    assert all("val_bpb" in r for r in records(run) if r["step"] % 2 == 0)


@pytest.mark.slow  # waits out a collective timeout
def test_a_hung_rank_becomes_an_error_after_the_timeout(tmp_path, corpus_file, env):
    run = tmp_path / "run"
    p = launch([f"data.path={corpus_file}", f"out_dir={run}", *COMMON, "train.max_steps=100000",
                "train.batch_size=4", "train.eval_interval=0", "train.dist_timeout_s=10"], env, wait=False)
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.05)
    workers = sorted(_children(p.pid))
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGSTOP)              # the rank hangs: alive, but never answers
    start = time.time()
    try:
        _, err = p.communicate(timeout=240)
    finally:
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert p.returncode != 0
    assert time.time() - start < 200                  # an error after ~dist_timeout_s, not an endless wait
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-3000:]


def test_a_rank_failing_on_bad_input_stops_its_peer_in_one_line(tmp_path, env):
    """Rank 0 prepares the data first and fails on a missing corpus; rank 1, waiting in the barrier,
    stops with one line naming rank 0, not gloo's "Connection reset by peer" traceback."""
    missing = tmp_path / "missing.txt"
    p = launch([f"data.path={missing}", f"out_dir={tmp_path / 'run'}", *COMMON, "train.max_steps=2"], env,
               wait=False)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    errors = sorted(l for l in err.splitlines() if l.startswith("error:"))
    assert errors == [f"error: data.path={missing}: no such file or folder; give a UTF-8 text file, a folder or a glob",
                      f"error: rank 1 stopped: rank 0 failed: data.path={missing}: no such file or folder; give "
                      "a UTF-8 text file, a folder or a glob"], err[-3000:]
    assert "Connection reset" not in err and "gloo" not in err.replace("(gloo, DDP)", "")


@pytest.mark.slow  # ~30 s: a time-budgeted run under torchrun
def test_a_time_budget_is_planned_alike_on_every_rank(tmp_path, corpus_file, env):
    """Each rank measures its own clock; the all-reduced plan is one max_steps, so both ranks stop at
    the same step (a rank that stopped early would leave its peer hanging in a collective)."""
    run = tmp_path / "run"
    single([f"data.path={corpus_file}", f"out_dir={tmp_path / 'prepare'}", *COMMON, "train.max_steps=1"], env)
    err = launch([f"data.path={corpus_file}", f"out_dir={run}", *COMMON, "train.max_steps=null",
                  "train.time_budget_s=25", "optim.schedule=wsd", "train.eval_interval=0"], env)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    last = records(run)[-1]
    assert state["budget"]["locked"] and state["budget"]["max_steps"] == last["step"] == state["train_state"]["step"]
    assert "val_bpb" in last and "time budget 25 s:" in err
