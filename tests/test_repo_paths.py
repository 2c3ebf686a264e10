"""No tracked file names a folder of the machine it was written on: the checkout, its parent, the temp folder.

A user's clone lives elsewhere, so such a path in a doc or a command is wrong for every reader. The paths are
computed at run time, so this holds on any machine and in any checkout.
"""
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"not a git checkout with git available: {e}")
    return [REPO / p for p in out.stdout.decode().split("\0") if p]


def test_no_tracked_file_names_this_machines_folders():
    forbidden = {str(REPO) + os.sep, str(REPO.parent) + os.sep, tempfile.gettempdir().rstrip(os.sep) + os.sep}
    forbidden = {f for f in forbidden if f != os.sep}  # a checkout at / would forbid everything
    files = tracked_files()
    assert len(files) > 50  # really the repository's files
    hits = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary (a plot) or deleted in the working tree
        for bad in forbidden:
            if bad in text:
                line = text[:text.index(bad)].count("\n") + 1
                hits.append(f"{f.relative_to(REPO)}:{line}: {bad}")
    assert not hits, "machine paths in tracked files:\n" + "\n".join(hits)
