"""The budget recipe: vocabulary, model size, batch and optimizer of a time-budgeted run, chosen from
the corpus and the budget (``train.time_budget_s``), every choice visible and overridable.

The default presets name the keys the recipe may choose as interpolations, ``${minillm.recipe:KEY}``
(configs/model/tiny.yaml, configs/tokenizer/bpe.yaml, configs/optim/default.yaml,
configs/train/default.yaml). A key the user sets, on the command line or in a preset, replaces its
interpolation, so the user's value wins; ``--cfg job --resolve`` prints what the recipe chose, and
config.json records it. Without a time budget every key resolves to its schema default
(minillm/config.py): an unbudgeted run is exactly what it was before the recipe existed.

With a budget B seconds:
- the corpus is sampled (``corpus_stats``: up to 4 MB read from up to 8 of its files, or from the first
  rows of a local Hugging Face dataset) for its share of CJK characters and its alphabet;
- training compute C = B x TRAIN_SHARE x the device's sustained training rate (``device_rate``; FLOPs);
- the model comes from the ladder of shapes ``LADDER``: the largest whose 6 N D training cost (Kaplan
  et al., 2020; N parameters, D tokens) with D = TOKENS_PER_PARAM x N fits in C, i.e. the size a
  tokens-per-parameter rule assigns to that compute (Hoffmann et al., 2022 derive ~20 at large scale;
  the ratio here is measured at CPU-minute budgets, see TOKENS_PER_PARAM);
- vocabulary: BPE, VOCAB pieces, CJK_VOCAB for CJK text, raised until the characters covering 98% of
  the text are at most half the pieces (``vocab_for``); character coverage: the commonest characters
  that fit in half the pieces, the rarer ones left to byte fallback (``coverage_for``);
- optimizer: Muon for the blocks' matrices and AdamW for the rest, warmup then a wsd schedule, which
  lets minillm/time_budget.py re-plan max_steps until its decay begins; one evaluation, at the end.
The measurements behind each constant: README "The budget recipe" and benchmarks/bench_recipe.py.
"""
from __future__ import annotations

import functools
import logging
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

from minillm.config import ModelConfig, OptimConfig, TokenizerConfig, TrainConfig

log = logging.getLogger(__name__)

VOCAB = 1024             # BPE pieces for alphabetic text and code (measured: README "The budget recipe")
CJK_VOCAB = 4000         # for text whose non-space characters are more than 30% CJK
MIN_COVERAGE = 0.98      # sentencepiece's lowest character_coverage
CHAR_SHARE = 0.5         # at most this share of the non-byte pieces are single characters
TRAIN_SHARE = 0.8        # of the budget: the rest is start-up, data loading, the final evaluation
TOKENS_PER_PARAM = 2.0   # D / N at the ladder rung chosen for a budget (measured; see the module docstring)
CPU_RATE_PER_THREAD = 35e9   # sustained training FLOP/s per CPU thread at the first rung (measured: 30e9 at
                             # vocabulary 1024, 40e9 at 4000; 2 threads, 6 N FLOPs per token)
MUON_LR = 0.015          # Muon's peak lr for MUON_STEPS steps under wsd (measured at 421-450 steps: 0.05, 0.03,
MUON_STEPS = 450         # 0.02, 0.01 -> 红楼梦 2.066, 2.017, 1.998, 1.982; Vim docs 1.349, -, 1.215, 1.218)
MAX_EPOCHS = 4           # passes over a small corpus's training split, at most (epoch_cap)
BYTES_PER_TOKEN = (2.2, 4.0)  # text bytes per token, estimated before the tokenizer exists: other, CJK
EVAL_TOKENS = 1 << 18    # the final evaluation's validation tokens (at most): seconds on a CPU, not minutes
GPU_MFU = 0.3            # fraction of the device's peak a small model sustains

# (n_layer, n_embd, n_head, block_size, batch_size): the shapes a budget may get, smallest first
LADDER = [
    (4, 128, 4, 32, 32),
    (4, 192, 6, 64, 32),
    (6, 256, 8, 128, 32),
    (8, 384, 6, 256, 32),
    (12, 512, 8, 512, 32),
    (12, 768, 12, 1024, 32),
]


@dataclass(frozen=True)
class CorpusStats:
    """What the recipe reads of a corpus: its size in bytes, and of a sample of its text the share of
    CJK characters among non-space characters and the counts of its distinct characters, commonest
    first (how much of the text the commonest k characters cover: ``coverage_of``)."""
    bytes: int | None  # None: unknown (a hub dataset whose metadata gives no row count)
    sample_chars: int
    cjk_share: float
    counts: tuple[int, ...]

    @property
    def alphabet(self) -> int:
        return len(self.counts)

    def coverage_of(self, k: int) -> float:
        """Fraction of the sample's characters that are among its k commonest."""
        return sum(self.counts[:k]) / max(1, sum(self.counts))


def is_cjk(ch: str) -> bool:
    """Han, kana and hangul characters (the scripts whose text needs a larger vocabulary)."""
    return unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL"))


def text_stats(text: str, total_bytes: int | None) -> CorpusStats:
    counts = Counter(text)
    visible = sum(n for c, n in counts.items() if not c.isspace())
    cjk = sum(n for c, n in counts.items() if is_cjk(c))
    return CorpusStats(total_bytes, len(text), cjk / max(1, visible), tuple(sorted(counts.values(), reverse=True)))


SAMPLE_BYTES = 4 << 20  # of text read for the statistics


@functools.lru_cache(maxsize=8)
def _stats_of(data_key: tuple) -> CorpusStats | None:
    from minillm.config import DataConfig
    from minillm.data.corpus import resolve_corpus
    from minillm.data.formats import file_format, iter_records, open_bytes

    data = DataConfig(**dict(data_key))
    if data.hf_dataset is not None:
        return _hf_stats(data)
    try:
        files = resolve_corpus(data)
    except Exception:  # noqa: BLE001 - the corpus's own error comes, as one line, when the data is prepared
        return None
    picked = files[:: max(1, len(files) // 8)][:8]
    per_file, texts = SAMPLE_BYTES // len(picked), []
    for path in picked:
        try:
            fmt = file_format(path)
            if fmt == "text":
                with open_bytes(path) as f:
                    texts.append(f.read(per_file).decode("utf-8", "ignore"))
                continue
            _take_text(iter_records(path, fmt, data.text_field, skip_bad=True), per_file, texts)
        except Exception:  # noqa: BLE001 - an unreadable file is the preparation's to report
            continue
    total = sum(p.stat().st_size for p in files)
    return text_stats("".join(texts), total) if texts else None


def _take_text(records: Any, limit: int, texts: list[str]) -> tuple[int, int, bool]:
    """Append the texts of ``records`` ((row, text or RecordError) pairs) to ``texts`` until ``limit``
    bytes are taken: (bytes taken, rows read, whether the records ran out first)."""
    got = rows = 0
    for _, text in records:
        rows += 1
        if isinstance(text, str):
            texts.append(text)
            got += len(text.encode("utf-8"))
        if got >= limit:
            return got, rows, False
    return got, rows, True


def _hf_stats(data: Any) -> CorpusStats | None:
    """CorpusStats of the training split of a local ``data.hf_dataset`` (a saved dataset or a folder of
    data files) from its first SAMPLE_BYTES of text. Its size: exact when the sample is the whole split,
    else rows x the sample's bytes per row (rows from a saved dataset or the metadata), else the split's
    file bytes (a folder's; compressed Parquet counts small, so its epoch cap comes early), else unknown.
    A hub dataset is not read here: this runs while the config resolves, in every process of a run,
    inside its time budget, and the answer must not change with the network (the tokenizer settings
    key the prepared data); it gets the defaults. None also when the dataset cannot be opened
    (preparation then says why, in one line)."""
    from minillm.data.hf_dataset import hf_splits

    try:
        split = hf_splits(data)[0]
        if split.kind == "hub":
            return None
        texts: list[str] = []
        got, rows, whole = _take_text(split.records(data.text_field, skip_bad=True), SAMPLE_BYTES, texts)
        if whole:
            return text_stats("".join(texts), got) if got else None
        total = split.rows()
        size = round(got / rows * total) if total is not None else split.file_bytes()
        return text_stats("".join(texts), size)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; preparation reports it in one line
        log.debug("the recipe could not read %s: %s", data.hf_dataset, e)
        return None


def corpus_stats(data: Any) -> CorpusStats | None:
    """CorpusStats of the corpus ``data`` (a DataConfig or its config node) names: files or a local
    Hugging Face dataset (its first SAMPLE_BYTES of text); None when it is not read here (a hub dataset)
    or cannot be (a missing file or dataset, reported later by preparation)."""
    keys = ("name", "path", "url", "sha256", "filename", "val_fraction", "val_path", "text_field", "hf_dataset",
            "hf_config", "hf_split", "hf_val_split")
    return _stats_of(tuple((k, getattr(data, k)) for k in keys))


def chars_for(stats: CorpusStats, coverage: float) -> int:
    """How many of the commonest characters cover ``coverage`` of the sample's characters."""
    total, running = sum(stats.counts), 0
    for k, n in enumerate(stats.counts, 1):
        running += n
        if running >= coverage * total:
            return k
    return stats.alphabet


def vocab_for(stats: CorpusStats | None) -> int:
    """tokenizer.vocab_size for a corpus: CJK_VOCAB for CJK text, else VOCAB, raised (to a multiple of
    64) until the characters covering MIN_COVERAGE of the text are at most CHAR_SHARE of the pieces."""
    if stats is None:
        return VOCAB
    vocab = CJK_VOCAB if stats.cjk_share > 0.3 else VOCAB
    need = 261 + chars_for(stats, MIN_COVERAGE) / CHAR_SHARE
    return max(vocab, 64 * math.ceil(need / 64))


def coverage_for(stats: CorpusStats | None, vocab: int) -> float:
    """tokenizer.character_coverage for ``vocab`` pieces: at most CHAR_SHARE of the pieces left after the
    4 specials, newline and 256 byte-fallback pieces are single characters (the rest are merges), the
    commonest characters; the rarer ones fall back to their UTF-8 bytes (sentencepiece's
    character_coverage: the share of character occurrences whose characters get a piece). Kept within
    [MIN_COVERAGE, 0.9995]: sentencepiece refuses a coverage below 0.98."""
    chars = int(CHAR_SHARE * (vocab - 261))
    if stats is None or stats.alphabet <= chars:
        return 1.0
    return min(0.9995, max(MIN_COVERAGE, math.floor(stats.coverage_of(chars) * 1e4) / 1e4))


def device_rate(device: str) -> float:
    """Sustained training FLOP/s of a small model on ``device`` (auto | cpu | cuda)."""
    import torch

    from minillm.flops import peak_flops

    if device != "cpu" and torch.cuda.is_available():
        return GPU_MFU * (peak_flops(torch.device("cuda"), True) or 100e12)
    return CPU_RATE_PER_THREAD * torch.get_num_threads()


def epoch_cap(stats: CorpusStats | None, data: Any, tokens_per_step: int) -> int | None:
    """train.max_steps that keeps a small corpus to MAX_EPOCHS passes over its training split (None: the
    corpus is unknown). Repeated data is worth almost as much as new for up to ~4 epochs and little
    after (Muennighoff et al., 2023, "Scaling Data-Constrained Language Models"); measured here: Vim's
    manual (180 KB) reached 2.152 bpb in a 49 s run and 2.710 in a 120 s one (~14 epochs). The
    split's tokens are estimated from its bytes at BYTES_PER_TOKEN (measured 2.2-2.5 for English and
    code at 1024 pieces, 4.1 for 红楼梦 at 4000); a compressed file counts at its compressed size, so
    its cap comes early."""
    if stats is None or stats.bytes is None:
        return None
    held_out = data.val_path is not None or data.hf_val_split is not None
    train_bytes = stats.bytes * (1.0 if held_out else 1.0 - data.val_fraction)
    per_token = BYTES_PER_TOKEN[1] if stats.cjk_share > 0.3 else BYTES_PER_TOKEN[0]
    return max(1, math.ceil(MAX_EPOCHS * train_bytes / per_token / tokens_per_step))


def n_params(n_layer: int, n_embd: int, vocab: int) -> int:
    """Parameters of a ladder shape: 12 d^2 per block (attention 4 d^2, SwiGLU MLP ~8 d^2) plus the
    tied embedding, V d."""
    return 12 * n_layer * n_embd ** 2 + vocab * n_embd


def muon_lr_for(steps: float) -> float:
    """Muon's peak lr for a run of about ``steps`` steps under the wsd schedule: MUON_LR at MUON_STEPS
    steps, scaled by sqrt(MUON_STEPS / steps) (a longer run takes smaller steps), within [0.008, 0.05]."""
    return round(min(0.05, max(0.008, MUON_LR * math.sqrt(MUON_STEPS / max(steps, 1.0)))), 4)


def model_for(train_flops: float, vocab: int) -> tuple:
    """The largest LADDER rung whose 6 N D cost, D = TOKENS_PER_PARAM x N, fits ``train_flops``."""
    chosen = LADDER[0]
    for rung in LADDER:
        if 6 * TOKENS_PER_PARAM * n_params(rung[0], rung[1], vocab) ** 2 <= train_flops:
            chosen = rung
    return chosen


def choose(root: Any, run_vocab: int | None = None) -> dict[str, Any]:
    """Every key the recipe decides, for the config ``root`` (a TrainJobConfig or its config node);
    the coverage for ``run_vocab`` pieces when given (the vocabulary the run has: the recipe's, or one
    the user set)."""
    budget = root.train.time_budget_s
    if not budget:
        return {}
    stats = corpus_stats(root.data)
    vocab = vocab_for(stats)
    train_flops = budget * TRAIN_SHARE * device_rate(root.device)
    n_layer, n_embd, n_head, block, batch = model_for(train_flops, vocab)
    cap = epoch_cap(stats, root.data, block * batch)
    steps = train_flops / (6 * n_params(n_layer, n_embd, vocab) * block * batch)  # expected, before measuring
    steps = steps if cap is None else min(steps, cap)
    coverage = coverage_for(stats, vocab if run_vocab is None else run_vocab)
    return {"model.name": "auto", "model.n_layer": n_layer, "model.n_embd": n_embd, "model.n_head": n_head,
            "model.block_size": block, "tokenizer.vocab_size": vocab, "tokenizer.character_coverage": coverage,
            "train.max_steps": cap, "train.batch_size": batch, "train.eval_interval": 0,
            "train.eval_tokens": EVAL_TOKENS,
            "optim.name": "muon", "optim.lr": 6e-3, "optim.muon_lr": muon_lr_for(steps), "optim.warmup_steps": 15,
            "optim.schedule": "wsd", "optim.fused": True}


_DEFAULTS = {f"{prefix}.{f.name}": f.default for prefix, cls in
             (("model", ModelConfig), ("tokenizer", TokenizerConfig), ("train", TrainConfig), ("optim", OptimConfig))
             for f in fields(cls)}


def resolve(key: str, *, _root_: Any) -> Any:
    """The OmegaConf resolver ``minillm.recipe``: the recipe's value of ``key``, or its schema default."""
    if key not in _DEFAULTS:
        raise KeyError(f"minillm.recipe: {key} is not a key the recipe chooses")
    run_vocab = _root_.tokenizer.vocab_size if key == "tokenizer.character_coverage" else None
    return choose(_root_, run_vocab).get(key, _DEFAULTS[key])


def describe(chosen: dict[str, Any], stats: CorpusStats | None, budget: float) -> str:
    """One log line: what the recipe chose and from what."""
    size = "size unknown" if stats is None or stats.bytes is None else f"{stats.bytes / 1e6:.2f} MB"
    seen = ("corpus not read: the defaults" if stats is None else
            f"corpus {size}, {stats.cjk_share:.0%} CJK, {stats.alphabet} distinct characters in "
            f"{stats.sample_chars:,} sampled")
    values = ", ".join(f"{k}={v}" for k, v in chosen.items())
    return f"time budget {budget:g} s ({seen}): {values}"
