"""Corpus -> tokenizer -> token files, cached so a second run with the same inputs reuses them.

    resolve_corpus(data cfg)     the text file: data.path, else the cache folder, else a download
    split_corpus(bytes, frac)    the last ``frac`` of the bytes is validation (cut on a UTF-8 boundary)
    prepare(data, tok, cache)    trains the tokenizer on the training split and encodes both splits

The cache key is the corpus's sha256 plus the tokenizer settings and split, so changing either makes a
fresh folder and nothing stale is ever reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minillm.config import DataConfig, TokenizerConfig
from minillm.tokenizer import Tokenizer, train_tokenizer
from minillm.tokens import FORMAT_VERSION, write_tokens

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The corpus cannot be found, fetched or read; the message says which and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_DATA_DIR") or Path.home() / ".cache" / "minillm").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` through a temporary file; a checksum mismatch leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False) as bar:
                for block in iter(lambda: r.read(1 << 16), b""):
                    f.write(block)
                    bar.update(len(block))
        got = sha256_file(Path(tmp))
        if sha256 and got != sha256:
            raise DataError(f"{url}: sha256 {got} does not match the expected {sha256}; "
                            "the download is not the right file (nothing was kept)")
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_corpus(cfg: DataConfig) -> Path:
    """The corpus file: ``cfg.path`` if given, else ``<cache>/<filename>``, else downloaded there."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise DataError(f"data.path={cfg.path}: no such file; give a UTF-8 text file")
        return path
    if cfg.filename is None:
        raise DataError(f"data={cfg.name}: has neither a path nor a file name; set data.path")
    cached = cache_dir() / cfg.filename
    if cached.is_file():
        if cfg.sha256 and sha256_file(cached) != cfg.sha256:
            raise DataError(f"{cached}: sha256 does not match the one data={cfg.name} expects; "
                            "delete it to download again, or pass data.path")
        return cached
    if cfg.url is None:
        raise DataError(f"data={cfg.name}: {cached} is missing and there is no url to fetch it from")
    log.info("downloading %s to %s", cfg.url, cached)
    try:
        return download(cfg.url, cached, cfg.sha256)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataError(f"data={cfg.name}: cannot download {cfg.url} ({getattr(e, 'reason', e)}); put "
                        f"{cfg.filename} in {cached.parent} (or set MINILLM_DATA_DIR to its folder) "
                        f"or pass data.path=/path/to/{cfg.filename}") from e


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the corpus is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") from e


def split_corpus(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the last ``val_fraction`` of the UTF-8 bytes, cut on a character boundary."""
    raw = text.encode("utf-8")
    cut = int(len(raw) * (1.0 - val_fraction))
    while 0 < cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # never cut inside a character
        cut += 1
    return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


def encode_text(tok: Tokenizer, text: str, chunk_chars: int = 1 << 20) -> np.ndarray:
    """Encode text in newline-aligned chunks (sentencepiece encodes a batch on several threads)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        nl = text.rfind("\n", start, end) if end < len(text) else -1
        end = nl + 1 if nl > start else end
        chunks.append(text[start:end])
        start = end
    ids = tok.encode_batch(chunks)
    return np.fromiter((i for part in ids for i in part), dtype=np.int64, count=sum(map(len, ids)))


@dataclass
class PreparedData:
    dir: Path
    tokenizer: Path
    train: Path
    val: Path
    meta: dict


def prepare(data_cfg: DataConfig, tok_cfg: TokenizerConfig) -> PreparedData:
    """Train the tokenizer and encode the splits, or reuse a cached result for the same inputs."""
    corpus = resolve_corpus(data_cfg)
    digest = sha256_file(corpus)
    settings = {"format": FORMAT_VERSION, "corpus_sha256": digest, "val_fraction": data_cfg.val_fraction,
                "tokenizer": asdict(tok_cfg) | {"num_threads": None}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir() / "prepared" / f"{corpus.stem}-{key}"
    paths = PreparedData(out, out / "tokenizer.model", out / "train.bin", out / "val.bin", {})
    if (out / "meta.json").is_file():  # written last: its presence means the rest is complete
        paths.meta = json.loads((out / "meta.json").read_text())
        log.info("reusing tokenized data in %s", out)
        return paths

    text = read_text(corpus)
    train_text, val_text = split_corpus(text, data_cfg.val_fraction)
    if not train_text.strip() or not val_text.strip():
        raise DataError(f"{corpus}: too small to split into training and validation text")
    log.info("training a %s tokenizer (vocab %d) on %s", tok_cfg.model_type, tok_cfg.vocab_size, corpus)
    tok = train_tokenizer([train_text], tok_cfg, source=str(corpus))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        tok.save(tmp / "tokenizer.model")
        meta = {"corpus": str(corpus), **settings, "vocab_size": tok.vocab_size,
                "tokenizer_train_seconds": round(tok.train_seconds, 3)}
        for split, part in (("train", train_text), ("val", val_text)):
            ids = encode_text(tok, part)
            write_tokens(tmp / f"{split}.bin", ids, tok.vocab_size)
            meta[f"{split}_tokens"] = int(ids.size)
            meta[f"{split}_bytes"] = len(part.encode("utf-8"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out.exists():  # a concurrent preparer won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    paths.meta = meta
    log.info("tokenized: %d train / %d val tokens, %.2f bytes per token", meta["train_tokens"],
             meta["val_tokens"], meta["val_bytes"] / max(1, meta["val_tokens"]))
    return paths
