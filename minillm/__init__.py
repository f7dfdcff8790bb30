"""minillm: train GPT-style language models from scratch (README.md: use; its Layout section: every file).

A run, from the outside in: train.py turns the Hydra config into ``config.TrainJobConfig`` and calls
``trainer.train``. The ``trainer.Trainer`` prepares the corpus (``data``: corpus files -> tokenizer ->
token files -> batches), builds ``model.GPT`` (kernels behind ``ops``), the ``optimizer``, the step
guard, RNG streams and train state, resumes them from a ``checkpoint`` (``resume`` chooses which), and
runs the loop (``evaluation`` for validation bits per byte). ``distributed`` applies DDP/FSDP2 from
outside the single-device model. sample.py reads a run folder back (``run_folder``) and drives the
``generation`` engine. User mistakes raise ``errors.UserError``; the entry points print it as one line.
"""
__version__ = "0.1.0"


def _bind_source_tree_kernels() -> None:
    """Bind ``minillm.kernels`` to the checkout's top-level ``kernels/`` folder when minillm runs from source.

    The Triton kernels live in the top-level ``kernels/`` folder (the project's layout) but are always
    imported as ``minillm.kernels``, never as a top-level ``kernels`` package: that name belongs to
    Hugging Face's kernel hub. pyproject.toml maps the folder there (``package-dir``), so a wheel
    holds ``minillm/kernels/`` and this function does nothing. When minillm is imported from a
    checkout, ``minillm/`` has no ``kernels`` subfolder: ``python train.py`` or ``python -m pytest``
    from the repository root with no install, or with a regular ``pip install .`` that the checkout's
    own ``minillm/`` shadows. For that case we register exactly one module, ``minillm.kernels``, from
    the checkout's ``kernels/``, so a running minillm always uses the kernels of its own tree. An
    editable install also imports minillm from the checkout; setuptools' editable import hook maps
    ``minillm.kernels`` to the same folder, so the two agree.

    Why this and not the alternatives: adding the repository root to ``minillm.__path__`` would also
    make ``minillm.train``, ``minillm.tests`` and every other top-level name importable; a symlink
    ``minillm/kernels -> ../kernels`` breaks on checkouts without symlinks (Windows) and shows every
    kernel twice to tools that walk the tree; an import hook in ``sys.meta_path`` would take part in
    every import of the process. Binding one name in ``sys.modules`` gives what the installed layout
    gives, and says so here. Cheap: ``kernels/__init__.py`` is a docstring; the kernel modules (and
    triton) load only when ``minillm.ops`` asks for them.
    """
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    root = here.parent
    if (here / "kernels").is_dir():          # an installed wheel: minillm/kernels/ is right here
        return
    # A source checkout: the project file and the kernels folder next to minillm/. site-packages has no
    # pyproject.toml, so another distribution's top-level `kernels` there is never picked up.
    init = root / "kernels" / "__init__.py"
    if not ((root / "pyproject.toml").is_file() and init.is_file()):
        return
    name = f"{__name__}.kernels"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module              # before exec, as the import system does
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    globals()["kernels"] = module            # attribute access: minillm.kernels


_bind_source_tree_kernels()
del _bind_source_tree_kernels
