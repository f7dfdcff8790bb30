"""Packaging: the top-level kernels/ folder installs as ``minillm.kernels``, never as ``kernels``.

``kernels`` is the import name of Hugging Face's kernel hub (transformers probes for it; nanochat loads
FlashAttention-3 through it). If our wheel held a top-level ``kernels/``, installing both would let
one overwrite the other. These tests build the real wheel, install it next to an unrelated ``kernels``
distribution, and check that each keeps its own files and that minillm still finds its own kernels,
both from the installed wheel and from the source tree (where tests and ``python train.py`` run).
"""
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_MARKER = "an unrelated distribution that is also called kernels"

# Not needed to build, or produced by runs and builds (a stale build/ would even leak into the wheel).
_COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "out", "outputs", "multirun",
                                      "wandb", ".pytest_cache", ".hypothesis", "__pycache__",
                                      "*.egg-info")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """minillm's wheel, built by pip the way a user's ``pip install .`` builds it (isolated build env).

    Built from a copy of the working tree, so the build leaves nothing (build/, *.egg-info) in the
    checkout and no stale build output from an earlier build can end up in it. The copy gets one
    extra subpackage, minillm/_probe_subpackage/, to show that a subpackage nobody listed is included.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE)
    probe = src / "minillm" / "_probe_subpackage"
    probe.mkdir()
    (probe / "__init__.py").write_text("")
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail("building minillm's wheel failed. `pip wheel` builds in an isolated environment and "
                    "so installs the build backend (setuptools, see [build-system] in pyproject.toml) "
                    "from the package index: without network access or a reachable index this fails "
                    "(offline, `pip wheel --no-build-isolation` with setuptools installed builds the same "
                    f"wheel).\n$ {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                    pytrace=False)
    wheels = list(out.glob("minillm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_kernels_under_minillm_and_every_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    files = set(names)
    assert "minillm/kernels/__init__.py" in files
    assert "minillm/kernels/attention.py" in files
    assert "minillm/kernels/layernorm.py" in files
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ package is installed"
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if re.fullmatch(r"minillm-[^/]+\.dist-info", t)}
    assert len(dist_info) == 1 and top == {"minillm"} | dist_info, f"top-level entries: {sorted(top)}"
    assert zipfile.ZipFile(wheel).read(f"{dist_info.pop()}/top_level.txt").decode().split() == ["minillm"]

    # Every Python file of the source tree, at its installed path: minillm/ as is, kernels/ under
    # minillm/kernels/. This covers every subpackage (minillm.data, minillm.distributed, ...) as it
    # is added, with no list to keep up to date; the probe shows an unlisted one is picked up.
    expected = {f"minillm/{p.relative_to(ROOT / 'minillm').as_posix()}"
                for p in (ROOT / "minillm").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"minillm/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}"
                 for p in (ROOT / "kernels").rglob("*.py") if "__pycache__" not in p.parts}
    expected.add("minillm/_probe_subpackage/__init__.py")
    assert {n for n in names if n.endswith(".py")} == expected
    for sub in ("data", "distributed"):
        if (ROOT / "minillm" / sub / "__init__.py").is_file():
            assert f"minillm/{sub}/__init__.py" in files


def _fake_kernels_files() -> dict[str, str]:
    """A stand-in for the hub's package: a top-level `kernels` with a marker, and submodules named
    like ours, so that minillm importing anything from a top-level `kernels` would be seen."""
    fake_fn = "def _fake(*args, **kwargs):\n    raise RuntimeError('the fake kernels package was called')\n"
    return {
        "kernels/__init__.py": f"MARKER = {FAKE_MARKER!r}\n\ndef get_kernel(name):\n    return name\n",
        "kernels/layernorm.py": fake_fn + "layer_norm = rms_norm = _fake\n",
        "kernels/attention.py": fake_fn + "flash_attention = _fake\n",
    }


def _write_wheel(out_dir: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal valid wheel (PEP 427): the files, METADATA, WHEEL and a RECORD with hashes."""
    dist_info = f"{name}-{version}.dist-info"
    files = {**files,
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: minillm-tests\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    path = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


# Run in a subprocess: `import kernels` must give the other distribution, and minillm's triton backend
# must still load minillm's kernels, which must compute (a tiny RMSNorm under the interpreter).
CHECK = textwrap.dedent('''
    import sys
    from pathlib import Path
    {prelude}
    import kernels
    assert kernels.MARKER == {marker!r}, kernels.__file__
    import torch
    import torch.nn.functional as F
    import minillm
    import minillm.kernels
    from minillm import ops
    assert ops.configure("triton", "cpu") == "triton", ops.backend()
    modules = {{name: fn.__module__ for name, fn in ops._kernels.items()}}
    assert set(modules) == {{"layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "attention"}}, modules
    assert all(m.startswith("minillm.kernels.") for m in modules.values()), modules
    assert sys.modules["kernels"] is kernels and kernels.MARKER == {marker!r}
    x, w = torch.randn(3, 40), torch.randn(40)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (40,), w, 1e-6))
    print("minillm", Path(minillm.__file__).parent)
    print("minillm.kernels", Path(minillm.kernels.__file__).parent)
    print("kernels", Path(kernels.__file__).parent)
''')


def _run_check(prelude: str, cwd: Path, extra_env: dict) -> dict[str, Path]:
    env = {**os.environ, "TRITON_INTERPRET": "1", **extra_env}
    code = CHECK.format(prelude=prelude, marker=FAKE_MARKER)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {k: Path(v) for k, v in (line.split(" ", 1) for line in proc.stdout.splitlines())}


def test_source_tree_minillm_uses_its_kernels_with_another_kernels_first_on_sys_path(tmp_path):
    """From the repository root (as tests and `python train.py` run), with another `kernels` first on
    sys.path: both import, each as itself."""
    site = tmp_path / "other"
    for rel, text in _fake_kernels_files().items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    where = _run_check(f"sys.path.insert(0, {str(site)!r})", cwd=ROOT, extra_env={})
    assert where["kernels"] == site / "kernels"
    assert where["minillm"] == ROOT / "minillm"
    assert where["minillm.kernels"] == ROOT / "kernels"


def test_installed_wheel_and_another_kernels_distribution_share_one_environment(wheel, tmp_path):
    """Both wheels installed into one site directory: no file of one is a file of the other, and a
    process started elsewhere imports each as itself."""
    fake = _write_wheel(tmp_path, "kernels", "0.0.1", _fake_kernels_files())
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--target", str(site), str(fake), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def installed(dist: str) -> set[str]:
        (record,) = site.glob(f"{dist}-*.dist-info/RECORD")
        return {line.split(",")[0] for line in record.read_text().splitlines() if line}

    ours, theirs = installed("minillm"), installed("kernels")
    assert "minillm/kernels/layernorm.py" in ours and "kernels/__init__.py" in theirs
    assert not ours & theirs, f"both distributions install {sorted(ours & theirs)}"
    assert FAKE_MARKER in (site / "kernels" / "__init__.py").read_text()

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    where = _run_check("", cwd=run_dir, extra_env={"PYTHONPATH": str(site)})
    assert where == {"minillm": site / "minillm", "minillm.kernels": site / "minillm" / "kernels",
                     "kernels": site / "kernels"}
