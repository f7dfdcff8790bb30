"""Token shards: streaming atomic writes, strict reading, parallel streaming encoding, multi-file
corpora with document boundaries, and every bad input as one clear error with nothing half-written."""
import json
import struct
import zlib

import numpy as np
import pytest

from conftest import make_corpus
from minillm.config import DataConfig, TokenizerConfig
from minillm.data.prepare import prepare
from minillm.data.corpus import Segment, check_files, iter_chunks, split_segments
from minillm.data.encode import encode_segments
from minillm.data.token_file import HEADER_SIZE, MAGIC, TokenWriter, read_tokens
from minillm.errors import DataError, TokenFileError, TokenizerError
from minillm.tokenizer import EOS_ID, Tokenizer, train_tokenizer
from minillm.train_tokenizer import train_on_files

TOK_CFG = TokenizerConfig(vocab_size=400)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([make_corpus(600)], TOK_CFG)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- writer and reader

def test_streaming_writes_equal_one_write_and_are_atomic(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n) for n in (0, 5, 1000, 1)]
    with TokenWriter(tmp_path / "a.bin", 1000) as w:
        for p in parts:
            w.write(p)
        # before close the data sits in a temp file whose header has no magic
        [tmp] = list(tmp_path.glob("a.bin.*.tmp"))
        assert not (tmp_path / "a.bin").exists()
        with pytest.raises(TokenFileError, match="not a minillm token file"):
            read_tokens(tmp)
    assert np.array_equal(read_tokens(tmp_path / "a.bin", 1000), np.concatenate(parts))
    assert list(tmp_path.iterdir()) == [tmp_path / "a.bin"]


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with TokenWriter(tmp_path / "b.bin", 100) as w:
            w.write(np.arange(50))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_uint32_for_big_vocabularies(tmp_path):
    with TokenWriter(tmp_path / "c.bin", 70_000) as w:
        w.write(np.array([69_999, 0]))
    t = read_tokens(tmp_path / "c.bin", 70_000)
    assert t.dtype == np.uint32 and list(t) == [69_999, 0]
    assert (tmp_path / "c.bin").stat().st_size == HEADER_SIZE + 8


def forge(path, ids, vocab, itemsize=2, version=1, count=None):
    """A token file written by hand, with a correct checksum of whatever payload it is given."""
    payload = np.asarray(ids, dtype=np.uint16 if itemsize == 2 else np.uint32).tobytes()
    head = struct.pack("<8sIIIIQI", MAGIC, version, itemsize, vocab, 0, len(ids) if count is None else count,
                       zlib.crc32(payload))
    path.write_bytes(head.ljust(HEADER_SIZE, b"\0") + payload)
    return path


@pytest.mark.parametrize("case, match", [
    ("big_id", r"big_id.bin: token id 500 >= vocabulary size 400"),
    ("version", r"version.bin: format version 9, this minillm reads 1"),
    ("count", r"count.bin: .* bytes on disk but the header promises .*truncated"),
    ("itemsize", r"itemsize.bin: item size 4 does not fit vocabulary size 400"),
    ("foreign", r"foreign.bin: not a minillm token file"),
    ("short", r"short.bin: not a minillm token file"),
    ("missing", r"missing.bin: token file not found"),
])
def test_bad_shards_are_one_line_errors_naming_the_file(tmp_path, case, match):
    p = tmp_path / f"{case}.bin"
    if case == "big_id":
        forge(p, [1, 500, 2], 400)
    elif case == "version":
        forge(p, [1], 400, version=9)
    elif case == "count":
        forge(p, [1, 2, 3], 400, count=4)
    elif case == "itemsize":
        forge(p, [1, 2], 400, itemsize=4)
    elif case == "foreign":
        p.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    elif case == "short":
        p.write_bytes(MAGIC)
    with pytest.raises(TokenFileError, match=match) as e:
        read_tokens(p)
    assert "\n" not in str(e.value)


def test_tokenizer_and_shard_vocab_mismatch(tmp_path, tok):
    forge(tmp_path / "s.bin", [1, 2], 512)
    with pytest.raises(TokenFileError, match=r"s.bin: made for a vocabulary of 512, the tokenizer has 400"):
        read_tokens(tmp_path / "s.bin", tok.vocab_size)


# ----------------------------------------------------------------------------- chunking and encoding

def test_chunks_cover_the_segment_on_line_and_character_boundaries(tmp_path):
    text = "short line\n" * 50 + "梦" * 3000 + "\n" + "tail without newline 😀"
    p = write(tmp_path / "t.txt", text)
    raw = p.read_bytes()
    seg = Segment(p, 7, len(raw))
    chunks = list(iter_chunks(seg, chunk_bytes=256))
    assert b"".join(c for _, c in chunks) == raw[7:]
    offsets = [o for o, _ in chunks]
    assert offsets[0] == 7 and all(raw[o:o + len(c)] == c for o, c in chunks)
    for _, c in chunks:
        c.decode("utf-8")            # never inside a character
        assert len(c) <= 2 * 256
    assert sum(c.endswith(b"\n") for _, c in chunks[:-1]) >= 2


def test_parallel_encoding_is_identical_and_memory_is_bounded(tmp_path, tok):
    docs = [write(tmp_path / f"d{i}.txt", make_corpus(2000, seed=i) + "梦 ▁ 😀\r\n") for i in range(3)]
    segs = [Segment(p, 0, p.stat().st_size) for p in docs]
    total = sum(s.size for s in segs)
    chunk = 1024                                  # ~70 chunks per file: far more than one batch of work
    out = {}
    for workers in (1, 2):
        with TokenWriter(tmp_path / f"w{workers}.bin", tok.vocab_size) as w:
            st = encode_segments(tok, segs, w, num_workers=workers, chunk_bytes=chunk)
        out[workers] = np.array(read_tokens(tmp_path / f"w{workers}.bin", tok.vocab_size))
        assert st["max_pending_bytes"] <= (2 * workers + 1) * 2 * chunk < total / 10
        assert st["documents"] == 3 and st["bytes"] == total and st["tokens"] == out[workers].size
    assert np.array_equal(out[1], out[2])
    ids = out[2]
    assert int(np.count_nonzero(ids == EOS_ID)) == 2            # between documents, not after the last
    pieces = np.split(ids, np.flatnonzero(ids == EOS_ID))
    assert [tok.decode(p) for p in pieces] == [p.read_bytes().decode("utf-8") for p in docs]
    assert int(tok.token_bytes()[ids].sum()) == total           # bits-per-byte accounting stays exact


# ----------------------------------------------------------------------------- corpora and splits

def test_validation_fraction_spans_files_and_cuts_on_a_character(tmp_path):
    a = write(tmp_path / "a.txt", "a" * 100)
    b = write(tmp_path / "b.txt", "梦" * 30)                    # 90 bytes
    files = check_files([a, b], skip_invalid=False)
    train, val = split_segments(files, 0.2, "x")                # cut at byte 152 = 52 into b.txt -> 54
    assert train == [Segment(a, 0, 100), Segment(b, 0, 54)] and val == [Segment(b, 54, 90)]
    train, val = split_segments(files, 0.5, "x")
    assert train == [Segment(a, 0, 95)] and val == [Segment(a, 95, 100), Segment(b, 0, 90)]


def test_prepare_a_folder_with_a_separate_validation_file(tmp_path, data_dir):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = {"a.txt": make_corpus(400, seed=1), "sub/b.md": make_corpus(400, seed=2) + "红楼梦\n",
             ".hidden": "never read"}
    for name, text in texts.items():
        write(corpus / name, text)
    val = write(tmp_path / "val.txt", make_corpus(100, seed=3))
    p = prepare(DataConfig(path=str(corpus), val_path=str(val), num_workers=2), TOK_CFG, progress=False)
    tok = Tokenizer.load(p.tokenizer)
    train = np.array(read_tokens(p.train, tok.vocab_size))
    assert [tok.decode(x) for x in np.split(train, np.flatnonzero(train == EOS_ID))] == [texts["a.txt"], texts["sub/b.md"]]
    assert tok.decode(read_tokens(p.val, tok.vocab_size)) == val.read_text()
    m = p.meta
    assert (m["train_documents"], m["val_documents"], m["val_bytes"]) == (2, 1, val.stat().st_size)
    assert m["val_tokens"] == read_tokens(p.val).size and m["train_tokens"] == train.size
    r = m["tokenizer_report"]
    assert r["vocab_size"] == 400 and r["bytes_per_token"] == pytest.approx(m["val_bytes"] / m["val_tokens"])
    assert json.loads((p.dir / "meta.json").read_text()) == m


def test_glob_skip_invalid_and_cache_key(tmp_path, data_dir):
    write(tmp_path / "good.txt", make_corpus(500))
    (tmp_path / "bad.txt").write_bytes(b"fine so far\ncaf\xe9\n")
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(invalid byte 0xe9 at offset 15\)"):
        prepare(DataConfig(path=pattern), TOK_CFG, progress=False)
    p = prepare(DataConfig(path=pattern, skip_invalid=True), TOK_CFG, progress=False)
    assert p.meta["skipped"] == [str(tmp_path / "bad.txt")] and p.meta["corpus"] == [str(tmp_path / "good.txt")]
    write(tmp_path / "more.txt", make_corpus(50, seed=9))          # new content -> new cache entry
    assert prepare(DataConfig(path=pattern, skip_invalid=True), TOK_CFG, progress=False).dir != p.dir


def test_utf8_error_offset_across_read_blocks(tmp_path, monkeypatch):
    import minillm.data.corpus as data
    monkeypatch.setattr(data, "_SCAN_BLOCK", 7)
    p = tmp_path / "x.txt"
    p.write_bytes("abcde梦".encode() + b"\xff" + b"zz")            # 梦 straddles the first block edge
    assert data.scan_file(p).problem == "not UTF-8 text (invalid byte 0xff at offset 8)"
    p.write_bytes("abc梦".encode()[:-1])
    assert data.scan_file(p).problem == "not UTF-8 text (the file ends inside a character at offset 3)"


@pytest.mark.parametrize("setup, match", [
    ("empty", r"the corpus is empty"),
    ("blank", r"the corpus is empty"),
    ("binary", r"blob.bin: looks like a binary file \(NUL byte at offset 4\)"),
    ("noglob", r"data.path=.*nothing-\*.txt: the pattern matches no files"),
    ("emptydir", r"the folder holds no files"),
    ("tiny", r"too small to split"),
])
def test_bad_corpora_are_clear_errors_and_leave_no_cache(tmp_path, data_dir, setup, match):
    path = tmp_path / "c.txt"
    if setup == "empty":
        path.write_bytes(b"")
    elif setup == "blank":
        path.write_text(" \n\t\n")
    elif setup == "binary":
        path = tmp_path / "blob.bin"
        path.write_bytes(b"\x89PNG\x00\x00\x01")
    elif setup == "noglob":
        path = tmp_path / "nothing-*.txt"
    elif setup == "emptydir":
        path = tmp_path / "dir"
        path.mkdir()
    elif setup == "tiny":
        path.write_text("x")
    with pytest.raises(DataError, match=match) as e:
        prepare(DataConfig(path=str(path)), TOK_CFG, progress=False)
    assert "\n" not in str(e.value)
    assert not (data_dir / "prepared").exists() or not any((data_dir / "prepared").iterdir())


def test_vocab_too_large_for_the_corpus_leaves_no_cache(tmp_path, data_dir):
    corpus = write(tmp_path / "small.txt", "a few words only\n" * 20)
    with pytest.raises(TokenizerError, match=r"tokenizer.vocab_size=3000 is more than .*small.txt supports"):
        prepare(DataConfig(path=str(corpus)), TokenizerConfig(vocab_size=3000), progress=False)
    assert not (data_dir / "prepared").exists() or not any((data_dir / "prepared").iterdir())


def test_train_on_files_with_validation_input(tmp_path):
    train = write(tmp_path / "train.txt", make_corpus(300))
    val = write(tmp_path / "val.txt", "ROMEO: 鬼\n")
    tok, report = train_on_files([str(train)], TokenizerConfig(vocab_size=340), val_spec=str(val))
    assert report.val_bytes == val.stat().st_size
    assert report.val_tokens == len(tok.encode(val.read_text()))
    assert report.byte_fallback_share == pytest.approx(3 / report.val_tokens)   # 鬼 is three byte tokens


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, data_dir, monkeypatch):
    corpus = write(tmp_path / "c.txt", make_corpus(3000))
    calls = {"n": 0}
    real = Tokenizer.encode_array

    def flaky(self, text):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt   # the user presses Ctrl-C in the middle of encoding
        return real(self, text)

    monkeypatch.setattr(Tokenizer, "encode_array", flaky)
    monkeypatch.setattr("minillm.data.encode.CHUNK_BYTES", 8192)
    cfg = DataConfig(path=str(corpus), num_workers=1)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, TOK_CFG, progress=False)
    assert calls["n"] == 3 and list((data_dir / "prepared").iterdir()) == []
    monkeypatch.setattr(Tokenizer, "encode_array", real)
    p = prepare(cfg, TOK_CFG, progress=False)                   # the next run starts clean and completes
    assert Tokenizer.load(p.tokenizer).decode(read_tokens(p.train)) + \
        Tokenizer.load(p.tokenizer).decode(read_tokens(p.val)) == corpus.read_text()
