"""Importing Hugging Face GPT-2 weights: logits equal transformers' GPT2LMHeadModel, clear errors on mismatches."""
import os

import pytest
import torch

from e2e_nlg.hf_checkpoint import CheckpointError, infer_config, load_hf_gpt2_weights, read_hf_state_dict
from e2e_nlg.model import GPTConfig, build_model

transformers = pytest.importorskip("transformers")

V = 211  # a small vocabulary keeps the test fast; the importer takes sizes from the checkpoint


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0/1: make every tensor count
        for n, p in m.named_parameters():
            if "bias" in n or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _ours_from(path, lora_dim=4):
    cfg = GPTConfig(**infer_config(path), lora_dim=lora_dim, lora_alpha=8)
    model = build_model(cfg, base_seed=1)
    load_hf_gpt2_weights(model, path)
    return model.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-no-prefix"])
def test_logits_equal_transformers(hf_model, tmp_path, fmt):
    if fmt == "safetensors":
        hf_model.save_pretrained(tmp_path)  # writes model.safetensors + config.json
        path = str(tmp_path)  # a directory works too
        assert os.path.isfile(tmp_path / "model.safetensors")
    else:
        sd = hf_model.state_dict() if fmt == "bin" else hf_model.transformer.state_dict()  # GPT2Model keys
        path = str(tmp_path / "pytorch_model.bin")
        torch.save(sd, path)
        hf_model.config.save_pretrained(tmp_path)
    assert infer_config(path) == dict(vocab_size=V, hidden_dim=32, max_positions=64, num_layers=2, num_heads=4,
                                      layer_norm_eps=1e-5)
    ours = _ours_from(path)
    ids = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_head_lora_merge_never_changes_wte(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = _ours_from(str(tmp_path)).train()
    wte = ours.transformer.wte.weight.detach().clone()
    assert torch.equal(ours.lm_head.weight, wte)  # initialised from the embedding, as GPT-2 ties them
    assert ours.lm_head.weight.data_ptr() != ours.transformer.wte.weight.data_ptr()  # but not the same tensor
    with torch.no_grad():
        ours.lm_head.lora_B.normal_()
    ours.eval()  # merges the head's LoRA into lm_head.weight
    assert not torch.equal(ours.lm_head.weight, wte)
    assert torch.equal(ours.transformer.wte.weight, wte)


def test_shape_mismatch_names_key_and_shapes(hf_model, tmp_path):
    sd = dict(hf_model.state_dict())
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)  # HF Conv1D layout (in, out); should be 128
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, path)
    model = build_model(GPTConfig(vocab_size=V, max_positions=64, hidden_dim=32, num_layers=2, num_heads=4,
                                  lora_dim=4), 0)
    with pytest.raises(CheckpointError) as e:
        load_hf_gpt2_weights(model, path)
    assert "transformer.h.1.mlp.c_fc.weight" in str(e.value) and "(32, 100)" in str(e.value)
    assert "(128, 32)" in str(e.value)


def test_layer_count_mismatch_names_keys(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = build_model(GPTConfig(vocab_size=V, max_positions=64, hidden_dim=32, num_layers=1, num_heads=4,
                                  lora_dim=4), 0)
    with pytest.raises(CheckpointError, match=r"unexpected \['transformer\.h\.1\."):
        load_hf_gpt2_weights(model, str(tmp_path))


def test_bad_paths_and_unsafe_pickles(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_hf_state_dict(str(tmp_path / "missing.bin"))
    with pytest.raises(CheckpointError, match="without model.safetensors or pytorch_model.bin"):
        read_hf_state_dict(str(tmp_path))
    evil = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1), "f": os.system}, evil)  # weights_only=True must refuse the function
    with pytest.raises(CheckpointError, match="cannot read"):
        read_hf_state_dict(str(evil))
    (tmp_path / "trunc.bin").write_bytes(evil.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cannot read"):
        read_hf_state_dict(str(tmp_path / "trunc.bin"))


def test_run_training_builds_from_init_checkpoint(hf_model, tmp_path):
    """--init_checkpoint takes the model sizes from the checkpoint and loads its weights."""
    import run_training

    hf_model.save_pretrained(tmp_path)
    args = run_training.get_parser().parse_args(["--init_checkpoint", str(tmp_path), "--lora_dim", "2"])
    model, _ = run_training.build(args, torch.device("cpu"))
    assert model.config.hidden_dim == 32 and model.config.num_layers == 2 and model.config.vocab_size == V
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert (model.eval()(ids).logits - hf_model(ids).logits).abs().max() < 1e-4
