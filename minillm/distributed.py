"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

A plain ``python train.py`` is world size 1 and never touches torch.distributed.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA (this rank's GPU) if present, else CPU."""
    if pref == "cuda" and not torch.cuda.is_available():
        from minillm.config import ConfigError
        raise ConfigError("device='cuda': no CUDA device is available; use device=cpu or device=auto")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_pref: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1: nccl on CUDA, gloo on CPU, or
    $MINILLM_DIST_BACKEND. A collective waiting longer than ``timeout_s`` raises instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = os.environ.get("MINILLM_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        timeout = timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = attempt_store(rank, world, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistInfo(rank, local_rank, world, device)


def attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The torchrun agent's key-value store, seen through a namespace that is new in this attempt.

    With c10d rendezvous (torchrun's default for --nnodes > 1 and --rdzv_backend=c10d) the workers
    share one TCPStore held by the agent, and it outlives restarts: after `--max-restarts` relaunches
    the workers, the keys the killed attempt wrote (each rank's gloo/NCCL address) are still there,
    and torch puts no attempt number in the process group's keys (pytorch/pytorch#135712; still so
    in torch 2.13). A rank that reads a dead peer's address fails with "connectFullMesh ... Connection
    refused" or waits out its connect timeout. TORCHELASTIC_RESTART_COUNT cannot name the attempt:
    each agent counts only its own restarts, so nodes disagree.

    So the ranks agree on a fresh namespace by themselves. Global rank 0 draws a random id; every
    other rank posts its own random id under a fixed key ``hello/<rank>`` (which may still hold a
    dead attempt's id) and waits for the answer under ``ack/<rank>/<its id>``, a key no earlier
    attempt can have written. Rank 0 answers every id it sees until each rank has confirmed under
    ``confirm/<rank 0's id>/<rank>``, also a key only this attempt can write. Stale keys are read
    at most once and answered harmlessly; nothing this attempt uses was written before it.
    """
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=False, timeout=timeout)
    me = uuid.uuid4().hex
    if rank == 0:
        answered: dict[int, bytes] = {}
        waiting, deadline = set(range(1, world)), time.monotonic() + timeout.total_seconds()
        while waiting:
            for r in sorted(waiting):
                if base.check([f"minillm/confirm/{me}/{r}"]):
                    waiting.discard(r)
                elif base.check([f"minillm/hello/{r}"]):
                    their = base.get(f"minillm/hello/{r}")
                    if answered.get(r) != their:
                        base.set(f"minillm/ack/{r}/{their.decode()}", me)
                        answered[r] = their
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"rank 0: ranks {sorted(waiting)} did not join within "
                                   f"{timeout.total_seconds():.0f} s (train.dist_timeout_s)")
            time.sleep(0.005 if waiting else 0)
        attempt = me
    else:
        base.set(f"minillm/hello/{rank}", me)
        try:
            attempt = base.get(f"minillm/ack/{rank}/{me}").decode()  # waits up to the store's timeout
        except dist.DistStoreError as e:
            raise TimeoutError(f"rank {rank}: rank 0 did not answer within {timeout.total_seconds():.0f} s "
                               "(train.dist_timeout_s)") from e
        base.set(f"minillm/confirm/{attempt}/{rank}", "1")
    return dist.PrefixStore(f"minillm/{attempt}/", base)


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
