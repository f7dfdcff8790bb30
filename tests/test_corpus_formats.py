"""Corpus formats: JSON Lines, Parquet and compressed files (alone, in folders, mixed with text) round-trip
through prepare; the validation split keeps whole documents; every bad record is one line naming its
file and line (or row) and leaves no cache entry; the cache key covers the text field."""
import bz2
import gzip
import json
import lzma
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import make_corpus
from minillm.config import DataConfig, TokenizerConfig
from minillm.data.corpus import check_files
from minillm.data.encode import encode_segments
from minillm.data.formats import Records, file_format, open_bytes
from minillm.data.prepare import prepare
from minillm.data.token_file import TokenWriter, read_tokens
from minillm.errors import ConfigError, DataError
from minillm.tokenizer import EOS_ID, Tokenizer, train_tokenizer
from minillm.train_tokenizer import main as train_tokenizer_main

TOK_CFG = TokenizerConfig(vocab_size=400)
COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": zstandard.ZstdCompressor().compress}
# documents with what breaks naive handling: CJK, emoji (astral, ZWJ sequences), newlines, tabs, quotes,
# a literal U+2581, leading/trailing whitespace; "" is an empty document (skipped and counted)
DOCS = [make_corpus(60, seed=1), "红楼梦 第一回 甄士隐梦幻识通灵\n贾雨村风尘怀闺秀。", "",
        "emoji 😀🎉 👩\u200d👩\u200d👧 and \"quotes\"\tand ▁ and \\ backslash\n\n", "  spaces  ",
        make_corpus(40, seed=2) + "终。"]
TEXTS = [d for d in DOCS if d]


def write_jsonl(path, docs, field="text", extra_lines=(), blank_lines=False):
    lines = [json.dumps({field: d, "id": i}, ensure_ascii=i % 2 == 0) for i, d in enumerate(docs)]
    if blank_lines:  # not records: skipped, not counted as documents
        lines = ["", *lines[:2], "  \r", *lines[2:], "", ""]
    body = ("\n".join([*lines, *extra_lines]) + "\n").encode("utf-8")
    path.write_bytes(COMPRESS["".join(path.suffixes[1:])](body))
    return path


def write_parquet(path, docs, field="text", row_group_size=2):
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=row_group_size)
    return path


def write_text(path, text):
    path.write_bytes(COMPRESS["".join(path.suffixes[1:])](text.encode("utf-8")))
    return path


def documents(p, split="train"):
    """The documents of a prepared split: its ids cut at eos, each decoded."""
    tok = Tokenizer.load(p.tokenizer)
    ids = np.array(read_tokens(getattr(p, split), tok.vocab_size))
    return [tok.decode(x[x != EOS_ID]) for x in np.split(ids, np.flatnonzero(ids == EOS_ID))]


def prep(path, val_path=None, **kw):
    return prepare(DataConfig(path=str(path), val_path=str(val_path) if val_path else None, num_workers=1, **kw),
                   TOK_CFG, progress=False)


@pytest.mark.parametrize("name", ["c.jsonl", "c.ndjson", "c.jsonl.gz", "c.jsonl.bz2", "c.jsonl.xz", "c.jsonl.zst",
                                  "c.parquet"])
def test_record_formats_round_trip(tmp_path, data_dir, name):
    writer = write_parquet if "parquet" in name else write_jsonl
    corpus, val = writer(tmp_path / name, DOCS), writer(tmp_path / f"v{name}", DOCS[:2])
    if writer is write_jsonl:
        write_jsonl(corpus, DOCS, blank_lines=True)
    p = prep(corpus, val)
    assert documents(p) == TEXTS and documents(p, "val") == DOCS[:2]
    assert (p.meta["train_documents"], p.meta["val_documents"], p.meta["empty_documents"]) == (len(TEXTS), 2, 1)
    assert p.meta["train_bytes"] == sum(len(t.encode()) for t in TEXTS)


@pytest.mark.parametrize("ext", ["", ".gz", ".bz2", ".xz", ".zst"])
def test_text_files_compressed_or_not_round_trip_and_split_by_bytes(tmp_path, data_dir, ext):
    corpus = tmp_path / "books"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        write_text(corpus / f"{i}.txt{ext}", text)
    p = prep(corpus, val_fraction=0.2)
    train, val = documents(p), documents(p, "val")
    # the cut falls inside the last file (a text file is split on a character boundary) ...
    assert train[:-1] == TEXTS[:-1] and train[-1] + val[0] == TEXTS[-1] and len(val) == 1
    # ... at the same byte for a compressed file as for the plain one
    assert len(train[-1].encode()) == int(sum(len(t.encode()) for t in TEXTS) * 0.8) - sum(
        len(t.encode()) for t in TEXTS[:-1])


def test_mixed_folder_in_order_and_record_split_keeps_whole_documents(tmp_path, data_dir):
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    write_text(d / "a.txt", TEXTS[0])
    write_jsonl(d / "b.jsonl.zst", DOCS[1:4])
    write_text(d / "sub" / "c.md.gz", "gz text 文字\n")
    docs = [f"document {i}: " + make_corpus(8, seed=i) for i in range(10)]
    write_parquet(d / "sub" / "d.parquet", docs)
    p = prep(d, val_fraction=0.15)
    train, val = documents(p), documents(p, "val")
    assert train + val == [TEXTS[0], *TEXTS[1:3], "gz text 文字\n", *docs]
    assert 1 <= len(val) < len(docs) and val == docs[-len(val):]      # whole documents, the last ones
    nbytes = [len(t.encode()) for t in train + val]
    cut, before = int(sum(nbytes) * 0.85), sum(nbytes[:len(train)])
    assert before <= cut < before + nbytes[len(train)]     # the document holding the cut byte starts validation


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet])
def test_val_fraction_of_records_is_the_last_fraction_of_documents(tmp_path, data_dir, writer):
    docs = [(f"{i:02d} " + make_corpus(30, seed=i))[:400] for i in range(10)]  # equal sizes: cuts between docs
    p = prep(writer(tmp_path / ("c.jsonl" if writer is write_jsonl else "c.parquet"), docs), val_fraction=0.2)
    assert documents(p) == docs[:8] and documents(p, "val") == docs[8:]
    p = prep(tmp_path / ("c.jsonl" if writer is write_jsonl else "c.parquet"), val_fraction=0.25)
    assert documents(p) == docs[:7] and documents(p, "val") == docs[7:]  # 2.5 documents: the one cut goes


def test_nested_field_in_jsonl_and_parquet(tmp_path, data_dir):
    rows = [{"meta": {"body": t, "lang": "x"}} for t in TEXTS]
    (tmp_path / "n.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "n.parquet")
    for name in ("n.jsonl", "n.parquet"):
        p = prep(tmp_path / name, val_path=tmp_path / name, text_field="meta.body")
        assert documents(p) == TEXTS == documents(p, "val")
    with pytest.raises(ConfigError, match="data.text_field"):
        DataConfig(text_field="meta..body")


def _truncated(compress, n_cut):
    def make(path):
        raw = compress("\n".join(json.dumps({"text": t}) for t in TEXTS * 20).encode())
        path.write_bytes(raw[:-n_cut])
    return make


BAD = {  # file name, how to make it, the error
    "not json": ("bad.jsonl", lambda p: write_jsonl(p, TEXTS, extra_lines=['{"text": "a"']),
                 r"bad.jsonl: line 6: not JSON \(.*\); each line must be one JSON object"),
    "cut string": ("bad.jsonl", lambda p: write_jsonl(p, TEXTS, extra_lines=['{"text": "broken']),  # ends in \n
                   r"bad.jsonl: line 6: not JSON \(Unterminated string starting at column 10\); each line must be "
                   r"one JSON object"),
    "not an object": ("bad.jsonl", lambda p: write_jsonl(p, TEXTS, extra_lines=['["a", "b"]']),
                      r"bad.jsonl: line 6: not a JSON object \(it is a list\); each line must be one JSON object "
                      r"with the text in field 'text'"),
    "missing field": ("bad.jsonl", lambda p: write_jsonl(p, TEXTS, extra_lines=['{"body": "x"}']),
                      r"bad.jsonl: line 6: no field 'text'; set data.text_field"),
    "number": ("bad.ndjson", lambda p: write_jsonl(p, TEXTS, extra_lines=['{"text": 3}']),
               r"bad.ndjson: line 6: field 'text' is int, not a string"),
    "null": ("bad.jsonl.xz", lambda p: write_jsonl(p, TEXTS, extra_lines=['{"text": null}']),
             r"bad.jsonl.xz: line 6: field 'text' is null, not a string"),
    "utf8": ("bad.jsonl", lambda p: write_jsonl(p, TEXTS).open("ab").write(b'{"text": "caf\xe9"}\n'),
             r"bad.jsonl: line 6: not UTF-8 \(invalid byte 0xe9 at column 14\); write the file as UTF-8"),
    "lone surrogate": ("bad.jsonl", lambda p: write_jsonl(p, TEXTS, extra_lines=['{"text": "a\\ud83d b"}']),
                       r"bad.jsonl: line 6: the text holds a lone surrogate .*; fix the record"),
    "truncated gzip": ("bad.jsonl.gz", _truncated(gzip.compress, 100),
                       r"bad.jsonl.gz: the compressed stream is truncated or corrupt \(.*\); re-create"),
    "truncated zstd": ("bad.jsonl.zst", _truncated(COMPRESS[".zst"], 5),
                       r"bad.jsonl.zst: the compressed stream is truncated or corrupt"),
    "truncated text gzip": ("bad.txt.gz", lambda p: p.write_bytes(gzip.compress(b"words " * 9000)[:-9]),
                            r"bad.txt.gz: the compressed stream is truncated or corrupt"),
    "corrupt parquet": ("bad.parquet", lambda p: p.write_bytes(b"PAR1 this is not parquet at all"),
                        r"bad.parquet: not a readable Parquet file \(.*\); re-create"),
    "parquet column": ("bad.parquet", lambda p: write_parquet(p, TEXTS, field="body"),
                       r"bad.parquet: no column 'text' \(columns: id, body\); set data.text_field"),
    "parquet null": ("bad.parquet", lambda p: write_parquet(p, [*TEXTS, None]),
                     r"bad.parquet: row 5: field 'text' is null, not a string"),
    "jsonl named as text": ("bad.txt", lambda p: write_jsonl(p, TEXTS),
                            r"bad.txt: looks like JSON Lines \(its first lines are JSON objects with a string "
                            r"field 'text'\), not text to train on; name it .jsonl"),
    "jsonl named as gz text": ("bad.gz", lambda p: p.write_bytes(gzip.compress(b'{"text": "a"}')),
                               r"bad.gz: looks like JSON Lines"),
    "parquet named as text": ("bad.dat", lambda p: write_parquet(p, TEXTS),
                              r"bad.dat: looks like a Parquet file \(it starts with PAR1\); name it .parquet"),
    "compressed parquet": ("bad.parquet.gz", lambda p: p.write_bytes(b"x"),
                           r"bad.parquet.gz: a compressed Parquet file cannot be read in pieces; decompress it"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_records_are_one_line_and_leave_no_cache(tmp_path, data_dir, case):
    name, make, match = BAD[case]
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / name
    make(path)
    good = write_jsonl(tmp_path / "in" / "good.jsonl", TEXTS)
    for kw in ({"path": path}, {"path": good, "val_path": path}):
        with pytest.raises(DataError, match=match) as e:
            prep(**kw)
        assert "\n" not in str(e.value) and str(e.value).endswith(
            "(or set data.skip_invalid=true to skip bad records and unreadable files)")
    assert not (data_dir / "prepared").exists() or not any((data_dir / "prepared").iterdir())
    p = prep(tmp_path / "in", skip_invalid=True)   # skipped with a warning: the bad record, or an unreadable file
    record_level = re.match(r"[\w.]+: (line|row) \d", match) is not None
    assert p.meta["skipped"] == ([] if record_level else [str(path)])
    assert p.meta["skipped_records"] == ({str(path): 1} if record_level else {})
    assert documents(p) + documents(p, "val") == TEXTS * (2 if record_level else 1)


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_cut_line_mid_file_names_its_true_cause(tmp_path, ending):
    """A line cut inside a string, with lines after it: json's cause, not the line terminator's."""
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(1500)]
    path = tmp_path / "c.jsonl"
    path.write_text(ending.join([*lines, '{"text": "broken', *lines[:3]]) + ending, newline="")
    with pytest.raises(DataError) as e:
        check_files([path], False)
    assert str(e.value) == (f"{path}: line 1501: not JSON (Unterminated string starting at column 10); each line "
                            "must be one JSON object (or set data.skip_invalid=true to skip bad records and unreadable "
                            "files)")


@pytest.mark.parametrize("line, kind", [('["a", "b"]', "a list"), ("3", "a number"), ("2.5", "a number"),
                                        ('"x"', "a string"), ("true", "a boolean"), ("null", "null")])
def test_a_line_that_is_not_an_object_says_what_it_is(tmp_path, line, kind):
    path = write_jsonl(tmp_path / "c.jsonl", TEXTS[:2], field="body", extra_lines=[line])
    with pytest.raises(DataError, match=rf"c.jsonl: line 3: not a JSON object \(it is {kind}\); each line must be "
                                        r"one JSON object with the text in field 'body' \(or set data.skip_invalid"):
        check_files([path], False, text_field="body")


@pytest.mark.parametrize("text, message", [
    ('{"text": "a" "b"}', "Expecting ',' delimiter at column 14"),
    ('{"text": "a\x01"}', "Invalid control character at column 12"),
    ('{"text": "a"} x', "Extra data at column 15"),
])
def test_json_errors_read_as_what_and_where(tmp_path, text, message):
    path = tmp_path / "c.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(DataError, match=rf"line 1: not JSON \({message}\);"):
        check_files([path], False)


def test_cache_key_covers_the_text_field_only_for_record_files(tmp_path, data_dir):
    rows = [{"text": t, "body": t.upper()} for t in TEXTS]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = prep(tmp_path / "c.jsonl"), prep(tmp_path / "c.jsonl", text_field="body")
    assert a.dir != b.dir and documents(b) + documents(b, "val") == [t.upper() for t in TEXTS]
    assert prep(tmp_path / "c.jsonl").dir == a.dir                         # reused
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::-1]) + "\n")
    assert prep(tmp_path / "c.jsonl").dir != a.dir                         # content changed
    t = write_text(tmp_path / "t.txt", TEXTS[0])
    assert prep(t).dir == prep(t, text_field="body").dir                   # plain text ignores it


def test_record_batches_in_a_pool_match_one_process(tmp_path, monkeypatch):
    docs = [make_corpus(5, seed=i) + "文" * (i % 3) for i in range(60)]
    write_jsonl(tmp_path / "c.jsonl.gz", docs)
    write_parquet(tmp_path / "c.parquet", docs, row_group_size=7)
    tok = train_tokenizer(docs, TOK_CFG)
    for whole in ("read", "read_row_groups"):  # Parquet is read batch by batch, never a whole file at once
        monkeypatch.setattr(pq.ParquetFile, whole, lambda *a, **k: pytest.fail("read a whole Parquet file"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read a whole Parquet file"))
    for name in ("c.jsonl.gz", "c.parquet"):
        [f] = check_files([tmp_path / name], False)
        segs = [Records(f.path, f.fmt, f.field, 0, None, f.size), Records(f.path, f.fmt, f.field, 10, 50, 1)]
        outs = []
        for workers, chunk in ((1, 1 << 20), (2, 300)):
            with TokenWriter(tmp_path / f"{workers}.bin", tok.vocab_size) as w:
                st = encode_segments(tok, segs, w, num_workers=workers, chunk_bytes=chunk)
            outs.append(np.array(read_tokens(tmp_path / f"{workers}.bin")))
            assert st["documents"] == 100
            if workers == 2:  # at most 2 * 2 + 1 batches in flight, each under chunk + one document
                assert st["max_pending_bytes"] <= 5 * (300 + max(len(d.encode()) for d in docs))
        assert np.array_equal(*outs)
        pieces = np.split(outs[0], np.flatnonzero(outs[0] == EOS_ID))
        assert [tok.decode(x[x != EOS_ID]) for x in pieces] == docs + docs[10:50]


def test_formats_by_extension_and_streams(tmp_path):
    assert [file_format(tmp_path / n) for n in ("a.JSONL", "a.ndjson.zst", "a.parquet", "a.txt.gz", "a.json",
                                                "a.gz", "a")] == ["jsonl", "jsonl", "parquet", "text", "text",
                                                                  "text", "text"]
    body = "".join(TEXTS).encode() * 50
    for ext in COMPRESS:
        p = tmp_path / f"s.txt{ext}"
        p.write_bytes(COMPRESS[ext](body[:1000]) + COMPRESS[ext](body[1000:]))  # two streams / frames
        with open_bytes(p) as f:
            f.seek(700)
            assert f.read(300) + f.read() == body[700:]


def test_train_tokenizer_command_reads_jsonl(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl.gz", [make_corpus(200, seed=i) for i in range(5)], field="body")
    out = tmp_path / "tok.model"
    assert train_tokenizer_main(["--input", str(tmp_path / "c.jsonl.gz"), "--text-field", "body",
                                 "--vocab-size", "400", "--out", str(out)]) == 0
    assert Tokenizer.load(out).vocab_size == 400
    assert train_tokenizer_main(["--input", str(tmp_path / "c.jsonl.gz"), "--out", str(out)]) == 2
    assert "line 1: no field 'text'; set data.text_field" in capsys.readouterr().err


def test_skip_invalid_skips_bad_records_and_counts_them_per_file(tmp_path, data_dir, caplog):
    d = tmp_path / "c"
    d.mkdir()
    write_jsonl(d / "a.jsonl.gz", TEXTS[:3], extra_lines=["{oops", '{"text": 7}', json.dumps({"text": TEXTS[3]})])
    write_parquet(d / "b.parquet", [TEXTS[4], None, None, "last"])
    with pytest.raises(DataError, match=r"a.jsonl.gz: line 4: not JSON"):
        prep(d)
    p = prep(d, skip_invalid=True, val_fraction=0.3)
    assert p.meta["skipped_records"] == {str(d / "a.jsonl.gz"): 2, str(d / "b.parquet"): 2}
    assert documents(p) + documents(p, "val") == [*TEXTS[:5], "last"]   # the split skips them too
    assert "a.jsonl.gz: skipped 2 bad records (the first: line 4: not JSON" in caplog.text
    assert "b.parquet: skipped 2 bad records (the first: row 1: field 'text' is null" in caplog.text


def test_text_that_only_resembles_json_is_text(tmp_path, data_dir):
    texts = ['{"text": "a"}\n{not json}\n' + make_corpus(100),           # the second line is not JSON
             '{"body": "no text field"}\n' + make_corpus(100, seed=1),   # no string field 'text'
             "{curly}\n" + make_corpus(100, seed=2)]
    for i, t in enumerate(texts):
        write_text(tmp_path / f"{i}.txt", t)
    assert documents(prep(tmp_path, val_path=tmp_path / "0.txt")) == texts


def test_zstd_lines_are_read_in_blocks_not_byte_by_byte(tmp_path, monkeypatch):
    from minillm.data import formats
    calls = []
    real = formats._ZstdReader.readinto
    monkeypatch.setattr(formats._ZstdReader, "readinto", lambda self, b: calls.append(len(b)) or real(self, b))
    docs = [make_corpus(10, seed=i) for i in range(300)]                  # about 100 KB of lines
    write_jsonl(tmp_path / "c.jsonl.zst", docs)
    assert [t for _, t in formats.iter_records(tmp_path / "c.jsonl.zst", "jsonl", "text")] == docs
    assert len(calls) < 20                                                # a line at a time would be ~2000 calls


class _RecordingBar:
    """Stands in for tqdm in corpus.py: records total, updates, postfix and disable."""
    made = []

    def __init__(self, total=None, disable=False, unit=None, **kw):
        self.total, self.disable, self.unit, self.n, self.postfix = total, disable, unit, 0, ""
        _RecordingBar.made.append(self)

    def update(self, n):
        self.n += n

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def close(self):
        pass


def test_check_pass_progress_counts_disk_bytes_and_documents(tmp_path, monkeypatch):
    import minillm.data.corpus as corpus
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_text(folder / "a.txt", TEXTS[0])
    write_text(folder / "b.txt.gz", TEXTS[1])
    write_jsonl(folder / "c.jsonl.zst", DOCS)
    write_parquet(folder / "d.parquet", DOCS)
    paths = sorted(folder.iterdir())
    monkeypatch.setattr(corpus, "tqdm", _RecordingBar)
    _RecordingBar.made.clear()
    check_files(paths, False, progress=True)
    [bar] = _RecordingBar.made
    on_disk = sum(p.stat().st_size for p in paths)
    assert bar.total == on_disk and bar.n == on_disk and bar.unit == "B"  # compressed files count compressed bytes
    assert bar.disable is None                                            # tqdm: off when stderr is not a terminal
    assert bar.postfix == f"{2 + 2 * len(TEXTS)} documents"                 # 2 text files, 5 + 5 records
    check_files(paths, False, progress=False)
    assert _RecordingBar.made[-1].disable is True                         # logger.progress=false
    info = check_files(paths, False, progress=True)
    assert sum(f.documents for f in info) == 2 + 2 * len(TEXTS)


def test_check_bar_counts_documents_of_every_file():
    from minillm.data.corpus import CheckBar
    bar = CheckBar(None, False)
    for n in (5, 7, 9):
        bar.document(n)
    assert (bar.docs, bar.text) == (3, 21)
