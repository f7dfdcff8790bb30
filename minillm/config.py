"""Config schemas: the single source of truth for every key a run accepts.

The dataclasses here are registered in Hydra's ConfigStore by the entry points (train.py, sample.py);
the YAML files in configs/ only choose values. Each dataclass validates itself in ``__post_init__``,
so a config built from YAML (``OmegaConf.to_object``) and one built in Python are checked alike.
A bad value raises :class:`ConfigError`, whose message is one line naming the key and the value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from minillm.errors import ConfigError


def plain(cfg: Any) -> dict:
    """A config dataclass as a plain dict, as JSON reads it back (tuples as lists): how a checkpoint
    and config.json record it, so a saved config and the current one compare key by key."""
    import json
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg)))


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _finite(obj: Any, prefix: str) -> None:
    """Every float setting of ``obj`` is a finite number: inf and nan pass every range check below."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float):
            _check(math.isfinite(value), prefix + f.name, value, "must be a finite number")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, f"must be one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Shapes and options of the GPT (see minillm/model.py). Saved with every checkpoint."""
    name: str = "tiny"
    vocab_size: Optional[int] = None   # None: taken from the tokenizer at startup
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None    # None: = n_head (multi-head); 1: multi-query; else GQA
    n_embd: int = 128
    block_size: int = 256
    norm: str = "rmsnorm"              # layernorm | rmsnorm
    norm_eps: float = 1e-5
    pos: str = "rope"                  # learned | rope
    rope_theta: float = 10000.0
    mlp: str = "swiglu"                # gelu | swiglu
    mlp_hidden: Optional[int] = None   # None: 4*n_embd for gelu, 8/3*n_embd (rounded to 64) for swiglu
    gelu_approximate: str = "tanh"     # mlp=gelu: tanh (GPT-2) | none (exact erf, nanoGPT; ~3x cheaper on CPU)
    tie_embeddings: bool = True
    bias: bool = False
    qk_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _finite(self, "model.")
        p = "model."
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            _check(getattr(self, key) >= 1, p + key, getattr(self, key), "must be >= 1")
        if self.vocab_size is not None:
            _check(self.vocab_size >= 2, p + "vocab_size", self.vocab_size, "must be >= 2")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check(self.n_kv_head >= 1, p + "n_kv_head", self.n_kv_head, "must be >= 1")
        _check(self.n_embd % self.n_head == 0, p + "n_embd", self.n_embd,
               f"must be divisible by model.n_head={self.n_head}")
        _check(self.n_head % self.n_kv_head == 0, p + "n_head", self.n_head,
               f"must be divisible by model.n_kv_head={self.n_kv_head}")
        _choice(p + "norm", self.norm, ("layernorm", "rmsnorm"))
        _choice(p + "pos", self.pos, ("learned", "rope"))
        _choice(p + "mlp", self.mlp, ("gelu", "swiglu"))
        _choice(p + "gelu_approximate", self.gelu_approximate, ("tanh", "none"))
        if self.pos == "rope":
            _check(self.head_dim % 2 == 0, p + "n_embd", self.n_embd,
                   f"rope needs an even head dim, got n_embd/n_head={self.head_dim}")
            _check(self.rope_theta > 0, p + "rope_theta", self.rope_theta, "must be > 0")
        _check(self.norm_eps > 0, p + "norm_eps", self.norm_eps, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, p + "dropout", self.dropout, "must be in [0, 1)")
        if self.mlp_hidden is not None:
            _check(self.mlp_hidden >= 1, p + "mlp_hidden", self.mlp_hidden, "must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class DataConfig:
    """Where the corpus comes from. ``path`` wins over the named dataset (url/sha256/filename).

    ``path`` and ``val_path`` take a file, a folder (every non-hidden file under it, sorted) or a glob
    (``corpus/**/*.txt``); the format of each file is chosen by its extension (mixing is fine):
    a text file (any other extension) is one document; in ``.jsonl``/``.ndjson`` one JSON object per line,
    and in ``.parquet`` one row, is one document, its text in ``text_field`` (a dotted path such as
    ``meta.body`` reaches a nested field); ``.gz``, ``.bz2``, ``.xz`` and ``.zst`` versions of text and
    JSONL files are read decompressing on the fly. Empty documents are skipped (and counted).
    Documents are separated by eos in the token stream.

    Validation is ``val_path`` if set, else the last ``val_fraction`` of the corpus's text bytes (files
    in order): a text file is cut on a character boundary; a record file is cut between whole documents,
    the document holding the cut byte being the first of validation (so the last fraction of documents).

    ``hf_dataset`` reads a Hugging Face dataset instead of files (needs ``pip install -e ".[hf]"``): a
    folder written by ``save_to_disk``, a local dataset folder ``datasets.load_dataset`` reads (parquet,
    jsonl, ... files), or a hub name (streamed; needs the network). Each row is one document, its text in
    ``text_field``. ``hf_split`` is the training split (default ``train``; a saved single Dataset is used
    whole), ``hf_config`` the configuration name, and validation is ``hf_val_split``, else ``val_path``,
    else the last ``val_fraction`` of the split's text bytes (between whole rows).
    """
    name: str = "shakespeare"
    path: Optional[str] = None
    url: Optional[str] = None          # download source of a named dataset
    sha256: Optional[str] = None       # its checksum; a mismatch is an error
    filename: Optional[str] = None     # its file name in the cache folder
    val_fraction: float = 0.1          # the last fraction of the corpus text bytes is validation
    val_path: Optional[str] = None     # validation text (file, folder or glob); wins over val_fraction
    skip_invalid: bool = False         # skip files that are not UTF-8 text (or are binary or damaged), and bad
                                       # JSONL/Parquet records (counted per file), instead of failing
    num_workers: int = 0               # encoding processes; 0: one per CPU core, 1: in-process
    text_field: str = "text"           # JSONL field / Parquet column / HF column holding a document's text (dotted: nested)
    hf_dataset: Optional[str] = None   # a Hugging Face dataset: save_to_disk folder, local dataset folder or hub name
    hf_config: Optional[str] = None    # its configuration name (load_dataset's name=)
    hf_split: Optional[str] = None     # the training split; None: train (a saved single Dataset: all of it)
    hf_val_split: Optional[str] = None # the validation split; None: data.val_path, else data.val_fraction

    def __post_init__(self) -> None:
        _finite(self, "data.")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(self.path is None or str(self.path).strip() != "", "data.path", self.path,
               "is empty; give a file, folder or glob (or leave it unset for the named dataset)")
        _check(self.val_path is None or str(self.val_path).strip() != "", "data.val_path", self.val_path,
               "is empty; give a file, folder or glob, or leave it unset to use data.val_fraction")
        _check(isinstance(self.skip_invalid, bool), "data.skip_invalid", self.skip_invalid, "must be true or false")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "data.num_workers", self.num_workers,
               "must be >= 0 (0: one per CPU core)")
        _check(isinstance(self.text_field, str) and all(self.text_field.split(".")), "data.text_field",
               self.text_field, "must be a field name, or a dotted path such as meta.text")
        self._check_hf()

    def _check_hf(self) -> None:
        for key in ("hf_dataset", "hf_config", "hf_split", "hf_val_split"):
            value = getattr(self, key)
            _check(value is None or str(value).strip() != "", "data." + key, value, "is empty; give a value or leave it unset")
            if key != "hf_dataset" and value is not None:
                _check(self.hf_dataset is not None, "data." + key, value, "applies only with data.hf_dataset; set data.hf_dataset or drop this key")
        if self.hf_dataset is None:
            return
        _check(self.path is None, "data.hf_dataset", self.hf_dataset,
               f"conflicts with data.path={self.path}; give the corpus one way (files or a Hugging Face dataset)")
        _check(self.hf_val_split is None or self.val_path is None, "data.hf_val_split", self.hf_val_split,
               f"conflicts with data.val_path={self.val_path}; give validation one way")
        _check(self.hf_val_split is None or self.hf_val_split != (self.hf_split or "train"), "data.hf_val_split",
               self.hf_val_split, "is the training split too; choose another split, or unset it to use data.val_fraction")


@dataclass
class TokenizerConfig:
    """sentencepiece training settings (see minillm/tokenizer.py), or ``path``: an existing sentencepiece
    model (e.g. from ``python -m minillm.train_tokenizer``) used as it is, the other keys then unused."""
    model_type: str = "bpe"            # bpe | unigram | char
    vocab_size: int = 1024
    character_coverage: float = 1.0    # 1.0 for small alphabets, ~0.9995 for CJK
    byte_fallback: bool = True         # unknown characters become UTF-8 bytes: lossless
    split_digits: bool = True
    max_sentence_length: int = 1 << 16 # bytes; longer lines are cut into pieces for training
    input_sentence_size: int = 2_000_000  # lines sampled for training; bounds memory on big corpora
    num_threads: int = 2
    path: Optional[str] = None         # an existing sentencepiece .model to use instead of training one

    def __post_init__(self) -> None:
        _finite(self, "tokenizer.")
        _check(self.path is None or str(self.path).strip() != "", "tokenizer.path", self.path,
               "is empty; give a sentencepiece .model file, or leave it unset to train one")
        _choice("tokenizer.model_type", self.model_type, ("bpe", "unigram", "char"))
        # 4 specials (<unk> <s> </s> <pad>) + "\n" + 256 byte-fallback pieces, and room for one more.
        floor = 4 + 1 + (256 if self.byte_fallback else 0) + 1
        _check(self.vocab_size >= floor, "tokenizer.vocab_size", self.vocab_size,
               f"must be >= {floor} (4 specials + newline{' + 256 byte-fallback pieces' if self.byte_fallback else ''}"
               " + 1); raise it")
        _check(self.vocab_size <= 1 << 31, "tokenizer.vocab_size", self.vocab_size, "is too large")
        _check(0.0 < self.character_coverage <= 1.0, "tokenizer.character_coverage",
               self.character_coverage, "must be in (0, 1]")
        _check(self.max_sentence_length >= 1024, "tokenizer.max_sentence_length",
               self.max_sentence_length, "must be >= 1024")
        _check(self.input_sentence_size > 100, "tokenizer.input_sentence_size",
               self.input_sentence_size, "must be > 100 (sentencepiece samples at least 101 lines)")
        _check(self.num_threads >= 1, "tokenizer.num_threads", self.num_threads, "must be >= 1")


@dataclass
class OptimConfig:
    """AdamW (or Muon + AdamW) with warmup then cosine decay to ``min_lr_ratio * lr``."""
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1          # on matrices (linear and embedding weights); norms and biases get 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    schedule: str = "cosine"           # cosine | linear | wsd | constant (after warmup; minillm/optimizer.py)
    decay_fraction: float = 0.3        # schedule=wsd: the last fraction of steps, decaying linearly
    grad_clip: float = 1.0             # 0 disables clipping
    fused: Optional[bool] = None       # AdamW's fused kernel; None: on CUDA only (true works on CPU too)
    # optim.name=muon: Muon (torch.optim.Muon) for the blocks' 2-D weights, AdamW for everything else
    muon_lr: float = 0.02              # Muon's peak lr; the schedule scales it like lr
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5             # Newton-Schulz iterations

    def __post_init__(self) -> None:
        _finite(self, "optim.")
        _choice("optim.name", self.name, ("adamw", "muon"))
        _check(self.muon_lr >= 0, "optim.muon_lr", self.muon_lr, "must be >= 0")
        _check(0.0 <= self.muon_momentum < 1.0, "optim.muon_momentum", self.muon_momentum, "must be in [0, 1)")
        _check(self.muon_ns_steps >= 1, "optim.muon_ns_steps", self.muon_ns_steps, "must be >= 1")
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "wsd", "constant"))
        _check(0.0 < self.decay_fraction <= 1.0, "optim.decay_fraction", self.decay_fraction, "must be in (0, 1]")
        _check(self.lr >= 0, "optim.lr", self.lr, "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(0.0 <= self.beta1 < 1.0, "optim.beta1", self.beta1, "must be in [0, 1)")
        _check(0.0 <= self.beta2 < 1.0, "optim.beta2", self.beta2, "must be in [0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")


@dataclass
class TrainConfig:
    """The loop: how long, how big a batch, how often to evaluate and checkpoint."""
    max_steps: Optional[int] = 300     # None: planned from time_budget_s (which must then be set)
    time_budget_s: Optional[float] = None  # seconds from process start to the end of the final evaluation:
                                       # max_steps is planned to fit (minillm/time_budget.py), at most
                                       # max_steps when that is set too; sizes from the recipe (minillm/recipe.py)
    batch_size: int = 16               # sequences per micro-batch per process
    grad_accum_steps: int = 1
    eval_interval: int = 50            # also evaluates after the last step; 0: only at the end
    eval_tokens: Optional[int] = None  # validation tokens per evaluation; None: the whole split
    log_interval: int = 10
    ckpt_interval: Optional[int] = None  # None: at every evaluation and at the end
    keep_last: int = 2                 # checkpoints kept in the run folder
    resume: str = "auto"               # auto | never | PATH (a checkpoint file or run folder)
    compile: bool = False
    dtype: str = "auto"                # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    nan_policy: str = "skip"           # a NaN/inf loss or grad norm: skip the update | stop the run
    max_skipped_steps: int = 10        # more skipped non-finite steps than this stops the run
    spike_zscore: float = 0.0          # skip updates whose loss or grad norm z-score exceeds this; 0: off
    spike_window: int = 100            # steps of history for the z-score
    profile_interval: int = 50         # time forward/backward/optimizer every N steps; 0: never
    global_batch_tokens: Optional[int] = None  # if set, grad_accum_steps = this / (batch_size*block_size*world)
    dist_timeout_s: float = 600.0      # a collective that waits longer than this fails instead of hanging
    parallel: str = "ddp"              # with several processes: ddp (replicated) | fsdp (FSDP2, sharded)
    allow_changes: bool = False        # resume although training settings differ from the checkpoint's (logged)
    init_from: Optional[str] = None    # fine-tune: start from this run folder's (or checkpoint's) weights
                                       # and tokenizer, with a fresh optimizer and schedule

    def uses_bf16(self, device_type: str) -> bool:
        """Whether training computes in bf16 on this device type (dtype auto: on CUDA only)."""
        return self.dtype == "bfloat16" or (self.dtype == "auto" and device_type == "cuda")

    def __post_init__(self) -> None:
        _finite(self, "train.")
        p = "train."
        for key in ("batch_size", "grad_accum_steps", "log_interval"):
            _check(getattr(self, key) >= 1, p + key, getattr(self, key), "must be >= 1")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, p + "max_steps", self.max_steps, "must be >= 1 (or null with train.time_budget_s)")
        if self.time_budget_s is not None:
            _check(self.time_budget_s > 0, p + "time_budget_s", self.time_budget_s, "must be > 0 seconds (or null)")
        _check(self.max_steps is not None or self.time_budget_s is not None, p + "max_steps", None,
               "is null, so the run's length must come from train.time_budget_s; set one of them")
        _check(self.eval_interval >= 0, p + "eval_interval", self.eval_interval, "must be >= 0")
        if self.eval_tokens is not None:
            _check(self.eval_tokens >= 1, p + "eval_tokens", self.eval_tokens, "must be >= 1 (or null for all)")
        if self.ckpt_interval is not None:
            _check(self.ckpt_interval >= 1, p + "ckpt_interval", self.ckpt_interval, "must be >= 1")
        _check(self.resume != "", p + "resume", self.resume, "must be auto, never or a checkpoint path")
        _choice(p + "dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _check(self.keep_last >= 2, p + "keep_last", self.keep_last,
               "must be >= 2 so a complete checkpoint survives a crash during the next save")
        _choice(p + "nan_policy", self.nan_policy, ("skip", "stop"))
        _check(self.max_skipped_steps >= 0, p + "max_skipped_steps", self.max_skipped_steps, "must be >= 0")
        _check(self.spike_zscore >= 0, p + "spike_zscore", self.spike_zscore, "must be >= 0 (0 disables)")
        _check(self.spike_window >= 2, p + "spike_window", self.spike_window, "must be >= 2")
        _check(self.profile_interval >= 0, p + "profile_interval", self.profile_interval, "must be >= 0")
        if self.global_batch_tokens is not None:
            _check(self.global_batch_tokens >= 1, p + "global_batch_tokens", self.global_batch_tokens, "must be >= 1")
        _check(self.dist_timeout_s > 0, p + "dist_timeout_s", self.dist_timeout_s, "must be > 0")
        _choice(p + "parallel", self.parallel, ("ddp", "fsdp"))
        _check(self.init_from != "", p + "init_from", self.init_from, "must name a run folder or checkpoint")


@dataclass
class WandbConfig:
    mode: str = "disabled"             # disabled | offline | online
    project: str = "minillm"
    name: Optional[str] = None         # None: the run folder's name
    tags: list[str] = field(default_factory=list)
    log_checkpoint: bool = False       # upload the final checkpoint as a wandb artifact

    def __post_init__(self) -> None:
        _finite(self, "logger.wandb.")
        _choice("logger.wandb.mode", self.mode, ("disabled", "offline", "online"))


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True              # tqdm progress bars (training, data) when stderr is a terminal


_DEVICES = ("auto", "cpu", "cuda")
_KERNELS = ("auto", "torch", "triton")


@dataclass
class TrainJobConfig:
    """Everything ``python train.py`` accepts (configs/train.yaml)."""
    out_dir: str = "out/run"
    device: str = "auto"               # auto | cpu | cuda
    seed: int = 1337
    kernels: str = "auto"              # auto (Triton on CUDA when it imports) | torch | triton
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _finite(self, "")
        _check(self.out_dir.strip() != "", "out_dir", self.out_dir, "must name a folder")
        _choice("device", self.device, _DEVICES)
        _choice("kernels", self.kernels, _KERNELS)
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")


@dataclass
class SampleJobConfig:
    """Everything ``python sample.py`` accepts (configs/sample.yaml)."""
    ckpt: Optional[str] = None         # run folder or checkpoint file; None: newest run under out/
    out_root: str = "out"              # where to look for the newest run
    prompt: Optional[str] = None       # None: start a fresh document
    prompt_file: Optional[str] = None  # prompts separated by blank lines
    interactive: bool = False          # read prompts from stdin, one per line, until EOF
    max_new_tokens: int = 256
    temperature: float = 0.8           # 0 = greedy
    top_k: int = 200                   # 0 disables
    top_p: float = 1.0                 # nucleus sampling; 1.0 disables
    repetition_penalty: float = 1.0    # CTRL's penalty on tokens already present; 1.0 disables
    stop: List[str] = field(default_factory=list)  # end a sample before any of these ("\n" = newline)
    seed: int = 1337                   # sample j of every prompt draws from seed + j
    num_samples: int = 1               # per prompt
    batch_size: int = 32               # rows (prompt x sample) generated together; bounds KV cache memory
    kv_cache: bool = True
    stream: bool = True                # print text as it is generated (first sample)
    device: str = "auto"
    kernels: str = "auto"
    dtype: str = "float32"             # float32 | bfloat16

    def __post_init__(self) -> None:
        _finite(self, "")
        _check(self.prompt is None or self.prompt != "", "prompt", self.prompt,
               "is empty; give some text, or leave prompt unset to start a fresh document")
        given = [k for k in ("prompt", "prompt_file", "interactive") if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            _check(False, given[1], getattr(self, given[1]),
                   f"conflicts with {given[0]}; give prompts one way: prompt, prompt_file or interactive")
        _check(self.prompt_file is None or self.prompt_file != "", "prompt_file", self.prompt_file, "is empty")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 = greedy)")
        _check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 disables)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty,
               "must be > 0 (1.0 disables, > 1 discourages repeats)")
        for s in self.stop:
            _check(s != "", "stop", list(self.stop), "holds an empty string, which would stop at once")
        _check(self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")
        _choice("device", self.device, _DEVICES)
        _choice("kernels", self.kernels, _KERNELS)
        _choice("dtype", self.dtype, ("float32", "bfloat16"))
