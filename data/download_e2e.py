"""Get the E2E NLG splits (train/valid/test.txt, Microsoft LoRA's format) into data/e2e/, checked by sha256.

    python data/download_e2e.py                  # download from github.com/microsoft/LoRA (needs internet)
    python data/download_e2e.py --from DIR       # copy from a directory that already has the three files

The NLG examples call :func:`fetch_e2e` themselves when they find no data (``--no_download`` turns that off).

A file whose sha256 differs from the published one (corrupted, partial, another version) is refused and never
replaces a good copy: each file is written to a temporary name and renamed into place only once it checks out.
"""
import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request

BASE_URL = "https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data/e2e/"
# sha256 and size of each file as published in microsoft/LoRA (examples/NLG/data/e2e, unchanged since 2021-10-15).
FILES = {
    "train.txt": ("eae319082237310913d9f37f6a891d48fb3f821f29d86870d2cb4f92ddd72c5a", 9_624_463),
    "valid.txt": ("ba963113c8401d3d26216c0dc0a6dae1ea6ea927de3bf830e32c41f65401c80d", 1_198_093),
    "test.txt": ("81b1bcd40c4f12845ec4eb61a77bf43765d112483cd9b2f91ef10bfc1b3d8f13", 1_351_149),
}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e")
# Seconds to wait for the server to connect or send the next chunk: offline, a run should fail in seconds, not hang.
TIMEOUT_S = 15


class DownloadError(RuntimeError):
    """A file that could not be copied or downloaded, or whose sha256 is not the published one."""


class NetworkError(DownloadError):
    """The server could not be reached or the transfer broke off (offline, DNS, timeout)."""


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()  # the E2E files are 10 MB at most


def _fetch(url: str, dst, size: int, progress: bool) -> None:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r, tqdm(total=size, unit="B", unit_scale=True,
                                                          desc=os.path.basename(url), disable=not progress) as bar:
        for chunk in iter(lambda: r.read(1 << 16), b""):
            dst.write(chunk)
            bar.update(len(chunk))


def install_file(name: str, out_dir: str, src_dir: str = None, progress: bool = True) -> str:
    """Copy (``src_dir``) or download one file into ``out_dir``; keep it only if its sha256 is the published one.

    Raises:
        DownloadError: the source is missing or unreachable, or the content does not match (the old file, if any,
            is left untouched).
    """
    expected, size = FILES[name]
    dst = os.path.join(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            if src_dir is not None:
                src = os.path.join(src_dir, name)
                if not os.path.isfile(src):
                    raise DownloadError(f"--from {src_dir!r} has no {name}")
                with open(src, "rb") as s:
                    shutil.copyfileobj(s, f)
            else:
                try:
                    _fetch(BASE_URL + name, f, size, progress)
                except OSError as e:  # URLError, socket timeouts and resets are all OSErrors
                    reason = " ".join(str(e).split())  # one line, whatever the library put in it
                    raise NetworkError(f"cannot download {BASE_URL + name}: {reason}") from e
        got = sha256_file(tmp)
        if got != expected:
            got_size = os.path.getsize(tmp)
            what = "partial" if got_size < size else "corrupted or a different version"
            raise DownloadError(f"{name}: sha256 {got} ({got_size:,} bytes) is not the published {expected} "
                                f"({size:,} bytes): the file is {what}; refused, {dst} left as it was")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def fetch_e2e(out_dir: str = DEFAULT_OUT, src_dir: str = None, force: bool = False, progress: bool = True,
              log=print) -> str:
    """Make ``out_dir`` hold the three E2E files, each checked against its published sha256.

    A file already there that checks out is kept (unless ``force``); the others are copied from ``src_dir`` or
    downloaded, each through a temporary file renamed into place only once its hash matches.

    Args:
        out_dir: where train.txt, valid.txt and test.txt go.
        src_dir: copy from this directory instead of downloading.
        force: fetch again even the files that already check out.
        progress: show a tqdm bar per downloaded file.
        log: called with one line per file.

    Returns:
        ``out_dir``.

    Raises:
        NetworkError: the download failed (offline, unreachable, timed out); files already fetched stay.
        DownloadError: a missing source file or a sha256 mismatch (the old file, if any, is left untouched).
    """
    for name, (expected, _) in FILES.items():
        dst = os.path.join(out_dir, name)
        if not force and os.path.isfile(dst) and sha256_file(dst) == expected:
            log(f"{dst}: present, sha256 ok")
            continue
        install_file(name, out_dir, src_dir, progress=progress)
        log(f"{dst}: sha256 ok")
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src_dir", default=None, help="copy from this directory instead of downloading")
    p.add_argument("--out_dir", default=DEFAULT_OUT, help="where the files go (default: data/e2e/ in the repo)")
    p.add_argument("--force", action="store_true", help="fetch again even when a file already checks out")
    args = p.parse_args(argv)
    try:
        fetch_e2e(args.out_dir, args.src_dir, force=args.force)
    except NetworkError as e:
        print(f"error: {e}. Offline? Copy the files from a directory that has them with --from DIR",
              file=sys.stderr)
        return 1
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"E2E data ready in {args.out_dir} (licence CC BY-SA 4.0, see data/README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
