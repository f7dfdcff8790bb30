"""Prepare a corpus for training: tokenizer (trained or given) + both splits encoded, cached by content.

    prepare(data cfg, tokenizer cfg) -> PreparedData(dir, tokenizer, train, val, meta)

The cache folder's name holds a key over the content of every file (sha256) plus the tokenizer and
split settings: changing any of them makes a fresh folder and nothing stale is ever reused. A folder
is built under a temporary name and renamed when complete (meta.json, written last, marks it), so
concurrent preparers on a shared cache are safe: the first rename wins.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from minillm.config import DataConfig, TokenizerConfig
from minillm.data.corpus import (FileInfo, Segment, cache_dir, check_files, describe_files, expand_paths,
                                 resolve_corpus, segment_texts, split_segments, whole_files)
from minillm.data.encode import encode_segments, resolve_workers
from minillm.data.formats import Records
from minillm.data.token_file import FORMAT_VERSION, TokenWriter
from minillm.tokenizer import Tokenizer, make_report, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A prepared corpus: ``train`` and ``val`` are token files (read with ``read_tokens``); ``meta``
    holds train/val tokens, bytes and documents, the files used and skipped, the tokenizer report."""
    dir: Path
    tokenizer: Path
    train: Path
    val: Path
    meta: dict


def prepare(data_cfg: DataConfig, tok_cfg: TokenizerConfig, progress: bool = True,
            tokenizer: Tokenizer | None = None) -> PreparedData:
    """Train the tokenizer and encode the splits, or reuse a cached result for the same inputs.

    With ``tokenizer`` (fine-tuning another run's model), that tokenizer encodes the corpus instead
    of a newly trained one, and tok_cfg is not used. Raises DataError / TokenizerError for bad input.
    """
    paths = resolve_corpus(data_cfg)
    files = check_files(paths, data_cfg.skip_invalid, text_field=data_cfg.text_field)
    val_files = None
    if data_cfg.val_path is not None:
        val_files = check_files(expand_paths(data_cfg.val_path, "data.val_path"), data_cfg.skip_invalid,
                                "data.val_path", text_field=data_cfg.text_field)
    settings = _cache_settings(data_cfg, tok_cfg, files, val_files, tokenizer)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stem = files[0].path.stem if len(files) == 1 else data_cfg.name
    out = cache_dir() / "prepared" / f"{stem}-{key}"
    prepared = PreparedData(out, out / "tokenizer.model", out / "train.bin", out / "val.bin", {})
    if (out / "meta.json").is_file():  # written last: its presence means the rest is complete
        prepared.meta = json.loads((out / "meta.json").read_text())
        log.info("reusing tokenized data in %s", out)
        return prepared
    source = describe_files(files, f"data.path={data_cfg.path}")
    if val_files is None:
        train_segs, val_segs = split_segments(files, data_cfg.val_fraction, source)
    else:
        train_segs, val_segs = whole_files(files), whole_files(val_files)
    tok = _tokenizer_for(train_segs, tok_cfg, tokenizer, source, progress)
    meta = {"corpus": [str(f.path) for f in files],
            "skipped": [str(p) for p in sorted(set(paths) - {f.path for f in files})],
            "empty_documents": sum(f.empty for f in files + (val_files or [])),
            "skipped_records": {str(f.path): f.bad for f in files + (val_files or []) if f.bad},
            **settings, "vocab_size": tok.vocab_size, "tokenizer_train_seconds": round(tok.train_seconds, 3)}
    kind = tok_cfg.model_type if tokenizer is None else "given"
    prepared.meta = _build(out, tok, kind, {"train": train_segs, "val": val_segs}, meta,
                           resolve_workers(data_cfg.num_workers), progress)
    return prepared


def _cache_settings(data_cfg: DataConfig, tok_cfg: TokenizerConfig, files: list[FileInfo],
                    val_files: list[FileInfo] | None, tokenizer: Tokenizer | None) -> dict:
    """Everything the prepared data depends on (its cache key is a hash of this). The text field is
    part of it only where a record file (JSONL, Parquet) uses it, so text corpora keep their key."""
    records = any(f.fmt != "text" for f in files + (val_files or []))
    return {"format": FORMAT_VERSION, "layout": 2, "corpus_sha256": [f.sha256 for f in files],
            **({"text_field": data_cfg.text_field} if records else {}),
            "val_sha256": [f.sha256 for f in val_files] if val_files is not None else None,
            "val_fraction": data_cfg.val_fraction if val_files is None else None,
            "tokenizer": asdict(tok_cfg) | {"num_threads": None} if tokenizer is None
            else {"given_sha256": hashlib.sha256(tokenizer.proto).hexdigest()}}


def _tokenizer_for(train_segs: list[Segment | Records], tok_cfg: TokenizerConfig, given: Tokenizer | None,
                   source: str, progress: bool) -> Tokenizer:
    if given is not None:
        log.info("encoding %s with the given tokenizer (vocab %d)", source, given.vocab_size)
        given.train_seconds = 0.0
        return given
    log.info("training a %s tokenizer (vocab %d) on %s", tok_cfg.model_type, tok_cfg.vocab_size, source)
    return train_tokenizer(segment_texts(train_segs, progress=progress), tok_cfg, source=source)


def _build(out: Path, tok: Tokenizer, kind: str, splits: dict[str, list[Segment | Records]], meta: dict,
           workers: int, progress: bool) -> dict:
    """Encode the splits into a temporary folder and rename it to ``out``; returns the final meta."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        tok.save(tmp / "tokenizer.model")
        stats = {}
        for split, segs in splits.items():
            with TokenWriter(tmp / f"{split}.bin", tok.vocab_size) as w:
                stats[split] = st = encode_segments(tok, segs, w, workers, progress=progress, desc=f"encode {split}")
            meta |= {f"{split}_tokens": st["tokens"], f"{split}_bytes": st["bytes"],
                     f"{split}_documents": st["documents"]}
        v = stats["val"]
        report = make_report(tok, kind, v["bytes"], v["text_tokens"], v["byte_tokens"])
        meta["tokenizer_report"] = asdict(report)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out.exists():  # a concurrent preparer won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenized: %d train / %d val tokens\n  %s", meta["train_tokens"], meta["val_tokens"],
             "\n  ".join(report.lines()))
    return meta
