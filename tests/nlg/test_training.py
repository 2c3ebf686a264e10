"""run_training.py end to end on a tiny model and tiny data: outputs, resume == uninterrupted, Ctrl-C, atomic saves,
device selection, and the error paths (one line on stderr, exit status 2)."""
import dataclasses
import json
import os

import pytest
import torch

import run_training
from conftest import tiny_args
from e2e_nlg import adapter_io
from e2e_nlg import train_utils
from e2e_nlg.adapter_io import load_model_from_adapter_dir, read_adapter_weights
from e2e_nlg.model import GPTConfig, base_fingerprint, build_model
from e2e_nlg.train_config import TrainConfig


def test_flags_are_the_train_config_fields_with_its_defaults(capsys):
    """Every flag is a TrainConfig field with the field's default, so --help shows what a run uses."""
    parser = run_training.get_parser()
    flags = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(flags) == set(fields) - {"recipe_info"}
    assert {k: fields[k] for k in flags} == flags
    with pytest.raises(SystemExit) as e:
        run_training.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert [f for f in flags if f"--{f}" not in out] == []


def test_defaults_reach_the_run(monkeypatch):
    """main() with no flags trains with TrainConfig's defaults: the documented default run (README, "Measured
    default run"): 1,200 steps of 4 examples over the faithful references, names delexicalised, bf16 where the
    CPU has it."""
    seen = []

    def setup_then_stop(cfg, ctx, stop):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_training, "setup", setup_then_stop)
    assert run_training.main([]) == 130
    (cfg,) = seen
    assert cfg == TrainConfig() and cfg.recipe_info == {}
    assert (cfg.num_epochs, cfg.log_interval, cfg.output_dir, cfg.device) == (1, 10, "lora_model", "auto")
    assert (cfg.max_steps, cfg.batch_size, cfg.max_train_examples, cfg.lr, cfg.warmup_steps) == (1200, 4, 0, 1e-3, 30)
    assert (cfg.train_refs, cfg.delex_slots, cfg.precision) == ("faithful", ("name", "near"), "auto")
    assert cfg.model_config() == GPTConfig(vocab_size=50257, hidden_dim=768, num_layers=2, num_heads=12, lora_dim=16,
                                           lora_alpha=128, lora_dropout=0.0)


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=0), "--batch_size must be >= 1, got 0"),
    (dict(grad_accum=0), "--grad_accum must be >= 1, got 0"),
    (dict(seq_len=0), "--seq_len must be >= 1, got 0"),
    (dict(max_steps=-1), r"--max_steps must be >= 0 \(0: no limit\), got -1"),
    (dict(val_examples=-1), r"--val_examples must be >= 0 \(0: all\)"),
    (dict(lr=0.0), "--lr must be > 0, got 0.0"),
    (dict(weight_decay=-0.1), "--weight_decay must be >= 0"),
    (dict(adam_beta2=1.0), r"--adam_beta2 must be in \[0, 1\), got 1.0"),
    (dict(adam_eps=0.0), "--adam_eps must be > 0"),
    (dict(max_grad_norm=-1.0), r"--max_grad_norm must be >= 0 \(0: no clipping\)"),
    (dict(label_smoothing=1.0), r"--label_smoothing must be in \[0, 1\)"),
    # the LoRA settings through the library's one check (loralib.layers.check_lora_args), the flags named
    (dict(lora_dropout=-0.1), r"^--lora_dim \(r\) / --lora_alpha / --lora_dropout: lora_dropout must be a number in "
                              r"\[0, 1\), got lora_dropout=-0.1$"),
    (dict(lora_dim=0), r"^--lora_dim \(r\) .*: r must be a positive int \(an adapter needs a rank\), got r=0$"),
    (dict(lora_alpha=0), r"--lora_alpha .*: lora_alpha must be a positive finite number when r > 0, got lora_alpha=0$"),
    (dict(lora_alpha=float("inf")), "lora_alpha must be a positive finite number when r > 0, got lora_alpha=inf"),
    (dict(lora_alpha=True), "lora_alpha must be a positive finite number"),
    (dict(dist_backend="mpi"), "--dist_backend must be one of auto, gloo, nccl, got 'mpi'"),
    (dict(precision="fp8"), "--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (dict(train_refs="some"), "--train_refs must be one of faithful, all"),
    (dict(adapter_format="npz"), "--adapter_format must be one of bin, safetensors, got 'npz'"),
    (dict(delex="name,food"), "--delex 'name,food': food cannot be delexicalised"),
    (dict(lora_targets=[]), "--lora_targets must be one or more of attn"),
    (dict(lora_targets=["attn", "ffn"]), "--lora_targets must be one or more of"),
    (dict(hidden_dim=30, num_heads=4), r"--hidden_dim \(30\) must be divisible by --num_heads \(4\)"),
    (dict(num_layers=0), "--num_layers must be >= 1"),
    (dict(vocab_size=1000), "--vocab_size must be at least 50257"),
    (dict(seq_len=1025), r"--seq_len must be <= 1024 \(the model's positions\)"),
    (dict(recipe="fast"), "unknown --recipe 'fast'"),
])
def test_train_config_rejects_each_bad_value_in_one_line(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig(**kw)
    assert "\n" not in str(e.value)


def test_train_config_model_sizes_come_from_the_checkpoint_when_there_is_one():
    # With --init_checkpoint the checkpoint's config.json sets the sizes, so the size flags are not checked.
    assert TrainConfig(init_checkpoint="gpt2", vocab_size=1000, seq_len=2048).vocab_size == 1000
    cfg = TrainConfig(hidden_dim=32, num_heads=2, lora_targets=["attn"])
    assert cfg.model_config(lora_dim=0).lora_dim == 0 and cfg.model_config().lora_targets == ("attn",)
    assert cfg.model_config(vocab_size=67, max_positions=64).max_positions == 64


def test_train_config_applies_its_recipe_keeping_the_values_set():
    cfg = TrainConfig(recipe="paper", lr=0.5)
    assert (cfg.lr, cfg.lora_dim, cfg.batch_size, cfg.adam_eps, cfg.lora_targets) == (0.5, 4, 8, 1e-6, ["attn"])
    assert cfg.recipe_info["overridden"] == {"lr": 0.5}
    assert TrainConfig(recipe="paper", recipe_info={}).lr == TrainConfig().lr  # already applied: left alone


def test_lr_schedule():
    f = train_utils.warmup_linear_decay(4, 12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == 0.5 and f(12) == 0.0 and f(20) == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU behaviour")
def test_device_selection_without_gpu(e2e_dir, tmp_path, capsys):
    assert train_utils.select_device("auto") == torch.device("cpu")
    assert train_utils.select_device("cpu") == torch.device("cpu")
    with pytest.raises(train_utils.DeviceError, match="no CUDA GPU.*--device cpu"):
        train_utils.select_device("cuda")
    with pytest.raises(train_utils.DeviceError, match="unknown --device"):
        train_utils.select_device("tpu")
    argv = tiny_args(e2e_dir, tmp_path / "out")
    argv[argv.index("--device") + 1] = "cuda"
    assert run_training.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda") and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_tiny_training_run(e2e_dir, tmp_path):
    out = tmp_path / "out"
    assert run_training.main(tiny_args(e2e_dir, out, "--num_epochs", "2", "--seed", "3")) == 0
    for name in ["pytorch_model.bin", "adapter_config.json", "metrics.json", "loss.png", "loss_history.json",
                 "training_state.pt"]:
        assert os.path.isfile(out / name), name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 8 and m["finished"] is True  # 16 examples / batch 4 = 4 steps, 2 epochs
    assert m["val_loss_final"] < m["val_loss_start"] - 0.5  # it learns (the tiny set repeats 7 examples)
    assert m["adapter_bytes"] == os.path.getsize(out / "pytorch_model.bin")
    assert m["seconds"] > 0 and m["total_params"] > m["trainable_params"] > 0
    hist = json.loads((out / "loss_history.json").read_text())
    assert [s for s, _ in hist["val"]] == [0, 4, 8] and len(hist["train"]) == 8  # start + end of each epoch

    # The adapter: exactly the LoRA tensors; loadable with strict=False, as with Microsoft's loralib.
    state = read_adapter_weights(str(out))
    assert state and all("lora_" in k for k in state)
    assert sum(v.numel() for v in state.values()) == m["trainable_params"]
    cfg = adapter_io.read_adapter_config(str(out))  # the example's fields: the loralib config's extra
    assert cfg["training_args"]["seed"] == 3 and len(cfg["data"]["train_sha256"]) == 64
    # Every setting is recorded, and the flags not given ran with TrainConfig's defaults.
    argv = tiny_args(e2e_dir, out, "--num_epochs", "2", "--seed", "3")
    assert cfg["training_args"] == json.loads(json.dumps(TrainConfig.from_namespace(
        run_training.parse_args(argv)).to_dict()))
    group = train_utils.load_training_state(str(out))["optimizer"]["param_groups"][0]
    d = TrainConfig()
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.9, d.adam_beta2), d.adam_eps,
                                                                            d.weight_decay)
    fresh = build_model(GPTConfig.from_dict(cfg["model_config"]), base_seed=3)
    assert base_fingerprint(fresh) == cfg["base"]["fingerprint"]  # the frozen base did not move
    res = fresh.load_state_dict(state, strict=False)
    assert not res.unexpected_keys and all("lora_" not in k for k in res.missing_keys)
    model, _ = load_model_from_adapter_dir(str(out))  # the inference side rebuilds it from the config alone
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_resume_equals_uninterrupted(e2e_dir, tmp_path):
    """8 steps in one go == interrupted (Ctrl-C) after 3 steps + --resume for the rest: same adapter."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("--num_epochs", "2", "--lora_dropout", "0.1")  # dropout: the RNG state must be restored too
    metrics_full = run_training.train(run_training.get_parser().parse_args(tiny_args(e2e_dir, full, *extra)))

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    args = run_training.get_parser().parse_args(tiny_args(e2e_dir, part, *extra))
    with pytest.raises(KeyboardInterrupt):
        run_training.train(args, step_callback=interrupt)
    m = json.loads((part / "metrics.json").read_text())
    assert m["steps"] == 3 and m["finished"] is False
    args = run_training.get_parser().parse_args(tiny_args(e2e_dir, part, *extra, "--resume"))
    metrics_part = run_training.train(args)
    assert metrics_part["steps"] == metrics_full["steps"] == 8
    a, b = read_adapter_weights(str(full)), read_adapter_weights(str(part))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert metrics_part["val_loss_final"] == pytest.approx(metrics_full["val_loss_final"], abs=1e-5)


def test_ctrl_c_saves_and_exits_cleanly(e2e_dir, tmp_path, monkeypatch, capsys):
    calls = []
    real = train_utils.is_finite

    def finite_then_ctrl_c(x):
        calls.append(x)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(train_utils, "is_finite", finite_then_ctrl_c)
    out = tmp_path / "out"
    assert run_training.main(tiny_args(e2e_dir, out)) == 130
    assert "interrupted at step 2" in capsys.readouterr().out  # the 2nd step had run
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert train_utils.load_training_state(str(out))["step"] == 2


def test_failed_save_keeps_previous_checkpoint(e2e_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_training.main(tiny_args(e2e_dir, out)) == 0
    before = {f: (out / f).read_bytes() for f in ("pytorch_model.bin", "adapter_config.json")}
    model, _ = load_model_from_adapter_dir(str(out))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)

    def torch_save_dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io.torch, "save", torch_save_dies_midway)
    with pytest.raises(OSError, match="disk full"):
        adapter_io.save_adapter_dir(model, str(out), base_seed=0)
    for f, data in before.items():
        assert (out / f).read_bytes() == data, f
    assert sorted(os.listdir(out)) == sorted(["pytorch_model.bin", "adapter_config.json", "metrics.json",
                                              "loss.png", "loss_history.json", "training_state.pt"])


def test_resume_without_state_starts_fresh(e2e_dir, tmp_path, capsys):
    assert run_training.main(tiny_args(e2e_dir, tmp_path / "out", "--resume", "--max_steps", "1")) == 0
    assert "starting from scratch" in capsys.readouterr().out


@pytest.mark.parametrize("bad, expect", [
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lora_dim", "0"], "--lora_dim (r) / --lora_alpha / --lora_dropout: r must be a positive int (an adapter "
                          "needs a rank), got r=0"),
    (["--max_train_examples", "2"], "2 training examples make no full step of batch_size 4 x 1 processes x "
                                    "grad_accum 1; lower them or raise --max_train_examples"),
])
def test_bad_arguments(e2e_dir, tmp_path, capsys, bad, expect):
    assert run_training.main(tiny_args(e2e_dir, tmp_path / "out", *bad)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {expect}\n"
    assert not os.path.exists(tmp_path / "out")


def test_data_errors_are_one_line(e2e_dir, tmp_path, capsys, monkeypatch):
    with open(os.path.join(e2e_dir, "train.txt"), "a") as f:
        f.write("name : Broken without a separator \n")
    assert run_training.main(tiny_args(e2e_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"{os.path.join(e2e_dir, 'train.txt')}:49:" in err and "Traceback" not in err

    from e2e_nlg import data

    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", str(tmp_path / "none"))
    argv = tiny_args(e2e_dir, tmp_path / "out")
    del argv[:2]  # no --data_dir, no $E2E_DATA_DIR (the fixture unset it), no data/e2e/
    assert run_training.main(argv + ["--no_download"]) == 2
    err = capsys.readouterr().err
    assert "$E2E_DATA_DIR" in err and "data/e2e/" in err and "download_e2e.py" in err


def test_only_lora_trains_and_grad_accum_matches_big_batch(e2e_dir, tmp_path):
    """batch 4 x grad_accum 2 gives the same first step as batch 8 (token-weighted accumulation)."""
    outs = []
    for extra in (["--batch_size", "8"], ["--batch_size", "4", "--grad_accum", "2"]):
        argv = tiny_args(e2e_dir, tmp_path / f"o{len(outs)}", "--max_steps", "1", "--max_train_examples", "16")
        argv[argv.index("--batch_size"):argv.index("--batch_size") + 2] = []
        assert run_training.main(argv + extra) == 0
        outs.append(read_adapter_weights(str(tmp_path / f"o{len(outs)}")))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-6)


def test_tiny_run_on_real_data(real_e2e_dir, tmp_path):
    """The script on the real E2E files (tiny model, 4 steps): it reads them, learns, and records their hashes."""
    argv = tiny_args(real_e2e_dir, tmp_path / "out")
    assert run_training.main(argv) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["steps"] == 4 and m["val_loss_final"] < m["val_loss_start"]
    cfg = adapter_io.read_adapter_config(str(tmp_path / "out"))
    assert cfg["data"]["train_sha256"] == "eae319082237310913d9f37f6a891d48fb3f821f29d86870d2cb4f92ddd72c5a"


def test_adapter_format_safetensors(e2e_dir, tmp_path):
    """--adapter_format safetensors writes the same tensors as the .bin, readable by the `safetensors` package, and
    inference / resume read it back through the config; switching format removes the stale file."""
    from safetensors.torch import load_file as st_load

    bin_dir, st_dir = tmp_path / "bin", tmp_path / "st"
    assert run_training.main(tiny_args(e2e_dir, bin_dir, "--max_steps", "2")) == 0
    assert run_training.main(tiny_args(e2e_dir, st_dir, "--max_steps", "2", "--adapter_format", "safetensors")) == 0
    assert not os.path.exists(st_dir / "pytorch_model.bin")
    ref = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    got = st_load(str(st_dir / "adapter_model.safetensors"))
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    cfg = json.loads((st_dir / "adapter_config.json").read_text())
    m = json.loads((st_dir / "metrics.json").read_text())
    assert cfg["weights_file"] == "adapter_model.safetensors"
    assert m["adapter_bytes"] == os.path.getsize(st_dir / "adapter_model.safetensors")
    model, _ = load_model_from_adapter_dir(str(st_dir))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())

    # Resume reads the safetensors weights; saving as .bin afterwards leaves one weights file, named by the config.
    assert run_training.main(tiny_args(e2e_dir, st_dir, "--max_steps", "3", "--resume")) == 0
    assert not os.path.exists(st_dir / "adapter_model.safetensors")
    assert json.loads((st_dir / "adapter_config.json").read_text())["weights_file"] == "pytorch_model.bin"
    assert json.loads((st_dir / "metrics.json").read_text())["steps"] == 3

    with pytest.raises(ValueError, match="unknown adapter format 'npz'"):
        adapter_io.save_adapter_dir(model, str(tmp_path / "x"), base_seed=0, weights_format="npz")


def test_corrupted_safetensors_adapter_is_an_adapter_error(e2e_dir, tmp_path):
    out = tmp_path / "st"
    assert run_training.main(tiny_args(e2e_dir, out, "--max_steps", "1", "--adapter_format", "safetensors")) == 0
    path = out / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(adapter_io.AdapterError, match="cannot load .*adapter_model.safetensors"):
        read_adapter_weights(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["weights_file"] = "../../etc/passwd"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(adapter_io.AdapterError, match="weights_file"):
        read_adapter_weights(str(out))


def test_precision_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert train_utils.resolve_precision("auto", cpu, cpu_bf16=False)[0] == "fp32"  # emulated bf16 would be slower
    assert train_utils.resolve_precision("auto", cpu, cpu_bf16=True)[0] == "bf16"
    assert train_utils.resolve_precision("fp32", cpu, cpu_bf16=True) == ("fp32", "asked for with --precision")
    assert train_utils.resolve_precision("auto", cpu)[0] == ("bf16" if train_utils.cpu_has_bf16() else "fp32")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        train_utils.resolve_precision("fp16", cpu)


def test_auto_on_a_cpu_without_bf16_trains_in_fp32(e2e_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_utils, "cpu_has_bf16", lambda: False)
    argv = tiny_args(e2e_dir, tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--precision") + 1] = "auto"
    assert run_training.main(argv) == 0
    assert "precision: fp32 (auto: this CPU has no native bfloat16" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["precision"] == "fp32"


def test_half_precision_caps_onednn_kernel_caches(e2e_dir, tmp_path, monkeypatch, capsys):
    """A bf16 run caps oneDNN's per-shape kernel caches before its first matmul and says so (a user's own value
    wins); an fp32 run leaves the environment alone."""
    for k in train_utils.ONEDNN_CACHE_ENV:
        monkeypatch.setenv(k, "unset")  # so that the test's end restores the variable's absence
        monkeypatch.delenv(k)
    for p in ("fp32", "bf16"):
        argv = tiny_args(e2e_dir, tmp_path / p, "--max_steps", "1")
        argv[argv.index("--precision") + 1] = p
        if p == "bf16":
            monkeypatch.setenv("LRU_CACHE_CAPACITY", "8")
        assert run_training.main(argv) == 0
        out = capsys.readouterr().out
        if p == "fp32":
            assert not any(k in os.environ for k in train_utils.ONEDNN_CACHE_ENV) and "oneDNN" not in out
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256" and os.environ["LRU_CACHE_CAPACITY"] == "8"
    assert "oneDNN kernel caches: ONEDNN_PRIMITIVE_CACHE_CAPACITY=256, LRU_CACHE_CAPACITY=8" in out


def test_bf16_base_float32_adapter(e2e_dir, tmp_path):
    """--precision bf16: the frozen base is stored in bfloat16, the adapter trains and is saved in float32, its
    recorded fingerprint is the float32 base's (so inference rebuilds and accepts it), and the loss is close to the
    fp32 run's."""
    runs = {}
    for p in ("fp32", "bf16"):
        argv = tiny_args(e2e_dir, tmp_path / p, "--num_epochs", "2", "--seed", "3")
        argv[argv.index("--precision") + 1] = p
        args = run_training.get_parser().parse_args(argv)
        model, _ = run_training.build(args, torch.device("cpu"), precision=p)
        dtypes = {("lora_" in n, q.dtype) for n, q in model.named_parameters()}
        assert dtypes == {(True, torch.float32), (False, torch.float32 if p == "fp32" else torch.bfloat16)}
        runs[p] = run_training.train(args)
    assert runs["bf16"]["precision"] == "bf16"
    assert runs["bf16"]["val_loss_final"] == pytest.approx(runs["fp32"]["val_loss_final"], rel=0.05)
    state = read_adapter_weights(str(tmp_path / "bf16"))
    assert {v.dtype for v in state.values()} == {torch.float32}
    cfg = adapter_io.read_adapter_config(str(tmp_path / "bf16"))
    assert cfg["precision"] == "bf16"
    assert cfg["base"]["fingerprint"] == adapter_io.read_adapter_config(str(tmp_path / "fp32"))["base"]["fingerprint"]
    load_model_from_adapter_dir(str(tmp_path / "bf16"))  # float32 rebuild: the fingerprint check passes
