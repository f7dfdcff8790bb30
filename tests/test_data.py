"""Corpus resolution and download, the split, token files, and preparation caching."""
import hashlib
import http.server
import json
import os
import re
import threading
from functools import partial

import numpy as np

import pytest

from minillm.config import DataConfig, TokenizerConfig
from minillm.data.prepare import prepare
from minillm.data.corpus import resolve_corpus, split_corpus
from minillm.data.token_file import HEADER_SIZE, read_tokens, write_tokens
from minillm.errors import ConfigError, DataError, TokenFileError, TokenizerError
from minillm.tokenizer import Tokenizer


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
    with pytest.raises(DataError, match=r"^data.path=/dev/zero: not a regular file \(a character device\)"):
        resolve_corpus(DataConfig(path="/dev/zero"))       # endless: it would be read forever
    named = tmp_path / "shk[1].txt"                       # glob characters in an existing name: that file
    named.write_text("text\n")
    assert resolve_corpus(DataConfig(path=str(named))) == [named]
    (tmp_path / "x[1]").mkdir()
    (tmp_path / "x[1]" / "a.txt").write_text("a\n")
    assert resolve_corpus(DataConfig(path=str(tmp_path / "x[1]"))) == [tmp_path / "x[1]" / "a.txt"]
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match=r"pipe: not a regular file \(a named pipe\)"):
        resolve_corpus(DataConfig(path=str(tmp_path / "pipe")))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\).*data.skip_invalid=true"):
        prepare(DataConfig(path=str(bad)), TokenizerConfig(vocab_size=400))
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(DataError, match=r"blank.txt: holds only whitespace, so the corpus is empty \(no text\)"):
        prepare(DataConfig(path=str(blank)), TokenizerConfig(vocab_size=400))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.txt: the corpus is empty \(no text\); give UTF-8 text"):
        prepare(DataConfig(path=str(empty)), TokenizerConfig(vocab_size=400))


def test_every_file_skipped_says_so(tmp_path, data_dir):
    """data.skip_invalid=true and no file usable: the error counts the skipped files, not an 'empty corpus'."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "c" / "b.txt").write_bytes(b"x\0y")
    tok = TokenizerConfig(vocab_size=400)
    with pytest.raises(DataError) as e:
        prepare(DataConfig(path=str(tmp_path / "c"), skip_invalid=True), tok, progress=False)
    assert str(e.value) == ("data.path: all 2 files were skipped as unusable (data.skip_invalid=true; the warnings "
                            "above say why), so there is no text; fix or replace them")
    with pytest.raises(DataError) as e:
        prepare(DataConfig(path=str(tmp_path / "c" / "b.txt"), skip_invalid=True), tok, progress=False)
    assert str(e.value) == (f"{tmp_path / 'c' / 'b.txt'}: the only file was skipped as unusable (data.skip_invalid="
                            "true; the warnings above say why), so there is no text; fix or replace it")
    assert not (data_dir / "prepared").exists() or not any((data_dir / "prepared").iterdir())


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


# ----------------------------------------------------------------------------- a damaged cache entry

def _flip_byte(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, fault", [
    (lambda p: _flip_byte(p.train, HEADER_SIZE + 3), "train.bin: checksum mismatch"),
    (lambda p: p.val.write_bytes(p.val.read_bytes()[:-2]), "val.bin: .* bytes on disk but the header promises"),
    (lambda p: (p.dir / "meta.json").write_text((p.dir / "meta.json").read_text()[:40]),
     r"meta.json: Unterminated string|meta.json: Expecting"),
    (lambda p: p.tokenizer.write_bytes(b"garbage"), "tokenizer.model: not a sentencepiece model"),
    (lambda p: (p.dir / "meta.json").unlink(), "meta.json is missing"),
])
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(corpus_file, data_dir, caplog, damage, fault):
    cfg, tcfg = DataConfig(path=str(corpus_file), num_workers=1), TokenizerConfig(vocab_size=400)
    first = prepare(cfg, tcfg, progress=False)
    good = {name: (first.dir / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.model")}
    meta = first.meta
    damage(first)
    again = prepare(cfg, tcfg, progress=False)
    assert again.dir == first.dir
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert re.search(rf"the prepared data in .*{first.dir.name} is damaged \(.*{fault}.*\); it is derived data: "
                     "rebuilding it", warning), warning
    assert {name: (again.dir / name).read_bytes() for name in good} == good  # the same entry, rebuilt
    assert again.meta["train_tokens"] == meta["train_tokens"] and json.loads((again.dir / "meta.json").read_text())
    assert len(read_tokens(again.train, 400)) == meta["train_tokens"]
    assert [p.name for p in again.dir.parent.iterdir()] == [first.dir.name]  # nothing left aside


def test_training_proceeds_on_a_damaged_cache_entry(tmp_path, corpus_file, data_dir, caplog):
    """The run that finds the entry damaged rebuilds it and trains (it used to fail in every run)."""
    from minillm.config import LoggerConfig, ModelConfig, TrainConfig, TrainJobConfig
    from minillm.trainer import train

    def cfg(run):
        return TrainJobConfig(out_dir=str(tmp_path / run), device="cpu",
                              model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32),
                              data=DataConfig(path=str(corpus_file), num_workers=1),
                              tokenizer=TokenizerConfig(vocab_size=400),
                              train=TrainConfig(max_steps=2, batch_size=2, eval_interval=0, eval_tokens=64),
                              logger=LoggerConfig(progress=False))
    first = prepare(cfg("a").data, cfg("a").tokenizer, progress=False)  # the entry train() will look for
    [entry] = (data_dir / "prepared").iterdir()
    assert entry == first.dir
    _flip_byte(entry / "train.bin", HEADER_SIZE + 1)
    (entry / "meta.json").write_text("{\"train_tok")
    summary = train(cfg("b"))
    assert "is damaged" in caplog.text and (tmp_path / "b" / "summary.json").is_file()
    assert json.loads((tmp_path / "b" / "summary.json").read_text()) and summary is not None
    assert read_tokens(entry / "train.bin", 400) is not None


# ----------------------------------------------------------------------------- tokenizer.path

def test_tokenizer_path_uses_that_model_and_keys_the_cache_on_its_bytes(tmp_path, corpus_file, data_dir):
    from minillm.train_tokenizer import main as train_tokenizer_main
    for name, vocab in (("a", 400), ("b", 420)):
        assert train_tokenizer_main(["--input", str(corpus_file), "--vocab-size", str(vocab),
                                     "--out", str(tmp_path / f"{name}.model")]) == 0
    cfg = DataConfig(path=str(corpus_file), num_workers=1)
    p = prepare(cfg, TokenizerConfig(path=str(tmp_path / "a.model")), progress=False)
    assert p.tokenizer.read_bytes() == (tmp_path / "a.model").read_bytes()
    assert p.meta["tokenizer_train_seconds"] == 0 and p.meta["tokenizer_report"]["model_type"] == "given"
    tok = Tokenizer.load(p.tokenizer)
    assert tok.decode(read_tokens(p.val, tok.vocab_size)) == split_corpus(corpus_file.read_text(), 0.1)[1]
    # other tokenizer settings do not matter; other model bytes do
    assert prepare(cfg, TokenizerConfig(path=str(tmp_path / "a.model"), vocab_size=999), progress=False).dir == p.dir
    assert prepare(cfg, TokenizerConfig(path=str(tmp_path / "b.model")), progress=False).dir != p.dir
    (tmp_path / "a.model").write_bytes((tmp_path / "b.model").read_bytes())  # replaced under the same name
    assert prepare(cfg, TokenizerConfig(path=str(tmp_path / "a.model")), progress=False).dir != p.dir


def test_tokenizer_path_errors_are_one_line_naming_the_key(tmp_path, corpus_file, data_dir):
    import sentencepiece as spm
    cfg = DataConfig(path=str(corpus_file), num_workers=1)
    (tmp_path / "junk.model").write_bytes(b"not a model at all")
    spm.SentencePieceTrainer.train(input=str(corpus_file), model_prefix=str(tmp_path / "plain"), vocab_size=100,
                                   bos_id=-1, unk_id=0, eos_id=1, minloglevel=2)
    cases = [(tmp_path / "none.model", r"tokenizer.path=.*none.model: no such file; give a sentencepiece .model "
              r"file \(make one with python -m minillm.train_tokenizer"),
             (tmp_path / "junk.model", r"tokenizer.path=.*junk.model: not a sentencepiece model \(.*\); give a .model"),
             (tmp_path / "plain.model", r"tokenizer.path=.*plain.model: its unk, bos, eos ids are \(0, -1, 1\), "
              r"minillm needs \(0, 1, 2\)")]
    for path, message in cases:
        with pytest.raises(TokenizerError, match=message) as e:
            prepare(cfg, TokenizerConfig(path=str(path)), progress=False)
        assert "\n" not in str(e.value)
    assert not (data_dir / "prepared").exists() or not list((data_dir / "prepared").iterdir())
    with pytest.raises(ConfigError, match="tokenizer.path='': is empty"):
        TokenizerConfig(path="")
