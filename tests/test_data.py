"""Corpus resolution and download, the split, token files, and preparation caching."""
import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest

from minillm.config import DataConfig, TokenizerConfig
from minillm.data.prepare import prepare
from minillm.data.corpus import resolve_corpus, split_corpus
from minillm.data.token_file import HEADER_SIZE, read_tokens, write_tokens
from minillm.errors import DataError, TokenFileError


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def named(url, sha, filename="corpus.txt"):
    return DataConfig(name="test", url=url, sha256=sha, filename=filename)


def test_download_checks_sha256_and_caches(http_dir, data_dir):
    www, base = http_dir
    body = "To be, or not to be\n" * 50
    (www / "c.txt").write_text(body)
    sha = hashlib.sha256(body.encode()).hexdigest()
    [path] = resolve_corpus(named(f"{base}/c.txt", sha))
    assert path == data_dir / "corpus.txt" and path.read_text() == body
    (www / "c.txt").unlink()  # second time it comes from the cache
    assert resolve_corpus(named(f"{base}/c.txt", sha)) == [path]


def test_download_with_wrong_checksum_leaves_nothing(http_dir, data_dir):
    www, base = http_dir
    (www / "c.txt").write_text("not the file you wanted\n")
    with pytest.raises(DataError, match="does not match the expected"):
        resolve_corpus(named(f"{base}/c.txt", "0" * 64))
    assert not any(data_dir.glob("*")) if data_dir.exists() else True


def test_offline_without_a_copy_says_where_to_put_the_file(data_dir):
    with pytest.raises(DataError, match=r"put corpus.txt in .*data_cache.*data.path="):
        resolve_corpus(named("http://127.0.0.1:9/none.txt", None))


def test_explicit_path_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match="missing.txt: no such file or folder"):
        resolve_corpus(DataConfig(path=str(tmp_path / "missing.txt")))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\).*data.skip_invalid=true"):
        prepare(DataConfig(path=str(bad)), TokenizerConfig(vocab_size=400))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        prepare(DataConfig(path=str(empty)), TokenizerConfig(vocab_size=400))


def test_split_is_last_fraction_of_bytes_on_a_character_boundary():
    text = "ab" * 45 + "梦" * 10  # 90 bytes + 30 bytes
    train, val = split_corpus(text, 0.21)  # cut at byte 94, inside a character -> 96
    assert train + val == text
    assert len(val.encode()) == 24 and val == "梦" * 8


def test_token_file_round_trip_and_validation(tmp_path):
    ids = np.array([0, 5, 65535, 7], dtype=np.int64)
    p = tmp_path / "t.bin"
    write_tokens(p, ids, 65536)
    assert p.stat().st_size == HEADER_SIZE + 4 * 2   # uint16 for vocab <= 65536
    assert np.array_equal(read_tokens(p, 65536), ids)
    write_tokens(tmp_path / "big.bin", np.array([70000]), 100000)
    assert read_tokens(tmp_path / "big.bin").dtype == np.uint32
    with pytest.raises(TokenFileError, match="made for a vocabulary of 65536"):
        read_tokens(p, 1000)
    raw = p.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(raw[:-1])
    with pytest.raises(TokenFileError, match="trunc.bin: .* truncated"):
        read_tokens(tmp_path / "trunc.bin")
    (tmp_path / "foreign.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(TokenFileError, match="foreign.bin: not a minillm token file"):
        read_tokens(tmp_path / "foreign.bin")
    flipped = bytearray(raw)
    flipped[-1] ^= 0x01
    (tmp_path / "flip.bin").write_bytes(bytes(flipped))
    with pytest.raises(TokenFileError, match="checksum mismatch"):
        read_tokens(tmp_path / "flip.bin")
    with pytest.raises(TokenFileError, match="outside"):
        write_tokens(tmp_path / "x.bin", np.array([5]), 5)
    assert not (tmp_path / "x.bin").exists() and not list(tmp_path.glob("x.bin*"))


def test_prepare_encodes_both_splits_and_reuses_the_cache(corpus_file, data_dir):
    cfg, tcfg = DataConfig(path=str(corpus_file)), TokenizerConfig(vocab_size=400)
    first = prepare(cfg, tcfg)
    from minillm.tokenizer import Tokenizer
    tok = Tokenizer.load(first.tokenizer)
    text = corpus_file.read_text()
    train_text, val_text = split_corpus(text, 0.1)
    assert tok.decode(read_tokens(first.val, tok.vocab_size)) == val_text
    assert tok.decode(read_tokens(first.train, tok.vocab_size)) == train_text
    mtime = first.train.stat().st_mtime_ns
    again = prepare(cfg, tcfg)
    assert again.dir == first.dir and again.train.stat().st_mtime_ns == mtime   # reused
    other = prepare(cfg, TokenizerConfig(vocab_size=420))
    assert other.dir != first.dir   # a different tokenizer config never reuses stale files
