"""Tokenizer training and shard encoding: time, bytes per token, and encoding throughput vs workers.

    python benchmarks/bench_tokenizer.py              # tinyshakespeare x ~50 MB; shakespeare + hongloumeng
    python benchmarks/bench_tokenizer.py --quick      # a small generated corpus, a few seconds

Encoding: a bpe tokenizer (vocab 1024, the default config) trained on tinyshakespeare encodes
tinyshakespeare repeated to ``--size-mb`` into a token file through ``minillm.data.encode.encode_segments``
(the path ``prepare`` uses), with 1 worker (in-process) and 2 worker processes. MB/s counts corpus
bytes; each setting is timed ``--reps`` times, interleaved, and the median reported. Also recorded:
CPU seconds used (this process and its workers), hence the cores the run actually got, and the load
average: the machine may be shared, and the ratio means little when other work holds the cores.

Training: bpe, unigram and char on tinyshakespeare (vocab 1024, coverage 1.0) and hongloumeng
(vocab 8000, coverage 0.9995), the last 10% of the bytes held out for bytes/token and the byte-fallback
share. char's vocabulary is the size its alphabet allows (sentencepiece's own limit).
Goal: 2 workers >= 1.7x one.
"""
from __future__ import annotations

import os
import re
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bar_png, bench_parser, print_table, timeit, write_results  # noqa: E402
from minillm.config import TokenizerConfig  # noqa: E402
from minillm.data.corpus import Segment  # noqa: E402
from minillm.data.encode import encode_segments  # noqa: E402
from minillm.data.token_file import TokenWriter  # noqa: E402
from minillm.errors import TokenizerError  # noqa: E402
from minillm.tokenizer import train_tokenizer  # noqa: E402
from minillm.train_tokenizer import train_on_files  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def generated_corpus(n_bytes: int) -> str:
    import random
    rng = random.Random(0)
    words = ("the king queen lord good night day love death sweet fair heart sword crown blood my thy thou "
             "art hath doth shall will not and but with what where when o 红楼 梦 😀").split()
    out, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "\n"
        out.append(line)
        size += len(line.encode())
    return "".join(out)


def find(name: str) -> Path | None:
    for d in (SHARED, Path(os.environ.get("MINILLM_DATA_DIR") or Path.home() / ".cache" / "minillm")):
        if (d / name).is_file():
            return d / name
    return None


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool's workers, once it is closed)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_encoding(base: str, size_mb: float, workers: list[int], reps: int, chunk: int, tmp: Path,
                   vocab: int = 1024) -> list[dict]:
    """Runs interleave the worker counts (1, 2, 1, 2, ...) so both see the same background load."""
    tok = train_tokenizer([base], TokenizerConfig(vocab_size=vocab))
    corpus = tmp / "big.txt"
    raw = base.encode()
    with open(corpus, "wb") as f:
        for _ in range(max(1, round(size_mb * 1e6 / len(raw)))):
            f.write(raw)
    seg = Segment(corpus, 0, corpus.stat().st_size)
    runs: dict[int, list] = {w: [] for w in workers}
    for _ in range(reps):
        for w in workers:
            def run() -> None:
                with TokenWriter(tmp / f"out{w}.bin", tok.vocab_size) as wr:
                    encode_segments(tok, [seg], wr, num_workers=w, chunk_bytes=chunk)
            load, cpu0 = os.getloadavg()[0], cpu_seconds()
            ms = timeit(run, warmup=0, reps=1)
            runs[w].append((ms / 1e3, cpu_seconds() - cpu0, load))
    rows = []
    for w in workers:
        wall = statistics.median(r[0] for r in runs[w])
        cpu = statistics.median(r[1] for r in runs[w])
        rows.append({"bench": "encode", "workers": w, "MB": round(seg.size / 1e6, 2), "s": wall,
                     "MB/s": seg.size / 1e6 / wall, "cpu_s": cpu, "cores_used": cpu / wall,
                     "load1": statistics.median(r[2] for r in runs[w]), "runs_s": [round(r[0], 3) for r in runs[w]]})
    for r in rows:
        r["speedup"] = r["MB/s"] / rows[0]["MB/s"]
    return rows


def train_one(path: Path, model_type: str, vocab: int, coverage: float) -> dict:
    cfg = dict(model_type=model_type, vocab_size=vocab, character_coverage=coverage)
    while True:
        try:
            tok, rep = train_on_files([str(path)], TokenizerConfig(**cfg), num_workers=1)
            break
        except TokenizerError as e:  # char: the alphabet decides the size; take sentencepiece's limit
            m = re.search(r"at most (\d+)", str(e))
            if not m or int(m.group(1)) >= cfg["vocab_size"]:
                raise
            cfg["vocab_size"] = int(m.group(1))
    return {"bench": "train", "corpus": path.name, "model": model_type, "vocab": rep.vocab_size,
            "train_s": rep.train_seconds, "bytes/token": rep.bytes_per_token,
            "byte_fallback_%": 100 * rep.byte_fallback_share}


def main(argv=None) -> int:
    p = bench_parser(__doc__, "bench_tokenizer", "small generated corpus, seconds")
    p.add_argument("--size-mb", type=float, default=50.0)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.quick:
            base = generated_corpus(200_000)
            enc = bench_encoding(base, 2.0, workers, 1, 1 << 18, tmp, vocab=400)
            (tmp / "gen.txt").write_text(base)
            corpora = [(tmp / "gen.txt", 400, 1.0)]
        else:
            shakespeare, hlm = find("tinyshakespeare.txt"), find("hongloumeng.txt")
            if shakespeare is None:
                print("tinyshakespeare.txt not found in ../shared/data or the data cache", file=sys.stderr)
                return 1
            enc = bench_encoding(shakespeare.read_text(), a.size_mb, workers, a.reps, 1 << 20, tmp)
            corpora = [(shakespeare, 1024, 1.0)] + ([(hlm, 8000, 0.9995)] if hlm else [])
        train = [train_one(path, mt, vocab if mt != "char" else 100_000, cov)
                 for path, vocab, cov in corpora for mt in ("bpe", "unigram", "char")]
    print_table(enc, ["workers", "MB", "s", "MB/s", "speedup", "cpu_s", "cores_used", "load1"])
    print()
    print_table(train, ["corpus", "model", "vocab", "train_s", "bytes/token", "byte_fallback_%"])
    ratio = enc[-1]["speedup"] if len(enc) > 1 else None
    write_results("bench_tokenizer", enc + train, {"quick": a.quick, "speedup_last_vs_first": ratio,
                                                   "goal": "2 workers >= 1.7x one"}, out_dir=a.out_dir)
    bar_png("bench_tokenizer", [f"{r['workers']} worker(s)" for r in enc], [r["MB/s"] for r in enc], "MB/s",
            "encoding throughput", a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
