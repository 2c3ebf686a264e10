"""Ctrl-C at random moments of ``run_training.py``; ``--resume`` then ends with the uninterrupted run's adapter.

A real SIGINT is sent to this process at a moment drawn (seeded) from four kinds: while a batch is produced (data
loading), inside a forward pass (a training step or validation), at the optimizer step (which must hold the
signal until the step is committed), and while a checkpoint file is written (a save). The interrupted run raises
KeyboardInterrupt; the next ``--resume`` run continues from what was saved, and may be interrupted in turn. The
runs are in-process on a tiny model (dropout on, so the RNG state must be restored at the right step too).
"""
import json
import os
import random
import signal

import pytest
import torch

import loralib as lora

from . import test_loader_fuzz  # noqa: F401  (puts the NLG example on sys.path)
import run_training  # noqa: E402
from e2e_nlg import adapter_io, data, train_utils  # noqa: E402
from e2e_nlg.model import SimpleGPT2WithLoRA  # noqa: E402

SEED = 7
MOMENTS = 20  # Ctrl-Cs actually delivered, as the issue asks; a chain continues until its last run finishes
KINDS = ("data", "forward", "optimizer step", "save")

def _nlg_conftest():
    """tests/nlg/conftest.py's helpers (write_e2e, tiny_args), loaded under a name of its own."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "nlg", "conftest.py")
    spec = importlib.util.spec_from_file_location("_nlg_conftest_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NLG_CONF = _nlg_conftest()


def _tiny(e2e, out, *extra):
    return NLG_CONF.tiny_args(e2e, out, "--lora_dropout", "0.1", "--num_epochs", "2", *extra)


class Moments:
    """Counts the moments of each kind in this run and sends SIGINT at the chosen one (``kind``, ``index``)."""

    def __init__(self, monkeypatch):
        self.target, self.counts, self.fired = None, dict.fromkeys(KINDS, 0), False
        real_batches, real_forward = data.iterate_batches, SimpleGPT2WithLoRA.forward
        real_step, real_write = torch.optim.AdamW.step, lora.serialization.atomic_write

        def batches(*a, **k):
            for b in real_batches(*a, **k):
                self.hit("data")
                yield b

        def forward(model, *a, **k):
            self.hit("forward")
            return real_forward(model, *a, **k)

        def step(opt, *a, **k):
            out = real_step(opt, *a, **k)
            self.hit("optimizer step")  # inside the deferred block: the step must still be committed whole
            return out

        def write(*a, **k):
            self.hit("save")
            return real_write(*a, **k)

        monkeypatch.setattr(data, "iterate_batches", batches)
        monkeypatch.setattr(SimpleGPT2WithLoRA, "forward", forward)
        monkeypatch.setattr(torch.optim.AdamW, "step", step)
        for mod in (lora.serialization, train_utils):  # the adapter's files (lora.save_adapter), the training state's
            monkeypatch.setattr(mod, "atomic_write", write)

    def arm(self, kind, index):
        self.target, self.fired, self.counts = (kind, index), False, dict.fromkeys(KINDS, 0)

    def hit(self, kind):
        self.counts[kind] += 1
        if not self.fired and self.target == (kind, self.counts[kind]):
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode, wherever that is


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever the process started with: a shell
    without job control starts its background jobs with SIGINT ignored, and the SIGINTs below would be lost."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_at_random_moments_then_resume_gives_the_same_adapter(tmp_path, monkeypatch, tally, python_sigint):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setenv("LORALIB_NLG_CACHE", str(tmp_path / "cache"))
    e2e = NLG_CONF.write_e2e(tmp_path / "e2e")
    moments = Moments(monkeypatch)
    moments.arm(None, 0)
    args = _tiny(e2e, tmp_path / "full")
    reference = run_training.train(run_training.get_parser().parse_args(args))
    per_run = dict(moments.counts)  # how many moments of each kind one whole run has
    want = adapter_io.read_adapter_weights(str(tmp_path / "full"))

    rng = random.Random(SEED)
    delivered, runs, chains, where = 0, 0, 0, {k: 0 for k in KINDS}
    while delivered < MOMENTS:
        chains += 1
        out = tmp_path / f"chain{chains}"
        resume = False
        while True:  # one chain: interrupted runs resumed until one finishes
            kind = rng.choice(KINDS)
            moments.arm(kind, rng.randint(1, max(1, per_run[kind] // 2)))
            a = _tiny(e2e, out, *(["--resume"] if resume else []))
            runs += 1
            try:
                metrics = run_training.train(run_training.get_parser().parse_args(a))
            except KeyboardInterrupt:
                assert moments.fired, "KeyboardInterrupt without a Ctrl-C"
                delivered += 1
                where[kind] += 1
                resume = True
                continue
            # Finished (the moment may have come after the end, or in the last save: that one is complete).
            if moments.fired:
                delivered += 1
                where[kind] += 1
            break
        assert metrics["steps"] == reference["steps"]
        got = adapter_io.read_adapter_weights(str(out))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"chain {chains}: {k}")
        assert json.loads((out / "metrics.json").read_text())["finished"] is True
    tally.add("faults injected: Ctrl-C during run_training.py", delivered)
    tally.note(f"Ctrl-C moments: {', '.join(f'{n} {k}' for k, n in where.items())} ({runs} runs, {chains} resumed "
               "chains, each ending with the uninterrupted run's adapter)")
