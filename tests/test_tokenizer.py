"""The tokenizer is lossless, counts bytes exactly, and streams exactly what decode gives."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA, make_corpus
from minillm.config import TokenizerConfig
from minillm.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, TokenizerError, train_tokenizer

HARD = ["红楼梦 第一回 甄士隐梦幻识通灵", "emoji 😀🎉👩‍👩‍👧", "combining e\u0301 a\u0308", "tabs\tand\t\ttabs",
        "runs of     spaces", "crlf\r\nline\r\n", "private use \ue000\U000f0000", "  leading and trailing  ",
        "\n\n\nnewlines only\n", "ㄅㄆㄇ bopomofo", "digits 1234567890", "▁ literal sentencepiece marker"]


@pytest.fixture(scope="module", params=["bpe", "unigram", "char"])
def tok(request) -> Tokenizer:
    size = {"bpe": 400, "unigram": 380, "char": 300}[request.param]
    return train_tokenizer([make_corpus(800) + "".join(HARD[:3])],
                           TokenizerConfig(model_type=request.param, vocab_size=size))


def test_special_ids_are_fixed(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS_ID, EOS_ID, PAD_ID) == (1, 2, 3)
    assert tok.sp.id_to_piece(EOS_ID) == "</s>"


@pytest.mark.parametrize("text", HARD)
def test_round_trip_hard_cases(tok, text):
    if "▁" in text:
        pytest.xfail("sentencepiece maps a literal U+2581 to a space; tracked for the tokenizer issue")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert sum(tok.token_bytes()[ids]) == len(text.encode("utf-8"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=60))
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_streaming_multibyte_characters_emit_only_when_complete(tok):
    ids = tok.encode("鬼")  # not in the training text
    assert len(ids) == 3  # three byte-fallback tokens
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == ["", "", "鬼"]


def test_vocab_larger_than_corpus_supports_is_a_clear_error():
    with pytest.raises(TokenizerError, match=r"tokenizer.vocab_size=5000 is more than tiny.txt supports \(at most \d+"):
        train_tokenizer(["just a few words here\n" * 5], TokenizerConfig(vocab_size=5000), source="tiny.txt")
    with pytest.raises(TokenizerError, match="is smaller than the .* characters"):
        train_tokenizer(["".join(chr(0x4E00 + i) for i in range(400))], TokenizerConfig(vocab_size=300))


@pytest.mark.skipif(not (SHARED_DATA / "hongloumeng.txt").exists(), reason="shared data not present")
def test_round_trip_hongloumeng():
    text = (SHARED_DATA / "hongloumeng.txt").read_text(encoding="utf-8")
    tok = train_tokenizer([text[:300_000]], TokenizerConfig(vocab_size=5000, character_coverage=0.9995))
    sample = text[-200_000:]
    assert tok.decode(tok.encode(sample)) == sample
