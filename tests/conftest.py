"""Shared fixtures. ``loralib_ms`` is PyPI ``loralib==0.1.2`` (Microsoft's), importable beside ours.

The wheel is never committed: ``benchmarks/reference_wheel.py`` takes it from ``.cache/`` (``.ci/run`` puts it
there) or downloads it with pip, then unpacks it with the package renamed to ``loralib_ms``. Locally a missing wheel
skips the tests that need it; under CI (the ``CI`` environment variable set) it fails them, so CI never skips
silently.
"""
import os
import sys
from pathlib import Path

import pytest

# The reference loader lives with the benchmarks (tests import benchmarks, never the reverse).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_wheel import fetch_wheel, import_renamed  # noqa: E402


@pytest.fixture(scope="session")
def loralib_ms(tmp_path_factory):
    """Microsoft's ``loralib`` 0.1.2 imported as ``loralib_ms`` (skipped locally, failed under CI, if unavailable)."""
    try:
        return import_renamed(fetch_wheel(), tmp_path_factory.mktemp("loralib_ms"))
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
