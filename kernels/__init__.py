"""minillm's Triton kernels, imported as ``minillm.kernels``.

This folder sits at the top of the repository but is never a top-level ``kernels`` package (that name
is Hugging Face's kernel hub): pyproject.toml installs it as ``minillm.kernels``, and a checkout run
without an install binds it there in minillm/__init__.py. Import it as ``minillm.kernels``; inside the
folder, modules import each other relatively (``from ._spec import ...``).

Each module is a tutorial in one file: the Triton kernels, the autograd wrapper (registered as a
torch custom op so torch.compile sees no graph break), a plain torch reference, and the reasoning.
The model reaches these only through minillm/ops.py.
"""
