"""Export a run as a Hugging Face transformers folder: ``python -m minillm.export RUN_OR_CHECKPOINT OUT_DIR``.

    python -m minillm.export out/shakespeare-tiny hf/shakespeare-tiny
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               m = AutoModelForCausalLM.from_pretrained('hf/shakespeare-tiny'); \\
               t = AutoTokenizer.from_pretrained('hf/shakespeare-tiny')"

OUT_DIR gets config.json, model.safetensors and generation_config.json (written by transformers'
``save_pretrained``), and the tokenizer files of minillm/hf_tokenizer.py. Which architecture a model
becomes (Llama, Qwen3, GPT-2) is minillm/hf_arch.py's table; a model with no exact equivalent is
refused in one line naming the option. Before OUT_DIR appears, the export is loaded back with
transformers and its logits are compared with minillm's (``--no-check`` skips this).

The folder is written as ``.OUT_DIR.export-PID`` beside OUT_DIR and renamed into place, so OUT_DIR is
either absent, the previous export, or complete. An existing non-empty OUT_DIR is replaced only when it
is a previous minillm export (its config.json has a ``minillm`` key), and the command says so.
Needs the optional extra: ``pip install -e ".[hf]"``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from minillm.errors import UserError
from minillm.hf_arch import ExportError, architecture, hf_config_fields, require_hf, to_hf_state
from minillm.hf_tokenizer import save_hf_tokenizer, special_ids
from minillm.model import GPT
from minillm.run_folder import load_run
from minillm.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_TOL = {"float32": 1e-4, "bfloat16": None, "float16": None}  # max |logit diff| per unit of max |logit|


def is_previous_export(folder: Path) -> bool:
    """Whether ``folder`` holds a minillm export (config.json with a ``minillm`` key)."""
    try:
        return "minillm" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out_dir(out: Path) -> bool:
    """True when ``out`` holds a previous export to replace; ExportError when it holds anything else."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT_DIR {out}: is a file; give a folder path")
    if not out.parent.is_dir():
        raise ExportError(f"OUT_DIR {out}: its parent folder {out.parent} does not exist; create it first")
    if out.is_dir() and any(out.iterdir()):
        if not is_previous_export(out):
            raise ExportError(f"OUT_DIR {out}: not empty and not a minillm export; nothing was written, "
                              "choose an empty or new folder")
        return True
    return False


def hf_model(model: GPT, tok: Tokenizer, dtype: torch.dtype):
    """The transformers model computing ``model`` (its weights copied, in ``dtype``; eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = model.cfg
    arch = architecture(cfg)
    hf_cfg = AutoConfig.for_model(arch, **hf_config_fields(cfg, special_ids(tok)))
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(to_hf_state(model.state_dict(), cfg, arch), strict=False)
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings and tied else set()):
        raise RuntimeError(f"export mapping is wrong for {arch}: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings != tied:
        raise RuntimeError(f"{arch}: tie_word_embeddings={cfg.tie_embeddings} but transformers tied={tied}")
    return hf.to(dtype).eval()


def write_export(model: GPT, tok: Tokenizer, folder: Path, dtype: str, source: dict) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files into ``folder``."""
    from transformers import GenerationConfig
    hf = hf_model(model, tok, DTYPES[dtype])
    hf.config.minillm = {**hf.config.minillm, **source}
    specials = {k: v for k, v in special_ids(tok).items() if v is not None}
    # A padded vocabulary (model.vocab_size > the tokenizer's) has rows no tokenizer id decodes: never
    # generate them, as minillm's Engine masks them (transformers' SuppressTokensLogitsProcessor).
    padding = list(range(tok.vocab_size, model.cfg.vocab_size))
    hf.generation_config = GenerationConfig(**specials, do_sample=False,  # greedy, as sample.py temperature=0
                                            **({"suppress_tokens": padding} if padding else {}))
    hf.save_pretrained(folder)
    save_hf_tokenizer(tok, folder, model.cfg.block_size)


def check_export(model: GPT, folder: Path, dtype: str) -> float | None:
    """Max |logit difference| between minillm and the export loaded by transformers, on one full
    block_size sequence of random ids (fixed seed). ExportError when over CHECK_TOL times max(1, the
    largest |logit|) (float32 sums in another order drift with the logits' scale). None: not compared."""
    if CHECK_TOL[dtype] is None:
        return None
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, model.cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)[0]
        diff = (ours - hf(ids).logits).abs().max().item()
    allowed = CHECK_TOL[dtype] * max(1.0, ours.abs().max().item())
    if not diff <= allowed:
        raise ExportError(f"transformers' logits differ from minillm's by {diff:.3g} (allowed {allowed:.3g}); "
                          "nothing was written: this is a minillm bug, please report it (--no-check writes "
                          "the folder anyway)")
    return diff


def export(source: str | Path, out_dir: str | Path, dtype: str = "float32", check: bool = True) -> dict:
    """Export the run (folder or checkpoint) ``source`` to ``out_dir``; returns what was done
    (architecture, out_dir, replaced, max_logit_diff, checkpoint, step). Raises UserError subclasses
    (ExportError, CheckpointError) for bad input; nothing is written then."""
    require_hf()
    run = load_run(source)
    arch = architecture(run.model.cfg)  # refuse before writing anything
    out = Path(out_dir).expanduser()
    replacing = check_out_dir(out)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_export(run.model, run.tokenizer, tmp, dtype, {"checkpoint": run.checkpoint.name, "step": run.step})
        diff = check_export(run.model, tmp, dtype) if check else None
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"architecture": arch, "out_dir": str(out), "replaced": replacing, "max_logit_diff": diff,
            "checkpoint": str(run.checkpoint), "step": run.step}


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; a previous export (or empty folder) there is moved aside
    first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minillm.export", description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run folder (its latest checkpoint) or a checkpoint")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the transformers folder to write (new, empty, or a previous export)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights' dtype in model.safetensors (default float32, the training dtype)")
    p.add_argument("--no-check", action="store_true", help="skip loading the export back to compare logits")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; user errors are one line on stderr and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        done = export(args.source, args.out_dir, args.dtype, check=not args.no_check)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if done["replaced"]:
        print(f"replaced the previous export in {done['out_dir']}")
    diff = done["max_logit_diff"]
    print(f"wrote {done['out_dir']}: {done['architecture']} from {done['checkpoint']} (step {done['step']})"
          + (f"; transformers' logits match minillm's (max diff {diff:.2e})" if diff is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
