"""Export a run as a Hugging Face transformers folder: ``python -m minillm.export RUN_OR_CHECKPOINT OUT_DIR``.

    python -m minillm.export out/shakespeare-tiny hf/shakespeare-tiny
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               m = AutoModelForCausalLM.from_pretrained('hf/shakespeare-tiny'); \\
               t = AutoTokenizer.from_pretrained('hf/shakespeare-tiny')"

OUT_DIR gets config.json, model.safetensors and generation_config.json (written by transformers'
``save_pretrained``), and the tokenizer files of minillm/hf_tokenizer.py. Which architecture a model
becomes (Llama, Qwen3, GPT-2) is minillm/hf_arch.py's table; a model with no exact equivalent is
refused in one line naming the option. Before OUT_DIR appears, the export is loaded back with
transformers and its logits are compared with minillm's, whatever ``--dtype`` (``--no-check`` skips this).

The folder is written as ``.OUT_DIR.export-PID`` beside OUT_DIR and renamed into place, so OUT_DIR is
either absent, the previous export, or complete. Missing folders above OUT_DIR are created (as train.py
creates out_dir), and removed again when the export fails. An existing non-empty OUT_DIR is replaced
only when it is a previous minillm export (its config.json has a ``minillm`` key), and the command says so.
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

from minillm.atomic_files import blocking_file
from minillm.errors import UserError
from minillm.hf_arch import ExportError, architecture, hf_config_fields, require_hf, to_hf_state
from minillm.hf_tokenizer import save_hf_tokenizer, special_ids
from minillm.model import GPT
from minillm.run_folder import load_run
from minillm.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_TOL = 1e-4  # max |logit diff| per unit of max(1, max |logit|), for every dtype: see check_export


def is_previous_export(folder: Path) -> bool:
    """Whether ``folder`` holds a minillm export (config.json with a ``minillm`` key)."""
    try:
        return "minillm" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out_dir(out: Path) -> bool:
    """True when ``out`` holds a previous export to replace; ExportError when it holds anything else."""
    if (p := blocking_file(out)) is not None:
        raise ExportError(f"OUT_DIR {out}: is a file; give a folder path" if p == out else
                          f"OUT_DIR {out}: {p} is a file, so no folder can be made under it; give another path")
    if out.is_dir() and any(out.iterdir()):
        if not is_previous_export(out):
            raise ExportError(f"OUT_DIR {out}: not empty and not a minillm export; nothing was written, "
                              "choose an empty or new folder")
        return True
    return False


def make_parents(out: Path) -> list[Path]:
    """Create the missing folders above ``out``; returns them, outermost first (remove_made undoes this)."""
    made: list[Path] = []
    for folder in reversed([p for p in out.parents if not p.exists()]):
        try:
            folder.mkdir()
        except OSError as e:
            remove_made(made)
            raise ExportError(f"OUT_DIR {out}: cannot create the folder {folder} ({e.strerror}); "
                              "give a path where you may create folders") from e
        made.append(folder)
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders make_parents created, innermost first, as long as they are empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


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


def check_range(model: GPT, dtype: str) -> None:
    """ExportError when a weight does not fit ``dtype`` (float16's largest finite value is 65504: beyond
    it the file would hold inf, and every logit would be nan)."""
    for name, p in model.named_parameters():
        if torch.isinf(p.detach().to(DTYPES[dtype])).any():
            raise ExportError(f"--dtype {dtype}: weight {name} reaches {p.detach().abs().max().item():.3g}, past "
                              f"{dtype}'s largest value {torch.finfo(DTYPES[dtype]).max:.5g}; export with "
                              "--dtype bfloat16 or float32")


def rounded_logits(model: GPT, ids: torch.Tensor, dtype: str) -> torch.Tensor:
    """minillm's float32 logits with every weight rounded to ``dtype`` and back, i.e. computed from the
    weights the export file holds (float32: the model's own)."""
    weights = {k: v.to(DTYPES[dtype]).float() for k, v in model.named_parameters()}
    return torch.func.functional_call(model, weights, (ids,))[0]


def check_export(model: GPT, folder: Path, dtype: str) -> tuple[float, float | None]:
    """(max |logit difference| between minillm and the export loaded by transformers, max |logit change|
    that rounding the weights to ``dtype`` causes in minillm's own model; None for float32), on one full
    block_size sequence of random ids (fixed seed).

    Both sides run in float32 on the weights in the file: transformers upcasts a bfloat16/float16 file
    exactly, and minillm's weights go through ``dtype`` and back (rounded_logits). What is left is the
    order of float32 sums, which drifts with the logits' scale, so for every dtype: ExportError when the
    difference is over CHECK_TOL * max(1, the largest |logit|). Measured on the six random models of
    tests/test_hf_export.py (logits up to 10): at most 2.2e-05 in float32, bfloat16 and float16 alike.
    Running both sides in ``dtype`` instead would add each side's own activation rounding (up to 0.6 on
    those logits in bfloat16), a noise floor near what a mapping bug such as a lost norm scale moves."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, model.cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = rounded_logits(model, ids, dtype)
        diff = (ours - hf(ids).logits).abs().max().item()
        drift = None if dtype == "float32" else (ours - model(ids)[0]).abs().max().item()
    allowed = CHECK_TOL * max(1.0, ours.abs().max().item())
    if not diff <= allowed:
        raise ExportError(f"transformers' logits differ from minillm's by {diff:.3g} (allowed {allowed:.3g}); "
                          "nothing was written: this is a minillm bug, please report it (--no-check writes "
                          "the folder anyway)")
    return diff, drift


def export(source: str | Path, out_dir: str | Path, dtype: str = "float32", check: bool = True) -> dict:
    """Export the run (folder or checkpoint) ``source`` to ``out_dir``; returns what was done
    (architecture, out_dir, replaced, dtype, max_logit_diff, rounding_diff: check_export's pair, None
    without the check; checkpoint, step). Raises UserError subclasses (ExportError, CheckpointError) for
    bad input; nothing is written then (folders made above OUT_DIR are removed again)."""
    require_hf()
    run = load_run(source)
    arch = architecture(run.model.cfg)  # refuse before writing anything
    check_range(run.model, dtype)
    out = Path(out_dir).expanduser()
    replacing = check_out_dir(out)
    made = make_parents(out)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_export(run.model, run.tokenizer, tmp, dtype, {"checkpoint": run.checkpoint.name, "step": run.step})
        diff, drift = check_export(run.model, tmp, dtype) if check else (None, None)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            remove_made(made)
    return {"architecture": arch, "out_dir": str(out), "replaced": replacing, "dtype": dtype,
            "max_logit_diff": diff, "rounding_diff": drift, "checkpoint": str(run.checkpoint), "step": run.step}


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
    print(f"wrote {done['out_dir']}: {done['architecture']} from {done['checkpoint']} (step {done['step']}); "
          + check_summary(done))
    return 0


def check_summary(done: dict) -> str:
    """What the parity check found, for the command's last line (export's result ``done``)."""
    diff, drift = done["max_logit_diff"], done["rounding_diff"]
    if diff is None:
        return "logits not compared with minillm's (--no-check)"
    rounding = (f"; both with the weights rounded to {done['dtype']}, which moves minillm's own logits by up "
                f"to {drift:.2e}" if drift is not None else "")
    return f"transformers' logits match minillm's (max diff {diff:.2e}{rounding})"


if __name__ == "__main__":
    sys.exit(main())
