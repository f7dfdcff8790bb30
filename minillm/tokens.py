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

Writes go to a temporary name, are fsynced, then renamed, so a file that exists is complete.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"MLLMTOK\0"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIIIQI")


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and what is wrong."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_tokens(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Atomically write ``tokens`` (any integer array) as a token file for ``vocab_size``."""
    path = Path(path)
    dtype = dtype_for_vocab(vocab_size)
    tokens = np.ascontiguousarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise TokenFileError(f"{path}: token ids outside [0, {vocab_size}) cannot be written")
    payload = tokens.astype(dtype, copy=False).tobytes()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, vocab_size, 0, tokens.size, zlib.crc32(payload))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_SIZE, b"\0"))
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_tokens(path: str | Path, vocab_size: int | None = None, verify: bool = True) -> np.ndarray:
    """Open a token file as a read-only memmap after checking header, size and (verify) contents."""
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
    if itemsize not in (2, 4):
        raise TokenFileError(f"{path}: item size {itemsize} is not 2 or 4; the file is corrupt")
    if size != HEADER_SIZE + count * itemsize:
        raise TokenFileError(f"{path}: {size} bytes on disk but the header promises "
                             f"{HEADER_SIZE + count * itemsize}; the file is truncated or corrupt")
    if vocab_size is not None and vocab != vocab_size:
        raise TokenFileError(f"{path}: made for a vocabulary of {vocab}, the tokenizer has {vocab_size}; "
                             "re-encode with this tokenizer")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    data = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,)) if count else np.zeros(0, dtype)
    if verify and count:
        crc_now, top = 0, 0
        for i in range(0, count, 1 << 24):  # chunked: bounded memory on big files
            chunk = np.asarray(data[i:i + (1 << 24)])
            crc_now = zlib.crc32(chunk.tobytes(), crc_now)
            top = max(top, int(chunk.max()))
        if crc_now != crc:
            raise TokenFileError(f"{path}: checksum mismatch; the file is corrupt, re-create it")
        if top >= vocab:
            raise TokenFileError(f"{path}: token id {top} >= vocabulary size {vocab}; the file is corrupt")
    return data
