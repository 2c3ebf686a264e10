"""setup.py reads the version that loralib reports (it moved to loralib/version.py once, which broke the install)."""
import subprocess
import sys
from pathlib import Path

import loralib

REPO = Path(__file__).resolve().parents[1]


def _setup(*args) -> str:
    out = subprocess.run([sys.executable, "setup.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_setup_version_is_the_package_version():
    assert _setup("--version") == loralib.__version__
