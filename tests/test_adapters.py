"""Named adapters: add / set / delete / disable, lora_state_dict(adapter=...), and 0.1.2's checkpoint layout."""
import pytest
import torch
import torch.nn as nn

import loralib as lora
from inject_helpers import randomize_lora


@pytest.fixture
def ms(request):
    """PyPI loralib 0.1.2 imported as ``loralib_ms``: tests/conftest.py's session fixture when it exists,
    else an importable ``loralib_ms`` (e.g. ``PYTHONPATH=DIR``), else skip."""
    try:
        return request.getfixturevalue("loralib_ms")
    except pytest.FixtureLookupError:
        return pytest.importorskip("loralib_ms")


class Net(nn.Module):
    """One layer of each loralib kind, built with the classes of ``lib`` (ours or 0.1.2's)."""

    def __init__(self, lib, r=2):
        super().__init__()
        self.emb = lib.Embedding(11, 6, r=r, lora_alpha=4)
        self.lin = lib.Linear(6, 9, r=r, lora_alpha=4, fan_in_fan_out=True)
        self.qkv = lib.MergedLinear(9, 12, r=r, lora_alpha=4, enable_lora=[True, False, True])
        self.conv = lib.Conv2d(3, 4, 3, r=r, lora_alpha=4, padding=1)

    def forward(self, tok, img):
        h = self.qkv(self.lin(self.emb(tok)))
        return h.sum(), h, self.conv(img)


def inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 11, (2, 5), generator=g), torch.randn(2, 3, 6, 6, generator=g)


def outputs(model):
    _, h, c = model(*inputs())
    return h.detach(), c.detach()


def close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=atol)


def net(seed=0, r=2):
    torch.manual_seed(seed)
    return randomize_lora(Net(lora, r=r), seed=seed + 10)


def test_default_layout_is_loralib_012_and_added_adapters_only_when_added():
    m = net()
    keys = {k for k in m.state_dict() if "lora_" in k}
    assert keys == {f"{n}.lora_{ab}" for n in ("emb", "lin", "qkv", "conv") for ab in "AB"}
    lora.add_adapter(m, "task2", r=3, lora_alpha=6)
    extra = {k for k in m.state_dict() if "lora_adapters" in k}
    assert extra == {f"{n}.lora_adapters.task2.lora_{ab}" for n in ("emb", "lin", "qkv", "conv") for ab in "AB"}
    assert lora.list_adapters(m) == ["default", "task2"]
    lora.delete_adapter(m, "task2")
    assert {k for k in m.state_dict() if "lora_" in k} == keys
    assert not hasattr(m.lin, "lora_adapters")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_named_adapter_computes_what_a_layer_with_it_as_default_computes(mode):
    m = net()
    lora.add_adapter(m, "t", r=3, lora_alpha=6, rank_pattern={"conv": 1})
    randomize_lora(m, seed=7)
    # reference: the same layers built with r=3 (conv: r=1), their default update set to adapter t's
    ref = Net(lora, r=3)
    ref.conv = lora.Conv2d(3, 4, 3, r=1, lora_alpha=6, padding=1)
    for attr in ("emb", "lin", "qkv"):
        getattr(ref, attr).scaling = 6 / 3
    ref.conv.scaling = 6 / 1
    for name in ("emb", "lin", "qkv", "conv"):
        src, dst = getattr(m, name), getattr(ref, name)
        with torch.no_grad():
            dst.frozen_weight().copy_(src.frozen_weight())
            dst.lora_A.copy_(src.lora_adapters["t"].lora_A)
            dst.lora_B.copy_(src.lora_adapters["t"].lora_B)
            if getattr(src, "bias", None) is not None:
                dst.bias.copy_(src.bias)
            if name == "conv":
                dst.conv.bias.copy_(src.conv.bias)
    getattr(m, mode)()
    getattr(ref, mode)()
    default_out = outputs(m)
    lora.set_adapter(m, "t")
    close(outputs(m), outputs(ref))
    with pytest.raises(AssertionError):
        close(outputs(m), default_out)
    lora.set_adapter(m, "default")
    close(outputs(m), default_out, atol=1e-6)


def test_gradients_reach_only_the_active_adapter():
    m = net()
    lora.add_adapter(m, "t", r=2, lora_alpha=4, init_lora_weights="gaussian")
    randomize_lora(m)
    lora.mark_only_lora_as_trainable(m)
    m.train()
    lora.set_adapter(m, "t")
    m(*inputs())[0].backward()
    m.conv(inputs()[1]).sum().backward()
    for n, p in m.named_parameters():
        if ".lora_adapters.t." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_switching_while_merged_unmerges_the_old_adapter():
    m = net()
    w0 = {n: getattr(m, n).frozen_weight().detach().clone() for n in ("emb", "lin", "qkv", "conv")}
    lora.add_adapter(m, "t", r=3, lora_alpha=6)
    randomize_lora(m, seed=4)
    m.train()
    want_default = outputs(m)
    lora.set_adapter(m, "t")
    want_t = outputs(m)
    m.eval()
    assert all(getattr(m, n).merged for n in w0)
    close(outputs(m), want_t)
    lora.set_adapter(m, "default")  # merged: t comes out, default goes in
    assert all(getattr(m, n).merged for n in w0)
    close(outputs(m), want_default)
    lora.set_adapter(m, "t")
    lora.delete_adapter(m, "t")  # deleting the active, merged adapter falls back to the default, merged
    assert all(getattr(m, n).active_adapter == "default" and getattr(m, n).merged for n in w0)
    close(outputs(m), want_default)
    m.train()
    for n, w in w0.items():
        torch.testing.assert_close(getattr(m, n).frozen_weight(), w, rtol=0, atol=1e-5)


def test_state_dict_of_a_merged_layer_with_a_named_adapter_holds_the_base_weight():
    m = net()
    w = m.lin.weight.detach().clone()
    lora.add_adapter(m, "t", r=2, lora_alpha=4)
    randomize_lora(m, seed=9)
    lora.set_adapter(m, "t")
    m.eval()
    assert m.lin.merged
    torch.testing.assert_close(m.state_dict()["lin.weight"], w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_disable_adapters_runs_the_base_model(mode):
    m = net()
    layers = (m.emb, m.lin, m.qkv, m.conv)
    getattr(m, mode)()
    adapted = outputs(m)
    with lora.disable_adapters(m):
        assert not any(layer.merged for layer in layers)
        off = outputs(m)
        m.eval()  # must not merge inside the block
        assert not any(layer.merged for layer in layers)
        close(outputs(m), off, atol=1e-6)
        getattr(m, mode)()
        # the base model by hand: embedding, x W (fan_in_fan_out), x W^T + b, the convolution
        tok, img = inputs()
        h = nn.functional.embedding(tok, m.emb.weight) @ m.lin.weight + m.lin.bias
        h = nn.functional.linear(h, m.qkv.weight, m.qkv.bias)
        close(off, (h.detach(), m.conv.conv(img).detach()))
    assert all(layer.merged == (mode == "eval") for layer in layers)
    close(outputs(m), adapted)


def test_lora_state_dict_of_a_named_adapter_uses_012_keys_and_loads_as_default():
    m = net()
    lora.add_adapter(m, "t", r=2, lora_alpha=4)
    randomize_lora(m, seed=8)
    lora.set_adapter(m, "t")
    want = outputs(m)
    sd = lora.lora_state_dict(m, adapter="t")
    assert set(sd) == {f"{n}.lora_{ab}" for n in ("emb", "lin", "qkv", "conv") for ab in "AB"}
    assert torch.equal(sd["lin.lora_A"], m.lin.lora_adapters["t"].lora_A)
    assert set(lora.lora_state_dict(m, adapter="default")) == set(sd)
    assert torch.equal(lora.lora_state_dict(m, adapter="default")["lin.lora_A"], m.lin.lora_A)
    everything = lora.lora_state_dict(m)  # 0.1.2's call: all LoRA entries, the added adapter included
    assert "lin.lora_adapters.t.lora_A" in everything and "lin.lora_A" in everything
    other = net(seed=0)  # same base weights, its own default update
    other.load_state_dict(sd, strict=False)
    close(outputs(other), want)
    with_bias = lora.lora_state_dict(m, bias="lora_only", adapter="t")
    assert set(with_bias) - set(sd) == {"lin.bias", "qkv.bias", "conv.conv.bias"}
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        lora.lora_state_dict(m, adapter="nope")


def test_checkpoints_interchangeable_with_loralib_012(ms):
    torch.manual_seed(0)
    theirs = Net(ms)
    torch.manual_seed(0)
    ours = Net(lora)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    randomize_lora(theirs, seed=3)
    ours.load_state_dict(theirs.state_dict())
    ours.train()
    theirs.train()
    close(outputs(ours), outputs(theirs))
    # a named adapter's checkpoint loads into 0.1.2
    lora.add_adapter(ours, "t", r=2, lora_alpha=4)
    randomize_lora(ours, seed=6)
    lora.set_adapter(ours, "t")
    theirs.load_state_dict(lora.lora_state_dict(ours, adapter="t"), strict=False)
    close(outputs(theirs), outputs(ours))
    # and 0.1.2's checkpoint loads into our default adapter
    lora.set_adapter(ours, "default")
    ours.load_state_dict(ms.lora_state_dict(theirs), strict=False)
    close(outputs(ours), outputs(theirs))


def test_errors_name_the_problem():
    m = net()
    with pytest.raises(ValueError, match="'default' is the layers' own"):
        lora.add_adapter(m, "default")
    with pytest.raises(ValueError, match="without dots"):
        lora.add_adapter(m, "a.b")
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora.add_adapter(m, "z", r=0)
    assert lora.list_adapters(m) == ["default"]  # a failed add leaves nothing behind
    lora.add_adapter(m, "t")
    with pytest.raises(ValueError, match="already exists"):
        lora.add_adapter(m, "t")
    with pytest.raises(ValueError, match=r"no adapter 'x'.*\['default', 't'\]"):
        lora.set_adapter(m, "x")
    with pytest.raises(ValueError, match="cannot be deleted"):
        lora.delete_adapter(m, "default")
    with pytest.raises(ValueError, match="no adapter 'x'"):
        lora.delete_adapter(m, "x")
    with pytest.raises(ValueError, match="has no LoRA layer"):
        lora.add_adapter(nn.Linear(2, 2), "t")


def test_add_adapter_after_inject_on_a_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    base = model(x).detach()
    lora.inject(model, "all-linear", r=2)
    lora.add_adapter(model, "b", r=4, lora_alpha=2, lora_dropout=0.1, use_rslora=True)
    assert model[0].lora_adapters["b"].scaling == pytest.approx(2 / 2)
    assert isinstance(model[0].lora_adapters["b"].lora_dropout, nn.Dropout)
    lora.set_adapter(model, "b")
    model.eval()
    torch.testing.assert_close(model(x), base)  # B = 0 at init: still the base model
