"""One failing rank, one message: its peers stop with one line pointing at it, not a gloo traceback.

A rank that stops on bad input (a UserError: missing corpus, unreadable checkpoint, ...) posts its
message in the process group's store (``report``) before it exits. Its peers are then waiting in a
collective, which fails when the rank's connections close ("Connection reset by peer"). A peer that
fails that way looks in the store (``peer_failure``): if another rank posted a message, the peer's
error becomes one line naming that rank; otherwise the collective's error stands (a real fault).

The store is the one the process group was built on: torchrun's agent store, which outlives the
failing worker, under this attempt's own prefix (minillm/distributed/restart_store.py), so a
restarted job never reads an earlier attempt's failure.
"""
from __future__ import annotations

import logging
import time

import torch.distributed as dist

from minillm.distributed.process_group import DistInfo

log = logging.getLogger(__name__)
KEY = "minillm_failed/"


def _store():
    return dist.distributed_c10d._get_default_store()  # the process group's store (no public accessor)


def report(info: DistInfo, message: str) -> None:
    """Post this rank's user error for its peers (best effort: a failing store changes nothing)."""
    if not info.enabled or not dist.is_initialized():
        return
    try:
        _store().set(f"{KEY}{info.rank}", message)
    except Exception as e:  # the store went away: the peers get the collective's own error
        log.debug("could not post the failure: %s", e)


def peer_failure(info: DistInfo, wait_s: float = 1.0) -> tuple[int, str] | None:
    """(rank, message) of another rank that reported a user error, or None. Waits up to ``wait_s``:
    the collective may fail a moment before the failing rank's post is visible."""
    if not info.enabled or not dist.is_initialized():
        return None
    deadline = time.monotonic() + wait_s
    try:
        store = _store()
        while True:
            for rank in range(info.world_size):
                if rank != info.rank and store.check([f"{KEY}{rank}"]):
                    return rank, store.get(f"{KEY}{rank}").decode()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
    except Exception:  # no store left to ask
        return None
