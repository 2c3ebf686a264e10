"""The examples fetch the E2E data themselves when it is found nowhere (through data/download_e2e.py's fetch_e2e),
never touch the network when it is found or --no_download is given, and fail offline with one line. The network is
never used: the downloader's _fetch is replaced by a failing one (offline) or one serving a local directory."""
import hashlib
import os
import urllib.error

import pytest

import compare_lora_vs_full as cmp
import run_inference
import run_training
from conftest import tiny_args, write_e2e
from e2e_nlg import data


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No --data_dir, $E2E_DATA_DIR unset, data/e2e/ redirected to an empty temporary place."""
    monkeypatch.setenv("LORALIB_NLG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    target = tmp_path / "repo_data_e2e"
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", str(target))
    return target


@pytest.fixture
def dl():
    return data.downloader()


@pytest.fixture
def offline(dl, monkeypatch):
    calls = []

    def fail(url, dst, size, progress):
        calls.append(url)
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(dl, "_fetch", fail)
    return calls


@pytest.fixture
def served(dl, tmp_path, monkeypatch):
    """A 'server': tiny E2E files in a directory, published hashes patched to theirs; records the URLs fetched."""
    src = write_e2e(tmp_path / "server")
    files = {}
    for name in dl.FILES:
        data = open(os.path.join(src, name), "rb").read()
        files[name] = (hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setattr(dl, "FILES", files)
    calls = []

    def serve(url, dst, size, progress):
        calls.append(url)
        with open(os.path.join(src, url.rsplit("/", 1)[1]), "rb") as f:
            dst.write(f.read())

    monkeypatch.setattr(dl, "_fetch", serve)
    return src, calls


def _one_error_line(err):
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _assert_offline_message(line):
    for part in ("--data_dir", "$E2E_DATA_DIR", "data/e2e/", "python data/download_e2e.py --from DIR",
                 "Name or service not known", "Offline?"):
        assert part in line, (part, line)


def test_training_offline_fails_with_one_line(nowhere, offline, tmp_path, capsys):
    argv = tiny_args("unused", tmp_path / "out")[2:]  # no --data_dir
    assert run_training.main(argv) == 2
    _assert_offline_message(_one_error_line(capsys.readouterr().err))
    assert offline == [data.downloader().BASE_URL + "train.txt"]  # the first failure stops it
    assert not os.path.exists(tmp_path / "out")
    assert not nowhere.exists()  # no partial file, not even an empty data/e2e/, left behind


def test_inference_eval_and_compare_offline(nowhere, offline, tmp_path, capsys):
    assert run_inference.main(["--eval", "--adapter_dir", str(tmp_path / "no_adapter")]) == 2
    _assert_offline_message(_one_error_line(capsys.readouterr().err))  # the data is checked before the adapter
    assert cmp.main(["--device", "cpu"]) == 2
    _assert_offline_message(_one_error_line(capsys.readouterr().err))
    assert len(offline) == 2


def test_download_lands_atomically_then_training_runs(nowhere, served, tmp_path, capsys):
    src, calls = served
    data.ensure_data(None, ("train", "valid"), progress=False)
    assert sorted(os.listdir(nowhere)) == ["test.txt", "train.txt", "valid.txt"]  # no temporary file left
    for name in ("train.txt", "valid.txt", "test.txt"):
        assert (nowhere / name).read_bytes() == open(os.path.join(src, name), "rb").read()
    assert [u.rsplit("/", 1)[1] for u in calls] == ["train.txt", "valid.txt", "test.txt"]
    assert "fetching it into data/e2e/" in capsys.readouterr().err
    # Found now: training neither fetches again nor needs --data_dir.
    assert run_training.main(tiny_args("unused", tmp_path / "out", "--max_steps", "1")[2:]) == 0
    assert len(calls) == 3


def test_corrupted_download_is_refused_and_leaves_nothing(nowhere, served, dl, monkeypatch, capsys):
    src, calls = served
    with open(os.path.join(src, "valid.txt"), "ab") as f:
        f.write(b"tampered\n")
    with pytest.raises(data.DataError) as e:
        data.ensure_data(None, ("train", "valid"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "valid.txt: sha256" in msg and "refused" in msg and "--from DIR" in msg
    assert sorted(os.listdir(nowhere)) == ["train.txt"]  # the good file kept, the bad one never renamed in


def test_no_download_never_fetches(nowhere, served, tmp_path, capsys):
    _, calls = served
    assert run_training.main(tiny_args("unused", tmp_path / "out")[2:] + ["--no_download"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--no_download" in line and "$E2E_DATA_DIR" in line and "python data/download_e2e.py --from DIR" in line
    assert run_inference.main(["--eval", "--no_download", "--adapter_dir", str(tmp_path / "x")]) == 2
    assert "--no_download" in _one_error_line(capsys.readouterr().err)
    assert calls == [] and not nowhere.exists()


def test_found_data_is_never_fetched(nowhere, served, tmp_path, monkeypatch):
    _, calls = served
    env_dir = write_e2e(tmp_path / "env")
    monkeypatch.setenv(data.ENV_VAR, env_dir)
    data.ensure_data(None, ("train", "valid", "test"))
    monkeypatch.delenv(data.ENV_VAR)
    data.ensure_data(env_dir, ("train", "valid"))  # --data_dir
    with pytest.raises(data.DataError, match="--data_dir .* has no train.txt"):
        data.ensure_data(str(tmp_path / "empty"), ("train",))  # an explicit directory is never replaced by a fetch
    assert calls == [] and not nowhere.exists()
