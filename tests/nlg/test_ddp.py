"""run_training.py under torchrun: 2 CPU processes (gloo) give the adapter one process gives with the same global
batch, only rank 0 writes, Ctrl-C stops every process cleanly with a checkpoint that --resume continues, and the
launch errors are one clear line."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import run_training
from conftest import NLG, tiny_args
from e2e_nlg import distributed
from e2e_nlg import train_utils
from e2e_nlg.adapter_io import read_adapter_weights

SCRIPT = os.path.join(NLG, "run_training.py")
REPO = os.path.abspath(os.path.join(NLG, "..", ".."))

# Loaded into every torchrun worker (via PYTHONPATH): records each file a rank creates or replaces under
# $WRITE_WATCH_DIR in $WRITE_LOG_DIR/rank<RANK>.txt, so the test can see which process wrote what.
SITECUSTOMIZE = r'''
import builtins, os, tempfile
_watch, _log = os.environ.get("WRITE_WATCH_DIR"), os.environ.get("WRITE_LOG_DIR")
if _watch and _log and "RANK" in os.environ:
    _logfile = os.path.join(_log, "rank%s.txt" % os.environ["RANK"])
    _real_open, _real_replace, _real_mkstemp = builtins.open, os.replace, tempfile.mkstemp

    def _note(path):
        p = os.path.abspath(os.fspath(path))
        if p.startswith(_watch):
            with _real_open(_logfile, "a") as f:
                f.write(p + "\n")

    def _open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            _note(file)
        return _real_open(file, mode, *a, **k)

    def _replace(src, dst, *a, **k):
        _note(dst)
        return _real_replace(src, dst, *a, **k)

    def _mkstemp(*a, **k):
        fd, path = _real_mkstemp(*a, **k)
        _note(path)
        return fd, path

    builtins.open, os.replace, tempfile.mkstemp = _open, _replace, _mkstemp
'''


def torchrun_cmd(nproc, argv):
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            SCRIPT, *argv]


def start(cmd, env):
    # Its own session, so a failed test can kill torchrun and its workers together, leaving no orphan.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{out[-2000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def run_torchrun(nproc, argv, env, timeout=120):
    return finish(start(torchrun_cmd(nproc, argv), env), timeout)


def worker_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    logs = tmp_path / "write_logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), REPO]), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", WRITE_WATCH_DIR=str(tmp_path), WRITE_LOG_DIR=str(logs))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def writes(tmp_path, rank):
    f = tmp_path / "write_logs" / f"rank{rank}.txt"
    return f.read_text().split() if f.exists() else []


def set_arg(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def assert_same_adapter(a_dir, b_dir, atol=1e-5, rel=None):
    """Equal tensors within ``atol``, or within ``rel`` times each tensor's largest magnitude."""
    a, b = read_adapter_weights(str(a_dir)), read_adapter_weights(str(b_dir))
    assert a.keys() == b.keys() and a
    for k in a:
        tol = atol if rel is None else rel * float(b[k].abs().max())
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= tol, f"{k}: max difference {diff:.3g} > {tol:.3g}"


def test_two_processes_equal_one_process_with_the_global_batch(e2e_dir, tmp_path):
    """2 ranks x batch 2 x grad_accum 2 == 1 process x batch 8, over 2 epochs (reshuffled): same adapter."""
    common = ("--max_train_examples", "32", "--num_epochs", "2", "--label_smoothing", "0.1", "--log_interval", "1")
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    argv = tiny_args(e2e_dir, ddp_out, *common, "--grad_accum", "2")
    argv = set_arg(argv, "--batch_size", "2")
    rc, out, err = run_torchrun(2, argv, worker_env(tmp_path))
    assert rc == 0, out[-2000:] + err[-3000:]
    assert "Traceback" not in err
    # Only rank 0 prints, and the log states the global batch.
    assert out.count("done: 8 steps") == 1 and out.count("data: ") == 1 and out.count("step 1/8 ") == 1
    assert "2 processes (gloo), global batch 2 (batch_size) x 2 (processes) x 2 (grad_accum) = 8 examples" in out
    # Only rank 0 wrote files (the checkpoint, metrics, plot; the token cache too).
    assert writes(tmp_path, 1) == []
    written = {os.path.basename(p) for p in writes(tmp_path, 0)}
    assert {"pytorch_model.bin", "training_state.pt", "metrics.json", "loss.png"} <= written

    assert run_training.main(set_arg(tiny_args(e2e_dir, ref_out, *common), "--batch_size", "8")) == 0
    assert_same_adapter(ddp_out, ref_out)
    m_ddp = json.loads((ddp_out / "metrics.json").read_text())
    m_ref = json.loads((ref_out / "metrics.json").read_text())
    assert (m_ddp["world_size"], m_ddp["global_batch"], m_ddp["steps"]) == (2, 8, 8)
    assert (m_ref["world_size"], m_ref["global_batch"], m_ref["steps"]) == (1, 8, 8)
    assert m_ddp["val_loss_final"] == pytest.approx(m_ref["val_loss_final"], abs=1e-5)
    h_ddp = json.loads((ddp_out / "loss_history.json").read_text())["train"]
    h_ref = json.loads((ref_out / "loss_history.json").read_text())["train"]
    assert [s for s, _ in h_ddp] == [s for s, _ in h_ref]
    assert [v for _, v in h_ddp] == pytest.approx([v for _, v in h_ref], abs=1e-5)  # the global token mean


def test_ctrl_c_under_torchrun_stops_all_ranks_and_resume_finishes_the_run(e2e_dir, tmp_path):
    """SIGINT to torchrun mid-run: both workers stop at the same step boundary, rank 0 saves; --resume with 2
    processes then ends with the adapter an uninterrupted 1-process run gives."""
    common = ("--max_train_examples", "32", "--num_epochs", "40", "--log_interval", "1", "--warmup_steps", "2")
    out = tmp_path / "ddp"
    argv = set_arg(tiny_args(e2e_dir, out, *common), "--batch_size", "4")  # 2 x 4 = 8 per step, 160 steps
    env = worker_env(tmp_path)
    proc = start(torchrun_cmd(2, argv), env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/160 "):
            proc.send_signal(signal.SIGINT)  # to torchrun only: it forwards the signal to its workers
            break
    rc, rest, err = finish(proc, 60)
    stdout = "".join(lines) + rest
    assert rc != 0
    assert stdout.count("interrupted by SIGINT at step") == 1, stdout[-2000:] + err[-3000:]
    assert "Connection closed" not in err and "hang" not in err.lower()
    state = train_utils.load_training_state(str(out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] is False and 3 <= m["steps"] == state["step"] < 160
    assert f"interrupted by SIGINT at step {m['steps']}:" in stdout
    assert writes(tmp_path, 1) == []

    rc, stdout, err = run_torchrun(2, argv + ["--resume"], env, timeout=180)
    assert rc == 0, err[-3000:]
    assert f"resumed from {out} at step {m['steps']} of 160" in stdout
    assert json.loads((out / "metrics.json").read_text())["finished"] is True
    assert writes(tmp_path, 1) == []

    ref = tmp_path / "ref"
    assert run_training.main(set_arg(tiny_args(e2e_dir, ref, *common), "--batch_size", "8")) == 0
    # 160 AdamW steps at lr 1e-2 amplify the rounding of 2-process vs 1-process sums (which differs between CPUs)
    # to ~1e-4 of the weights' size; a resume that lost state would be off by orders of magnitude more.
    assert_same_adapter(out, ref, rel=2e-4)


def test_resume_with_another_global_batch_is_refused(e2e_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_training.main(tiny_args(e2e_dir, out, "--max_steps", "1")) == 0
    assert run_training.main(tiny_args(e2e_dir, out, "--resume", "--grad_accum", "2")) == 2
    err = capsys.readouterr().err
    assert "global batch of 4" in err and "this run has 8" in err and "Traceback" not in err


def one_process_torchrun_env(monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0").items():
        monkeypatch.setenv(k, v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU behaviour")
@pytest.mark.parametrize("extra, message", [
    (["--dist_backend", "nccl"], "--dist_backend nccl needs CUDA GPUs but this run is on the CPU"),
    (["--device", "cuda"], "--device cuda was asked for but no CUDA GPU"),
    (["--device", "cuda:1"], "--device cuda:1 pins every process to one GPU"),
])
def test_launch_errors_are_one_line(e2e_dir, tmp_path, monkeypatch, capsys, extra, message):
    one_process_torchrun_env(monkeypatch)
    argv = tiny_args(e2e_dir, tmp_path / "out")
    del argv[argv.index("--device"):argv.index("--device") + 2]
    assert run_training.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(train_utils.DeviceError, match="LOCAL_RANK 2 needs GPU 2 but only 2 GPU.*--nproc_per_node 2"):
        distributed.device_for_rank("cuda", 2)
    assert distributed.device_for_rank("auto", 1) == torch.device("cuda", 1)
    assert distributed.choose_backend("auto", torch.device("cuda", 1)) == "nccl"
    assert distributed.choose_backend("auto", torch.device("cpu")) == "gloo"


def test_plain_run_has_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.init("cpu")
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    assert not torch.distributed.is_initialized()
