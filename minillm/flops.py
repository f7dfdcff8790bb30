"""Model FLOPs utilisation: achieved FLOP/s over the device's peak.

Peak dense (no sparsity) FLOP/s from NVIDIA's datasheets, for bf16/fp16 tensor cores and for plain
fp32 (CUDA cores; TF32 tensor cores would be higher, but fp32 training here means fp32 matmuls
unless the user enables TF32). Matched by substring of torch.cuda.get_device_name(), first match
wins, so more specific names come first.
"""
from __future__ import annotations

import torch

# (name substring, bf16 peak, fp32 peak)
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("b200", 2250e12, 80e12),
    ("h200", 989.4e12, 66.9e12),
    ("h100 pcie", 756.0e12, 51.2e12),
    ("h100", 989.4e12, 66.9e12),      # SXM
    ("a100", 312.0e12, 19.5e12),
    ("l40s", 362.1e12, 91.6e12),
    ("l4", 121.0e12, 30.3e12),
    ("a10g", 70.0e12, 31.2e12),
    ("a10", 125.0e12, 31.2e12),
    ("rtx 4090", 165.2e12, 82.6e12),
    ("rtx 3090", 71.0e12, 35.6e12),
    ("v100", 125.0e12, 15.7e12),      # fp16 tensor cores (no bf16)
]


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The device's peak FLOP/s for the training dtype, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, p_bf16, p_fp32 in PEAK_FLOPS:
        if key in name:
            return p_bf16 if bf16 else p_fp32
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None) -> float | None:
    """Fraction of peak achieved; None when the peak is unknown (report FLOP/s instead)."""
    return None if not peak else flops_per_token * tokens_per_sec / peak
