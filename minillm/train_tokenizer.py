"""Train a tokenizer on files, on its own: ``python -m minillm.train_tokenizer --input ... --out tok.model``.

    python -m minillm.train_tokenizer --input 'corpus/*.txt' --model-type bpe --vocab-size 8000 --out tok.model

Reads the files with minillm.data (a file, a folder or a glob; UTF-8 checked), trains the lossless
sentencepiece model of minillm.tokenizer on all but the held-out text (a seeded sample of at most
--input-sentence-size lines drawn from every file: minillm.data.tokenizer_sample), and reports on the
held-out text (bytes per token, byte-fallback share). Writes the .model and a .json report beside it;
``python train.py tokenizer.path=tok.model`` then uses it instead of training one.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from minillm.atomic_files import blocking_file
from minillm.config import TokenizerConfig
from minillm.data.corpus import check_files, describe_files, expand_paths, segment_texts, split_segments, whole_files
from minillm.data.encode import encode_segments, resolve_workers
from minillm.errors import ConfigError, TokenizerError, UserError
from minillm.data.tokenizer_sample import train_on_sample
from minillm.tokenizer import Tokenizer, TokenizerReport, make_report


def train_on_files(specs: Sequence[str], cfg: TokenizerConfig, val_spec: str | None = None,
                   val_fraction: float = 0.1, skip_invalid: bool = False,
                   num_workers: int = 0, text_field: str = "text") -> tuple[Tokenizer, TokenizerReport]:
    """Train a tokenizer on files (each spec a file, folder or glob; text, JSONL, Parquet or compressed,
    ``text_field`` naming the text of a record) and report on held-out text: ``val_spec``'s files,
    else the last ``val_fraction`` of the input's text bytes (whole documents of a record file).
    Raises ConfigError, DataError or TokenizerError (one-line messages) for bad input."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction={val_fraction}: must be in (0, 1)")
    paths = [p for spec in specs for p in expand_paths(spec, "--input")]
    files = check_files(paths, skip_invalid, "--input", "--skip-invalid", text_field, progress=True)
    source = describe_files(files, " ".join(specs))
    if val_spec:
        train = whole_files(files)
        val = whole_files(check_files(expand_paths(val_spec, "--val-input"), skip_invalid, "--val-input",
                                      "--skip-invalid", text_field))
    else:
        train, val = split_segments(files, val_fraction, source)
    tok = train_on_sample(segment_texts(train), cfg, source=source)
    st = encode_segments(tok, val, None, resolve_workers(num_workers))
    return tok, make_report(tok, cfg.model_type, st["bytes"], st["text_tokens"], st["byte_tokens"])


def cli_names(message: str) -> str:
    """A message naming train.py's tokenizer keys (TokenizerConfig, minillm/tokenizer.py), in this
    command's options: tokenizer.vocab_size=N -> --vocab-size N, and so on."""
    message = message.replace("or set tokenizer.byte_fallback=true", "or drop --no-byte-fallback")
    message = message.replace("(tokenizer=cjk sets both for Chinese, Japanese or Korean text)",
                              "(for Chinese, Japanese or Korean text: --vocab-size 8000 --character-coverage 0.9995)")
    flag = {"num_threads": "threads"}
    return re.sub(r"tokenizer\.(\w+)(?:=(\S+?)(?=[:;,)\s]|$))?",
                  lambda m: "--" + flag.get(m[1], m[1]).replace("_", "-") + (f" {m[2]}" if m[2] else ""), message)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minillm.train_tokenizer", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a lossless sentencepiece tokenizer on UTF-8 text and report how it does on held-out text.")
    p.add_argument("--input", action="append", required=True,
                   help="a file, a folder (all files under it) or a quoted glob; repeat for several")
    p.add_argument("--val-input", default=None, help="held-out text (file, folder or glob); default: the last "
                   "--val-fraction of the input")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the held-out share of the input's text bytes when --val-input is not given")
    p.add_argument("--out", required=True, help="where to write the .model file (a .json report goes beside it)")
    d = TokenizerConfig()
    p.add_argument("--model-type", default=d.model_type, choices=("bpe", "unigram", "char"),
                   help="sentencepiece's algorithm")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="pieces in all, the 4 specials, newline and 256 byte pieces included")
    p.add_argument("--character-coverage", type=float, default=d.character_coverage,
                   help="1.0 for small alphabets, ~0.9995 for CJK")
    p.add_argument("--no-split-digits", action="store_true")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="no <0xNN> byte pieces (lossless only if every character gets a piece: checked)")
    p.add_argument("--max-sentence-length", type=int, default=d.max_sentence_length,
                   help="bytes; longer lines are cut into pieces for training")
    p.add_argument("--input-sentence-size", type=int, default=d.input_sentence_size,
                   help="lines sampled for training (bounds memory)")
    p.add_argument("--threads", type=int, default=d.num_threads, help="sentencepiece trainer threads")
    p.add_argument("--skip-invalid", action="store_true", help="skip files that are not UTF-8 text instead of failing")
    p.add_argument("--text-field", default="text", help="the field (JSONL) or column (Parquet) holding the text; "
                   "a dotted path reaches a nested field")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; user errors are one line on stderr and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        cfg = TokenizerConfig(model_type=args.model_type, vocab_size=args.vocab_size,
                              character_coverage=args.character_coverage, split_digits=not args.no_split_digits,
                              byte_fallback=not args.no_byte_fallback,
                              max_sentence_length=args.max_sentence_length,
                              input_sentence_size=args.input_sentence_size, num_threads=args.threads)
        out = Path(args.out).expanduser()
        # its folder: checked now, made after training (nothing is left when training fails)
        if (p := blocking_file(out.parent)) is not None:
            raise TokenizerError(f"--out {out}: {p} is a file, so no folder can be made under it; give another path")
        tok, report = train_on_files(args.input, cfg, val_spec=args.val_input, val_fraction=args.val_fraction,
                                     skip_invalid=args.skip_invalid, text_field=args.text_field)
    except UserError as e:
        print(f"error: {cli_names(str(e))}", file=sys.stderr)
        return 2
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {out}: cannot create the folder {out.parent} ({e.strerror}); give another path",
              file=sys.stderr)
        return 2
    tok.save(out)
    rpath = out.with_suffix(".json")
    rpath.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"wrote {out} and {rpath}")
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
