"""``kill -9`` at every point of a save: afterwards the old adapter or the new one loads, complete, never a mix.

The save runs in a forked child (torch is already imported: no interpreter start per kill point) whose file
operations (``mkstemp``, ``fsync``, ``link``, ``replace``, ``unlink``, ``copyfile``) are wrapped: at the chosen
point, just before or just after one of them, the child sends itself SIGKILL. The parent waits for it (with a
timeout), then loads the directory. Every point is tried: before, between and after the renames, for loralib's
``save_adapter`` and for the NLG example's checkpoint (``save_adapter_dir`` + ``save_training_state``); and a kill
during a save that follows a torn save.
"""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import tempfile
import time

import pytest
import torch

import loralib as lora

from .test_loader_fuzz import TINY_CFG, adapted, tiny_base  # importing it puts the NLG example on sys.path
from e2e_nlg import adapter_io, train_utils  # noqa: E402
from e2e_nlg.model import build_model  # noqa: E402

TIMEOUT_S = 60
WRAPPED = [(os, "replace"), (os, "link"), (os, "unlink"), (os, "fsync"), (tempfile, "mkstemp"), (shutil, "copyfile")]


class _Points:
    """Counts the wrapped file operations (two points each: before and after); SIGKILLs at point ``kill_at``."""

    def __init__(self, kill_at=None):
        self.kill_at, self.n, self.saved = kill_at, 0, []

    def _hit(self):
        if self.n == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.n += 1

    def __enter__(self):
        for mod, name in WRAPPED:
            real = getattr(mod, name)
            self.saved.append((mod, name, real))

            def wrapper(*a, _real=real, **k):
                self._hit()
                out = _real(*a, **k)
                self._hit()
                return out
            setattr(mod, name, wrapper)
        return self

    def __exit__(self, *exc):
        for mod, name, real in self.saved:
            setattr(mod, name, real)


def run_killed(save, kill_at):
    """Run ``save()`` in a forked child killed at point ``kill_at``; True if the kill happened."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            with _Points(kill_at):
                save()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the save killed at point {kill_at} did not finish within {TIMEOUT_S} s")
        time.sleep(0.005)
    assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3), f"the save raised (point {kill_at})"
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def count_points(save):
    with _Points() as p:
        save()
    return p.n


@pytest.fixture
def tmp_path(tmp_path_factory):
    """A fresh directory, on tmpfs where there is one: the saves fsync every file, and a kill -9 does not lose the
    page cache anyway (what is tested is the order of the renames, not the disk)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = tempfile.mkdtemp(prefix="loralib-kill-", dir=base) if base else str(tmp_path_factory.mktemp("kill"))
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def factors(model):
    return {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}


def which(got, old, new, what):
    """"old" or "new", whichever ``got`` equals exactly; anything else (a mix, a partial file) fails."""
    for name, ref in (("old", old), ("new", new)):
        if got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got):
            return name
    pytest.fail(f"{what}: loaded factors are neither the old adapter nor the new one")


def _set(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_kill_during_library_save_adapter(tmp_path, tally):
    old_model, new_model = _set(adapted(), 1), _set(adapted(), 2)
    old, new = factors(old_model), factors(new_model)
    pristine = str(tmp_path / "pristine")
    lora.save_adapter(old_model, pristine)
    scratch = str(tmp_path / "scratch")
    shutil.copytree(pristine, scratch)
    n = count_points(lambda: lora.save_adapter(new_model, scratch))
    seen, torn = {"old": 0, "new": 0}, None
    for point in range(n + 1):
        d = str(tmp_path / f"k{point}")
        shutil.copytree(pristine, d)
        killed = run_killed(lambda: lora.save_adapter(new_model, d), point)
        assert killed == (point < n)
        target = tiny_base()
        lora.load_adapter(target, d)
        seen[which(factors(target), old, new, f"killed at point {point}")] += 1
        if torn is None and _is_torn(d):
            torn = shutil.copytree(d, str(tmp_path / "torn"))
        # and the directory stays usable: a save after the kill completes and loads the new adapter
        lora.save_adapter(new_model, d)
        target = tiny_base()
        lora.load_adapter(target, d)
        assert which(factors(target), old, new, "save after a kill") == "new"
    assert seen["old"] > 0 and seen["new"] > 0
    # Kills during a save that follows a torn save (new weights beside the old config): old or newest, never
    # the torn save's weights.
    assert torn is not None, "no kill point left the weights and the config of different saves"
    newest_model = _set(adapted(), 3)
    newest = factors(newest_model)
    n2 = count_points(lambda: lora.save_adapter(newest_model, shutil.copytree(torn, str(tmp_path / "scratch2"))))
    for point in range(n2 + 1):
        d = shutil.copytree(torn, str(tmp_path / f"t{point}"))
        run_killed(lambda: lora.save_adapter(newest_model, d), point)
        target = tiny_base()
        lora.load_adapter(target, d)
        which(factors(target), old, newest, f"second save killed at point {point}")
    tally.add("faults injected: kill -9 during a save", n + 1 + n2 + 1)


def _is_torn(d):
    """Whether ``d`` holds weights that are not the ones its config names (a save killed between its renames)."""
    with open(os.path.join(d, "adapter_model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(d, "adapter_config.json")) as f:
        return json.load(f)["weights_sha256"] != sha


def _nlg_save(model, d, step, fmt):
    adapter_io.save_adapter_dir(model, d, base_seed=3, weights_format=fmt, extra={"step": step})
    train_utils.save_training_state(d, {"step": step, "lora": factors(model)})


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_kill_during_example_checkpoint(tmp_path, fmt, tally):
    old_model, new_model = _set(build_model(TINY_CFG, base_seed=3), 1), _set(build_model(TINY_CFG, base_seed=3), 2)
    old, new = factors(old_model), factors(new_model)
    pristine = str(tmp_path / "pristine")
    _nlg_save(old_model, pristine, 1, fmt)
    scratch = str(tmp_path / "scratch")
    shutil.copytree(pristine, scratch)
    n = count_points(lambda: _nlg_save(new_model, scratch, 2, fmt))
    seen = set()
    for point in range(n + 1):
        d = str(tmp_path / f"k{point}")
        shutil.copytree(pristine, d)
        assert run_killed(lambda: _nlg_save(new_model, d, 2, fmt), point) == (point < n)
        model, config = adapter_io.load_model_from_adapter_dir(d)
        got = which(factors(model), old, new, f"adapter, killed at point {point}")
        assert config["step"] == {"old": 1, "new": 2}[got], f"point {point}: config of one save, weights of another"
        state = train_utils.load_training_state(d)  # what --resume reads: self-consistent on its own
        in_state = which(state["lora"], old, new, f"training state, killed at point {point}")
        assert state["step"] == {"old": 1, "new": 2}[in_state]
        seen.add((got, in_state))
    assert ("old", "old") in seen and ("new", "new") in seen
    tally.add("faults injected: kill -9 during a save", n + 1)
