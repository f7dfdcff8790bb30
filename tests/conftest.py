"""Test-wide setup.

TRITON_INTERPRET must be set before triton (or any kernel module) is imported, so it is set
here, at the top of the first file pytest imports. On a machine with CUDA, export
MINILLM_TEST_GPU=1 to run the kernels compiled instead of interpreted.
"""
import os

if os.environ.get("MINILLM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns when this is unset; fused multiply-add is what the GPU build uses too.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
