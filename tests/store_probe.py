"""Run under torchrun --max-restarts=1 (for test_distributed.py): does attempt 1 see attempt 0's keys?

Attempt 0 writes a key to the agent's store and fails; attempt 1 prints whether the key is there.
"""
import os
import sys
from datetime import timedelta

import torch.distributed as dist

store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                      timeout=timedelta(seconds=30))
key = f"probe/written-by-attempt-0/rank{os.environ['RANK']}"
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    store.set(key, "x")
    sys.exit(1)
print(f"agent store {os.environ['TORCHELASTIC_USE_AGENT_STORE']}, stale key seen {store.check([key])}", flush=True)
