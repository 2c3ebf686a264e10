"""compare_lora_vs_full.py and e2e_nlg/measure.py: the figures are measured correctly, the two modes really are LoRA
vs full fine-tuning of the same base, and bad input ends in a clear message."""
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

NLG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "NLG")
REPO = os.path.abspath(os.path.join(NLG, "..", ".."))
SCRIPT = os.path.join(NLG, "compare_lora_vs_full.py")
sys.path.insert(0, NLG)

import run_inference  # noqa: E402
from e2e_nlg import measure  # noqa: E402
from e2e_nlg.data import load_references  # noqa: E402
from e2e_nlg.model import GPTConfig, base_fingerprint  # noqa: E402


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_lora_vs_full", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cmp = _load_script()
TINY = ["--hidden_dim", "32", "--num_heads", "2", "--num_layers", "2"]
V = GPTConfig.vocab_size


def gpt2_params(C, L, V, P=GPTConfig.max_positions):
    """GPT-2 parameter count, written out layer by layer: what full fine-tuning trains."""
    per_layer = (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (2 * C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + P * C + L * per_layer + 2 * C + V * C  # wte, wpe, blocks, ln_f, lm_head (untied, no bias)


def lora_params(r, C, L, V):
    """LoRA's A (r_total x in) and B (out x r_total) for every adapted layer of SimpleGPT2WithLoRA."""
    c_attn = 2 * r * C + 2 * C * r  # MergedLinear(C, 3C), enable_lora=[q, not k, v]: A (2r, C), B (2C, r)
    c_fc = r * C + 4 * C * r  # Linear(C, 4C)
    mlp_proj = r * 4 * C + C * r  # Linear(4C, C)
    lm_head = r * C + V * r  # Linear(C, V)
    return L * (c_attn + c_fc + mlp_proj) + lm_head


# --- the two modes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 4, 16])
def test_lora_trainable_count_is_the_lora_formula(r):
    args, _ = cmp.parse_args(TINY + ["--lora_dim", str(r)])
    counts = measure.param_counts(cmp.build_for_mode(args, "lora", torch.device("cpu")))
    assert counts["trainable"] == lora_params(r, 32, 2, V)
    assert counts["frozen"] == gpt2_params(32, 2, V)
    assert counts["total"] == counts["trainable"] + counts["frozen"]


def test_changing_lora_dim_changes_trainable_by_the_formula_and_full_not_at_all():
    n = {}
    for r in (2, 8):
        args, _ = cmp.parse_args(TINY + ["--lora_dim", str(r)])
        n[r] = {m: measure.param_counts(cmp.build_for_mode(args, m, torch.device("cpu")))["trainable"]
                for m in cmp.MODES}
    assert n[8]["lora"] - n[2]["lora"] == (8 - 2) * (2 * (4 * 32 + 5 * 32 + 5 * 32) + 32 + V)
    assert n[2]["full"] == n[8]["full"] == gpt2_params(32, 2, V)


def test_full_mode_is_the_plain_model_on_the_same_base_all_trainable():
    args, _ = cmp.parse_args(TINY)
    lora_m = cmp.build_for_mode(args, "lora", torch.device("cpu"))
    full_m = cmp.build_for_mode(args, "full", torch.device("cpu"))
    assert not any("lora_" in n for n, _ in full_m.named_parameters())
    assert all(p.requires_grad for p in full_m.parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora_m.named_parameters())
    assert base_fingerprint(lora_m) == base_fingerprint(full_m)
    ids = torch.randint(0, V, (2, 9))
    lora_m.eval(), full_m.eval()
    torch.testing.assert_close(lora_m(ids).logits, full_m(ids).logits)  # B = 0: LoRA starts as the base
    other, _ = cmp.parse_args(TINY + ["--seed", "1"])
    assert base_fingerprint(cmp.build_for_mode(other, "full", torch.device("cpu"))) != base_fingerprint(full_m)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_keeps_its_frozen_base_in_the_precision_and_full_trains_float32(precision):
    """LoRA: frozen base in the precision's dtype, LoRA weights and their gradients float32; full fine-tuning:
    every weight float32 and trainable, before and after steps under autocast; both from the same float32 base."""
    args, _ = cmp.parse_args(TINY + ["--lora_dim", "2", "--steps", "2", "--warmup", "1"])
    cpu, half = torch.device("cpu"), {"fp32": "float32", "bf16": "bfloat16"}[precision]
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, V, (2, 7)), "labels": torch.randint(0, V, (2, 7))} for _ in range(2)]
    fingerprints = {}
    for mode in cmp.MODES:
        model, fingerprints[mode] = cmp.prepare_model(args, mode, cpu, precision)
        want = {"trainable": ["float32"], "frozen": [half] if mode == "lora" else []}
        assert cmp.param_dtypes(model) == want
        out = cmp.train_measured(args, model, batches, cpu, precision, mode)
        assert cmp.param_dtypes(model) == want
        n = measure.param_counts(model)["trainable"]
        assert out["grad_bytes"] == 4 * n  # float32 gradients
        assert all(0 < x < 20 for x in out["train_losses"])
    assert fingerprints["lora"] == fingerprints["full"] == base_fingerprint(cmp.build_for_mode(args, "full", cpu))


# --- measure.py -----------------------------------------------------------------------------------------------------

def test_param_counts_count_a_shared_tensor_once():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight
    m[0].weight.requires_grad_(False)
    assert measure.param_counts(m) == {"total": 40, "trainable": 0, "frozen": 40, "trainable_share": 0.0}


def test_grad_and_adamw_state_bytes_are_the_tensors_they_hold():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    m[0].weight.requires_grad_(False)
    trainable = [p for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)  # 16 + 48 + 3
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    assert measure.optimizer_state_bytes(opt) == 0  # AdamW creates its state on the first step
    m(torch.randn(5, 8)).sum().backward()
    assert measure.grad_bytes(m) == 4 * n
    opt.step()
    steps = [s["step"] for s in opt.state.values()]
    assert measure.optimizer_state_bytes(opt) == 2 * 4 * n + sum(t.numel() * t.element_size() for t in steps)
    opt.zero_grad(set_to_none=True)
    assert measure.grad_bytes(m) == 0


def test_saved_tensor_bytes_counts_activations_once_and_not_parameters():
    w = nn.Parameter(torch.randn(128, 256))
    x = torch.randn(64, 128, requires_grad=True)
    with measure.SavedTensorBytes(exclude=[w]) as saved:
        h = x @ w  # saves x (for w's grad) and w (excluded: a parameter)
        y = h.relu()  # saves its output
        z = (y * y).sum()  # saves y twice: one storage, counted once
    assert saved.bytes == 64 * 128 * 4 + 64 * 256 * 4
    assert saved.count == 2
    z.backward()  # the hooks handed the tensors back unchanged
    torch.testing.assert_close(w.grad, x.detach().t() @ (2 * y.detach() * (h.detach() > 0)))


def test_allreduce_counter_counts_the_trainable_gradients_ddp_syncs():
    args, _ = cmp.parse_args(TINY + ["--lora_dim", "2"])
    model = cmp.build_for_mode(args, "lora", torch.device("cpu"))
    batch = {"input_ids": torch.randint(0, V, (2, 7)), "labels": torch.randint(0, V, (2, 7))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = cmp.allreduce_bytes_per_step(model, batch, torch.device("cpu"))
    assert got["bytes"] == measure.param_bytes(model, trainable_only=True) == 4 * lora_params(2, 32, 2, V)
    assert (got["world_size"], got["backend"]) == (1, "gloo")
    assert not torch.distributed.is_initialized()  # its own group of one, gone again
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step taken
    assert all(p.grad is None for p in model.parameters())


def test_saved_file_bytes_is_the_file_written(tmp_path):
    sd = {"a": torch.zeros(1000), "b": torch.ones(10, 10, dtype=torch.float64)}
    n = measure.saved_file_bytes(sd, str(tmp_path), "x.pt")
    assert n == os.path.getsize(tmp_path / "x.pt")
    assert 4000 + 800 < n < 4000 + 800 + 4096  # the tensors' bytes plus a small archive overhead
    assert measure.saved_file_bytes(sd, name="x.pt") == n  # in a temporary directory: the same file


def test_peak_rss_sees_a_transient_allocation():
    with measure.PeakRSS() as peak:
        t = torch.ones(64 << 18)  # 64 MiB, touched, then freed before the window closes
        del t
    assert peak.method
    assert peak.delta >= 60 << 20
    assert peak.peak >= peak.baseline + peak.delta


def test_peak_memory_picks_the_measurement_for_the_device():
    assert isinstance(measure.peak_memory(torch.device("cpu")), measure.PeakRSS)
    with measure.peak_memory(torch.device("meta")) as none:
        pass
    assert none.peak is None and none.method.startswith("n/a")
    assert cmp.fmt_mib(none.peak) == "n/a"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_sees_a_transient_allocation():
    dev = torch.device("cuda")
    with measure.peak_memory(dev) as peak:
        t = torch.ones(64 << 18, device=dev)
        del t
    assert peak.delta >= 64 << 20


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--hidden_dim", "30", "--num_heads", "4"], "divisible by --num_heads"),
    (["--vocab_size", "1000"], "at least 50257"),
    (["--steps", "3", "--warmup", "3"], "at least one step is timed"),
    (["--lora_dim", "0"], r"--lora_dim \(r\) .*: r must be a positive int"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--lora_dropout", "1.0"], r"\[0, 1\)"),
    (["--seq_len", "5000"], r"--seq_len must be <= 1024 \(the model's positions\), got 5000"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--val_examples", "0"], "--val_examples must be >= 1, got 0"),
    (["--lora_alpha", "0"], "lora_alpha must be a positive finite number when r > 0, got lora_alpha=0"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--score", "-1"], r"--score must be >= 0 \(0: no scoring\), got -1"),
    (["--full_lr", "0"], "--full_lr must be > 0, got 0.0"),
    (["--delex", "price"], "--delex 'price': price cannot be delexicalised"),
    (["--train_refs", "some"], "invalid choice: 'some'"),
])
def test_bad_flags_are_rejected_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cmp.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_missing_data_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("E2E_DATA_DIR", raising=False)
    assert cmp.main(["--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no train.txt" in err and "download_e2e.py" in err


def test_fp16_on_a_cpu_is_a_clear_error(capsys):
    assert cmp.main(["--device", "cpu", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --precision fp16 is for CUDA GPUs") and err.count("\n") == 1


def test_bad_device_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert cmp.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no CUDA GPU" in err and "--device cpu" in err


# --- a real run of the script ---------------------------------------------------------------------------------------

def test_tiny_run_writes_every_measured_figure(e2e_dir, tmp_path):
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    r = 4
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, SCRIPT, *TINY, "--lora_dim", str(r), "--steps", "3", "--warmup", "1", "--batch_size", "2",
         "--seq_len", "48", "--val_examples", "4", "--infer_reps", "2", "--device", "cpu", "--data_dir", e2e_dir,
         "--score", "3", "--full_lr", "1e-3", "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA/full" in proc.stdout and "Traceback" not in proc.stderr
    s = json.loads(out_json.read_text())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert s["same_base_weights"] is True and s["device"] == "cpu"
    lo, fu = s["lora"], s["full"]
    # The default precision reaches both runs: every weight float32, no autocast.
    assert s["precision"] == {"name": "fp32", "why": "asked for with --precision", "autocast_dtype": None}
    assert lo["param_dtypes"] == {"trainable": ["float32"], "frozen": ["float32"]}
    assert fu["param_dtypes"] == {"trainable": ["float32"], "frozen": []}
    assert "precision: fp32 (asked for with --precision): every weight float32, no autocast" in proc.stdout
    assert "precision fp32 (asked for with --precision)" in proc.stderr
    assert lo["params"]["trainable"] == lora_params(r, 32, 2, V)
    assert fu["params"]["trainable"] == fu["params"]["total"] == lo["params"]["frozen"] == gpt2_params(32, 2, V)
    for m in (lo, fu):
        assert len(m["step_times_s"]) == 3 and all(t > 0 for t in m["step_times_s"])
        assert m["median_step_s"] == statistics.median(m["step_times_s"][1:])  # warm-up step left out
        assert m["checkpoint"]["bytes"] > 4 * m["params"]["trainable"]  # the file holds at least the tensors
        assert m["grad_bytes"] == 4 * m["params"]["trainable"]
        # What DDP syncs, measured by its comm hook: every trainable gradient, once per step, nothing frozen.
        assert m["allreduce"]["bytes"] == m["grad_bytes"] and m["allreduce"]["buckets"] >= 1
        assert m["optimizer_state_bytes"] > 2 * 4 * m["params"]["trainable"]
        assert m["saved_tensor_bytes"] > 0
        pm = m["peak_memory"]
        assert pm["peak_bytes"] >= pm["baseline_bytes"] > 0 and pm["delta_bytes"] >= 0
        assert 0 < m["val_loss_after"] < 20
    assert lo["checkpoint"]["keys"] == 2 * 3 * 2 + 2  # A and B of c_attn, c_fc, c_proj in 2 layers, and lm_head
    assert lo["checkpoint"]["bytes"] < fu["checkpoint"]["bytes"]
    assert lo["optimizer_state_bytes"] < fu["optimizer_state_bytes"]
    # Same base, LoRA's B = 0 at the start: both modes begin at the same validation loss.
    assert lo["val_loss_before"] == pytest.approx(fu["val_loss_before"], rel=1e-5)
    assert lo["train_losses"][0] == pytest.approx(fu["train_losses"][0], rel=1e-5)
    inf = s["inference"]
    assert inf["lora_is_merged"] is True and inf["merged_lora_median_s"] > 0 and inf["plain_median_s"] > 0
    R = s["ratios_lora_over_full"]
    assert R["checkpoint_bytes"] == lo["checkpoint"]["bytes"] / fu["checkpoint"]["bytes"]
    assert R["median_step_s"] == lo["median_step_s"] / fu["median_step_s"]
    assert R["allreduce_bytes"] == lo["allreduce"]["bytes"] / fu["allreduce"]["bytes"] < 0.2
    assert "all-reduced per step (DDP)" in proc.stdout
    # --full_lr reaches full fine-tuning only; --score: both modes write texts for the same spread-out test MRs.
    assert (lo["lr"], fu["lr"]) == (2e-4, 1e-3)
    n_test = len(load_references("test", e2e_dir))
    for m in (lo, fu):
        sc = m["score"]
        assert (sc["mrs"], sc["of"], sc["indices"]) == (3, n_test, [0, n_test // 3, 2 * n_test // 3])
        assert len(sc["texts"]) == 3 and 0 <= sc["bleu"] <= 1 and sc["slots"]["slots"] > 0
        inference = run_inference.get_parser().parse_args([])  # decoded as run_inference.py does by default
        assert (sc["decoding"]["beam_size"], sc["decoding"]["no_repeat_ngram_size"],
                sc["decoding"]["max_new_tokens"]) == (inference.beam_size, inference.no_repeat_ngram_size,
                                                      inference.max_new_tokens)
    assert f"BLEU, 3 of {n_test} test MRs" in proc.stdout and "slot error rate, same MRs" in proc.stdout
    assert f"[lora] 3 of {n_test} test MRs: BLEU" in proc.stderr  # the log says it is a subset too


def test_tiny_run_in_bf16_records_its_precision(e2e_dir, tmp_path):
    out_json = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, SCRIPT, *TINY, "--lora_dim", "4", "--steps", "2", "--warmup", "1", "--batch_size", "2",
         "--seq_len", "48", "--val_examples", "4", "--infer_reps", "1", "--device", "cpu", "--data_dir", e2e_dir,
         "--precision", "bf16", "--json", str(out_json)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out_json.read_text())
    assert s["precision"] == {"name": "bf16", "why": "asked for with --precision", "autocast_dtype": "bfloat16"}
    lo, fu = s["lora"], s["full"]
    assert lo["param_dtypes"] == {"trainable": ["float32"], "frozen": ["bfloat16"]}
    assert fu["param_dtypes"] == {"trainable": ["float32"], "frozen": []}
    # The frozen base takes 2 bytes a weight, the trainable weights 4, in LoRA mode; full keeps 4 bytes everywhere.
    assert lo["param_bytes"] == 2 * lo["params"]["frozen"] + 4 * lo["params"]["trainable"]
    assert fu["param_bytes"] == 4 * fu["params"]["total"]
    assert s["same_base_weights"] is True and s["inference"]["lora_is_merged"] is True
    assert all(0 < m["val_loss_after"] < 20 for m in (lo, fu))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("weights, trainable / frozen"))
    assert row.split()[4:] == ["float32", "/", "bfloat16", "float32", "/", "-"]
    assert "precision: bf16 (asked for with --precision): LoRA's frozen base in bfloat16" in proc.stdout


def test_more_steps_than_data_is_a_clear_error(e2e_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cmp.main(["--data_dir", e2e_dir, "--steps", "30", "--batch_size", "2"])
    assert e.value.code == 2
    assert "more than the 48 training examples" in capsys.readouterr().err


def test_llama_gguf_base_lora_vs_full(tmp_path, e2e_dir):
    """--init_checkpoint with a Llama GGUF: both modes hold its weights, LoRA trains q_proj and v_proj only, full
    trains everything, and both take steps on real batches of the file's tokenizer."""
    from gguf_fixtures import write_tiny_llama

    path = str(tmp_path / "tiny.gguf")
    cfg, _ = write_tiny_llama(path)
    args, _ = cmp.parse_args(["--init_checkpoint", path, "--lora_dim", "2", "--steps", "2", "--warmup", "1",
                              "--seq_len", "48", "--batch_size", "2", "--val_examples", "2", "--data_dir", e2e_dir])
    cpu = torch.device("cpu")
    models = {m: cmp.build_for_mode(args, m, cpu) for m in cmp.MODES}
    C, L, kv = cfg["n_embd"], cfg["n_layer"], cfg["n_kv_head"] * cfg["head_dim"]
    lora_n = L * (2 * C + C * 2 + 2 * C + kv * 2)  # r = 2: q_proj A (r, C), B (C, r); v_proj A (r, C), B (kv, r)
    assert measure.param_counts(models["lora"])["trainable"] == lora_n
    full = measure.param_counts(models["full"])
    assert full["trainable"] == full["total"] == measure.param_counts(models["lora"])["total"] - lora_n
    assert base_fingerprint(models["lora"]) == base_fingerprint(models["full"])
    train_batches, _ = cmp.load_batches(args, cpu)
    assert int(max(b["input_ids"].max() for b in train_batches)) < cfg["vocab_size"]
    for mode, model in models.items():
        out = cmp.train_measured(args, model, train_batches, cpu, "fp32", mode)
        assert len(out["train_losses"]) == 2 and all(0 < x < 10 for x in out["train_losses"])


def test_max_len_is_still_accepted_as_seq_len():
    """--max_len, this script's earlier name for --seq_len, keeps working; the default stays TrainConfig's."""
    assert cmp.parse_args(["--max_len", "64"])[0].seq_len == 64
    assert cmp.parse_args(["--seq_len", "32"])[0].seq_len == 32
    assert cmp.parse_args([])[0].seq_len == 128
