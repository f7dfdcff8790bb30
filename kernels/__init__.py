"""minillm's Triton kernels, imported as ``minillm.kernels``.

This folder sits at the top of the repository but is never a top-level ``kernels`` package (that name
is Hugging Face's kernel hub): pyproject.toml installs it as ``minillm.kernels``, and a checkout run
without an install binds it there in minillm/__init__.py. Import it as ``minillm.kernels``; inside the
folder, modules import each other relatively (``from ._spec import ...``).

Each kernel module is a tutorial in one file: the Triton kernels, the autograd wrapper (registered as
a torch custom op so torch.compile sees no graph break), a plain torch reference, and the reasoning.
Attention's tile lists and pruning rule (attention_tiles.py) and its build-tier variants
(attention_build.py) sit beside it, one concept each. The model reaches these only through
minillm/ops.py.
"""

if __name__ == "kernels":
    # Imported by its folder's name: a process whose sys.path starts at a checkout's root (python
    # train.py, pytest) asked for the top-level `kernels`, e.g. transformers probing for Hugging Face's
    # kernel hub (transformers.utils.import_utils imports a package it finds without metadata). That
    # name is not ours. Hand over the hub's package when one is installed elsewhere on sys.path (the
    # import machinery returns what sys.modules holds after this runs); otherwise stay an empty stand-in:
    # no __path__ entries, so none of our modules can load (and register its custom ops) a second time,
    # and no __file__, which is how transformers tells a mere namespace from an installed package.
    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        others = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", others)
        if spec is not None and spec.loader is not None:
            real = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = real
            try:
                spec.loader.exec_module(real)
                return
            except BaseException:
                sys.modules["kernels"] = sys.modules.get(__name__) or real
                raise
        globals().update(__file__=None, __path__=[])
        if __spec__ is not None:
            __spec__.submodule_search_locations = []

    _hand_over()
    del _hand_over
