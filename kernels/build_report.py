"""Build report: compile every kernel configuration for real GPUs, on a machine without one.

    python -m minillm.kernels.build_report [--arch 80,90] [--only NAME_SUBSTRING] [--json PATH]

Each module in ``KERNEL_MODULES`` exposes ``build_specs() -> list[KernelSpec]`` (kernels/_spec.py):
every (kernel, configuration) its dispatcher can choose. For each spec and each arch (of those the spec
is listed for, when it names them: per-architecture autotune lists) we run the full
Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) against a ``GPUTarget``; no device is
needed for that. From the result we report:

* ``regs``   registers per thread (cuobjdump ``REG``);
* ``stack``/``local``  bytes of stack frame / local memory per thread (cuobjdump ``STACK``/``LOCAL``).
  ptxas puts spilled registers in the stack frame, so either being non-zero means the kernel spills
  (Triton kernels use no local arrays or calls of their own);
* ``shared`` bytes of shared memory per CTA: Triton's dynamic allocation (``metadata.shared``) plus any
  static shared memory in the cubin;
* ``ctas/SM`` how many CTAs of this kernel fit on one SM at once (limited by registers, shared memory,
  warps and the CTA cap): an occupancy figure to reason about latency hiding;
* ``wgmma``  whether the PTX uses Hopper's warpgroup MMA (``wgmma.mma_async``), which an sm_90
  attention kernel needs to reach its speed;
* ``tma``    whether the PTX moves tiles with Hopper's tensor memory accelerator (bulk tensor copies,
  ``cp.async.bulk.tensor``). A spec that ``requires`` a feature fails when the PTX lacks it.

Exit status 1 when any configuration fails to compile, spills, needs more shared memory than one
CTA may use on that SM (sm_80: 163 KiB, sm_90: 227 KiB), or lacks a PTX feature its spec requires.

The report must run with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` returns an
interpreted function that cannot be compiled. ``main`` clears the variable before it imports any kernel
module; a process that already imported kernels under the interpreter (pytest) must call this script as
a subprocess.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

KERNEL_MODULES = ["minillm.kernels.layernorm", "minillm.kernels.attention_build"]

# Per-SM hardware limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
# max_shared_per_cta is what one CTA may opt in to (the SM has 1 KiB more, reserved per CTA).
ARCH_LIMITS = {
    80: dict(max_shared_per_cta=163 * 1024, shared_per_sm=164 * 1024, regs_per_sm=65536,
             max_warps_per_sm=64, max_ctas_per_sm=32),
    90: dict(max_shared_per_cta=227 * 1024, shared_per_sm=228 * 1024, regs_per_sm=65536,
             max_warps_per_sm=64, max_ctas_per_sm=32),
}

COLUMNS = ["module", "kernel", "config", "arch", "warps", "stages", "regs", "stack", "local",
           "shared", "ctas/SM", "wgmma", "tma", "status"]


@dataclass
class Resource:
    regs: int
    stack: int
    local: int
    shared: int


def cuobjdump_path() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes, kernel_name: str) -> Resource:
    """Parse ``cuobjdump --dump-resource-usage`` for the one function in this cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
    # " Function <name>:\n  REG:24 STACK:0 SHARED:0 LOCAL:0 ..."
    blocks = re.split(r"\n\s*Function\s+", out)
    for block in blocks[1:]:
        name, _, body = block.partition(":")
        if name.strip() != kernel_name and len(blocks) > 2:
            continue
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", body))
        return Resource(int(fields.get("REG", 0)), int(fields.get("STACK", 0)),
                        int(fields.get("LOCAL", 0)), int(fields.get("SHARED", 0)))
    raise RuntimeError(f"cuobjdump reported no function {kernel_name!r}:\n{out}")


def ctas_per_sm(arch: int, regs: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256, shared memory per CTA
    carries a 1 KiB reservation."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs_per_sm"] // (regs_per_warp * num_warps)
    by_warps = lim["max_warps_per_sm"] // num_warps
    by_shared = lim["shared_per_sm"] // (shared + 1024)
    return max(0, min(by_regs, by_warps, by_shared, lim["max_ctas_per_sm"]))


def compile_spec(spec: Any, arch: int) -> dict:
    """Compile one KernelSpec for ``sm_<arch>`` and return its report row (without module)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(spec.fn, JITFunction):
        raise TypeError(f"{spec.name}: {type(spec.fn).__name__} is not a JITFunction; was the kernel "
                        "module imported with TRITON_INTERPRET=1? Run the build report in a fresh "
                        "process without it.")
    signature = dict(spec.signature)
    for k in spec.constexprs:  # constexprs must appear in the signature; be forgiving
        signature.setdefault(k, "constexpr")
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    options.update(getattr(spec, "options", None) or {})
    src = triton.compiler.ASTSource(fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs))
    # Target "cuda" arch 90 makes Triton build for sm_90a (wgmma / TMA available).
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    res = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    shared = int(getattr(compiled.metadata, "shared", 0) or 0) + res.shared
    ptx = compiled.asm.get("ptx", "")
    return {
        "kernel": spec.name, "config": spec.label, "arch": f"sm_{arch}",
        "warps": options["num_warps"], "stages": options["num_stages"],
        "regs": res.regs, "stack": res.stack, "local": res.local, "shared": shared,
        "ctas/SM": ctas_per_sm(arch, res.regs, shared, options["num_warps"]),
        "wgmma": "yes" if "wgmma.mma_async" in ptx else "no",
        "tma": "yes" if "cp.async.bulk.tensor" in ptx else "no",
    }


def check_row(row: dict, arch: int, requires: Sequence[str] = ()) -> str:
    """'ok' or the reason this configuration fails the build tier (``requires``: the spec's PTX
    features, each of which must show as "yes" in the row)."""
    problems = [f"no {feature} in the PTX" for feature in requires if row.get(feature) != "yes"]
    if row["stack"] or row["local"]:
        problems.append(f"spills ({row['stack']} B stack, {row['local']} B local per thread)")
    limit = ARCH_LIMITS[arch]["max_shared_per_cta"]
    if row["shared"] > limit:
        problems.append(f"shared {row['shared']} B > {limit} B")
    if row["ctas/SM"] == 0:
        problems.append("cannot be resident (0 CTAs/SM)")
    return "; ".join(problems) or "ok"


def load_specs(modules: Sequence[str], only: str | None) -> list[tuple[str, Any]]:
    """(kernel module, spec) for every spec of every importable module, filtered by ``only``."""
    out = []
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            print(f"[build_report] skipping {mod_name}: not present yet", file=sys.stderr)
            continue
        if not hasattr(mod, "build_specs"):
            print(f"[build_report] skipping {mod_name}: no build_specs()", file=sys.stderr)
            continue
        for spec in mod.build_specs():
            text = f"{spec.name} {spec.label}"
            if only is None or only.lower() in text.lower():
                # the module that defines the kernel (attention_build lists attention's kernels); Triton's
                # JITFunction carries its function's __module__
                out.append((spec.fn.__module__.rsplit(".", 1)[-1], spec))
    return out


def run(archs: Sequence[int], only: str | None = None, modules: Sequence[str] = KERNEL_MODULES,
        verbose: bool = True) -> list[dict]:
    rows = []
    specs = load_specs(modules, only)
    t0 = time.time()
    for i, (mod_name, spec) in enumerate(specs):
        for arch in archs:
            if getattr(spec, "archs", ()) and arch not in spec.archs:
                continue  # listed for other architectures only: the dispatcher never runs it here
            try:
                row = compile_spec(spec, arch)
                row["status"] = check_row(row, arch, getattr(spec, "requires", ()))
            except Exception as e:  # a compile error is a failed configuration, reported, not a crash
                msg = str(e).strip().splitlines()
                row = {"kernel": spec.name, "config": spec.label, "arch": f"sm_{arch}",
                       "warps": spec.num_warps, "stages": spec.num_stages,
                       "status": f"compile error: {type(e).__name__}: {msg[-1] if msg else ''}"[:200]}
            row["module"] = mod_name
            rows.append(row)
        if verbose:
            print(f"[build_report] {i + 1}/{len(specs)} {spec.name} {spec.label} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return rows


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Aligned text table (same look as benchmarks.common.print_table, which is not installed)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def main(argv: Sequence[str] | None = None) -> int:
    # Must happen before any kernel module (and so @triton.jit) is imported.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (80,90)")
    p.add_argument("--only", default=None, help="keep specs whose name or label contains this")
    p.add_argument("--json", default=None, help="also write the rows (and verdict) to this JSON file")
    p.add_argument("--modules", default=",".join(KERNEL_MODULES), help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="no per-spec progress on stderr")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        p.error(f"--arch {args.arch!r}: expected comma-separated integers such as 80,90")
    bad = [a for a in archs if a not in ARCH_LIMITS]
    if bad:
        p.error(f"--arch: no limits known for {bad}; supported: {sorted(ARCH_LIMITS)}")

    rows = run(archs, args.only, args.modules.split(","), verbose=not args.quiet)
    print_table(rows, COLUMNS)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows)} compiled configurations, {len(failed)} failing")
    if not rows:
        print("nothing to compile (no module or --only matched nothing)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        import triton  # the compiler's version decides registers and spills: keep it with the rows
        head = {"archs": archs, "only": args.only, "triton": triton.__version__, "failed": len(failed)}
        # one row per line, so that a rebuilt report's diff shows the configurations that changed
        Path(args.json).write_text(json.dumps(head)[:-1] + ', "rows": [\n'
                                   + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]}\n")
        print(f"wrote {args.json}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
