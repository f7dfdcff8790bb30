"""Sampling speed: tokens/s with and without the KV cache, batch 1 and 8.

    python benchmarks/bench_sample.py                # 16-token prompt, 256 new tokens, 256-context model
    python benchmarks/bench_sample.py --quick        # tiny model, 32 new tokens (seconds); used by the tests

The model is random (speed does not depend on the weights): 4 layers, n_embd 256, 4 heads, 2 kv heads,
rope, vocab 2048, block_size 256. 16 + 256 tokens pass block_size, so the cached run refills its
window once and the uncached run slides for the last 16 steps: what a user sees. tokens/s counts
new tokens of every row (batch x max_new_tokens) over the wall time of the whole generation,
prefill included. Goal (CPU): the cache is >= 5x faster than no cache at 256 new tokens.

Rows that end early (a stop string, EOS) leave the batch. The "staggered" rows measure that at the
largest batch B, with the cache: row b ends after (b + 1)/B of the new tokens, once with the ended
rows leaving (what the Engine does: here each row has its own max_new_tokens) and once kept in the
batch until the last one ends (every row runs all the new tokens; only (b + 1)/B of them are counted).
    python benchmarks/bench_sample.py --threads 1   # steadier on a shared CPU (see --help)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bar_png, environment, print_table, timeit, write_results  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.generation import Engine, Row, SamplingParams  # noqa: E402
from minillm.model import GPT  # noqa: E402

FULL = dict(model=dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, block_size=256, vocab_size=2048),
            prompt_len=16, new_tokens=256, batches=(1, 8))
QUICK = dict(model=dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=64, vocab_size=256),
             prompt_len=16, new_tokens=32, batches=(1, 2))


def run_once(model: GPT, prompts: list[list[int]], new_tokens: int, kv_cache: bool,
             ends: list[int] | None = None, leave: bool = False) -> None:
    """Generate; with ``ends`` and ``leave``, row b ends after ends[b] tokens and leaves the batch."""
    limits = ends if leave else [None] * len(prompts)
    rows = [Row(p, seed=i, max_new_tokens=n) for i, (p, n) in enumerate(zip(prompts, limits))]
    for _ in Engine(model).generate(rows, new_tokens, SamplingParams(temperature=1.0, top_k=50), kv_cache=kv_cache):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, seconds on CPU")
    ap.add_argument("--out-dir", type=Path, default=None, help="where to write bench_sample.json")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a shared, oversubscribed CPU, 1 thread keeps "
                         "the many small ops of a decode step from waiting on each other")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT(ModelConfig(**setup["model"])).to(device).eval()
    rows = []
    for batch in setup["batches"]:
        prompts = torch.randint(0, setup["model"]["vocab_size"], (batch, setup["prompt_len"])).tolist()
        ms = {}
        for kv_cache in (True, False):
            reps = 3 if kv_cache or args.quick else 1  # the uncached full run takes tens of seconds
            ms[kv_cache] = timeit(lambda: run_once(model, prompts, setup["new_tokens"], kv_cache),
                                  warmup=1, reps=reps, device=device)
            rows.append({"batch": batch, "kv_cache": kv_cache, "new_tokens": setup["new_tokens"],
                         "ms": ms[kv_cache], "tokens_per_s": batch * setup["new_tokens"] / ms[kv_cache] * 1e3})
        rows[-2]["speedup_vs_no_cache"] = rows[-1]["speedup_vs_no_cache"] = ms[False] / ms[True]
    B, n = max(setup["batches"]), setup["new_tokens"]
    ends = [n * (b + 1) // B for b in range(B)]
    prompts = torch.randint(0, setup["model"]["vocab_size"], (B, setup["prompt_len"])).tolist()
    ms = {leave: timeit(lambda: run_once(model, prompts, n, True, ends, leave), warmup=1, reps=3, device=device)
          for leave in (False, True)}
    for leave in (False, True):
        rows.append({"batch": B, "kv_cache": True, "new_tokens": n, "rows_end": "staggered, " + ("leave" if leave else "kept"),
                     "ms": ms[leave], "tokens_per_s": sum(ends) / ms[leave] * 1e3, "speedup_vs_kept": ms[False] / ms[leave]})
    print_table(rows, ["batch", "kv_cache", "new_tokens", "rows_end", "ms", "tokens_per_s", "speedup_vs_no_cache",
                       "speedup_vs_kept"])
    write_results("bench_sample", rows, {"setup": setup, "quick": args.quick, "device": device,
                                         "threads": torch.get_num_threads(),
                                         "environment_summary": environment()["device"]}, out_dir=args.out_dir)
    bar_png("bench_sample", [f"B={r['batch']} {'cache' if r['kv_cache'] else 'no cache'}"
                             + (f" {r['rows_end']}" if "rows_end" in r else "") for r in rows],
            [r["tokens_per_s"] for r in rows], "new tokens / s",
            f"sampling {setup['new_tokens']} tokens after a {setup['prompt_len']}-token prompt", args.out_dir)


if __name__ == "__main__":
    main()
