"""Prepare a corpus for training: tokenizer (trained or given) + both splits encoded, cached by content.

    prepare(data cfg, tokenizer cfg) -> PreparedData(dir, tokenizer, train, val, meta)

The corpus is files (data.path, the named dataset) or a Hugging Face dataset (data.hf_dataset,
hf_dataset.py); the tokenizer is trained on the training split (a seeded sample of its lines:
tokenizer_sample.py), or given (tokenizer.path, or another run's for fine-tuning).

The cache folder's name holds a key over the content of every file (sha256) plus the tokenizer and
split settings: changing any of them makes a fresh folder and nothing stale is ever reused. A folder
is built under a temporary name and renamed when complete (meta.json, written last, marks it), so
concurrent preparers on a shared cache are safe: the first rename wins. An entry found damaged
(unreadable meta.json, tokenizer or token file) is derived data: it is removed, with a warning, and
built again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from minillm.config import DataConfig, TokenizerConfig
from minillm.data.corpus import (FileInfo, Segment, cache_dir, check_files, describe_files, expand_paths,
                                 resolve_corpus, segment_texts, split_segments, whole_files)
from minillm.data.encode import encode_segments, resolve_workers
from minillm.data.formats import Records
from minillm.data.hf_dataset import check_split, hf_splits
from minillm.data.token_file import FORMAT_VERSION, TokenWriter, read_tokens
from minillm.data.tokenizer_sample import train_on_sample
from minillm.errors import TokenizerError, UserError
from minillm.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer, make_report

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

    The tokenizer is ``tokenizer`` if given (fine-tuning another run's model), else the sentencepiece
    model at ``tok_cfg.path`` if set, else one trained on the training split. ``progress``: progress
    bars (checking, tokenizer sample, encoding) when stderr is a terminal. A damaged cache entry is
    rebuilt with a warning. Raises DataError / TokenizerError for bad input, leaving no entry behind.
    """
    if tokenizer is None and tok_cfg.path is not None:
        tokenizer = load_given_tokenizer(tok_cfg.path)
    corpus = _hf_corpus(data_cfg, progress) if data_cfg.hf_dataset is not None else _file_corpus(data_cfg, progress)
    settings = corpus.settings | {"format": FORMAT_VERSION, "layout": 2, "tokenizer": _tokenizer_key(tok_cfg, tokenizer)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir() / "prepared" / f"{corpus.stem}-{key}"
    prepared = PreparedData(out, out / "tokenizer.model", out / "train.bin", out / "val.bin", {})
    if (meta := reusable(out)) is not None:
        prepared.meta = meta
        log.info("reusing tokenized data in %s", out)
        return prepared
    files, val_files = corpus.checked()
    if val_files is None:
        train_segs, val_segs = split_segments(files, data_cfg.val_fraction, corpus.source)
    else:
        train_segs, val_segs = whole_files(files), whole_files(val_files)
    tok = _tokenizer_for(train_segs, tok_cfg, tokenizer, corpus.source, progress)
    meta = {"corpus": [str(f.path) for f in files],
            "skipped": [str(p) for p in corpus.paths if p not in {f.path for f in files}],
            "empty_documents": sum(f.empty for f in files + (val_files or [])),
            "skipped_records": {str(f.path): f.bad for f in files + (val_files or []) if f.bad},
            **settings, "vocab_size": tok.vocab_size, "tokenizer_train_seconds": round(tok.train_seconds, 3)}
    kind = tok_cfg.model_type if tokenizer is None else "given"
    prepared.meta = _build(out, tok, kind, {"train": train_segs, "val": val_segs}, meta,
                           resolve_workers(data_cfg.num_workers), progress)
    return prepared


@dataclass
class _Corpus:
    """A corpus before preparation: what its cache key covers (``settings``), the folder name's stem, how
    messages name it, and ``checked()``: the checked (train, val or None) files of the corpus."""
    settings: dict
    stem: str
    source: str
    paths: list
    checked: Callable[[], tuple[list[FileInfo], list[FileInfo] | None]]


def _file_corpus(data_cfg: DataConfig, progress: bool) -> _Corpus:
    """Files (data.path or the named dataset): every file is checked first, its sha256 in the key. The
    text field is part of the key only where a record file (JSONL, Parquet) uses it, so text corpora keep
    their key."""
    paths = resolve_corpus(data_cfg)
    files = check_files(paths, data_cfg.skip_invalid, text_field=data_cfg.text_field, progress=progress)
    val_files = None
    if data_cfg.val_path is not None:
        val_files = check_files(expand_paths(data_cfg.val_path, "data.val_path"), data_cfg.skip_invalid,
                                "data.val_path", text_field=data_cfg.text_field, progress=progress)
    records = any(f.fmt != "text" for f in files + (val_files or []))
    settings = {"corpus_sha256": [f.sha256 for f in files],
                **({"text_field": data_cfg.text_field} if records else {}),
                "val_sha256": [f.sha256 for f in val_files] if val_files is not None else None,
                "val_fraction": data_cfg.val_fraction if val_files is None else None}
    stem = files[0].path.stem if len(files) == 1 else data_cfg.name
    return _Corpus(settings, stem, describe_files(files, f"data.path={data_cfg.path}"), paths,
                   lambda: (files, val_files))


def _hf_corpus(data_cfg: DataConfig, progress: bool) -> _Corpus:
    """A Hugging Face dataset (hf_dataset.py): the key covers its identity (a local one's folder, its
    configuration, split, text field and the sha256 of its files), so a cache hit reads no row; the
    rows are checked only when the entry is built."""
    train, val = hf_splits(data_cfg)
    val_files = None
    if data_cfg.val_path is not None:
        val_files = check_files(expand_paths(data_cfg.val_path, "data.val_path"), data_cfg.skip_invalid,
                                "data.val_path", text_field=data_cfg.text_field, progress=progress)
    where = train.spec if train.kind == "hub" else str(train.path.resolve())
    fingerprint, val_fingerprint = train.fingerprint(), val.fingerprint() if val else None
    settings = {"hf": {"dataset": where, "kind": train.kind, "config": train.config, "split": train.split,
                       "val_split": val.split if val else None, "fingerprint": fingerprint,
                       "val_fingerprint": val_fingerprint},
                "text_field": data_cfg.text_field,
                "val_sha256": [f.sha256 for f in val_files] if val_files is not None else None,
                "val_fraction": data_cfg.val_fraction if val is None and val_files is None else None}

    def checked() -> tuple[list[FileInfo], list[FileInfo] | None]:
        files = check_split(train, data_cfg.text_field, data_cfg.skip_invalid, progress, fingerprint)
        if val is not None:
            return files, check_split(val, data_cfg.text_field, data_cfg.skip_invalid, progress, val_fingerprint)
        return files, val_files
    stem = re.sub(r"[^\w.-]+", "_", Path(where).name if train.kind != "hub" else where).strip("._") or "hf"
    return _Corpus(settings, stem, str(train), [train], checked)


def _tokenizer_key(tok_cfg: TokenizerConfig, given: Tokenizer | None) -> dict:
    """The tokenizer's part of the cache key: its settings, or the given model's sha256 (tokenizer.path
    or another run's model: the same bytes, the same key). ``path`` is left out while unset, so keys
    made before it existed still hold."""
    if given is not None:
        return {"given_sha256": hashlib.sha256(given.proto).hexdigest()}
    return {k: v for k, v in asdict(tok_cfg).items() if k != "path"} | {"num_threads": None}


def load_given_tokenizer(path: str) -> Tokenizer:
    """The sentencepiece model at ``tokenizer.path``; TokenizerError (one line naming tokenizer.path)
    if it is missing, not a sentencepiece model, or numbers its special pieces otherwise than minillm
    (unk 0, bos 1, eos 2: eos separates documents)."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "not a file" if p.exists() else "no such file"
        raise TokenizerError(f"tokenizer.path={path}: {what}; give a sentencepiece .model file (make one with "
                             "python -m minillm.train_tokenizer --input CORPUS --out tok.model) or unset it")
    try:
        tok = Tokenizer(p.read_bytes())
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"tokenizer.path={path}: not a sentencepiece model ({str(e).strip().splitlines()[-1]}); "
                             "give a .model file written by python -m minillm.train_tokenizer") from e
    ids = (tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id())
    if ids != (UNK_ID, BOS_ID, EOS_ID):
        raise TokenizerError(f"tokenizer.path={path}: its unk, bos, eos ids are {ids}, minillm needs "
                             f"{(UNK_ID, BOS_ID, EOS_ID)}; train one with python -m minillm.train_tokenizer")
    return tok


def reusable(out: Path) -> dict | None:
    """The meta of a complete, readable cache entry at ``out``, or None. The entry is derived data: one
    that cannot be read (meta.json not JSON, tokenizer, a token file truncated or failing its checksum)
    is removed with a warning naming the file and the fault, so it is built again."""
    if not out.exists():  # asked first: a concurrent preparer's rename brings the folder and its meta.json at once
        return None
    if not (out / "meta.json").is_file():  # so this folder lost it
        log.warning("the prepared data in %s is damaged (%s is missing); it is derived data: rebuilding it",
                    out, out / "meta.json")
        _discard(out)
        return None
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"{out / 'meta.json'}: not a JSON object")
        tok = Tokenizer.load(out / "tokenizer.model")
        for split in ("train", "val"):
            read_tokens(out / f"{split}.bin", tok.vocab_size)
    except (UserError, ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        what = f"{out / 'meta.json'}: {e}" if isinstance(e, ValueError) and not isinstance(e, UserError) else str(e)
        log.warning("the prepared data in %s is damaged (%s); it is derived data: rebuilding it", out, what)
        _discard(out)
        return None
    return meta


def _discard(out: Path) -> None:
    """Move ``out`` aside (one rename: no reader sees half of it) and delete it."""
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=".damaged-"))
    try:
        os.replace(out, aside / out.name)
    except FileNotFoundError:  # another preparer got there first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _tokenizer_for(train_segs: list[Segment | Records], tok_cfg: TokenizerConfig, given: Tokenizer | None,
                   source: str, progress: bool) -> Tokenizer:
    if given is not None:
        log.info("encoding %s with the given tokenizer (vocab %d)", source, given.vocab_size)
        given.train_seconds = 0.0
        return given
    # a char vocabulary takes one piece per character of the corpus, up to vocab_size
    size = f"vocab {'up to ' if tok_cfg.model_type == 'char' else ''}{tok_cfg.vocab_size}"
    log.info("training a %s tokenizer (%s) on %s", tok_cfg.model_type, size, source)
    return train_on_sample(segment_texts(train_segs, progress=progress), tok_cfg, source=source)


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
    log.info("tokenized: %d train / %d val tokens (an eos between documents)\n  %s", meta["train_tokens"],
             meta["val_tokens"], "\n  ".join(report.lines()))
    return meta
