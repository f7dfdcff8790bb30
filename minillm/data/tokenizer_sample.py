"""The tokenizer's training sample: a seeded, uniform sample of lines from the whole corpus.

    training_sample(texts, cfg)   at most cfg.input_sentence_size lines, drawn uniformly from every line of
                                  ``texts`` (all files, first to last), the same lines in every process
    train_on_sample(texts, cfg)   minillm.tokenizer.train_tokenizer on that sample

sentencepiece keeps a uniform sample of ``input_sentence_size`` lines by itself, but its generator is
seeded from the clock in every process (``set_random_generator_seed`` does not reach it when lines
come from an iterator): the same corpus gave a different tokenizer in each run once it had more lines
than that (measured). Drawing the sample here, with a fixed seed, makes the tokenizer a function of the
corpus and the settings; sentencepiece then gets no more lines than it keeps and samples nothing.

A line is cut the way minillm.tokenizer cuts lines for training (a line of more than
``max_sentence_length`` bytes into pieces of ``max_sentence_length // 4`` characters), and each piece
counts as one line, so the count sentencepiece sees is the count drawn. Memory: the sample itself
(at most ``input_sentence_size`` lines), whatever the corpus size.
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator

from minillm.config import TokenizerConfig
from minillm.tokenizer import Alphabet, Tokenizer, needs_alphabet, train_tokenizer

SEED = 0x5EED


def _lines(texts: Iterable[str], max_len: int) -> Iterator[str]:
    """Each text's lines with their endings (str.splitlines' boundaries, as the tokenizer's trainer),
    a line longer than ``max_len`` bytes cut into pieces of ``max_len // 4`` characters."""
    step = max_len // 4  # a UTF-8 character is at most 4 bytes
    for text in texts:
        for line in text.splitlines(keepends=True):
            if len(line) * 4 <= max_len or len(line.encode("utf-8")) <= max_len:
                yield line
            else:
                for i in range(0, len(line), step):
                    yield line[i:i + step]


def training_sample(texts: Iterable[str], cfg: TokenizerConfig, seed: int = SEED,
                    alphabet: Alphabet | None = None) -> list[str]:
    """At most ``cfg.input_sentence_size`` lines drawn uniformly from all lines of ``texts``
    (reservoir sampling, Algorithm R, with a fixed seed); all of them, in order, if there are fewer.
    ``alphabet``: gets the characters and the line count of all of them, not only the sample's."""
    k, rng = cfg.input_sentence_size, random.Random(seed)
    if alphabet is not None:
        texts = (alphabet.note(t) for t in texts)
    sample: list[str] = []
    i = -1
    for i, line in enumerate(_lines(texts, cfg.max_sentence_length)):
        if i < k:
            sample.append(line)
        elif (j := rng.randrange(i + 1)) < k:
            sample[j] = line
    if alphabet is not None:
        alphabet.lines = i + 1
    return sample


def train_on_sample(texts: Iterable[str], cfg: TokenizerConfig, source: str = "corpus") -> Tokenizer:
    """Train the tokenizer on :func:`training_sample` of ``texts``: the same corpus and settings give
    the same model in every run. Without byte fallback every character of the whole corpus, not only
    of the sample, must get a piece (minillm.tokenizer.needs_alphabet). Raises TokenizerError as
    minillm.tokenizer.train_tokenizer does."""
    alphabet = Alphabet() if needs_alphabet(cfg) else None
    return train_tokenizer(training_sample(texts, cfg, alphabet=alphabet), cfg, source=source, alphabet=alphabet)
