"""Data pipeline: prepare throughput (MB/s, documents/s) and peak memory per corpus format.

    python benchmarks/bench_data.py                          # a generated 50 MB corpus in every format
    python benchmarks/bench_data.py --size-mb 100,1000 --formats jsonl.zst,hf   # memory vs corpus size
    python benchmarks/bench_data.py --quick                  # 1 MB, one worker: seconds

One generated corpus (documents of 1-20 KB of English-like text with Chinese and emoji) is written in
each format: ``txt`` (one file; one document), ``jsonl``, ``jsonl.gz`` (level 1), ``jsonl.zst``,
``parquet`` (row groups of 1024) and ``hf`` (``datasets.Dataset.save_to_disk``). Each format is then
prepared by ``minillm.data.prepare.prepare`` in a fresh interpreter (its peak RSS its own; torch is
never imported there) with an empty cache and a given tokenizer (``tokenizer.path``: a bpe-1024 model
trained once on the corpus's first 2 MB), so the row times the data path: the checking pass, the split,
reading and encoding (``--workers`` processes) and writing the token files. The checking pass alone is
timed first (``check_s``: every byte or record read and validated, nothing encoded).

Columns: ``MB`` text bytes (UTF-8, what the tokenizer sees); ``prepare_MB/s`` and ``docs/s`` over the
whole prepare; ``check_MB/s`` the checking pass; ``vs_txt`` prepare throughput over the plain-text
row's of the same size, measured in the same run (plain text = 1.0); ``peak_rss_mib`` the preparing
process (VmHWM: reading, splitting, feeding and writing), ``base_rss_mib`` the same process after its
imports (so peak - base is what the corpus costs). The encoding workers (forked) are not counted: each
holds its copy of the tokenizer and one unit of work (about 1 MiB of text) at a time.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf")
_WORDS = ("the king queen lord good night day love death sweet fair heart sword crown blood my thy thou art "
          "hath doth shall will not and but with what where when o 红楼 梦 甄士隐 贾雨村 😀 🎉").split()


def _vocabulary(rng: random.Random) -> list[str]:
    """Common words, 3000 made-up ones (Zipf-like use below), 300 Chinese characters, a few emoji."""
    made = ["".join(rng.choice("bcdfghklmnprstvwz") + rng.choice("aeiouy") for _ in range(rng.randint(1, 4)))
            for _ in range(3000)]
    return _WORDS * 40 + made + [chr(0x4E00 + rng.randrange(3000)) for _ in range(300)] + ["😀", "🎉", "👩\u200d👧"]


def _documents(n_bytes: int, seed: int = 0):
    """Documents of 1-20 KB, about ``n_bytes`` of UTF-8 in all (fast: lines drawn from a pool)."""
    rng = random.Random(seed)
    words = _vocabulary(random.Random(0))
    weights = [1.0 / (1 + i) ** 0.7 for i in range(len(words))]
    pool = [" ".join(rng.choices(words, weights, k=rng.randint(3, 14))) + "\n" for _ in range(min(20000, n_bytes // 200))]
    size = 0
    while size < n_bytes:
        target = rng.randint(1000, 20000)
        lines, n = [], 0
        while n < target:
            lines.append(rng.choice(pool))
            n += len(lines[-1].encode())
        doc = "".join(lines)
        size += len(doc.encode())
        yield doc


def write_corpus(folder: Path, n_bytes: int, formats: list[str]) -> dict[str, Path]:
    """The corpus in each format under ``folder``; returns format -> path (hf: a save_to_disk folder)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    folder.mkdir(parents=True, exist_ok=True)
    paths = {f: folder / f"corpus.{f}" for f in formats if f != "hf"}
    need_parquet = "parquet" in formats or "hf" in formats
    pq_path = paths.get("parquet", folder / "for_hf.parquet")
    txt = open(paths["txt"], "w", encoding="utf-8") if "txt" in formats else None
    jl = open(paths["jsonl"], "w", encoding="utf-8") if "jsonl" in formats else None
    gz = gzip.open(paths["jsonl.gz"], "wt", encoding="utf-8", compresslevel=1) if "jsonl.gz" in formats else None
    zf = open(paths["jsonl.zst"], "wb") if "jsonl.zst" in formats else None
    zw = zstandard.ZstdCompressor(level=3).stream_writer(zf) if zf else None
    writer, batch = (pq.ParquetWriter(pq_path, pa.schema([("text", pa.string())])) if need_parquet else None), []
    for doc in _documents(n_bytes):
        line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
        for f, data in ((txt, doc + "\n"), (jl, line), (gz, line)):
            if f is not None:
                f.write(data)
        if zw is not None:
            zw.write(line.encode())
        if writer is not None:
            batch.append(doc)
            if len(batch) == 1024:
                writer.write_table(pa.table({"text": batch}), row_group_size=1024)
                batch = []
    if writer is not None and batch:
        writer.write_table(pa.table({"text": batch}), row_group_size=1024)
    for f in (txt, jl, gz, zw, writer):
        if f is not None:
            f.close()
    if "hf" in formats:
        paths["hf"] = _save_hf(pq_path, folder)
    return {f: paths[f] for f in formats}


def _save_hf(parquet: Path, folder: Path) -> Path:
    import datasets
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(folder / "hf_cache"))
    ds.save_to_disk(str(folder / "hf"))
    return folder / "hf"


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a child started by a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _child(fmt: str, spec: str, tok: str, workers: int) -> None:
    """Runs in a fresh interpreter: time the checking pass and the whole prepare; print one JSON line."""
    from minillm.config import DataConfig, TokenizerConfig
    from minillm.data.corpus import check_files, expand_paths
    from minillm.data.prepare import prepare
    if fmt == "hf":
        import datasets  # noqa: F401  (its import is part of the base, like pyarrow's)
        from minillm.data.hf_dataset import check_split, hf_splits
    base = _peak_rss_mib()
    cfg = DataConfig(**({"hf_dataset": spec} if fmt == "hf" else {"path": spec}), num_workers=workers)
    t0 = time.perf_counter()
    if fmt == "hf":
        check_split(hf_splits(cfg)[0], "text", False)
    else:
        check_files(expand_paths(spec, "data.path"), False)
    t1 = time.perf_counter()
    p = prepare(cfg, TokenizerConfig(path=tok), progress=False)
    t2 = time.perf_counter()
    m = p.meta
    print(json.dumps({"check_s": t1 - t0, "prepare_s": t2 - t1, "base_rss_mib": base,
                      "peak_rss_mib": _peak_rss_mib(),
                      "bytes": m["train_bytes"] + m["val_bytes"], "documents": m["train_documents"] + m["val_documents"],
                      "tokens": m["train_tokens"] + m["val_tokens"]}))


def run_format(fmt: str, spec: Path, tok: Path, workers: int, cache: Path) -> dict:
    env = {**os.environ, "MINILLM_DATA_DIR": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", fmt, str(spec), str(tok), str(workers)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{fmt}: prepare failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = r["bytes"] / 1e6
    on_disk = sum(p.stat().st_size for p in ([spec] if spec.is_file() else spec.rglob("*")) if p.is_file())
    return {"format": fmt, "MB": round(mb, 1), "disk_MB": round(on_disk / 1e6, 1), "docs": r["documents"],
            "check_MB/s": mb / r["check_s"], "prepare_MB/s": mb / r["prepare_s"], "docs/s": r["documents"] / r["prepare_s"],
            "prepare_s": r["prepare_s"], "check_s": r["check_s"], "peak_rss_mib": r["peak_rss_mib"],
            "base_rss_mib": r["base_rss_mib"], "tokens": r["tokens"]}


def bench_size(size_mb: float, formats: list[str], workers: int, tmp: Path, tok_mb: float = 2.0) -> list[dict]:
    from minillm.config import TokenizerConfig
    from minillm.data.tokenizer_sample import train_on_sample
    t0 = time.perf_counter()
    paths = write_corpus(tmp / f"corpus{size_mb:g}", int(size_mb * 1e6), formats)
    print(f"# wrote the {size_mb:g} MB corpus in {len(formats)} formats in {time.perf_counter() - t0:.1f} s", flush=True)
    tok = tmp / "tok.model"
    if not tok.exists():
        train_on_sample(_documents(int(tok_mb * 1e6), seed=1), TokenizerConfig(vocab_size=1024)).save(tok)
    rows = []
    for i, fmt in enumerate(formats):  # a fresh, empty cache for every row
        rows.append({"size_mb": size_mb, **run_format(fmt, paths[fmt], tok, workers, tmp / f"cache-{size_mb:g}-{i}")})
        print(f"# {fmt}: {rows[-1]['prepare_s']:.1f} s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    base = next((r for r in rows if r["format"] == "txt"), None)
    for r in rows:
        r["vs_txt"] = r["prepare_MB/s"] / base["prepare_MB/s"] if base else None
        r["check_vs_txt"] = r["check_MB/s"] / base["check_MB/s"] if base else None
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    from benchmarks.common import bar_png, bench_parser, print_table, write_results
    p = bench_parser(__doc__, "bench_data", "a 1 MB corpus, one worker: seconds")
    p.add_argument("--size-mb", default="50", help="corpus size in MB of text; a comma list runs each size")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--workers", type=int, default=2, help="encoding processes (data.num_workers)")
    p.add_argument("--tmp", type=Path, default=None, help="where the corpora go (default: a temporary folder)")
    a = p.parse_args(argv)
    formats = [f for f in a.formats.split(",") if f]
    if bad := [f for f in formats if f not in FORMATS]:
        p.error(f"--formats: unknown {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    sizes = [1.0] if a.quick else [float(s) for s in a.size_mb.split(",")]
    workers = 1 if a.quick else a.workers
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        rows = [r for size in sizes for r in bench_size(size, formats, workers, Path(tmp), 0.5 if a.quick else 2.0)]
    print_table(rows, ["size_mb", "format", "MB", "disk_MB", "docs", "prepare_s", "prepare_MB/s", "docs/s",
                       "vs_txt", "check_MB/s", "check_vs_txt", "peak_rss_mib", "base_rss_mib"])
    write_results("bench_data", rows, {"quick": a.quick, "workers": workers, "sizes_mb": sizes,
                                       "command": " ".join([Path(sys.argv[0]).name, *argv])}, out_dir=a.out_dir)
    bar_png("bench_data", [f"{r['format']} {r['size_mb']:g}MB" for r in rows], [r["prepare_MB/s"] for r in rows],
            "MB/s of text", "prepare throughput per format", a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
