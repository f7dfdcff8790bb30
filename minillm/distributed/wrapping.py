"""Wrapping the model for several processes: DDP (replicated) or FSDP2 (sharded per block).

FSDP2 (torch.distributed.fsdp.fully_shard) shards every Block's parameters, gradients and optimizer
state across ranks and gathers a block's parameters just before it runs; the root module holds the
embeddings and final norm. With bf16 training on CUDA its mixed-precision policy computes in bf16 and
reduces gradients in fp32 (so no autocast is needed); on CPU everything stays fp32.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minillm.distributed.process_group import DistInfo


def shard_fsdp(model: torch.nn.Module, info: DistInfo, bf16: bool) -> torch.nn.Module:
    """Apply fully_shard to each block, then to the root, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    # No buffer broadcast before every forward: the only buffers are the RoPE tables, identical on
    # every rank. torch 2.13 renamed the flag (broadcast_buffers is deprecated there).
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None, **no_buffer_sync)


def grad_sync(model: torch.nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) on all but the last micro-batch."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if last_micro_step else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to its full value (e.g. FSDP's total grad norm), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
