"""A key namespace of its own for each torchrun attempt, so a restarted job never reads a dead one's keys.

torchrun's agent holds one TCPStore for its workers (static and c10d rendezvous alike; the workers
see TORCHELASTIC_USE_AGENT_STORE=True), and it outlives restarts: after `--max-restarts` relaunches
the workers, the keys of the attempt that died are still there (each rank's gloo address, NCCL's
unique id, NCCL's "dump now" flag), and torch's process group puts no attempt number in its keys
(pytorch/pytorch#135712; still so in torch 2.13). A rank that reads a dead peer's address fails
with "connectFullMesh ... Connection refused" or waits out its connect timeout, depending on which
side of the pair gloo makes connect. TORCHELASTIC_RESTART_COUNT cannot name the attempt: each agent
counts only its own restarts, so nodes disagree after one node's rank fails.

So the ranks agree on a fresh namespace themselves:

1. Global rank 0 draws a random id A. Every other rank r draws its own random id N and posts it
   under the fixed key ``hello/r`` (which may still hold a dead attempt's id), then bumps the
   counter ``posted``.
2. Rank 0 answers each value it finds under ``hello/*`` by writing A to ``ack/r/<value>``; it
   re-reads the hellos whenever ``posted`` moves. Answers to stale ids are harmless: nobody waits
   for them.
3. Rank r waits for ``ack/r/N``, a key no earlier attempt can have written, reads A from it, and
   confirms under ``joined/A/r`` and the counter ``joined/A`` (also keys only this attempt writes).
4. Rank 0 stops answering once ``joined/A`` counts every other rank. Everyone then builds the
   process group under the prefix ``minillm/A/``.

Rank 0's wait costs two store requests per poll whatever the world size; the hellos are read in one
request only when one changed. The previous attempt's workers are gone before this one starts
(the agent stops them, SIGTERM then SIGKILL, before the next rendezvous round).
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

# Flags NCCL's watchdog raises in the store's root (not under any prefix) when a rank times out;
# left over, they make every rank of the next attempt dump its state and abort (older torch
# versions used the second name).
_NCCL_DUMP_FLAGS = ("exception_dump", "timeout_dump")


def attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """torchrun's agent store (MASTER_ADDR:MASTER_PORT) under a prefix new in this attempt."""
    host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    where = f"{host}:{port}"
    try:
        base = dist.TCPStore(host, int(port), world, is_master=False, timeout=timeout)
    except dist.DistError as e:
        raise TimeoutError(f"rank {rank}: cannot reach torchrun's store at {where}: {e}") from e
    return dist.PrefixStore(f"minillm/{attempt_namespace(base, rank, world, timeout, where)}/", base)


def attempt_namespace(store: dist.Store, rank: int, world: int, timeout: timedelta, where: str = "the store") -> str:
    """The id every rank of this attempt agrees on (see the module docstring); raises TimeoutError
    naming the missing ranks when they do not all join within ``timeout``."""
    limit = f"{timeout.total_seconds():.0f} s (train.dist_timeout_s) at {where}"
    if rank != 0:
        me = uuid.uuid4().hex
        store.set(f"minillm/hello/{rank}", me)
        store.add("minillm/posted", 1)  # after the hello: whoever sees the count move sees the hello
        try:
            store.wait([f"minillm/ack/{rank}/{me}"], timeout)
        except dist.DistStoreError as e:
            raise TimeoutError(f"rank {rank}: rank 0 did not answer within {limit}") from e
        attempt = store.get(f"minillm/ack/{rank}/{me}").decode()
        store.set(f"minillm/joined/{attempt}/{rank}", "1")
        store.add(f"minillm/joined/{attempt}", 1)
        return attempt

    attempt, others = uuid.uuid4().hex, range(1, world)
    for key in _NCCL_DUMP_FLAGS:
        store.delete_key(key)
    hellos = [f"minillm/hello/{r}" for r in others]
    deadline = time.monotonic() + timeout.total_seconds()

    def missing(prefix: str) -> list[int]:
        return [r for r in others if not store.check([f"{prefix}/{r}"])]

    try:
        store.wait(hellos, timeout)  # every rank has posted, in this attempt or an earlier one
    except dist.DistStoreError as e:
        raise TimeoutError(f"rank 0: ranks {missing('minillm/hello')} did not join within {limit}") from e
    answered: dict[int, bytes] = {}
    seen, pause = None, 0.001
    while store.add(f"minillm/joined/{attempt}", 0) < len(others):
        posted = store.add("minillm/posted", 0)
        if posted != seen:
            seen, pause = posted, 0.001
            new = [(r, v) for r, v in zip(others, store.multi_get(hellos)) if answered.get(r) != v]
            if new:
                store.multi_set([f"minillm/ack/{r}/{v.decode()}" for r, v in new], [attempt] * len(new))
                answered.update(new)
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0: ranks {missing(f'minillm/joined/{attempt}')} did not join within {limit}")
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    return attempt
