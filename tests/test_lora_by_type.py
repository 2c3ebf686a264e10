"""LoRA layers and tensors are found by type, not by the substring "lora_" in a name.

A user module named ``explora_head`` has parameter names containing "lora_"; it is an ordinary layer: frozen by
``mark_only_lora_as_trainable``, left out of ``lora_state_dict`` and of the adapter files, and part of the base
model's fingerprint. A loralib layer inside a module with such a name is LoRA as any other.
"""
import json

import torch
import torch.nn as nn

import loralib as lora
from loralib.safetensors_format import load_bytes

LORA = {"proj.lora_A", "proj.lora_B", "explora_block.0.lora_A", "explora_block.0.lora_B"}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = lora.Linear(8, 8, r=2, lora_alpha=4)
        self.explora_head = nn.Linear(8, 3)  # an ordinary layer whose name contains "lora_"
        self.explora_block = nn.Sequential(lora.Linear(8, 8, r=2, lora_alpha=4))  # a LoRA layer inside one

    def forward(self, x):
        return self.explora_head(self.explora_block(self.proj(x)))


def net(seed=0):
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():
        for name in ("proj", "explora_block.0"):
            m.get_submodule(name).lora_B.normal_()
    return m


def test_the_names_would_fool_a_substring_rule():
    names = [n for n, _ in net().named_parameters()]
    fooled = {n for n in names if "lora_" in n} - LORA
    assert fooled == {"explora_head.weight", "explora_head.bias", "explora_block.0.weight", "explora_block.0.bias"}


def test_mark_only_lora_as_trainable_trains_the_lora_layers_parameters_only():
    m = net()
    lora.mark_only_lora_as_trainable(m)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == LORA
    lora.mark_only_lora_as_trainable(m, bias="lora_only")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == LORA | {"proj.bias", "explora_block.0.bias"}
    lora.mark_only_lora_as_trainable(m, bias="all")  # every bias, explora_head's too: 0.1.2's "bias" rule
    assert {n for n, p in m.named_parameters() if p.requires_grad} == LORA | {
        "proj.bias", "explora_block.0.bias", "explora_head.bias"}


def test_added_adapters_are_lora_too():
    m = net()
    lora.add_adapter(m, "other", r=1)
    lora.mark_only_lora_as_trainable(m)
    added = {f"{layer}.lora_adapters.other.lora_{ab}" for layer in ("proj", "explora_block.0") for ab in "AB"}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == LORA | added
    assert set(lora.lora_state_dict(m)) == LORA | added
    assert set(lora.lora_state_dict(m, adapter="other")) == LORA  # under 0.1.2's keys


def test_lora_state_dict_leaves_the_ordinary_layer_out():
    m = net()
    sd = lora.lora_state_dict(m)
    assert set(sd) == LORA
    for k in LORA:
        torch.testing.assert_close(sd[k], m.state_dict()[k], rtol=0, atol=0)
    assert set(lora.lora_state_dict(m, bias="lora_only")) == LORA | {"proj.bias", "explora_block.0.bias"}


def test_save_adapter_writes_the_lora_layers_only_and_fingerprints_the_ordinary_one(tmp_path):
    m = net()
    config = lora.save_adapter(m, str(tmp_path))
    tensors = load_bytes((tmp_path / "adapter_model.safetensors").read_bytes())[0]
    assert set(tensors) == LORA
    assert config["target_modules"] == ["proj", "explora_block.0"]
    shapes = json.loads((tmp_path / "adapter_config.json").read_text())["base_fingerprint"]["shapes"]
    assert shapes["explora_head.weight"] == [3, 8] and shapes["explora_block.0.weight"] == [8, 8]
    assert not any(k.startswith("proj.lora_") or ".0.lora_" in k for k in shapes)

    other = net(seed=1)  # another base and adapter of the same architecture: loading replaces the adapter only
    lora.load_adapter(other, str(tmp_path))
    for k in LORA:
        torch.testing.assert_close(other.state_dict()[k], m.state_dict()[k], rtol=0, atol=0)
    assert not torch.equal(other.explora_head.weight, m.explora_head.weight)
