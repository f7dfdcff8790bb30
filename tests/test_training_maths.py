"""The training maths, pinned against hand-computed references: lr schedule, bits per byte, accumulation."""
import contextlib
import math

import numpy as np
import pytest
import torch

from minillm.config import ModelConfig, OptimConfig
from minillm.distributed.process_group import DistInfo
from minillm.model import GPT
from minillm.evaluation import evaluate
from minillm.optimizer import lr_at

# ---------------------------------------------------------------- learning-rate schedule
# Documented: step is 0-based (the lr of the update of step index `step`); linear warmup
# lr * (step + 1) / warmup over steps 0..warmup-1, then decay from lr to min_lr_ratio * lr over
# max_steps - warmup steps (frac = (step - warmup) / (max_steps - warmup), capped at 1).

LR, WARMUP, MAX_STEPS, MIN_RATIO = 3e-3, 10, 110, 0.1   # decay spans 100 steps


def opt(schedule: str, warmup: int = WARMUP, min_lr_ratio: float = MIN_RATIO) -> OptimConfig:
    return OptimConfig(lr=LR, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio)


def cosine(frac: float) -> float:
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * frac)))


def linear(frac: float) -> float:
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 - frac))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_lr_over_warmup_and_reaches_lr_on_its_last_step(schedule):
    """Warmup: step 0 gets lr/warmup, step warmup-1 gets lr, step warmup (first decay step) gets lr."""
    cfg = opt(schedule)
    assert lr_at(0, cfg, MAX_STEPS) == pytest.approx(LR * 1 / 10, rel=1e-12)
    assert lr_at(4, cfg, MAX_STEPS) == pytest.approx(LR * 5 / 10, rel=1e-12)
    assert lr_at(WARMUP - 1, cfg, MAX_STEPS) == pytest.approx(LR, rel=1e-12)
    assert lr_at(WARMUP, cfg, MAX_STEPS) == pytest.approx(LR, rel=1e-12)


def test_cosine_decay_values():
    """Cosine: lr * (r + (1 - r) * (1 + cos(pi * frac)) / 2), reaching min_lr_ratio * lr at max_steps."""
    cfg = opt("cosine")
    assert lr_at(WARMUP + 1, cfg, MAX_STEPS) == pytest.approx(cosine(1 / 100), rel=1e-12)
    assert lr_at(WARMUP + 25, cfg, MAX_STEPS) == pytest.approx(cosine(0.25), rel=1e-12)
    assert lr_at(WARMUP + 50, cfg, MAX_STEPS) == pytest.approx(LR * (0.1 + 0.9 * 0.5), rel=1e-12)  # midpoint
    assert lr_at(MAX_STEPS - 1, cfg, MAX_STEPS) == pytest.approx(cosine(99 / 100), rel=1e-12)  # last update
    assert lr_at(MAX_STEPS, cfg, MAX_STEPS) == pytest.approx(LR * MIN_RATIO, rel=1e-12)
    assert lr_at(MAX_STEPS + 50, cfg, MAX_STEPS) == pytest.approx(LR * MIN_RATIO, rel=1e-12)  # stays at min


def test_linear_decay_values():
    """Linear: lr * (r + (1 - r) * (1 - frac)), reaching min_lr_ratio * lr at max_steps."""
    cfg = opt("linear")
    assert lr_at(WARMUP + 25, cfg, MAX_STEPS) == pytest.approx(LR * (0.1 + 0.9 * 0.75), rel=1e-12)
    assert lr_at(WARMUP + 50, cfg, MAX_STEPS) == pytest.approx(LR * (0.1 + 0.9 * 0.5), rel=1e-12)
    assert lr_at(MAX_STEPS - 1, cfg, MAX_STEPS) == pytest.approx(linear(99 / 100), rel=1e-12)
    assert lr_at(MAX_STEPS, cfg, MAX_STEPS) == pytest.approx(LR * MIN_RATIO, rel=1e-12)
    assert lr_at(MAX_STEPS + 50, cfg, MAX_STEPS) == pytest.approx(LR * MIN_RATIO, rel=1e-12)


def test_constant_schedule_holds_lr_after_warmup():
    """Constant: lr from step warmup on, through and past max_steps (min_lr_ratio does not apply)."""
    cfg = opt("constant")
    for step in (WARMUP, WARMUP + 50, MAX_STEPS - 1, MAX_STEPS, MAX_STEPS + 50):
        assert lr_at(step, cfg, MAX_STEPS) == pytest.approx(LR, rel=1e-12)


def test_zero_warmup_starts_decay_at_step_zero():
    """warmup_steps=0: step 0 gets the full lr and decay spans all max_steps steps."""
    cos, lin, const = opt("cosine", warmup=0), opt("linear", warmup=0), opt("constant", warmup=0)
    assert lr_at(0, cos, 100) == pytest.approx(LR, rel=1e-12)
    assert lr_at(0, lin, 100) == pytest.approx(LR, rel=1e-12)
    assert lr_at(0, const, 100) == pytest.approx(LR, rel=1e-12)
    assert lr_at(25, cos, 100) == pytest.approx(cosine(0.25), rel=1e-12)
    assert lr_at(50, lin, 100) == pytest.approx(linear(0.5), rel=1e-12)
    assert lr_at(99, cos, 100) == pytest.approx(cosine(0.99), rel=1e-12)
    assert lr_at(100, cos, 100) == pytest.approx(LR * MIN_RATIO, rel=1e-12)
    assert lr_at(100, lin, 100) == pytest.approx(LR * MIN_RATIO, rel=1e-12)
    assert lr_at(100, const, 100) == pytest.approx(LR, rel=1e-12)


def test_min_lr_ratio_sets_the_floor():
    """The decay ends at min_lr_ratio * lr for any ratio (0 decays to zero, 1 never decays)."""
    for ratio in (0.0, 0.37, 1.0):
        cfg = opt("cosine", min_lr_ratio=ratio)
        assert lr_at(MAX_STEPS, cfg, MAX_STEPS) == pytest.approx(LR * ratio, rel=1e-12, abs=1e-18)
        assert lr_at(WARMUP + 50, cfg, MAX_STEPS) == pytest.approx(LR * (ratio + (1 - ratio) * 0.5), rel=1e-12)


# ---------------------------------------------------------------- bits per byte

# Token 7 opens the stream and appears nowhere else; it covers 40 bytes, so the bytes of the inputs
# and the bytes of the targets differ by 40 - bytes(last token). The last table entry (index -1)
# covers 1000 bytes: indexing the table with a padded target (-1) would count it.
TOKEN_BYTES = torch.tensor([3, 1, 2, 5, 4, 6, 2, 40, 1000], dtype=torch.int64)
STREAM = np.array([7, 1, 2, 3, 4, 5, 6, 1, 3, 5, 2, 4, 6, 0, 3], dtype=np.uint16)  # 15 tokens, 14 targets


class KnownNats(torch.nn.Module):
    """Stands in for GPT: model(x, y, reduction="none") -> (logits, nats (B, T)), 0 where y == -1."""

    def forward(self, x, y, reduction="mean"):
        assert reduction == "none"
        nats = 0.25 + 0.5 * y.double() + 0.125 * x.double()   # depends on input and target
        nats = torch.where(y >= 0, nats, torch.zeros_like(nats)).float()
        return torch.zeros(*y.shape, 9), nats


@pytest.mark.parametrize("batch_size,block_size,max_tokens", [(2, 4, None), (1, 5, None), (3, 4, 9), (8, 32, None)])
def test_evaluate_reports_nats_per_target_and_bits_per_target_byte(batch_size, block_size, max_tokens):
    """loss = mean nats over real targets; bpb = sum nats / ln 2 / sum of the targets' bytes (padding excluded)."""
    n = len(STREAM) if max_tokens is None else max_tokens + 1
    x = torch.from_numpy(STREAM[:n - 1].astype(np.int64))
    y = torch.from_numpy(STREAM[1:n].astype(np.int64))
    assert len(y) % block_size != 0 or max_tokens  # the last window is padded
    nats = (0.25 + 0.5 * y.double() + 0.125 * x.double()).float().double()  # as the stub returns them
    want_loss = nats.sum().item() / len(y)
    want_bpb = nats.sum().item() / math.log(2) / TOKEN_BYTES[y].sum().item()
    assert TOKEN_BYTES[x].sum() != TOKEN_BYTES[y].sum()   # inputs' bytes would give another answer

    model = KnownNats()
    loss, bpb = evaluate(model, STREAM, TOKEN_BYTES, batch_size, block_size, max_tokens, DistInfo(),
                         contextlib.nullcontext())
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert bpb == pytest.approx(want_bpb, rel=1e-12)
    assert model.training  # evaluate puts the model back in training mode


def test_evaluate_with_a_real_model_matches_the_log_softmax_reference():
    """evaluate on a tiny GPT equals -log_softmax over each window's targets, counted once each."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=9, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, block_size=4))
    block = 4
    nats_sum, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(STREAM) - 1, block):
            chunk = torch.from_numpy(STREAM[s:s + block + 1].astype(np.int64))
            logits, _ = model(chunk[None, :-1])
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            nats_sum -= logp.gather(-1, chunk[1:, None]).sum().item()
            count += len(chunk) - 1
    model.train()
    y = torch.from_numpy(STREAM[1:].astype(np.int64))
    loss, bpb = evaluate(model, STREAM, TOKEN_BYTES, 2, block, None, DistInfo(), contextlib.nullcontext())
    assert count == len(y) == 14
    assert loss == pytest.approx(nats_sum / count, rel=1e-5)
    assert bpb == pytest.approx(nats_sum / math.log(2) / TOKEN_BYTES[y].sum().item(), rel=1e-5)


# ---------------------------------------------------------------- gradient accumulation and clipping
# Trainer.train_step (minillm/trainer.py) backpropagates loss / accum for each of accum micro-batches, then clips
# the total gradient norm over the raw model's parameters. What that relies on from the model:

def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**dict(vocab_size=31, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                                     block_size=8), **kw}))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_accumulated_micro_batch_means_equal_the_full_batch_gradient():
    """Sum over accum micro-batches of grad(loss / accum) == grad of the full batch's mean loss."""
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 31, (8, 8), generator=g), torch.randint(0, 31, (8, 8), generator=g)
    _, full = model(x, y)
    full.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    accum, losses = 4, []
    for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
        _, loss = model(xm, ym)
        (loss / accum).backward()
        losses.append(loss.item())
    assert sum(losses) / accum == pytest.approx(full.item(), rel=1e-6)
    got = grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def test_clipping_scales_the_total_norm_over_unique_parameters():
    """The total grad norm counts a tied embedding once; clipping to c leaves the norm c, direction kept."""
    model = tiny_gpt(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 31, (4, 8), generator=g), torch.randint(0, 31, (4, 8), generator=g)
    _, loss = model(x, y)
    (loss * 100).backward()   # large enough that clipping to 1 bites
    before = grads(model)
    total = math.sqrt(sum(v.double().pow(2).sum().item() for v in before.values()))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert norm.item() == pytest.approx(total, rel=1e-5) and total > 1.0   # reported norm is before clipping
    after = grads(model)
    assert math.sqrt(sum(v.double().pow(2).sum().item() for v in after.values())) == pytest.approx(1.0, rel=1e-4)
    for name in before:
        torch.testing.assert_close(after[name], before[name] / total, rtol=1e-4, atol=1e-8, msg=name)
