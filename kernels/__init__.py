"""minillm's Triton kernels.

Each module is a tutorial in one file: the Triton kernels, the autograd wrapper (registered as a
torch custom op so torch.compile sees no graph break), a plain torch reference, and the reasoning.
The model reaches these only through minillm/ops.py.
"""
