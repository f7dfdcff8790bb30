"""sentencepiece tokenizer: lossless training settings, loading, byte accounting, streaming decode.

Lossless means decode(encode(text)) == text for any UTF-8 text. That takes identity normalization,
no dummy-prefix space, no whitespace collapsing, and byte fallback (a character outside the vocabulary
becomes its UTF-8 bytes, <0xNN> pieces, instead of <unk>). sentencepiece reads its training input
line by line and never sees the newline itself, so "\\n" is added as a user-defined piece.

Special ids (fixed, the same for every model type):
    0 <unk>  (never produced with byte fallback)    1 <s>  (bos)
    2 </s>   (eos: separates documents)             3 <pad>
"""
from __future__ import annotations

import codecs
import io
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from minillm.config import TokenizerConfig

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_SPACE = "\u2581"  # sentencepiece's visible space


class TokenizerError(ValueError):
    """Training or loading a tokenizer failed because of its input; the message says which."""


class Tokenizer:
    """A loaded sentencepiece model plus the byte table used for bits-per-byte and streaming."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, PAD_ID
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer model not found")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.proto)

    def _piece_bytes(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""
        if self.sp.is_byte(i):  # "<0xAB>"
            return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])
        return self.sp.id_to_piece(i).replace(_SPACE, " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact UTF-8 bytes the ids stand for (specials stand for none)."""
        return b"".join(self._bytes[int(i)] for i in ids)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: how many bytes of raw text each token covers; 0 for specials."""
        return np.array([len(b) for b in self._bytes], dtype=np.int64)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Token-by-token decoding whose output, concatenated, equals decode(all tokens).

    A byte-fallback character arrives as several tokens; the incremental UTF-8 decoder holds back
    an incomplete sequence until its last byte comes.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.dec.decode(self.tok._bytes[int(token_id)])

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


def _training_lines(texts: Iterable[str], max_len: int) -> Iterator[str]:
    """Lines with their newline, cut to at most max_len bytes so sentencepiece skips none."""
    for text in texts:
        for line in text.splitlines(keepends=True):
            if len(line.encode("utf-8")) <= max_len:
                yield line
            else:  # a line this long is rare; cut it on character boundaries
                step = max_len // 4  # a UTF-8 character is at most 4 bytes
                for i in range(0, len(line), step):
                    yield line[i:i + step]


def _explain_training_error(msg: str, cfg: TokenizerConfig, source: str) -> str:
    """sentencepiece's trainer errors, restated in terms of our config keys."""
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return (f"tokenizer.vocab_size={cfg.vocab_size} is more than {source} supports "
                f"(at most {m.group(2)} for {cfg.model_type}); lower tokenizer.vocab_size")
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
        return (f"tokenizer.vocab_size={cfg.vocab_size} is smaller than the {m.group(2)} characters {source} "
                f"needs at tokenizer.character_coverage={cfg.character_coverage}; raise the vocab size "
                "or lower the coverage")
    last = msg.strip().splitlines()[-1] if msg.strip() else "unknown error"
    return f"training the tokenizer on {source} failed: {last}"


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, source: str = "corpus") -> Tokenizer:
    """Train a sentencepiece model on ``texts`` (an iterable of documents) with lossless settings."""
    t0 = time.time()
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, cfg.max_sentence_length),
            model_writer=buf,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            split_digits=cfg.split_digits,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            max_sentence_length=cfg.max_sentence_length,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=cfg.num_threads,
            hard_vocab_limit=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(_explain_training_error(str(e), cfg, source)) from e
    tok = Tokenizer(buf.getvalue())
    tok.train_seconds = time.time() - t0
    return tok
