"""Corpus -> tokenizer -> token files, streamed, in parallel, and cached.

    resolve_corpus(data cfg)     the corpus files: data.path (file, folder or glob), else the named
                                 dataset from the cache folder, else downloaded there
    check_files(paths)           one pass per file: sha256, UTF-8 validity (file + byte offset), binary
    split_segments(files, frac)  the last ``frac`` of the bytes is validation (cut on a UTF-8 boundary)
    encode_segments(...)         newline-aligned chunks -> a pool of worker processes -> a TokenWriter,
                                 in order, with at most a few chunks in flight (bounded memory)
    prepare(data, tok)           trains the tokenizer on the training text and encodes both splits

Each file is one document (a file cut by the validation split is two); documents are separated by
the eos id in the token stream, and nothing else is added, so decoding a split gives its text back.
The cache key is the content of every file plus the tokenizer and split settings: changing any of
them makes a fresh folder and nothing stale is ever reused.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from minillm.config import ConfigError, DataConfig, TokenizerConfig
from minillm.tokenizer import EOS_ID, Tokenizer, TokenizerReport, make_report, train_tokenizer
from minillm.tokens import FORMAT_VERSION, TokenWriter

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20   # unit of work sent to an encoding process
_SCAN_BLOCK = 1 << 20


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


# ----------------------------------------------------------------------------- finding the files

def expand_paths(spec: str, key: str) -> list[Path]:
    """Files named by ``spec``: a file, a folder (every non-hidden file under it) or a glob; sorted."""
    spec = os.path.expanduser(str(spec))
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{key}={spec}: the pattern matches no files; check the path and quoting")
        return files
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{key}={spec}: the folder holds no files; put UTF-8 text files in it")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"{key}={spec}: no such file or folder; give a UTF-8 text file, a folder or a glob")


def resolve_corpus(cfg: DataConfig) -> list[Path]:
    """The corpus files: ``cfg.path`` if given, else ``<cache>/<filename>``, else downloaded there."""
    if cfg.path is not None:
        return expand_paths(cfg.path, "data.path")
    if cfg.filename is None:
        raise DataError(f"data={cfg.name}: has neither a path nor a file name; set data.path")
    cached = cache_dir() / cfg.filename
    if cached.is_file():
        if cfg.sha256 and sha256_file(cached) != cfg.sha256:
            raise DataError(f"{cached}: sha256 does not match the one data={cfg.name} expects; "
                            "delete it to download again, or pass data.path")
        return [cached]
    if cfg.url is None:
        raise DataError(f"data={cfg.name}: {cached} is missing and there is no url to fetch it from")
    log.info("downloading %s to %s", cfg.url, cached)
    try:
        return [download(cfg.url, cached, cfg.sha256)]
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataError(f"data={cfg.name}: cannot download {cfg.url} ({getattr(e, 'reason', e)}); put "
                        f"{cfg.filename} in {cached.parent} (or set MINILLM_DATA_DIR to its folder) "
                        f"or pass data.path=/path/to/{cfg.filename}") from e


@dataclass(frozen=True)
class FileInfo:
    path: Path
    size: int
    sha256: str
    has_text: bool             # holds something other than whitespace
    problem: str | None        # why it cannot be used as text, or None


def scan_file(path: Path) -> FileInfo:
    """One streaming pass: sha256, and the first NUL byte or invalid UTF-8 sequence with its offset."""
    h, dec = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
    pos, has_text, problem = 0, False, None
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):
            h.update(block)
            if problem is None:
                if (nul := block.find(b"\0")) >= 0:
                    problem = f"looks like a binary file (NUL byte at offset {pos + nul})"
                else:
                    pending = len(dec.getstate()[0])  # bytes of an unfinished character held back
                    try:
                        dec.decode(block)
                    except UnicodeDecodeError as e:
                        problem = (f"not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at offset "
                                   f"{pos - pending + e.start})")
                    has_text = has_text or bool(block.strip())
            pos += len(block)
    if problem is None and (tail := dec.getstate()[0]):
        problem = f"not UTF-8 text (the file ends inside a character at offset {pos - len(tail)})"
    return FileInfo(path, pos, h.hexdigest(), has_text, problem)


def check_files(paths: Sequence[Path], skip_invalid: bool, key: str = "data.path",
                flag: str = "data.skip_invalid=true") -> list[FileInfo]:
    """Scan every file; a bad one is an error naming it (or, with ``skip_invalid``, a warning)."""
    good = []
    for p in tqdm(paths, desc="check corpus", unit="file", leave=False, disable=len(paths) < 20):
        info = scan_file(p)
        if info.problem is None:
            good.append(info)
        elif skip_invalid:
            log.warning("skipping %s: %s", p, info.problem)
        else:
            raise DataError(f"{p}: {info.problem}; convert it to UTF-8 text, remove it, or set {flag} to skip such files")
    if not any(f.has_text for f in good):
        where = paths[0] if len(paths) == 1 else f"{key} ({len(paths)} files, {len(good)} usable)"
        raise DataError(f"{where}: the corpus is empty (no text); give UTF-8 text with something in it")
    return good


# ----------------------------------------------------------------------------- splitting and chunking

@dataclass(frozen=True)
class Segment:
    """One document: bytes [start, end) of a file."""
    path: Path
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def whole_files(files: Iterable[FileInfo]) -> list[Segment]:
    return [Segment(f.path, 0, f.size) for f in files if f.size]


def _char_boundary(path: Path, offset: int) -> int:
    """The first offset >= ``offset`` that does not fall inside a UTF-8 character."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(4)
    for k, b in enumerate(data):
        if (b & 0xC0) != 0x80:
            return offset + k
    return offset + len(data)


def split_segments(files: Sequence[FileInfo], val_fraction: float, source: str) -> tuple[list[Segment], list[Segment]]:
    """(train, val): val is the last ``val_fraction`` of all the bytes, cut on a character boundary."""
    total = sum(f.size for f in files)
    cut = int(total * (1.0 - val_fraction))
    train, val, base = [], [], 0
    for f in files:
        lo, hi = base, base + f.size
        base = hi
        if f.size == 0:
            continue
        if hi <= cut:
            train.append(Segment(f.path, 0, f.size))
        elif lo >= cut:
            val.append(Segment(f.path, 0, f.size))
        else:
            c = min(_char_boundary(f.path, cut - lo), f.size)
            train += [Segment(f.path, 0, c)] if c > 0 else []
            val += [Segment(f.path, c, f.size)] if c < f.size else []
    if not train or not val:
        raise DataError(f"{source}: too small to split into training and validation text at "
                        f"data.val_fraction={val_fraction}; give more text or set data.val_path")
    return train, val


def split_corpus(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val) of one in-memory text, with the same rule as :func:`split_segments`."""
    raw = text.encode("utf-8")
    cut = int(len(raw) * (1.0 - val_fraction))
    while 0 < cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # never cut inside a character
        cut += 1
    return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


def _last_char_start(buf: bytes) -> int:
    for i in range(len(buf) - 1, max(-1, len(buf) - 5), -1):
        if (buf[i] & 0xC0) != 0x80:
            return i
    return len(buf)


def iter_chunks(seg: Segment, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) pieces of ``seg`` of about ``chunk_bytes``, each ending just after a newline
    (or, in a line longer than a chunk, on a character boundary). Memory: at most two chunks."""
    with open(seg.path, "rb") as f:
        f.seek(seg.start)
        pos, carry, carry_off = seg.start, b"", seg.start
        while pos < seg.end:
            block = f.read(min(chunk_bytes, seg.end - pos))
            if not block:
                raise DataError(f"{seg.path}: the file shrank while being read; do not change the corpus during preparation")
            pos += len(block)
            buf = carry + block
            if pos >= seg.end:
                cut = len(buf)
            else:
                cut = buf.rfind(b"\n") + 1 or _last_char_start(buf)
            if cut:
                yield carry_off, buf[:cut]
            carry, carry_off = buf[cut:], carry_off + cut


def segment_texts(segments: Sequence[Segment], chunk_bytes: int = CHUNK_BYTES, progress: bool = False,
                  desc: str = "read for tokenizer") -> Iterator[str]:
    """The text of the segments, streamed in newline-aligned pieces (for tokenizer training)."""
    with tqdm(total=sum(s.size for s in segments), unit="B", unit_scale=True, desc=desc, leave=False,
              disable=not progress) as bar:
        for seg in segments:
            for off, data in iter_chunks(seg, chunk_bytes):
                bar.update(len(data))
                yield _decode(data, seg, off)


def _decode(data: bytes, seg: Segment, off: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:  # it was valid when scanned: the file changed
        raise DataError(f"{seg.path}: not UTF-8 text at offset {off + e.start} (did the file change during "
                        "preparation?); fix the file and run again") from e


# ----------------------------------------------------------------------------- parallel encoding

_worker_tok: Tokenizer | None = None


def _worker_init(proto: bytes) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(proto)


def _worker_encode(data: bytes) -> np.ndarray | UnicodeDecodeError:
    try:
        return _worker_tok.encode_array(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return e


def resolve_workers(num_workers: int) -> int:
    return num_workers if num_workers > 0 else (os.cpu_count() or 1)


def encode_segments(tok: Tokenizer, segments: Sequence[Segment], writer: TokenWriter | None,
                    num_workers: int = 1, chunk_bytes: int | None = None, progress: bool = False,
                    desc: str = "encode") -> dict:
    """Encode documents into ``writer`` (None: only count), eos between documents.

    With ``num_workers`` > 1 the chunks go to a process pool; results are written in input order, and
    at most ``2 * num_workers + 1`` chunks are in flight, so memory is bounded by the chunk size, not
    the corpus size. The ids do not depend on the number of workers.
    Returns tokens (incl. eos), text_tokens, byte_tokens (byte-fallback), bytes, documents, and
    max_pending_bytes (most input bytes read but not yet written at any time).
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    total = sum(s.size for s in segments)
    is_byte = tok.byte_fallback_mask()
    st = {"tokens": 0, "text_tokens": 0, "byte_tokens": 0, "bytes": total, "documents": 0, "max_pending_bytes": 0}
    last_doc = -1
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=not progress)

    def emit(doc: int, n_bytes: int, ids: np.ndarray) -> None:
        nonlocal last_doc
        if doc != last_doc:
            if last_doc >= 0:  # a document boundary
                if writer is not None:
                    writer.write(np.array([EOS_ID]))
                st["tokens"] += 1
            st["documents"] += 1
            last_doc = doc
        if writer is not None:
            writer.write(ids)
        st["tokens"] += ids.size
        st["text_tokens"] += ids.size
        st["byte_tokens"] += int(np.count_nonzero(is_byte[ids]))
        bar.update(n_bytes)

    work = ((d, seg, off, data) for d, seg in enumerate(segments) for off, data in iter_chunks(seg, chunk_bytes))
    workers = min(num_workers, total // chunk_bytes + 1)
    try:
        if workers <= 1:
            for d, seg, off, data in work:
                st["max_pending_bytes"] = max(st["max_pending_bytes"], len(data))
                emit(d, len(data), tok.encode_array(_decode(data, seg, off)))
        else:
            _encode_in_pool(tok, work, workers, emit, st)
    finally:
        bar.close()
    return st


def _encode_in_pool(tok: Tokenizer, work: Iterator, workers: int, emit, st: dict) -> None:
    window = 2 * workers + 1  # enough to keep every worker busy while the main process writes
    pending: deque = deque()
    pending_bytes = 0

    def take() -> None:
        nonlocal pending_bytes
        d, seg, off, n, res = pending.popleft()
        ids = res.get()
        if isinstance(ids, UnicodeDecodeError):
            raise DataError(f"{seg.path}: not UTF-8 text at offset {off + ids.start} (did the file change during "
                            "preparation?); fix the file and run again")
        pending_bytes -= n
        emit(d, n, ids)

    with mp.get_context().Pool(workers, initializer=_worker_init, initargs=(tok.proto,)) as pool:
        for d, seg, off, data in work:
            pending.append((d, seg, off, len(data), pool.apply_async(_worker_encode, (data,))))
            pending_bytes += len(data)
            st["max_pending_bytes"] = max(st["max_pending_bytes"], pending_bytes)
            if len(pending) >= window:
                take()
        while pending:
            take()


# ----------------------------------------------------------------------------- tokenizer on files

def _describe(files: Sequence[FileInfo], spec: str) -> str:
    return str(files[0].path) if len(files) == 1 else spec


def train_on_files(specs: Sequence[str], cfg: TokenizerConfig, val_spec: str | None = None,
                   val_fraction: float = 0.1, skip_invalid: bool = False,
                   num_workers: int = 0) -> tuple[Tokenizer, TokenizerReport]:
    """Train a tokenizer on files (each spec a file, folder or glob) and report on held-out text.
    This is what ``python -m minillm.tokenizer`` runs."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction={val_fraction}: must be in (0, 1)")
    paths = [p for spec in specs for p in expand_paths(spec, "--input")]
    files = check_files(paths, skip_invalid, "--input", "--skip-invalid")
    source = _describe(files, " ".join(specs))
    if val_spec:
        train = whole_files(files)
        val = whole_files(check_files(expand_paths(val_spec, "--val-input"), skip_invalid, "--val-input", "--skip-invalid"))
    else:
        train, val = split_segments(files, val_fraction, source)
    tok = train_tokenizer(segment_texts(train), cfg, source=source)
    st = encode_segments(tok, val, None, resolve_workers(num_workers))
    return tok, make_report(tok, cfg.model_type, st["bytes"], st["text_tokens"], st["byte_tokens"])


# ----------------------------------------------------------------------------- prepare (used by the trainer)

@dataclass
class PreparedData:
    dir: Path
    tokenizer: Path
    train: Path
    val: Path
    meta: dict


def prepare(data_cfg: DataConfig, tok_cfg: TokenizerConfig, progress: bool = True,
            tokenizer: Tokenizer | None = None) -> PreparedData:
    """Train the tokenizer and encode the splits, or reuse a cached result for the same inputs.

    With ``tokenizer`` (fine-tuning another run's model), that tokenizer encodes the corpus instead
    of a newly trained one, and tok_cfg is not used.

    ``.train`` and ``.val`` are token files (read with ``minillm.tokens.read_tokens``); ``.meta`` holds
    train/val tokens, bytes and documents, the files used and skipped, and the tokenizer report.
    """
    paths = resolve_corpus(data_cfg)
    files = check_files(paths, data_cfg.skip_invalid)
    val_files = None
    if data_cfg.val_path is not None:
        val_files = check_files(expand_paths(data_cfg.val_path, "data.val_path"), data_cfg.skip_invalid, "data.val_path")
    source = _describe(files, f"data.path={data_cfg.path}")
    settings = {"format": FORMAT_VERSION, "layout": 2, "corpus_sha256": [f.sha256 for f in files],
                "val_sha256": [f.sha256 for f in val_files] if val_files is not None else None,
                "val_fraction": data_cfg.val_fraction if val_files is None else None,
                "tokenizer": asdict(tok_cfg) | {"num_threads": None} if tokenizer is None
                else {"given_sha256": hashlib.sha256(tokenizer.proto).hexdigest()}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stem = files[0].path.stem if len(files) == 1 else data_cfg.name
    out = cache_dir() / "prepared" / f"{stem}-{key}"
    prepared = PreparedData(out, out / "tokenizer.model", out / "train.bin", out / "val.bin", {})
    if (out / "meta.json").is_file():  # written last: its presence means the rest is complete
        prepared.meta = json.loads((out / "meta.json").read_text())
        log.info("reusing tokenized data in %s", out)
        return prepared

    if val_files is None:
        train_segs, val_segs = split_segments(files, data_cfg.val_fraction, source)
    else:
        train_segs, val_segs = whole_files(files), whole_files(val_files)
    if tokenizer is None:
        log.info("training a %s tokenizer (vocab %d) on %s", tok_cfg.model_type, tok_cfg.vocab_size, source)
        tok = train_tokenizer(segment_texts(train_segs, progress=progress), tok_cfg, source=source)
    else:
        log.info("encoding %s with the given tokenizer (vocab %d)", source, tokenizer.vocab_size)
        tok, tok.train_seconds = tokenizer, 0.0
    workers = resolve_workers(data_cfg.num_workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        tok.save(tmp / "tokenizer.model")
        meta = {"corpus": [str(f.path) for f in files], "skipped": [str(p) for p in sorted(set(paths) - {f.path for f in files})],
                **settings, "vocab_size": tok.vocab_size, "tokenizer_train_seconds": round(tok.train_seconds, 3)}
        stats = {}
        for split, segs in (("train", train_segs), ("val", val_segs)):
            with TokenWriter(tmp / f"{split}.bin", tok.vocab_size) as w:
                stats[split] = st = encode_segments(tok, segs, w, workers, progress=progress, desc=f"encode {split}")
            meta |= {f"{split}_tokens": st["tokens"], f"{split}_bytes": st["bytes"], f"{split}_documents": st["documents"]}
        v = stats["val"]
        kind = tok_cfg.model_type if tokenizer is None else "given"
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
    prepared.meta = meta
    log.info("tokenized: %d train / %d val tokens\n  %s", meta["train_tokens"], meta["val_tokens"],
             "\n  ".join(report.lines()))
    return prepared
