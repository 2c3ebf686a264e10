"""data/download_e2e.py: --from copies and checks sha256; a corrupted or partial file is refused and never replaces
a good copy; no network is used (the download path needs internet and is not exercised here)."""
import hashlib
import importlib.util
import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
spec = importlib.util.spec_from_file_location("download_e2e", os.path.join(REPO, "data", "download_e2e.py"))
dl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dl)


@pytest.fixture
def fake_published(tmp_path, monkeypatch):
    """Three small files whose hashes stand in for the published ones."""
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for name in dl.FILES:
        data = f"name : {name}||A line of {name} . \n".encode() * 3
        (src / name).write_bytes(data)
        files[name] = (hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setattr(dl, "FILES", files)
    return src


def test_published_hashes_match_source_md():
    """The hashes in the script are the ones SOURCE.md publishes (when the shared notes are there)."""
    source = os.path.join(REPO, "..", "shared", "data", "e2e", "SOURCE.md")
    if not os.path.isfile(source):
        pytest.skip("../shared/data/e2e/SOURCE.md not present")
    text = open(source, encoding="utf-8").read()
    for name, (sha, size) in dl.FILES.items():
        assert sha in text and f"{size:,}" in text, name


def test_copy_from_dir(fake_published, tmp_path, capsys):
    out = tmp_path / "out"
    assert dl.main(["--from", str(fake_published), "--out_dir", str(out)]) == 0
    for name in dl.FILES:
        assert (out / name).read_bytes() == (fake_published / name).read_bytes()
    assert sorted(os.listdir(out)) == sorted(dl.FILES)  # no temporary files left
    assert dl.main(["--from", str(fake_published), "--out_dir", str(out)]) == 0
    assert "present, sha256 ok" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["corrupted", "partial"])
def test_bad_file_refused_and_good_copy_kept(fake_published, tmp_path, capsys, damage):
    out = tmp_path / "out"
    assert dl.main(["--from", str(fake_published), "--out_dir", str(out)]) == 0
    good = (out / "valid.txt").read_bytes()
    bad = good.replace(b"A line", b"A lime") if damage == "corrupted" else good[:-10]
    (fake_published / "valid.txt").write_bytes(bad)
    assert dl.main(["--from", str(fake_published), "--out_dir", str(out), "--force"]) == 1
    err = capsys.readouterr().err
    assert "valid.txt: sha256" in err and damage in err and "refused" in err
    assert (out / "valid.txt").read_bytes() == good
    assert not [f for f in os.listdir(out) if f.endswith(".part")]


def test_missing_source_file(fake_published, tmp_path, capsys):
    os.remove(fake_published / "test.txt")
    assert dl.main(["--from", str(fake_published), "--out_dir", str(tmp_path / "out")]) == 1
    assert "has no test.txt" in capsys.readouterr().err


def test_real_files_check_out(real_e2e_dir, tmp_path):
    out = tmp_path / "out"
    assert dl.main(["--from", real_e2e_dir, "--out_dir", str(out)]) == 0
    assert os.path.getsize(out / "train.txt") == 9_624_463
