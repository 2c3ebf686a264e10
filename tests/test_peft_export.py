"""save_adapter(format="peft") loads with peft.PeftModel.from_pretrained onto the matching transformers model, with
identical outputs; and PEFT's own LoRA directories load with lora.load_adapter."""
import json
import os
import sys
import warnings

import pytest
import torch

import loralib as lora
from inject_helpers import clone, conv_net, ids, randomize_lora, tiny_gpt2

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peft_logits(base, directory, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT / transformers deprecation chatter
        pm = peft.PeftModel.from_pretrained(base, directory, **kw).eval()
        return pm, pm(input_ids=x).logits


def test_peft_loads_our_adapter_with_identical_outputs(tmp_path):
    base = tiny_gpt2()
    model = clone(base)
    lora.inject(model, ["c_attn", "c_proj", "c_fc", "wte"], r=4, lora_alpha=8,
                rank_pattern={r".*h\.1\.mlp\.c_fc": 2}, alpha_pattern={"attn.c_proj": 3})
    randomize_lora(model)
    model.eval()
    x = ids()
    want = model(x).logits
    assert (want - base(x).logits).abs().max() > 1e-2  # the adapter does something
    config = lora.save_adapter(model, str(tmp_path), format="peft")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    pm, got = peft_logits(clone(base), str(tmp_path), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inner = pm.base_model.model.transformer.h
    assert inner[1].mlp.c_fc.r["default"] == 2 and inner[0].mlp.c_fc.r["default"] == 4
    assert inner[0].attn.c_proj.scaling["default"] == pytest.approx(3 / 4)


def test_rslora_and_named_adapter_export(tmp_path):
    base = tiny_gpt2()
    model = clone(base)
    lora.inject(model, "all-linear", r=4, lora_alpha=8, use_rslora=True)
    lora.add_adapter(model, "task", r=2, lora_alpha=5)
    randomize_lora(model)
    x = ids()
    for adapter in ("default", "task"):
        lora.set_adapter(model, adapter)
        want = model(x).logits
        d = str(tmp_path / adapter)
        lora.save_adapter(model, d, adapter=adapter, format="peft", task_type="CAUSAL_LM")
        pm, got = peft_logits(clone(base), d, x)
        assert isinstance(pm, peft.PeftModelForCausalLM)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_made_adapter_loads_into_loralib(tmp_path):
    base = tiny_gpt2()
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
                          rank_pattern={"c_fc": 2}, use_rslora=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(clone(base), cfg).eval()
        pm.save_pretrained(str(tmp_path))
    x = ids()
    want = pm(input_ids=x).logits
    assert (want - base(x).logits).abs().max() > 1e-3  # init_lora_weights=False: a non-zero update
    model = clone(base)
    lora.load_adapter(model, str(tmp_path))
    model.eval()
    torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)
    assert model.transformer.h[0].mlp.c_fc.r == 2
    assert model.transformer.h[0].attn.c_attn.scaling == pytest.approx(6 / 2)  # rsLoRA: alpha / sqrt(4)
    # into a model already adapted the same way; a different rank is named
    same = clone(base)
    lora.inject(same, ["c_attn", "c_fc", "wte"], r=4, lora_alpha=6, rank_pattern={"c_fc": 2}, use_rslora=True)
    lora.load_adapter(same, str(tmp_path))
    same.eval()
    torch.testing.assert_close(same(x).logits, want, rtol=1e-5, atol=1e-5)
    other = clone(base)
    lora.inject(other, ["c_attn", "c_fc", "wte"], r=4, lora_alpha=6, use_rslora=True)
    with pytest.raises(lora.AdapterError, match="'transformer.h.0.mlp.c_fc' has r=4 here but 2"):
        lora.load_adapter(other, str(tmp_path))


def test_nlg_example_model_adapter_moves_to_hugging_face_gpt2(tmp_path):
    """SimpleGPT2WithLoRA (MergedLinear over q|k|v, nn.Linear layout) -> PEFT on GPT2LMHeadModel (Conv1D)."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "NLG"))
    try:
        from e2e_nlg.model import GPTConfig, build_model
    finally:
        sys.path.pop(0)
    cfg = GPTConfig(vocab_size=64, max_positions=16, hidden_dim=16, num_layers=2, num_heads=2, lora_dim=4,
                    lora_alpha=8)
    ours = build_model(cfg, base_seed=0)
    sd = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}  # unmerged base weights
    randomize_lora(ours)
    ours.eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf_sd = {k: (v.t() if k.endswith(conv1d) else v) for k, v in sd.items()}
    assert torch.equal(hf_sd["lm_head.weight"], hf_sd["transformer.wte.weight"])  # GPT-2 ties them
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    x = ids()
    want = ours(x).logits
    with lora.disable_adapters(ours):
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-4, atol=1e-5)  # same base model
    config = lora.save_adapter(ours, str(tmp_path), format="peft")
    # MergedLinear's q|v update becomes one rank 2r update of c_attn with the same scaling
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # the first layer, h.0's c_attn; scaling stays 2
    assert set(config["rank_pattern"].values()) == {4} and set(config["alpha_pattern"].values()) == {8}
    _, got = peft_logits(hf, str(tmp_path), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_conv_layers_cannot_be_exported(tmp_path):
    net = conv_net()
    lora.inject(net, ["c2", "head"], r=2)
    with pytest.raises(lora.AdapterError, match="'c2' is a Conv2d: PEFT factorises.*format='loralib'"):
        lora.save_adapter(net, str(tmp_path), format="peft")
    assert not os.path.exists(tmp_path / "adapter_config.json")


def test_peft_config_has_no_unknown_keys(tmp_path):
    model = tiny_gpt2()
    lora.inject(model, ["c_attn"], r=2)
    lora.save_adapter(model, str(tmp_path), format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(cfg) <= set(peft.LoraConfig.__dataclass_fields__)
