"""File formats of a corpus, chosen by extension: plain text, JSON Lines, Parquet, and compressed files.

    file_format(path)            "text", "jsonl" or "parquet" (a .gz/.bz2/.xz/.zst suffix is looked through)
    looks_like_records(path, f)  why a file named as text holds Parquet or JSON Lines (refused), or None
    open_bytes(path, on_read)    the file's bytes as a stream, decompressed on the fly (never all in memory);
                                 ``on_read(n)`` hears of every n bytes read from the disk (progress)
    iter_records(path, fmt, f)   (record number, text) of every record of a JSONL or Parquet file, or of a
                                 Hugging Face split (fmt "hf": ``path`` is a hf_dataset.HFSplit, which reads
                                 itself: this module imports nothing from it)
    field_records(values, f)     (row, text) of a column's values, the text at field ``f`` (Parquet, HF)
    scan_records(path, fmt, f)   one checking pass: documents, empty documents, text bytes, problem
    Records                      documents [start, end) (record numbers) of a record file or HF split

A plain text file (compressed or not) is one document, read by corpus.py in byte ranges. In a record
file, one JSON object per line (``.jsonl``, ``.ndjson``) or one row (``.parquet``) is one document, its
text in the field ``text_field`` (a dotted path reaches nested fields). Empty documents are skipped (and
counted); blank lines of a JSONL file are not records. A bad record is a :class:`RecordError` naming
its line (from 1) or row (from 0, as pyarrow and pandas count); with ``skip_bad`` (data.skip_invalid)
bad records are skipped and counted. Parquet is read one batch of rows at a time; a compressed Parquet file is refused
(Parquet compresses inside).
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import zstandard

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
RECORD_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# what a damaged compressed stream raises while being read
STREAM_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
_PARQUET_BATCH = 1024  # rows read at once


class RecordError(Exception):
    """A bad record or file; the message names the line or row, what is wrong and what to do."""


@dataclass(frozen=True)
class Records:
    """Documents of a record file: records [start, end) (line or row numbers from 0; end None: to the
    end); ``size`` is their text in UTF-8 bytes."""
    path: Path
    fmt: str
    field: str
    start: int
    end: int | None
    size: int
    skip_bad: bool = False   # skip bad records (data.skip_invalid) instead of failing


def compression(path: Path) -> str | None:
    return path.suffix.lower() if path.suffix.lower() in COMPRESSIONS else None


def file_format(path: Path) -> str:
    """"jsonl", "parquet" or "text" (any other file), by extension, under a compression suffix."""
    inner = Path(path.stem) if compression(path) else path
    return RECORD_FORMATS.get(inner.suffix.lower(), "text")


class _Counted(io.RawIOBase):
    """A raw file that reports the bytes read from it to ``on_read`` (progress in on-disk bytes)."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None]):
        self._f, self._on_read = f, on_read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self._on_read(n or 0)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """A zstd stream (one or more frames) read on the fly; a truncated stream raises EOFError
    (zstandard's own stream_reader returns short data instead). Wrapped in a BufferedReader."""

    def __init__(self, path: Path, raw: BinaryIO | None = None):
        self._f = raw or open(path, "rb")
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._buf, self._off, self._pos, self._started = b"", 0, 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # forward only (what corpus.py needs); BufferedReader asks
        return True

    def readinto(self, b) -> int:
        while self._off >= len(self._buf):
            raw = self._d.unused_data if self._d.eof else b""   # the start of the next frame
            raw = raw or self._f.read(1 << 16)
            if not raw:
                if self._started and not self._d.eof:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                return 0
            self._started = True
            if self._d.eof:  # the next frame
                self._d = zstandard.ZstdDecompressor().decompressobj()
            self._buf, self._off = self._d.decompress(raw), 0
        n = min(len(b), len(self._buf) - self._off)
        b[:n] = memoryview(self._buf)[self._off:self._off + n]
        self._off += n
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        if whence == 2 or offset < self._pos:
            raise io.UnsupportedOperation("a zstd stream seeks forward only")
        while self._pos < offset and self.read(min(1 << 20, offset - self._pos)):
            pass
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._f.close()
        super().close()


def open_bytes(path: Path, on_read: Callable[[int], None] | None = None) -> BinaryIO:
    """The file's (decompressed) bytes as a binary stream that can seek forward. ``on_read(n)``, if
    given, is called with the number of bytes read from the file on disk (compressed bytes of a
    compressed file), so a progress bar can count towards the file's size."""
    kind = compression(path)
    raw = None if on_read is None else io.BufferedReader(_Counted(open(path, "rb", buffering=0), on_read), 1 << 16)
    if kind is None:
        return raw or open(path, "rb")
    if kind == ".zst":
        return io.BufferedReader(_ZstdReader(path, raw), 1 << 16)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[kind]
    return opener(path, "rb") if raw is None else _ClosingRaw(opener(raw, "rb"), raw)


class _ClosingRaw:
    """A decompressing stream over a file object it was given, closing that too (gzip, bz2 and lzma
    close only files they opened themselves)."""

    def __init__(self, f: BinaryIO, raw: BinaryIO):
        self._f, self._raw = f, raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._f)

    def __enter__(self) -> "_ClosingRaw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()
        self._raw.close()


# ----------------------------------------------------------------------------- reading records

def _field(obj: Any, field: str, where: str) -> str:
    """The string at the dotted path ``field`` of a decoded record."""
    for key in field.split("."):
        if not isinstance(obj, dict) or key not in obj:
            raise RecordError(f"{where}: no field '{field}'; set data.text_field (train_tokenizer: --text-field) to the field "
                              "that holds the text")
        obj = obj[key]
    if not isinstance(obj, str):
        kind = "null" if obj is None else type(obj).__name__
        raise RecordError(f"{where}: field '{field}' is {kind}, not a string; fix the record or set "
                          "data.text_field (--text-field)")
    return obj


def _jsonl_text(raw: bytes, where: str, field: str) -> str | None:
    """The text of one JSONL line (None: a blank line, not a record)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: not UTF-8 (invalid byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                          "write the file as UTF-8") from e
    if not line.strip():
        return None
    try:
        obj = json.loads(line.rstrip("\r\n"))  # the terminator inside a cut string is not its cause
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: not JSON ({_json_cause(e)}); each line must be one JSON object") from e
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: not a JSON object (it is {_json_kind(obj)}); each line must be one JSON "
                          f"object with the text in field '{field}'")
    text = _field(obj, field, where)
    if b"\\u" in raw and not _encodable(text):
        raise RecordError(f"{where}: the text holds a lone surrogate (an escape such as \\ud800 that is "
                          "not half of a pair), which is not UTF-8 text; fix the record")
    return text


def _json_cause(e: json.JSONDecodeError) -> str:
    """What json found wrong, and where: "Unterminated string starting at column 10"."""
    msg = e.msg if e.msg.endswith(" at") else f"{e.msg} at"   # some of json's messages end in "at"
    return f"{msg} column {e.colno}"


def _json_kind(value: Any) -> str:
    """What a decoded JSON value is, in words ("a list", "a number", ...)."""
    kinds = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"))
    return "null" if value is None else next(name for t, name in kinds if isinstance(value, t))


def _jsonl_records(path: Path, field: str, skip_bad: bool,
                   on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, str | RecordError]]:
    with open_bytes(path, on_read) as f:
        for n, raw in enumerate(f):
            try:
                text = _jsonl_text(raw, f"line {n + 1}", field)
            except RecordError as e:
                if not skip_bad:
                    raise
                text = e
            if text is not None:
                yield n, text


def looks_like_records(path: Path, field: str) -> str | None:
    """Why a file taken as text by its name is in fact Parquet or JSON Lines (its first three lines are
    JSON objects with a string ``field``), or None."""
    try:
        with open_bytes(path) as f:
            head = f.read(1 << 16)
    except STREAM_ERRORS:
        return None  # the full scan reports it
    if head.startswith(b"PAR1"):
        return "looks like a Parquet file (it starts with PAR1); name it .parquet to read its rows"
    lines = head.split(b"\n")
    if len(head) == 1 << 16:
        lines = lines[:-1]  # the read may have cut the last line
    lines = [line for line in lines if line.strip()][:3]
    try:
        if lines and all(isinstance(_jsonl_text(line, "", field), str) for line in lines):
            return (f"looks like JSON Lines (its first lines are JSON objects with a string field '{field}'), "
                    "not text to train on; name it .jsonl to read each object's text as a document")
    except RecordError:
        pass
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def no_column(top: str, columns: list[str]) -> RecordError:
    return RecordError(f"no column '{top}' (columns: {', '.join(columns)}); set data.text_field (train_tokenizer: --text-field) "
                       "to the column that holds the text")


def field_records(values: Iterable[Any], field: str, skip_bad: bool) -> Iterator[tuple[int, str | RecordError]]:
    """(row from 0, text) for the values of the column ``field``'s first part, row after row; the text
    is at the dotted path ``field``. A bad row raises RecordError, or with ``skip_bad`` comes as its error."""
    top = field.split(".")[0]
    for n, value in enumerate(values):
        try:
            text = _field({top: value}, field, f"row {n}")
        except RecordError as e:
            if not skip_bad:
                raise
            text = e
        yield n, text


def _parquet_records(path: Path, field: str, skip_bad: bool,
                     on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, str | RecordError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    top = field.split(".")[0]
    try:
        pf = pq.ParquetFile(path)
        if top not in pf.schema_arrow.names:
            raise no_column(top, pf.schema_arrow.names)
        rows, size = max(1, pf.metadata.num_rows), path.stat().st_size

        def values() -> Iterator[Any]:
            done = 0
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[top]):
                yield from batch.column(0).to_pylist()
                if on_read is not None:  # progress in on-disk bytes, pro rata of the rows
                    on_read(size * (done + batch.num_rows) // rows - size * done // rows)
                done += batch.num_rows
        yield from field_records(values(), field, skip_bad)
    except (pa.ArrowException, OSError) as e:
        raise RecordError(f"not a readable Parquet file ({str(e).splitlines()[0]}); re-create or remove it") from e


def iter_records(path: Path, fmt: str, field: str, skip_bad: bool = False,
                 on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, str | RecordError]]:
    """(record number, text) of every record (line or row) of a JSONL or Parquet file, or row of a
    Hugging Face split (fmt "hf", ``path`` an HFSplit), streamed. A bad record raises RecordError, or
    with ``skip_bad`` comes as (number, the error). ``on_read``: as for :func:`open_bytes`."""
    if fmt == "hf":
        return path.records(field, skip_bad)
    if fmt == "parquet":
        if compression(path):
            raise RecordError("a compressed Parquet file cannot be read in pieces; decompress it "
                              "(Parquet compresses its columns itself)")
        return _parquet_records(path, field, skip_bad, on_read)
    return _jsonl_records(path, field, skip_bad, on_read)


def record_texts(rec: Records) -> Iterator[tuple[int, str]]:
    """(record number, text) of the non-empty documents of ``rec`` (bad records skipped)."""
    for n, text in iter_records(rec.path, rec.fmt, rec.field, rec.skip_bad):
        if rec.end is not None and n >= rec.end:
            return
        if n >= rec.start and text and isinstance(text, str):
            yield n, text


@dataclass(frozen=True)
class RecordScan:
    documents: int       # non-empty
    empty: int           # skipped empty documents
    bad: int             # skipped bad records (skip_bad)
    first_bad: str | None
    text_bytes: int
    has_text: bool
    problem: str | None


def scan_records(path: Path, fmt: str, field: str, skip_bad: bool = False, progress: Any = None) -> RecordScan:
    """One pass over every record, checking each; the first bad one is the ``problem`` (with
    ``skip_bad``: counted, and only a damaged file is a problem). ``progress`` (optional) hears of it:
    ``progress.read(n)`` on-disk bytes, ``progress.document(n_bytes)`` each document's text bytes."""
    docs = empty = size = bad = 0
    has_text, problem, first_bad = False, None, None
    try:
        for _, text in iter_records(path, fmt, field, skip_bad, progress.read if progress else None):
            if isinstance(text, RecordError):
                bad, first_bad = bad + 1, first_bad or str(text)
                continue
            if not text:
                empty += 1
                continue
            docs += 1
            n = len(text.encode("utf-8"))
            size += n
            has_text = has_text or not text.isspace()
            if progress is not None:
                progress.document(n)
    except RecordError as e:
        problem = str(e)
    except STREAM_ERRORS as e:
        problem = f"the compressed stream is truncated or corrupt ({e}); re-create or remove the file"
    return RecordScan(docs, empty, bad, first_bad, size, has_text, problem)
