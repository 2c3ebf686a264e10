"""Shared fixtures. ``loralib_ms`` is PyPI ``loralib==0.1.2`` (Microsoft's), importable beside ours.

The wheel is never committed: it is taken from ``.cache/`` (``.ci/run`` puts it there) or downloaded with pip,
then unpacked into a temporary directory with the package renamed to ``loralib_ms``. Locally a missing wheel skips
the tests that need it; under CI (the ``CI`` environment variable set) it fails them, so CI never skips silently.
"""
import hashlib
import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEEL = REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl"
# The published wheel's digest: a corrupted or substituted cache file must not become the reference.
WHEEL_SHA256 = "e341c9a507b180f3b8e70914efef9f6b19d1aa3996dec546b180cfbd027059e9"


def _fetch_wheel() -> Path:
    if not WHEEL.exists():
        WHEEL.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-input", "loralib==0.1.2",
             "-d", str(WHEEL.parent)],
            capture_output=True, text=True, timeout=180)
        if not WHEEL.exists():
            raise RuntimeError(f"pip download loralib==0.1.2 failed (rc={proc.returncode}): {proc.stderr[-1500:]}")
    digest = hashlib.sha256(WHEEL.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}; delete it to download it again")
    return WHEEL


def _import_renamed(wheel: Path, dest: Path):
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


@pytest.fixture(scope="session")
def loralib_ms(tmp_path_factory):
    """Microsoft's ``loralib`` 0.1.2 imported as ``loralib_ms`` (skipped locally, failed under CI, if unavailable)."""
    try:
        return _import_renamed(_fetch_wheel(), tmp_path_factory.mktemp("loralib_ms"))
    except Exception as exc:  # noqa: BLE001 - any failure to obtain the reference is reported the same way
        msg = f"reference loralib==0.1.2 unavailable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def loralib_ours():
    import loralib
    return loralib


@pytest.fixture(params=["ours", "ms"])
def lib(request):
    """Both libraries in turn, for tests whose body runs unchanged against each (``lib.name`` says which).

    Tests that 0.1.2 is known to fail mark the ``ms`` case ``xfail(strict=True)`` (see ``test_defects.py``).
    """
    if request.param == "ms":
        return request.getfixturevalue("loralib_ms")
    return request.getfixturevalue("loralib_ours")


def pytest_terminal_summary(terminalreporter):
    """One line per test file with its outcome counts, so a ``-q`` run still shows which suites ran."""
    counts = {}
    for outcome in ("passed", "failed", "error", "xfailed", "xpassed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            path = getattr(report, "nodeid", "").split("::")[0] or "(collection)"
            counts.setdefault(path, {}).setdefault(outcome, 0)
            counts[path][outcome] += 1
    if counts:
        terminalreporter.section("results per test file")
        for path in sorted(counts):
            terminalreporter.write_line(f"{path}: " + ", ".join(f"{n} {o}" for o, n in counts[path].items()))
