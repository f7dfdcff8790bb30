"""Token files: a fixed 64-byte header, then the token ids, read back as a memmap.

Header (little-endian):
    magic     8s   b"MLLMTOK\\0"
    version   u32  FORMAT_VERSION
    itemsize  u32  2 (uint16, vocab <= 65536) or 4 (uint32)
    vocab     u32  vocabulary size the ids were made with
    reserved  u32
    count     u64  number of tokens
    crc32     u32  zlib.crc32 of the payload
    padding   to 64 bytes

Writing streams: :class:`TokenWriter` appends ids to a temporary file in the same folder (its header
is zeros, so it never looks like a token file), keeps a running count and CRC, and on ``close()``
writes the real header, fsyncs and renames. A file under the final name is therefore complete; an
interrupted write leaves at most a ``*.tmp`` file, which no reader accepts.
"""
from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from minillm.errors import TokenFileError

MAGIC = b"MLLMTOK\0"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIIIQI")
_VERIFY_CHUNK = 1 << 24  # tokens per step when checking a file: bounded memory on big files


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenWriter:
    """Append-only, atomic writer of one token file.

    with TokenWriter(path, vocab_size) as w:   # an exception inside removes the temporary file
        w.write(ids); w.write(more_ids)
    """

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.count = 0
        self.crc = 0
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        self.f.write(b"\0" * HEADER_SIZE)  # placeholder: no magic until the file is complete

    def write(self, ids: np.ndarray | list[int]) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise TokenFileError(f"{self.path}: token ids outside [0, {self.vocab_size}) cannot be written")
        payload = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self.crc = zlib.crc32(payload, self.crc)
        self.count += ids.size
        self.f.write(payload)

    def close(self) -> Path:
        """Write the header, fsync, and move the file to its final name."""
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.vocab_size, 0, self.count, self.crc)
        self.f.seek(0)
        self.f.write(header.ljust(HEADER_SIZE, b"\0"))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tokens(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Atomically write ``tokens`` (any integer array) as a token file for ``vocab_size``."""
    with TokenWriter(path, vocab_size) as w:
        w.write(tokens)


def read_header(path: str | Path) -> dict:
    """The validated header of a token file: version, itemsize, vocab, count, crc (file size checked)."""
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"{path}: token file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or head[:8] != MAGIC:
        raise TokenFileError(f"{path}: not a minillm token file (bad magic); re-create it")
    _, version, itemsize, vocab, _, count, crc = _HEADER.unpack(head[:_HEADER.size])
    if version != FORMAT_VERSION:
        raise TokenFileError(f"{path}: format version {version}, this minillm reads {FORMAT_VERSION}; re-create it")
    if itemsize not in (2, 4) or vocab < 1 or dtype_for_vocab(vocab).itemsize != itemsize:
        raise TokenFileError(f"{path}: item size {itemsize} does not fit vocabulary size {vocab}; "
                             "the header is corrupt, re-create the file")
    if size != HEADER_SIZE + count * itemsize:
        raise TokenFileError(f"{path}: {size} bytes on disk but the header promises "
                             f"{HEADER_SIZE + count * itemsize}; the file is truncated or corrupt, re-create it")
    return {"version": version, "itemsize": itemsize, "vocab": vocab, "count": count, "crc": crc}


def read_tokens(path: str | Path, vocab_size: int | None = None, verify: bool = True) -> np.ndarray:
    """Open a token file as a read-only memmap after checking header, size and (verify) contents.

    ``vocab_size``: the tokenizer's; a file made for another vocabulary is refused.
    ``verify``: also check the payload's CRC and that every id is < the file's vocabulary size.
    """
    path = Path(path)
    h = read_header(path)
    vocab, count = h["vocab"], h["count"]
    if vocab_size is not None and vocab != vocab_size:
        raise TokenFileError(f"{path}: made for a vocabulary of {vocab}, the tokenizer has {vocab_size}; "
                             "re-encode with this tokenizer")
    dtype = np.uint16 if h["itemsize"] == 2 else np.uint32
    data = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,)) if count else np.zeros(0, dtype)
    if verify and count:
        crc_now, top = 0, 0
        for i in range(0, count, _VERIFY_CHUNK):
            chunk = np.asarray(data[i:i + _VERIFY_CHUNK])
            crc_now = zlib.crc32(chunk.tobytes(), crc_now)
            top = max(top, int(chunk.max()))
        if crc_now != h["crc"]:
            raise TokenFileError(f"{path}: checksum mismatch; the file is corrupt, re-create it")
        if top >= vocab:
            raise TokenFileError(f"{path}: token id {top} >= vocabulary size {vocab}; the file is corrupt, re-create it")
    return data
