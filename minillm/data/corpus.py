"""The corpus on disk: finding its files, checking them, splitting and reading them in pieces.

    resolve_corpus(data cfg)     the corpus files: data.path (file, folder or glob), else the named
                                 dataset from the cache folder, else downloaded there (sha256-checked)
    check_files(paths)           one pass per file: sha256, UTF-8 validity (file + byte offset), binary;
                                 for JSONL/Parquet (formats.py) every record checked and counted; a
                                 progress bar (CheckBar) counts bytes and documents
    split_segments(files, frac)  the last ``frac`` of the text bytes is validation (cut on a UTF-8
                                 boundary in a text file, between documents in a record file)
    iter_chunks(segment)         newline-aligned pieces of about 1 MiB (bounded memory)

A text file (compressed or not: formats.open_bytes) is one document (a file cut by the validation split
is two); a record file is many (formats.Records).
"""
from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import logging
import os
import stat
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from minillm.config import DataConfig
from minillm.data.formats import (STREAM_ERRORS, Records, compression, file_format, looks_like_records, open_bytes,
                                  record_texts, scan_records)
from minillm.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20   # unit of work read at once (and sent to an encoding process)
_SCAN_BLOCK = 1 << 20
_SAVED_HF_FILES = ("state.json", "dataset_info.json")   # beside the .arrow files of a save_to_disk folder


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
    """Files named by ``spec``: a file, a folder (every non-hidden file under it) or a glob; sorted. A path
    that exists is taken literally, so a name holding glob characters (``shk[1].txt``) is that file."""
    spec = os.path.expanduser(str(spec))
    if glob.has_magic(spec) and not os.path.exists(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{key}={spec}: the pattern matches no files; check the path and quoting")
        return files
    path = Path(spec)
    if path.is_dir() and is_saved_dataset(path):
        # refused whole, even with data.skip_invalid: skipping its .arrow files would leave its JSON metadata
        # to be trained on as the corpus
        raise DataError(f"{key}={spec}: a dataset saved with Hugging Face datasets (save_to_disk), not text "
                        f"files; {saved_dataset_advice(key, spec)}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{key}={spec}: the folder holds no files; put UTF-8 text files in it")
        return files
    if path.is_file():
        return [path]
    if path.exists():  # a device (/dev/zero), a pipe or a socket: no end to read up to, no content to hash
        raise DataError(f"{key}={spec}: not a regular file ({_kind(path)}); give a UTF-8 text file, a folder "
                        "or a glob")
    raise DataError(f"{key}={spec}: no such file or folder; give a UTF-8 text file, a folder or a glob")


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    return ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")


def resolve_corpus(cfg: DataConfig) -> list[Path]:
    """The corpus files: ``cfg.path`` if given, else ``<cache>/<filename>``, else downloaded there."""
    if cfg.path is not None:
        return expand_paths(cfg.path, "data.path")
    if cfg.filename is None:
        where = "data.hf_dataset (a saved or local dataset folder, or a hub name)" if cfg.name == "hf" else "data.path"
        raise DataError(f"data={cfg.name}: has neither a path nor a file name; set {where}")
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
    path: Path                 # (a Hugging Face split: an hf_dataset.HFSplit)
    size: int
    sha256: str
    has_text: bool             # holds something other than whitespace
    problem: str | None        # why it cannot be used as text, or None
    fmt: str = "text"          # "text", "jsonl" or "parquet" (formats.file_format)
    field: str = "text"        # the text field of a record file
    documents: int = 1         # non-empty documents (a record file: size is their text bytes)
    empty: int = 0             # empty documents skipped
    bad: int = 0               # bad records skipped (data.skip_invalid)


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a data bar: off without ``progress`` (logger.progress=false), and
    (None) off when stderr is not a terminal."""
    return None if progress else True


class CheckBar:
    """The checking pass's progress bar: on-disk bytes read towards the files' total size, with the
    documents found beside them; or, ``by_documents`` (a Hugging Face split), documents towards the
    rows' count, with their text bytes beside them."""

    def __init__(self, total: int | None, progress: bool, by_documents: bool = False, desc: str = "check corpus"):
        self.by_documents, self.docs, self.text = by_documents, 0, 0
        self.bar = tqdm(total=total, unit="doc" if by_documents else "B", unit_scale=not by_documents, desc=desc,
                        leave=False, disable=bar_disabled(progress))

    def read(self, n: int) -> None:
        """``n`` more bytes read from the disk."""
        if not self.by_documents:
            self.bar.update(n)

    def document(self, n_bytes: int) -> None:
        """One more document, of ``n_bytes`` bytes of text."""
        self.docs, self.text = self.docs + 1, self.text + n_bytes
        if self.by_documents:
            self.bar.update(1)
        if self.docs % 1024 == 1:
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.text / 1e6:,.1f} MB of text" if self.by_documents
                                 else f"{self.docs:,} documents", refresh=False)

    def close(self) -> None:
        self._postfix()
        self.bar.close()


def scan_file(path: Path, progress: CheckBar | None = None) -> FileInfo:
    """One streaming pass: sha256, and the first NUL byte or invalid UTF-8 sequence with its offset
    (of a compressed file: its decompressed bytes). ``progress`` hears of the bytes read."""
    h, dec = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
    pos, has_text, problem = 0, False, None
    with open_bytes(path, progress.read if progress else None) as f:
        while block := _read_block(f, path):
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


def _read_block(f, path: Path) -> bytes:
    """The next block; a damaged compressed stream raises _Damaged (a plain file's errors propagate)."""
    try:
        return f.read(_SCAN_BLOCK)
    except STREAM_ERRORS as e:
        if compression(path) is None:
            raise
        raise _Damaged(f"the compressed stream is truncated or corrupt ({e}); re-create or remove the file") from e


class _Damaged(Exception):
    pass


def scan_any(path: Path, text_field: str = "text", skip_bad: bool = False,
             progress: CheckBar | None = None, key: str = "data.path") -> FileInfo:
    """:func:`scan_file` for a text file; for a record file, sha256 and every record checked (with
    ``skip_bad``, bad records are counted and skipped, with a warning)."""
    fmt = file_format(path)
    if fmt == "text":
        try:
            if disguised := looks_like_records(path, text_field):
                return FileInfo(path, 0, "", False, disguised)
            info = scan_file(path, progress)
        except _Damaged as e:
            return FileInfo(path, 0, "", False, str(e))
        if (info.problem or "").startswith("looks like a binary") and (saved := saved_hf_dataset(path)):
            info = dataclasses.replace(info, problem=(
                f"looks like part of a dataset saved with Hugging Face datasets (save_to_disk), not text; "
                f"{saved_dataset_advice(key, saved)}"))
        if progress is not None and info.has_text:
            progress.document(info.size)
        return info
    r = scan_records(path, fmt, text_field, skip_bad, progress)
    if r.bad:
        log.warning("%s: skipped %d bad records (the first: %s)", path, r.bad, r.first_bad)
    return FileInfo(path, r.text_bytes, sha256_file(path), r.has_text, r.problem, fmt, text_field, r.documents,
                    r.empty, r.bad)


def saved_hf_dataset(path: Path) -> Path | None:
    """The folder of a dataset saved with ``datasets``' save_to_disk that the file ``path`` is part of (an
    .arrow file, or any file of a saved folder), or None."""
    folder = path.parent
    if path.suffix.lower() != ".arrow" and not is_saved_dataset(folder):
        return None
    return folder.parent if is_saved_dataset(folder.parent) else folder  # a DatasetDict's split


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by save_to_disk: a Dataset (state.json and dataset_info.json beside
    its .arrow files) or a DatasetDict (dataset_dict.json beside a split folder that is a saved Dataset)."""
    if all((folder / n).is_file() for n in _SAVED_HF_FILES) and any(folder.glob("*.arrow")):
        return True
    return (folder / "dataset_dict.json").is_file() and any(
        sub.is_dir() and is_saved_dataset(sub) for sub in folder.iterdir())


def saved_dataset_advice(key: str, folder: object) -> str:
    """What to do with a saved dataset given as files under ``key`` (data.path, data.val_path, --input)."""
    if key == "data.path":
        return f"read it with data=hf data.hf_dataset={folder}"
    if key == "data.val_path":
        return ("with data=hf its training split can be read from it too (data.hf_dataset, data.hf_val_split); "
                "else write it out as JSONL (Dataset.to_json) and give that file")
    return "write it out as JSONL (datasets' Dataset.to_json) and give that file"


def check_files(paths: Sequence[Path], skip_invalid: bool, key: str = "data.path",
                flag: str = "data.skip_invalid=true", text_field: str = "text", progress: bool = False) -> list[FileInfo]:
    """Scan every file, with a progress bar (bytes on disk, documents) when ``progress`` and stderr is
    a terminal; a bad one is a DataError naming it (or, with ``skip_invalid``, a warning)."""
    good = []
    bar = CheckBar(sum(p.stat().st_size for p in paths), progress)
    try:
        for p in paths:
            info = scan_any(p, text_field, skip_invalid, bar, key)
            if info.problem is None:
                good.append(info)
            elif skip_invalid:
                log.warning("skipping %s: %s", p, info.problem)
            else:
                raise problem_error(p, info.problem, flag)
    finally:
        bar.close()
    return usable(good, paths, key, flag)


def problem_error(where: object, problem: str, flag: str) -> DataError:
    """The error for an unusable file (or HF split): what is wrong and what to do."""
    if not problem.startswith(("not UTF-8", "looks like a binary")):  # says what to do itself
        return DataError(f"{where}: {problem} (or set {flag} to skip bad records and unreadable files)")
    return DataError(f"{where}: {problem}; convert it to UTF-8 text, remove it, or set {flag} to skip such files")


def usable(good: list[FileInfo], paths: Sequence[object], key: str,
           flag: str = "data.skip_invalid=true") -> list[FileInfo]:
    """``good``, once the empty documents are reported; an error if there is no text at all."""
    if empty := sum(f.empty for f in good):
        log.warning("%s: skipped %d empty documents", key, empty)
    if not good:
        one = len(paths) == 1
        where = f"{paths[0]}: the only file was" if one else f"{key}: all {len(paths)} files were"
        raise DataError(f"{where} skipped as unusable ({flag}; the warnings above say why), so there is no "
                        f"text; fix or replace {'it' if one else 'them'}")
    if not any(f.has_text for f in good):
        where = paths[0] if len(paths) == 1 else f"{key} ({len(paths)} files, {len(good)} usable)"
        why = "holds only whitespace, so " if any(f.size for f in good) else ""
        raise DataError(f"{where}: {why}the corpus is empty (no text); give UTF-8 text with something in it")
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


def describe_files(files: Sequence[FileInfo], spec: str) -> str:
    """How messages name a corpus: its one file's path, or the spec that found several."""
    return str(files[0].path) if len(files) == 1 else spec


def whole_files(files: Iterable[FileInfo]) -> list[Segment | Records]:
    return [_part(f, 0, None) for f in files if f.size]


def _part(f: FileInfo, start: int, end: int | None, size: int | None = None) -> Segment | Records:
    """Bytes [start, end) of a text file, or records [start, end) of a record file (``size``: their bytes)."""
    if f.fmt == "text":
        return Segment(f.path, start, f.size if end is None else end)
    return Records(f.path, f.fmt, f.field, start, end, f.size if size is None else size, f.bad > 0)


def _char_boundary(path: Path, offset: int) -> int:
    """The first offset >= ``offset`` that does not fall inside a UTF-8 character."""
    with open_bytes(path) as f:
        f.seek(offset)
        data = f.read(4)
    for k, b in enumerate(data):
        if (b & 0xC0) != 0x80:
            return offset + k
    return offset + len(data)


def split_segments(files: Sequence[FileInfo], val_fraction: float, source: str) -> tuple[list, list]:
    """(train, val): val is the last ``val_fraction`` of all the (text) bytes, cut on a character
    boundary in a text file; in a record file, the document holding the cut byte starts validation."""
    total = sum(f.size for f in files)
    cut = int(total * (1.0 - val_fraction))
    train, val, base = [], [], 0
    for f in files:
        lo, hi = base, base + f.size
        base = hi
        if f.size == 0:
            continue
        if hi <= cut:
            train.append(_part(f, 0, None))
        elif lo >= cut:
            val.append(_part(f, 0, None))
        elif f.fmt == "text":
            c = min(_char_boundary(f.path, cut - lo), f.size)
            train += [Segment(f.path, 0, c)] if c > 0 else []
            val += [Segment(f.path, c, f.size)] if c < f.size else []
        else:
            train_part, val_part = _split_records(f, cut - lo)
            train += [train_part] if train_part.size else []
            val.append(val_part)
    if not train or not val:
        raise DataError(f"{source}: too small to split into training and validation text at "
                        f"data.val_fraction={val_fraction}; give more text or set data.val_path")
    return train, val


def _split_records(f: FileInfo, offset: int) -> tuple[Records, Records]:
    """Records before / from the document holding text byte ``offset`` of a record file."""
    n, before = None, 0
    for n, text in record_texts(_part(f, 0, None)):
        size = len(text.encode("utf-8"))
        if before + size > offset:
            break
        before += size
    return _part(f, 0, n, before), _part(f, n, None, f.size - before)


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
    with open_bytes(seg.path) as f:
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


def segment_texts(segments: Sequence[Segment | Records], chunk_bytes: int = CHUNK_BYTES, progress: bool = False,
                  desc: str = "read for tokenizer") -> Iterator[str]:
    """The text of the segments, streamed in newline-aligned pieces, or documents of a record file
    (for tokenizer training)."""
    with tqdm(total=sum(s.size for s in segments), unit="B", unit_scale=True, desc=desc, leave=False,
              disable=bar_disabled(progress)) as bar:
        for seg in segments:
            if isinstance(seg, Records):
                for _, text in record_texts(seg):
                    bar.update(len(text.encode("utf-8")))
                    yield text
                continue
            for off, data in iter_chunks(seg, chunk_bytes):
                bar.update(len(data))
                yield decode_chunk(data, seg, off)


def decode_chunk(data: bytes, seg: Segment, off: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:  # it was valid when scanned: the file changed
        raise DataError(f"{seg.path}: not UTF-8 text at offset {off + e.start} (did the file change during "
                        "preparation?); fix the file and run again") from e
