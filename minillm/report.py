"""The picture and summary of a run: ``python -m minillm.report RUN_DIR`` (also run at the end of training).

curves.png: loss against steps and against tokens, validation bits per byte, learning rate,
gradient norm, throughput. summary.json: final/best validation, tokens, wall time, peak memory.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import warnings
from pathlib import Path

from minillm.atomic_files import write_run_file  # atomic; a full disk or read-only folder is one line
from minillm.metrics import read_records, strict_json


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_records(Path(run_dir) / "metrics.jsonl")


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> Path | None:
    """Draw ``<run>/curves.png`` from metrics.jsonl; None if there is nothing to draw. The title (the run
    folder's name) is drawn with an installed CJK font where one is needed; without one its characters
    are boxes, without matplotlib's warning for each of them (the picture is in that folder anyway)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        return None
    with warnings.catch_warnings(), plt.rc_context({"font.family": font_families()}):
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        return _draw(plt, records, Path(run_dir))


def _draw(plt, records: list[dict], run_dir: Path) -> Path:
    from matplotlib.ticker import EngFormatter
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    panels = [
        (axes[0, 0], [("train_loss", "-"), ("val_loss", "o-")], "step", "loss (nats/token) vs steps"),
        (axes[0, 1], [("train_loss", "-"), ("val_loss", "o-")], "tokens", "loss vs tokens"),
        (axes[0, 2], [("val_bpb", "o-")], "step", "validation bits per byte"),
        (axes[1, 0], [("lr", "-")], "step", "learning rate"),
        (axes[1, 1], [("grad_norm", "-")], "step", "gradient norm (before clipping)"),
        (axes[1, 2], [("tokens_per_sec", "-")], "step", "throughput (tokens/s)"),
    ]
    for ax, keys, x, title in panels:
        for key, style in keys:
            xs, ys = _series(records, key, x)
            if xs:
                ax.plot(xs, ys, style, label=key, markersize=3)
        ax.set(title=title, xlabel=x)
        if x == "tokens":  # millions of tokens: 1.5M, not overlapping 1500000-wide labels
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out, png = run_dir / "curves.png", io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    write_run_file(out, png.getvalue())
    return out


# Fonts with CJK glyphs, tried in order after DejaVu Sans (matplotlib falls back per glyph, >= 3.6).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN",
             "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei", "SimHei", "PingFang SC",
             "Hiragino Sans GB", "Heiti SC", "Droid Sans Fallback", "Arial Unicode MS")


def font_families() -> list[str]:
    """DejaVu Sans (matplotlib's own), then the CJK fonts of CJK_FONTS that are installed (only those:
    a missing family would be a warning of its own)."""
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in CJK_FONTS if name in installed]


def write_report(run_dir: str | Path, summary: dict) -> None:
    """summary.json (atomically) and curves.png."""
    run_dir = Path(run_dir)
    write_run_file(run_dir / "summary.json", strict_json(summary, indent=2))
    plot_run(run_dir)


def summarize(run_dir: str | Path) -> dict:
    """A summary from metrics.jsonl alone (for runs that were interrupted before their report)."""
    records = read_metrics(run_dir)
    if not records:
        return {}
    vals = [r for r in records if "val_loss" in r]
    tps = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
    out = {"step": records[-1]["step"], "tokens": records[-1].get("tokens"), "elapsed_s": records[-1].get("elapsed_s"),
           "median_tokens_per_sec": sorted(tps)[len(tps) // 2] if tps else None}
    if vals:
        best = min(vals, key=lambda r: r["val_loss"])
        out |= {"final_val_loss": vals[-1]["val_loss"], "final_val_bpb": vals[-1]["val_bpb"],
                "best_val_loss": best["val_loss"], "best_val_bpb": best["val_bpb"], "best_step": best["step"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minillm.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        why = "no metrics.jsonl; is this a run folder?" if run.is_dir() else "no such folder; give a run folder"
        print(f"error: {run}: {why}", file=sys.stderr)
        return 2
    summary = summarize(run)
    saved = run / "summary.json"
    if saved.is_file():
        summary = {**summary, **json.loads(saved.read_text())}
    print(strict_json(summary, indent=2))
    print(f"wrote {plot_run(run)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
