"""Test corpora for benchmarks/bench_recipe.py, built from text already on a machine (no download).

    python -m benchmarks.corpora OUT_DIR [--names en-vim-200k,zh-hongloumeng,...]

Each corpus is one UTF-8 file, built deterministically (sorted file lists, fixed byte caps, cut on a
line boundary), so two machines with the same sources build the same bytes; the sha256 of each is
printed and recorded by the benchmark. A corpus whose sources are missing is skipped with a message.
None of these was used to tune minillm's defaults except tinyshakespeare (listed so it is measured
with the rest, and marked ``tuned_on``).

    name             kind              source                                                   size
    en-vim-200k      English prose     Vim's user manual (usr_*.txt), the first 200 KB           200 KB
    en-shakespeare   English verse     tinyshakespeare (shared/data)                            1.1 MB
    zh-hongloumeng   Chinese prose     红楼梦 (shared/data)                                     2.65 MB
    en-vim-docs      English docs      every Vim help file (doc/*.txt)                          ~9.5 MB
    code-py-4m       Python source     the standard library's top-level modules                 ~4.7 MB
    code-py-100m     Python source     site-packages of this venv (*.py), the first 100 MB      100 MB
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VIM_DOC = Path("/usr/share/vim/vim90/doc")


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file()) if folder.is_dir() else []


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


# name -> (kind, list of source files (a callable), byte cap or None, tuned_on)
CORPORA = {
    "en-vim-200k": ("English prose", lambda: _files(VIM_DOC, "usr_*.txt"), 200_000, False),
    "en-shakespeare": ("English verse", lambda: [SHARED / "tinyshakespeare.txt"], None, True),
    "zh-hongloumeng": ("Chinese prose", lambda: [SHARED / "hongloumeng.txt"], None, False),
    "en-vim-docs": ("English docs", lambda: _files(VIM_DOC, "*.txt"), None, False),
    "code-py-4m": ("Python source", lambda: _files(_stdlib(), "*.py"), None, False),
    "code-py-100m": ("Python source", lambda: _files(_site_packages(), "**/*.py"), 100_000_000, False),
}


def build(name: str, out_dir: Path) -> Path | None:
    """Write corpus ``name`` to OUT_DIR/<name>.txt (kept if already there); None if its sources are missing."""
    kind, sources, cap, _ = CORPORA[name]
    path = out_dir / f"{name}.txt"
    if path.is_file():
        return path
    files = [f for f in sources() if f.is_file()]
    if not files:
        print(f"{name}: no source files on this machine; skipped", file=sys.stderr)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    size = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # not UTF-8 text: left out (the choice is the same on every machine)
            for line in text.splitlines(keepends=True):
                n = len(line.encode("utf-8"))
                if cap is not None and size + n > cap:
                    break
                out.write(line)
                size += n
            if cap is not None and size + 1 > cap:
                break
            if not text.endswith("\n"):
                out.write("\n")
                size += 1
    tmp.rename(path)
    return path


def sha256(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks (minillm's own, which imports no torch)."""
    from minillm.data.corpus import sha256_file

    return sha256_file(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--names", default=",".join(CORPORA), help="comma-separated corpus names")
    args = p.parse_args(argv)
    for name in args.names.split(","):
        if name not in CORPORA:
            print(f"error: --names: unknown corpus {name!r}; choose from {', '.join(CORPORA)}", file=sys.stderr)
            return 2
        path = build(name, args.out_dir)
        if path is not None:
            print(f"{name:16s} {path.stat().st_size:>12,d} bytes  sha256 {sha256(path)[:16]}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
