"""Encoding documents into a token file: newline-aligned chunks, optionally a process pool, in order.

A unit of work is a newline-aligned chunk of a text file (part of one document) or a batch of whole
documents of a record file (JSONL, Parquet) of about the same size. With ``num_workers`` > 1 the units
go to a pool of worker processes; results are written in input order with at most
``2 * num_workers + 1`` units in flight, so memory is bounded by the chunk size, not the corpus size,
and the ids do not depend on the number of workers. Documents are separated by the eos id and nothing
else is added, so decoding a split gives its text back.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from typing import Iterator, Sequence, Union

import numpy as np
from tqdm import tqdm

from minillm.data.corpus import CHUNK_BYTES, Segment, bar_disabled, iter_chunks
from minillm.data.formats import Records, record_texts
from minillm.data.token_file import TokenWriter
from minillm.errors import DataError
from minillm.tokenizer import EOS_ID, Tokenizer

_worker_tok: Tokenizer | None = None


def _worker_init(proto: bytes) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(proto)


Payload = Union[bytes, list]  # a chunk of a text file, or a list of document texts


def _encode_payload(tok: Tokenizer, data: Payload) -> list[np.ndarray] | UnicodeDecodeError:
    """The ids of each document of the unit (a chunk: one)."""
    if isinstance(data, list):
        return [tok.encode_array(text) for text in data]
    try:
        return [tok.encode_array(data.decode("utf-8"))]
    except UnicodeDecodeError as e:
        return e


def _worker_encode(data: Payload) -> list[np.ndarray] | UnicodeDecodeError:
    return _encode_payload(_worker_tok, data)


def _work(segments: Sequence[Segment | Records], chunk_bytes: int) -> Iterator[tuple]:
    """Units of work (first document number, segment, offset of a chunk, sizes in bytes, payload), in order."""
    d = 0
    for seg in segments:
        if isinstance(seg, Segment):
            for off, data in iter_chunks(seg, chunk_bytes):
                yield d, seg, off, [len(data)], data
            d += 1
            continue
        texts, sizes, n_bytes = [], [], 0   # a batch of whole documents of about chunk_bytes
        for _, text in record_texts(seg):
            texts.append(text)
            sizes.append(len(text.encode("utf-8")))
            n_bytes += sizes[-1]
            if n_bytes >= chunk_bytes:
                yield d, seg, None, sizes, texts
                d, texts, sizes, n_bytes = d + len(texts), [], [], 0
        if texts:
            yield d, seg, None, sizes, texts
            d += len(texts)


def _results(seg, off: int, res: list[np.ndarray] | UnicodeDecodeError) -> list[np.ndarray]:
    if isinstance(res, UnicodeDecodeError):
        raise DataError(f"{seg.path}: not UTF-8 text at offset {off + res.start} (did the file change during "
                        "preparation?); fix the file and run again")
    return res


def resolve_workers(num_workers: int) -> int:
    return num_workers if num_workers > 0 else (os.cpu_count() or 1)


def encode_segments(tok: Tokenizer, segments: Sequence[Segment | Records], writer: TokenWriter | None,
                    num_workers: int = 1, chunk_bytes: int | None = None, progress: bool = False,
                    desc: str = "encode") -> dict:
    """Encode documents into ``writer`` (None: only count), eos between documents.

    With ``num_workers`` > 1 the units (chunks, batches of records) go to a process pool; results are
    written in input order, and at most ``2 * num_workers + 1`` units are in flight, so memory is
    bounded by the chunk size, not the corpus size. The ids do not depend on the number of workers.
    Returns tokens (incl. eos), text_tokens, byte_tokens (byte-fallback), bytes, documents, and
    max_pending_bytes (most input bytes read but not yet written at any time).
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    total = sum(s.size for s in segments)
    is_byte = tok.byte_fallback_mask()
    st = {"tokens": 0, "text_tokens": 0, "byte_tokens": 0, "bytes": total, "documents": 0, "max_pending_bytes": 0}
    last_doc = -1
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=bar_disabled(progress))

    def emit(d: int, sizes: list[int], ids: list[np.ndarray]) -> None:
        """Write a unit's results: documents d, d+1, ... (a chunk: part of document d)."""
        nonlocal last_doc
        for doc, n_bytes, doc_ids in zip(range(d, d + len(sizes)), sizes, ids):
            if doc != last_doc:
                if last_doc >= 0:  # a document boundary
                    if writer is not None:
                        writer.write(np.array([EOS_ID]))
                    st["tokens"] += 1
                st["documents"] += 1
                if st["documents"] % 1024 == 0:  # the bar counts bytes; documents beside them
                    bar.set_postfix_str(f"{st['documents']:,} documents", refresh=False)
                last_doc = doc
            if writer is not None:
                writer.write(doc_ids)
            st["tokens"] += doc_ids.size
            st["text_tokens"] += doc_ids.size
            st["byte_tokens"] += int(np.count_nonzero(is_byte[doc_ids]))
            bar.update(n_bytes)

    work = _work(segments, chunk_bytes)
    workers = min(num_workers, total // chunk_bytes + 1)
    try:
        if workers <= 1:
            for d, seg, off, sizes, data in work:
                st["max_pending_bytes"] = max(st["max_pending_bytes"], sum(sizes))
                emit(d, sizes, _results(seg, off, _encode_payload(tok, data)))
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
        d, seg, off, sizes, res = pending.popleft()
        ids = _results(seg, off, res.get())
        pending_bytes -= sum(sizes)
        emit(d, sizes, ids)

    with mp.get_context().Pool(workers, initializer=_worker_init, initargs=(tok.proto,)) as pool:
        for d, seg, off, sizes, data in work:
            pending.append((d, seg, off, sizes, pool.apply_async(_worker_encode, (data,))))
            pending_bytes += sum(sizes)
            st["max_pending_bytes"] = max(st["max_pending_bytes"], pending_bytes)
            if len(pending) >= window:
                take()
        while pending:
            take()
