"""--init_checkpoint by name: a tiny random GPT-2 saved by transformers, as a local folder and in a Hugging Face Hub
cache layout under a temporary HF_HOME with HF_HUB_OFFLINE=1 (no network); logits equal transformers', training
records the Hub name and commit, inference rebuilds that base and refuses another."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import run_inference
import run_training
from conftest import tiny_args, write_e2e
from e2e_nlg.hf_checkpoint import CheckpointError, infer_config, load_hf_gpt2_weights, resolve_init_checkpoint
from e2e_nlg.model import GPTConfig, build_model

transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")

NLG = os.path.dirname(os.path.abspath(run_training.__file__))
REPO_ID = "tiny-org/tiny-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tiny_gpt2(seed):
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257,
                                                             n_positions=256)).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0/1: make every tensor count
        for n, p in m.named_parameters():
            if "bias" in n or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def hf_model():
    return _tiny_gpt2(0)


@pytest.fixture(scope="module")
def local_dir(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    hf_model.save_pretrained(d)  # config.json + model.safetensors
    return str(d)


def make_hub_cache(hf_home, local, repo_id=REPO_ID, commit=COMMIT):
    """The cache layout huggingface_hub resolves offline: hub/models--ORG--NAME/refs/main holds the commit sha,
    snapshots/<sha>/ the files."""
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)  # no newline: huggingface_hub reads the file as is
    shutil.copytree(local, os.path.join(repo, "snapshots", commit))
    return repo


@pytest.fixture
def offline_cache(local_dir, tmp_path, monkeypatch):
    """A temporary HF_HOME holding REPO_ID, offline: in this process (huggingface_hub read its settings at import)
    and for subprocesses (the environment)."""
    hf_home = str(tmp_path / "hf_home")
    make_hub_cache(hf_home, local_dir)
    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", os.path.join(hf_home, "hub"))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home


def _ours(path):
    model = build_model(GPTConfig(**infer_config(path), lora_dim=4, lora_alpha=8), base_seed=1)
    load_hf_gpt2_weights(model, path)
    return model.eval()


def _assert_same_logits(model, hf_model):
    ids = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf_model(ids).logits, model(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_local_dir_sizes_from_config_and_logits(hf_model, local_dir):
    src = resolve_init_checkpoint(local_dir)
    assert (src.path, src.revision, src.from_hub, src.recorded) == (local_dir, None, False, os.path.abspath(local_dir))
    assert infer_config(local_dir) == dict(vocab_size=50257, hidden_dim=32, max_positions=256, num_layers=2,
                                           num_heads=2, layer_norm_eps=1e-5)
    _assert_same_logits(_ours(local_dir), hf_model)


def test_hub_name_resolves_from_offline_cache(hf_model, offline_cache):
    src = resolve_init_checkpoint(REPO_ID)
    snapshot = os.path.join(offline_cache, "hub", "models--tiny-org--tiny-gpt2", "snapshots", COMMIT)
    assert (src.path, src.revision, src.from_hub, src.recorded) == (snapshot, COMMIT, True, REPO_ID)
    _assert_same_logits(_ours(src.path), hf_model)
    assert resolve_init_checkpoint(REPO_ID, revision=COMMIT).path == snapshot  # a pinned commit, no refs needed


def test_hub_cache_under_hf_home_in_a_fresh_process(hf_model, offline_cache, tmp_path):
    """The environment alone (HF_HOME, HF_HUB_OFFLINE=1) steers a fresh process, as it would a user's."""
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]);"
              "from e2e_nlg.hf_checkpoint import resolve_init_checkpoint, infer_config, load_hf_gpt2_weights;"
              "from e2e_nlg.model import GPTConfig, build_model;"
              "s = resolve_init_checkpoint('%s'); print(s.revision);"
              "m = build_model(GPTConfig(**infer_config(s.path), lora_dim=2), 0); load_hf_gpt2_weights(m, s.path);"
              "ids = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(0));"
              "torch.save(m.eval()(ids).logits, sys.argv[2])" % REPO_ID)
    out = tmp_path / "logits.pt"
    r = subprocess.run([sys.executable, "-c", script, NLG, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == COMMIT
    ids = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (torch.load(out, weights_only=True) - hf_model(ids).logits).abs().max().item() < 1e-4


def test_train_then_generate_from_a_local_dir(local_dir, tmp_path, capsys):
    data = write_e2e(tmp_path / "e2e")
    out = tmp_path / "adapter"
    argv = tiny_args(data, out, "--init_checkpoint", local_dir, "--max_steps", "5", "--max_train_examples", "24")
    assert run_training.main(argv) == 0
    cfg = json.load(open(out / "adapter_config.json"))["extra"]  # the example's fields
    assert cfg["base"]["init_checkpoint"] == os.path.abspath(local_dir) and cfg["base"]["init_revision"] is None
    assert cfg["model_config"]["hidden_dim"] == 32 and cfg["model_config"]["num_heads"] == 2  # from config.json
    assert cfg["step"] == 5
    capsys.readouterr()
    r = run_inference.run(run_inference.get_parser().parse_args(
        ["--adapter_dir", str(out), "--max_new_tokens", "4", "--no_unmerged", "--device", "cpu"]))
    assert len(r["results"][0]["texts"]) == len(r["mrs"]) and r["results"][0]["generated_tokens"] > 0
    assert f"base: {os.path.abspath(local_dir)}" in capsys.readouterr().out


def test_train_by_hub_name_then_inference_rebuilds_that_commit(offline_cache, local_dir, tmp_path):
    """Both scripts as a user runs them (fresh processes, offline, HF_HOME from the environment)."""
    data = write_e2e(tmp_path / "e2e")
    out = tmp_path / "adapter"
    env = {**os.environ, "LORALIB_NLG_CACHE": str(tmp_path / "tok_cache")}
    argv = tiny_args(data, out, "--init_checkpoint", REPO_ID, "--max_steps", "2", "--max_train_examples", "8")
    r = subprocess.run([sys.executable, os.path.join(NLG, "run_training.py"), *argv], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert f"base: {REPO_ID} from the Hugging Face Hub, commit {COMMIT}" in r.stdout + r.stderr
    base = json.load(open(out / "adapter_config.json"))["extra"]["base"]
    assert (base["init_checkpoint"], base["init_revision"]) == (REPO_ID, COMMIT)
    # refs/main now names a commit the cache lacks: inference still finds the recorded one.
    with open(os.path.join(offline_cache, "hub", "models--tiny-org--tiny-gpt2", "refs", "main"), "w") as f:
        f.write("f" * 40)
    cmd = [sys.executable, os.path.join(NLG, "run_inference.py"), "--adapter_dir", str(out), "--max_new_tokens", "3",
           "--no_unmerged", "--device", "cpu", "--input", "name : The Eagle | Type : pub"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert f"base: {REPO_ID} (commit {COMMIT})" in r.stdout and "text:" in r.stdout
    # Another GPT-2 of the same sizes in place of the recorded base: the fingerprint error, one line.
    other = tmp_path / "other"
    _tiny_gpt2(1).save_pretrained(other)
    r = subprocess.run(cmd + ["--init_checkpoint", str(other)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "are not the ones it was trained on" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_errors_name_the_fix(offline_cache, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as e:
        resolve_init_checkpoint("tiny-org/not-in-cache")
    msg = str(e.value)
    assert "\n" not in msg and "could not provide tiny-org/not-in-cache/config.json" in msg and "HF_HOME" in msg
    with pytest.raises(CheckpointError, match="does not exist.*gpt2-medium"):
        resolve_init_checkpoint(str(tmp_path / "missing" / "model.safetensors"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        resolve_init_checkpoint("gpt2-medium")


def test_unsupported_gpt2_variant_refused(local_dir, tmp_path):
    d = tmp_path / "variant"
    shutil.copytree(local_dir, d)
    cfg = json.load(open(d / "config.json"))
    cfg["scale_attn_by_inverse_layer_idx"] = True
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx=True is a GPT-2 variant"):
        infer_config(str(d))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not gpt2"):
        infer_config(str(d))
