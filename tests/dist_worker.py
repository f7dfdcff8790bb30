"""One stand-in torchrun worker (for test_distributed.py): join the process group, all-reduce, leave.

Environment as torchrun sets it (RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_USE_AGENT_STORE),
plus DELAY_RANK0 (seconds rank 0 waits before joining) and DIE (exit without teardown, like a
killed attempt).
"""
import os
import sys
import time

import torch

from minillm.distributed import process_group as dist

rank = int(os.environ["RANK"])
if rank == 0:
    time.sleep(float(os.environ.get("DELAY_RANK0", "0")))
info = dist.setup("cpu", timeout_s=30)
total = dist.all_reduce_sum(torch.tensor([rank + 1.0]), info)
print(f"sum {total.item():g}", flush=True)
if os.environ.get("DIE"):
    os._exit(0)
dist.teardown()
sys.exit(0)
