"""sentencepiece tokenizer: lossless training settings, loading, byte accounting, streaming decode.

Lossless means decode(encode(text)) == text for any UTF-8 text. That takes identity normalization,
no dummy-prefix space, no whitespace collapsing, and byte fallback (a character outside the vocabulary
becomes its UTF-8 bytes, <0xNN> pieces, instead of <unk>). sentencepiece reads its training input
line by line and never sees the newline itself, so "\\n" is added as a user-defined piece.

sentencepiece writes a space as U+2581 ("▁") inside its pieces, so a literal U+2581 in the text would
come back as a space. :meth:`Tokenizer.encode` therefore cuts the text at each literal U+2581 and emits
that character as its three byte-fallback tokens <0xE2><0x96><0x81>; a piece's "▁" always means a
space. Byte accounting stays exact: each byte token covers one byte.

Special ids (fixed, the same for every model type):
    0 <unk>  (never produced with byte fallback)    1 <s>  (bos)
    2 </s>   (eos: separates documents)             3 <pad>
    4 "\\n"  (user-defined)                          5..260 <0x00>..<0xFF> (byte fallback)

Train one on files from the command line with ``python -m minillm.train_tokenizer`` (its own module,
minillm/train_tokenizer.py; this one reads no files and imports nothing from minillm.data).
"""
from __future__ import annotations

import codecs
import errno
import io
import itertools
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from minillm.atomic_files import atomic_write_bytes
from minillm.config import TokenizerConfig
from minillm.errors import TokenizerError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_SPACE = "\u2581"  # sentencepiece's visible space
_SPACE_BYTES = _SPACE.encode("utf-8")  # b"\xe2\x96\x81"


class Tokenizer:
    """A loaded sentencepiece model plus the byte table used for bits-per-byte and streaming."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, PAD_ID
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_BYTES]
        has_bytes = all(self.sp.is_byte(i) for i in byte_ids)
        self._space_ids = byte_ids if has_bytes else None  # None: no byte fallback, "▁" is lossy
        self.train_seconds: float | None = None

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
        """Write the model atomically (temporary file, fsync, rename). Raises TokenizerError, one line
        naming the folder (for a full disk, with the bytes needed), when it cannot be written (disk full,
        read-only folder); the temporary file is removed and an earlier file at ``path`` stays."""
        path = Path(path)
        try:
            atomic_write_bytes(path, lambda f: f.write(self.proto))
        except OSError as e:
            raise TokenizerError(f"{path.parent}: cannot write {path.name} ({_why(e, len(self.proto), path.parent)}"
                                 ", then run again") from e

    def _piece_bytes(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""
        if self.sp.is_byte(i):  # "<0xAB>"
            return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])
        return self.sp.id_to_piece(i).replace(_SPACE, " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a literal U+2581 becomes its three byte tokens (see module doc)."""
        if _SPACE not in text or self._space_ids is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(_SPACE)):
            if k:
                ids.extend(self._space_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as a numpy array of the smallest dtype that holds the vocabulary; for long texts.

        The text is encoded line by line (one thread): "\n" is a user-defined piece, which nothing
        merges across, so the ids are the same as encode(text)'s (tested), and sentencepiece is 2-3x
        faster on many short inputs than on one long one (measured on tinyshakespeare, bpe 1024).
        """
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        lines = text.split("\n")
        lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        if _SPACE in text and self._space_ids is not None:
            parts = [self.encode(line) for line in lines]
        else:
            parts = self.sp.encode(lines, num_threads=1)
        return np.fromiter(itertools.chain.from_iterable(parts), dtype=dtype, count=sum(map(len, parts)))

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        if any(_SPACE in t for t in texts):
            return [self.encode(t) for t in texts]
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact UTF-8 bytes the ids stand for (specials stand for none)."""
        return b"".join(self._bytes[int(i)] for i in ids)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: how many bytes of raw text each token covers; 0 for specials."""
        return np.array([len(b) for b in self._bytes], dtype=np.int64)

    def byte_fallback_mask(self) -> np.ndarray:
        """(vocab_size,) bool: True for the <0xNN> byte-fallback pieces."""
        return np.array([self.sp.is_byte(i) for i in range(self.vocab_size)], dtype=bool)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


def _why(e: OSError, size: int, folder: Path) -> str:
    """What an OSError of a write means and what to do, in a few words; for a full disk, the bytes
    needed and free."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {shutil.disk_usage(folder).free:,} free"
        except OSError:
            free = ""
        return f"no space left on the device: {size:,} bytes needed{free}); free space there"
    if e.errno == errno.EROFS:
        return "read-only file system); make it writable or choose another folder"
    return f"{e.strerror or e}); check the folder"


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


@dataclass
class TokenizerReport:
    """What a trained tokenizer does on held-out text."""
    model_type: str
    vocab_size: int
    train_seconds: float
    val_bytes: int
    val_tokens: int
    bytes_per_token: float
    byte_fallback_share: float   # fraction of validation tokens that are <0xNN> byte pieces

    def lines(self) -> list[str]:
        return [f"vocab size           {self.vocab_size} ({self.model_type})",
                f"training time        {self.train_seconds:.2f} s",
                f"validation text      {self.val_bytes:,} bytes -> {self.val_tokens:,} tokens",
                f"bytes per token      {self.bytes_per_token:.3f}",
                f"byte-fallback share  {100 * self.byte_fallback_share:.3f}% of tokens"]


def make_report(tok: Tokenizer, model_type: str, val_bytes: int, val_tokens: int, byte_tokens: int) -> TokenizerReport:
    return TokenizerReport(model_type, tok.vocab_size, round(tok.train_seconds or 0.0, 3), val_bytes, val_tokens,
                           val_bytes / max(1, val_tokens), byte_tokens / max(1, val_tokens))


def _training_lines(texts: Iterable[str], max_len: int) -> Iterator[str]:
    """Lines with their newline, cut to at most max_len bytes so sentencepiece skips none.

    A literal U+2581 is dropped: sentencepiece would read it as a space, and encode() never lets it
    reach sentencepiece anyway.
    """
    for text in texts:
        if _SPACE in text:
            text = text.replace(_SPACE, "")
        for line in text.splitlines(keepends=True):
            if len(line) * 4 <= max_len or len(line.encode("utf-8")) <= max_len:
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
        # the tokenizer=cjk hint only where the coverage still is the default's 1 (tokenizer=cjk lowers it)
        cjk = " (tokenizer=cjk sets both for Chinese, Japanese or Korean text)" if cfg.character_coverage == 1.0 else ""
        return (f"tokenizer.vocab_size={cfg.vocab_size} is smaller than the {m.group(2)} pieces {source} needs "
                f"(its characters at tokenizer.character_coverage={cfg.character_coverage}, plus specials and byte "
                f"pieces); raise the vocab size or lower the coverage{cjk}")
    if "Corpus is empty" in msg or "No valid sentence" in msg.lower():
        return f"{source}: no text to train the tokenizer on; give a non-empty UTF-8 corpus"
    last = msg.strip().splitlines()[-1] if msg.strip() else "unknown error"
    return f"training the tokenizer on {source} failed: {last}"


@dataclass
class Alphabet:
    """The characters of a training text and how many lines it has (_training_lines' count): what
    :func:`check_alphabet` needs. ``note(text)`` adds a text's characters; ``lines`` is set by whoever
    streams the lines (minillm/data/tokenizer_sample.py, or train_tokenizer itself through ``counted``)."""
    chars: set = field(default_factory=set)
    lines: int = 0

    def note(self, text: str) -> str:
        self.chars.update(text)
        return text

    def counted(self, lines: Iterable[str]) -> Iterator[str]:
        """``lines`` unchanged, counted into ``lines``."""
        for line in lines:
            self.lines += 1
            yield line


def needs_alphabet(cfg: TokenizerConfig) -> bool:
    """Whether training must check that every character got a piece: without byte fallback, at
    character_coverage 1 (which asks for all of them), a character left out encodes as <unk> (lossy).
    sentencepiece's char trainer keeps the commonest characters up to vocab_size and says nothing of
    the rest; no trainer gives a piece to some control characters ("\\r", "\\x00") or to U+2585, and
    a literal U+2581 can only come back as a space."""
    return not cfg.byte_fallback and cfg.character_coverage == 1.0


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, source: str = "corpus",
                    alphabet: Alphabet | None = None) -> Tokenizer:
    """Train a sentencepiece model on ``texts`` (an iterable of text pieces, streamed) losslessly.

    Memory stays bounded on large corpora: sentencepiece keeps a uniform random sample of at most
    ``cfg.input_sentence_size`` lines (reservoir sampling over the stream). When ``needs_alphabet(cfg)``
    the characters of ``texts`` are checked against the trained pieces (``alphabet``: those of the whole
    corpus when ``texts`` is a sample of it). Raises TokenizerError (one line naming the setting to change).
    """
    t0 = time.time()
    buf = io.BytesIO()
    own = alphabet is None and needs_alphabet(cfg)  # not given: gather it from what is streamed here
    if own:
        alphabet = Alphabet()
        texts = map(alphabet.note, texts)
    lines = _training_lines(texts, cfg.max_sentence_length)
    if own:
        lines = alphabet.counted(lines)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
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
    if alphabet is not None:
        check_alphabet(tok, alphabet, cfg, source)
    return tok


def unpieced(tok: Tokenizer, chars: Iterable[str]) -> list[str]:
    """The characters of ``chars`` without a piece of their own in ``tok``, sorted: those encoding as
    <unk>, and a literal U+2581 (sentencepiece's space)."""
    return sorted(c for c in chars if c == _SPACE or tok.sp.piece_to_id(_SPACE if c == " " else c) == UNK_ID)


def check_alphabet(tok: Tokenizer, alphabet: Alphabet, cfg: TokenizerConfig, source: str) -> None:
    """Raises TokenizerError when a character of ``alphabet`` has no piece of its own in ``tok`` (see
    needs_alphabet), naming the likeliest cause: the vocab_size ceiling, the line sample, or characters
    sentencepiece gives no piece."""
    missing = unpieced(tok, alphabet.chars)
    if not missing:
        return
    shown = ", ".join(repr(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
    what = f"{len(missing)} of the {len(alphabet.chars)} characters of {source} ({shown})"
    if cfg.model_type == "char" and tok.vocab_size >= cfg.vocab_size:  # the ceiling cut the alphabet
        # (bpe and unigram fill vocab_size always; sentencepiece refuses one too small for the characters)
        needed = len(alphabet.chars | {"\n"}) + 4  # "\n" is always a piece; + <unk> <s> </s> <pad>
        why, fix = (f"tokenizer.vocab_size={cfg.vocab_size} leaves out {what}",
                    f"set tokenizer.vocab_size >= {needed} (characters + 4 specials)")
    elif alphabet.lines > cfg.input_sentence_size:  # the lines sampled lack them
        why, fix = (f"the {cfg.input_sentence_size:,} lines sampled of {alphabet.lines:,} leave out {what}",
                    "set a larger tokenizer.input_sentence_size")
    else:
        dropped = " (a line holding U+2585 is dropped whole)" if "\u2585" in missing else ""
        why, fix = f"sentencepiece gives no piece to {what}{dropped}", "remove them from the corpus"
    raise TokenizerError(f"{why}; without byte fallback they would not decode back: {fix}, "
                         "or set tokenizer.byte_fallback=true")


if __name__ == "__main__":  # the command moved: say so instead of silently doing nothing
    import sys
    print("error: `python -m minillm.tokenizer` is now `python -m minillm.train_tokenizer` (same options)",
          file=sys.stderr)
    sys.exit(2)
