"""Microsoft's ``loralib==0.1.2`` (PyPI), importable beside ours as ``loralib_ms``.

Used by ``benchmarks/bench_peers.py`` / ``bench_layer.py`` and by ``tests/conftest.py`` (the differential and defect
tests). It lives here, not in ``tests/``, so that imports run one way: tests import benchmarks, never the reverse.
The wheel is never committed: it is taken from ``.cache/`` (``.ci/run`` puts it there) or downloaded with pip, its
sha256 is checked, and its package is unpacked into a directory of the caller's with the package renamed to
``loralib_ms``.
"""
import hashlib
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL = REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl"
# The published wheel's digest: a corrupted or substituted cache file must not become the reference.
WHEEL_SHA256 = "e341c9a507b180f3b8e70914efef9f6b19d1aa3996dec546b180cfbd027059e9"


def fetch_wheel(wheel: Path = WHEEL) -> Path:
    """``wheel``, downloaded with pip first when it is missing, checked against the published sha256."""
    if not wheel.exists():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-input", "loralib==0.1.2",
             "-d", str(wheel.parent)],
            capture_output=True, text=True, timeout=180)
        if not wheel.exists():
            raise RuntimeError(f"pip download loralib==0.1.2 failed (rc={proc.returncode}): {proc.stderr[-1500:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it to download it again")
    return wheel


def import_renamed(wheel: Path, dest: Path):
    """Unpack ``wheel``'s ``loralib`` package into ``dest/loralib_ms`` and import it under that name."""
    pkg = dest / "loralib_ms"
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("loralib/") and name.endswith(".py"):
                target = pkg / name[len("loralib/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    for mod in [m for m in sys.modules if m == "loralib_ms" or m.startswith("loralib_ms.")]:
        del sys.modules[mod]  # never pick up a stray copy from PYTHONPATH
    sys.path.insert(0, str(dest))
    try:
        module = importlib.import_module("loralib_ms")
    finally:
        sys.path.remove(str(dest))
    assert Path(module.__file__).resolve().parent == pkg.resolve(), module.__file__
    return module
