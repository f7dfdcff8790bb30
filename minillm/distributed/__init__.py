"""Several processes: one module per concern, applied from outside the single-device model.

    process_group.py  torchrun's environment -> DistInfo (rank, world size, device), the process group,
                      and the few collectives the trainer uses (no-ops at world size 1)
    wrapping.py       the model for several processes: DDP (replicated) or FSDP2 (sharded per block),
                      gradient-sync control for accumulation, DTensor helpers
    failure.py        a rank's user error posted for its peers, who then stop with one line naming it
    restart_store.py  a fresh key namespace per torchrun restart attempt (pytorch#135712)
"""
