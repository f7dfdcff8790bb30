"""The tokenizer is lossless, counts bytes exactly, streams exactly what decode gives, and trains
from files on its own (python -m minillm.train_tokenizer)."""
import json
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, SHARED_DATA, make_corpus
from minillm.config import TokenizerConfig
from minillm.errors import ConfigError, TokenizerError
from minillm.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer
from minillm.data.tokenizer_sample import train_on_sample, training_sample
from minillm.train_tokenizer import main

HARD = ["红楼梦 第一回 甄士隐梦幻识通灵", "emoji 😀🎉👩‍👩‍👧", "combining e\u0301 a\u0308", "tabs\tand\t\ttabs",
        "runs of     spaces", "crlf\r\nline\r\n", "private use \ue000\U000f0000", "  leading and trailing  ",
        "\n\n\nnewlines only\n", "ㄅㄆㄇ bopomofo", "digits 1234567890", "▁ literal sentencepiece marker",
        "▁▁ ▁", " ▁", "a\u2581b \u2581\n\u2581", "\u3000full-width\u3000space", "nul \x00 and del \x7f"]


@pytest.fixture(scope="module", params=["bpe", "unigram", "char"])
def tok(request) -> Tokenizer:
    size = {"bpe": 400, "unigram": 380, "char": 300}[request.param]
    return train_tokenizer([make_corpus(800) + "".join(HARD[:3])],
                           TokenizerConfig(model_type=request.param, vocab_size=size))


def test_special_ids_are_fixed(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS_ID, EOS_ID, PAD_ID) == (1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "\n"]
    assert list(tok.token_bytes()[:4]) == [0, 0, 0, 0]   # specials cover no text


@pytest.mark.parametrize("text", HARD)
def test_round_trip_hard_cases(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert sum(tok.token_bytes()[ids]) == len(text.encode("utf-8"))


def test_literal_sentencepiece_space_is_three_byte_tokens(tok):
    marker = [tok.sp.piece_to_id(p) for p in ("<0xE2>", "<0x96>", "<0x81>")]
    ids = tok.encode("a\u2581b")
    assert ids == tok.encode("a") + marker + tok.encode("b")
    assert tok.encode("a b") != ids and tok.decode(tok.encode("a b")) == "a b"
    assert tok.encode_batch(["x\u2581", "plain"]) == [tok.encode("x\u2581"), tok.encode("plain")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
       | st.lists(st.sampled_from(["\u2581", " ", "\n", "\r\n", "\t", "梦", "😀", "e\u0301", "ab", "1"]),
                  max_size=30).map("".join))
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text
    assert tok.encode_array(text).tolist() == ids      # the line-by-line fast path gives the same ids


def test_encode_array_matches_encode_on_a_long_text(tok):
    text = make_corpus(400, seed=5) + "\n\n  \r\n".join(HARD) + "\n"
    assert tok.encode_array(text).tolist() == tok.encode(text)


def test_streaming_multibyte_characters_emit_only_when_complete(tok):
    ids = tok.encode("鬼")  # not in the training text
    assert len(ids) == 3  # three byte-fallback tokens
    assert tok.byte_fallback_mask()[ids].all()
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == ["", "", "鬼"]


def test_vocab_larger_than_corpus_supports_is_a_clear_error():
    with pytest.raises(TokenizerError, match=r"tokenizer.vocab_size=5000 is more than tiny.txt supports \(at most \d+"):
        train_tokenizer(["just a few words here\n" * 5], TokenizerConfig(vocab_size=5000), source="tiny.txt")
    with pytest.raises(TokenizerError, match=r"tokenizer.vocab_size=300 is smaller than the \d+ pieces corpus needs"
                                             r".*\(tokenizer=cjk sets both for Chinese, Japanese or Korean text\)$"):
        train_tokenizer(["".join(chr(0x4E00 + i) for i in range(400))], TokenizerConfig(vocab_size=300))
    # already CJK settings (coverage below 1): the advice does not repeat tokenizer=cjk
    with pytest.raises(TokenizerError, match=r"lower the coverage$"):
        train_tokenizer(["".join(chr(0x4E00 + i) for i in range(400))],
                        TokenizerConfig(vocab_size=300, character_coverage=0.9995))


def test_vocab_too_small_for_byte_fallback_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=261: must be >= 262 .*byte-fallback"):
        TokenizerConfig(vocab_size=261)
    TokenizerConfig(vocab_size=100, byte_fallback=False)  # without byte fallback the floor is low


def test_char_vocab_without_byte_fallback_takes_every_character_or_fails():
    """sentencepiece's char trainer keeps the most frequent characters up to vocab_size and drops the
    rest silently; without byte fallback those would be <unk>. A ceiling above the alphabet gives one
    piece per character + 4 specials; one piece short is an error that names the size needed."""
    text = make_corpus(300) + "\u00e9\u00e8 \u68a6 \u00a7\n"      # rare characters, each once
    chars = len(set(text))
    tok = train_tokenizer([text], TokenizerConfig(model_type="char", vocab_size=65536, byte_fallback=False))
    assert tok.vocab_size == chars + 4
    assert tok.decode(tok.encode(text)) == text and 0 not in tok.encode(text)
    assert train_tokenizer([text], TokenizerConfig(model_type="char", vocab_size=chars + 4,
                                                   byte_fallback=False)).vocab_size == chars + 4
    with pytest.raises(TokenizerError, match=rf"tokenizer.vocab_size={chars + 3} leaves out 1 of the {chars} "
                                             rf"characters of c.txt \(.*\).*set tokenizer.vocab_size >= {chars + 4} "):
        train_tokenizer([text], TokenizerConfig(model_type="char", vocab_size=chars + 3, byte_fallback=False),
                        source="c.txt")
    # "\n" is always a piece: a text without one needs its characters + "\n" + 4 specials
    flat = "abcdefghij" * 20
    with pytest.raises(TokenizerError, match=r"tokenizer.vocab_size=14 .* >= 15 "):
        train_tokenizer([flat], TokenizerConfig(model_type="char", vocab_size=14, byte_fallback=False))
    # with byte fallback a smaller char vocabulary is lossless (rare characters become bytes)
    small = train_tokenizer([text], TokenizerConfig(model_type="char", vocab_size=261 + chars - 3))
    assert small.decode(small.encode(text)) == text


def test_without_byte_fallback_every_character_of_the_whole_corpus_is_checked():
    """The training sample (train_on_sample: seeded, what data preparation uses) may miss a rare line:
    its characters are checked against the whole corpus. Characters sentencepiece gives no piece
    (a NUL, a literal U+2581 that would come back as a space) are named, whatever the model type."""
    corpus = "abc de\n" * 3000 + "Z\n"
    cfg = TokenizerConfig(model_type="char", vocab_size=65536, byte_fallback=False, input_sentence_size=101)
    assert "Z\n" not in training_sample([corpus], cfg)                   # the seeded sample misses it
    with pytest.raises(TokenizerError, match=r"the 101 lines sampled of 3,001 leave out 1 of the 8 characters "
                                             r"of corpus \('Z'\).*set a larger tokenizer.input_sentence_size"):
        train_on_sample([corpus], cfg)
    assert train_on_sample([corpus], TokenizerConfig(model_type="char", vocab_size=65536, byte_fallback=False)
                           ).encode("Z") != [0]
    for bad in ("\x00", "\u2581"):
        for model_type, size in (("char", 65536), ("bpe", 300)):
            with pytest.raises(TokenizerError, match=rf"sentencepiece gives no piece to 1 of .* \({re.escape(repr(bad))}\).*remove "
                                                     r"them from the corpus, or set tokenizer.byte_fallback=true"):
                train_on_sample([make_corpus(100) + f"a{bad}b\n"],
                                TokenizerConfig(model_type=model_type, vocab_size=size, byte_fallback=False))


def test_long_lines_and_sampling_keep_training_lossless():
    line = ("梦" * 3000 + " x") * 3  # one 27 KB line, longer than max_sentence_length
    cfg = TokenizerConfig(vocab_size=340, max_sentence_length=4096, input_sentence_size=200)
    t = train_tokenizer([make_corpus(300), line], cfg)
    assert t.decode(t.encode(line)) == line
    assert "梦" in [t.sp.id_to_piece(i) for i in range(t.vocab_size)]   # the long line was seen, not skipped


def test_cli_trains_from_a_glob_and_reports(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"part{i}.txt").write_text(make_corpus(300, seed=i) + ("鬼魅魍魉 ✓\n" if i == 2 else ""))
    out = tmp_path / "tok.model"
    rc = main(["--input", str(docs / "*.txt"), "--model-type", "unigram", "--vocab-size", "340",
               "--val-fraction", "0.2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    tok = Tokenizer.load(out)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["vocab_size"] == tok.vocab_size == 340 and report["model_type"] == "unigram"
    assert report["bytes_per_token"] == pytest.approx(report["val_bytes"] / report["val_tokens"])
    assert 0 < report["byte_fallback_share"] < 0.1    # characters only in the held-out text fall back
    assert report["val_bytes"] == pytest.approx(0.2 * sum(p.stat().st_size for p in docs.iterdir()), abs=4)
    assert "bytes per token" in capsys.readouterr().out


def test_cli_speaks_in_its_own_options(tmp_path, capsys):
    """The command's errors name its options, not train.py's keys; --no-byte-fallback trains a char
    vocabulary of exactly the corpus's characters + 4 specials."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(200))
    out = tmp_path / "t.model"
    assert main(["--input", str(corpus), "--model-type", "char", "--vocab-size", "200", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --vocab-size 200: must be >= 262 ")
    train_chars = len(set(corpus.read_text()[:int(0.9 * corpus.stat().st_size)]))
    assert main(["--input", str(corpus), "--model-type", "char", "--vocab-size", "1000", "--no-byte-fallback",
                 "--out", str(out)]) == 0
    assert abs(Tokenizer.load(out).vocab_size - (train_chars + 4)) <= 1   # the 90% cut may take a character
    assert main(["--input", str(corpus), "--model-type", "char", "--vocab-size", "20", "--no-byte-fallback",
                 "--out", str(tmp_path / "u.model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --vocab-size 20 leaves out ") and "or drop --no-byte-fallback" in err


def test_cli_out_makes_missing_folders_only_after_training(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(200))
    out = tmp_path / "new" / "deeper" / "t.model"
    assert main(["--input", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    assert Tokenizer.load(out).vocab_size == 400 and out.with_suffix(".json").is_file()
    failing = tmp_path / "other" / "t.model"      # training fails: no folder is left behind
    assert main(["--input", str(corpus), "--vocab-size", "200", "--out", str(failing)]) == 2
    assert not (tmp_path / "other").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["--input", str(corpus), "--out", str(tmp_path / "afile" / "t.model")]) == 2
    assert "afile is a file, so no folder can be made under it" in capsys.readouterr().err
    assert "(default: 0.1)" in " ".join(_help().split()) and "(default: 1024)" in " ".join(_help().split())


def _help() -> str:
    from minillm.train_tokenizer import _parser
    return _parser().format_help()


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minillm.train_tokenizer", "--input", str(tmp_path / "none/*.txt"),
                           "--out", str(tmp_path / "t.model")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "matches no files" in proc.stderr and not (tmp_path / "t.model").exists()


@pytest.mark.skipif(not (SHARED_DATA / "hongloumeng.txt").exists(), reason="shared data not present")
def test_round_trip_hongloumeng():
    text = (SHARED_DATA / "hongloumeng.txt").read_text(encoding="utf-8")
    tok = train_tokenizer([text[:300_000]], TokenizerConfig(vocab_size=5000, character_coverage=0.9995))
    sample = text[-200_000:]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert int(tok.token_bytes()[ids].sum()) == len(sample.encode("utf-8"))
    full = tok.encode_array(text)   # every private-use / bopomofo / long line of the whole book
    assert tok.decode(full) == text
    head = text[:text.index("\n", 100_000) + 1]
    assert tok.encode_array(head).tolist() == tok.encode(head)


def test_bench_tokenizer_quick(tmp_path):
    """The benchmark script's quick path works end to end (a benchmark is not a test: no timing asserted)."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_tokenizer.py", "--quick", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "bench_tokenizer.json").read_text())["rows"]
    enc = [r for r in rows if r["bench"] == "encode"]
    assert [r["workers"] for r in enc] == [1, 2] and all(r["MB/s"] > 0 for r in enc)
    train = [r for r in rows if r["bench"] == "train"]
    assert {r["model"] for r in train} == {"bpe", "unigram", "char"}
    assert all(1.0 <= r["bytes/token"] < 10 for r in train)


def test_the_old_tokenizer_command_says_where_it_moved():
    """`python -m minillm.tokenizer` (before the data package) fails loudly instead of doing nothing."""
    proc = subprocess.run([sys.executable, "-m", "minillm.tokenizer", "--input", "x.txt", "--out", "t.model"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "python -m minillm.train_tokenizer" in proc.stderr


def _two_alphabet_files(folder, lines=3000):
    """Two files, the second in another alphabet: a sample of only the first files would miss it."""
    import random
    rng = random.Random(0)
    latin, greek = "apple banana cherry orange grape melon".split(), "αλφα βητα γαμμα δελτα εψιλον ζητα".split()
    folder.mkdir()
    for name, words in (("a.txt", latin), ("b.txt", greek)):
        (folder / name).write_text("".join(" ".join(rng.choice(words) for _ in range(6)) + "\n" for _ in range(lines)))
    return folder


def test_training_sample_is_seeded_uniform_over_all_files_and_bounded():
    from minillm.data.tokenizer_sample import training_sample
    texts = [f"first {i}\n" for i in range(5000)] + [f"last {i}\n" for i in range(5000)]
    cfg = TokenizerConfig(input_sentence_size=1000)
    sample = training_sample(iter(texts), cfg)
    assert len(sample) == 1000 and sample == training_sample(iter(texts), cfg)  # bounded, the same every time
    last = sum(line.startswith("last") for line in sample)
    assert 400 < last < 600 and len(set(sample)) == 1000   # uniform over the stream, not its head
    assert training_sample(["a\nb\r\nc"], cfg) == ["a\n", "b\r\n", "c"]  # fewer lines: all, in order
    long = TokenizerConfig(max_sentence_length=1024, input_sentence_size=101)
    assert training_sample(["梦" * 600 + "\n"], long) == ["梦" * 256, "梦" * 256, "梦" * 88 + "\n"]  # 1801 bytes


def test_tokenizer_trained_on_a_big_corpus_is_the_same_in_every_process(tmp_path):
    """More lines than input_sentence_size: sentencepiece's own sample was drawn from a clock-seeded
    generator (a different model per process); the seeded sample is drawn over both files."""
    folder = _two_alphabet_files(tmp_path / "corpus")
    models = []
    for run in ("1", "2"):
        out = tmp_path / f"t{run}.model"
        proc = subprocess.run([sys.executable, "-m", "minillm.train_tokenizer", "--input", str(folder), "--vocab-size",
                               "400", "--input-sentence-size", "500", "--val-fraction", "0.05", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        models.append(out.read_bytes())
    assert models[0] == models[1]
    tok = Tokenizer(models[0])
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert "▁βητα" in pieces or "βητα" in pieces  # words of the last file were sampled
    assert "▁banana" in pieces or "banana" in pieces
