"""lora.inject and lora.merge_and_unload on a transformers GPT-2 and on a small conv net."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import loralib as lora
from inject_helpers import ConvNet, clone, conv_net, ids, randomize_lora, tiny_gpt2, tokens

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D

GPT2_LINEAR = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "zeros"])
def test_gpt2_outputs_unchanged_at_init(init):
    base = tiny_gpt2()
    x = ids()
    ref = base(x).logits
    model = clone(base)
    names = lora.inject(model, ["c_attn", "c_proj", "c_fc", "wte"], r=4, lora_alpha=8, init_lora_weights=init)
    assert names == ["transformer.wte"] + GPT2_LINEAR
    assert isinstance(model.transformer.h[0].attn.c_attn, lora.Linear)
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out  # Conv1D stores (in, out)
    assert isinstance(model.transformer.wte, lora.Embedding)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-6)
    a = model.transformer.h[0].mlp.c_fc.lora_A
    if init == "zeros":
        assert a.abs().max() == 0
    elif init == "gaussian":
        assert abs(a.std().item() - 1 / 4) < 0.1  # N(0, 1/r)
    else:
        bound = 1 / math.sqrt(a.shape[1])  # Kaiming-uniform with a=sqrt(5), as nn.Linear
        assert a.abs().max() <= bound and a.abs().max() > bound / 2


def test_gpt2_keeps_original_tensors_and_dtype():
    base = tiny_gpt2().double()
    w = base.transformer.h[1].attn.c_attn.weight
    b = base.transformer.h[1].attn.c_attn.bias
    lora.inject(base, ["c_attn"], r=2)
    layer = base.transformer.h[1].attn.c_attn
    assert layer.weight is w and layer.bias is b  # same Parameter objects: no copy
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A.shape == (2, 16)
    assert layer.lora_B.shape == (48, 2)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad


def test_gpt2_delta_matches_conv1d_math():
    """The adapted Conv1D computes x W + b + s * x A^T B^T, with W stored (in, out)."""
    base = tiny_gpt2()
    conv = base.transformer.h[0].mlp.c_fc
    W, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    lora.inject(base, ["transformer.h.0.mlp.c_fc"], r=3, lora_alpha=6)
    randomize_lora(base)
    layer = base.transformer.h[0].mlp.c_fc
    x = torch.randn(5, 16)
    want = x @ W + b + 2.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())
    layer.train()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    layer.eval()  # merged
    assert layer.merged
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_target_selection_forms():
    m = tiny_gpt2()
    assert lora.inject(clone(m), "all-linear") == GPT2_LINEAR  # lm_head (tied to wte) left alone
    assert lora.inject(clone(m), r"transformer\.h\.\d+\.attn\.c_attn") == GPT2_LINEAR[0::4]
    assert lora.inject(clone(m), ["attn.c_proj"]) == [GPT2_LINEAR[1], GPT2_LINEAR[5]]
    assert lora.inject(clone(m), ["transformer.h.1.mlp.c_fc"]) == ["transformer.h.1.mlp.c_fc"]
    assert lora.inject(clone(m), "all-linear", exclude_modules=["c_proj"]) == [
        n for n in GPT2_LINEAR if not n.endswith("c_proj")]
    assert lora.inject(clone(m), "all-linear", exclude_modules=r".*\.h\.1\..*") == GPT2_LINEAR[:4]
    # A list entry naming a container matches nothing itself, but its children do not count either.
    net = conv_net()
    assert lora.inject(clone(net), "all-linear") == ["head"]
    assert lora.inject(clone(net), ["c1", "c2", "c3", "emb", "head"]) == ["emb", "c1", "c2", "c3", "head"]


def test_unmatched_targets_name_the_candidates():
    m = tiny_gpt2()
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no layer.*c_attn.*c_fc.*lm_head"):
        lora.inject(m, ["c_attn", "q_proj"])
    with pytest.raises(ValueError, match="match no layer"):
        lora.inject(m, r"nothing\.like\.this")
    # nothing was replaced by the failed calls
    assert not any(isinstance(x, lora.LoRALayer) for x in m.modules())


@pytest.mark.parametrize("kwargs, msg", [
    (dict(target_modules=[]), "non-empty list"),
    (dict(target_modules=None), "non-empty list"),
    (dict(target_modules=["ln_f"]), "LayerNorm, which inject cannot adapt"),
    (dict(target_modules="all-linear", exclude_modules=r".*"), "leaves no layer"),
    (dict(target_modules="all-linear", exclude_modules=3), "exclude_modules must be"),
    (dict(target_modules=["c_attn"], r=0), "r must be a positive int .*got r=0"),
    (dict(target_modules=["c_attn"], r=2.5), "r must be an int .*got r=2.5"),
    (dict(target_modules=["c_attn"], rank_pattern={"c_attn": -1}), "layer 'transformer.h.0.attn.c_attn': r must be"),
    (dict(target_modules=["c_attn"], lora_alpha=0), "lora_alpha=0"),
    (dict(target_modules=["c_attn"], lora_alpha=float("inf")), "lora_alpha=inf"),
    (dict(target_modules=["c_attn"], alpha_pattern={"c_attn": -2}), "layer 'transformer.h.0.attn.c_attn': lora_alpha"),
    (dict(target_modules=["c_attn"], lora_dropout=1.0), "lora_dropout=1.0"),
    (dict(target_modules=["c_attn"], init_lora_weights="orthogonal"), "init_lora_weights"),
])
def test_bad_arguments_are_refused_and_change_nothing(kwargs, msg):
    m = tiny_gpt2()
    with pytest.raises(ValueError, match=msg):
        lora.inject(m, **kwargs)
    assert not any(isinstance(x, lora.LoRALayer) for x in m.modules())


def test_injecting_twice_points_to_add_adapter():
    m = tiny_gpt2()
    lora.inject(m, ["c_attn"])
    with pytest.raises(ValueError, match="already a loralib layer.*add_adapter"):
        lora.inject(m, ["transformer.h.0.attn.c_attn"])


def test_rank_alpha_pattern_and_rslora():
    m = tiny_gpt2()
    lora.inject(m, "all-linear", r=4, lora_alpha=8, rank_pattern={"c_fc": 2, r".*h\.1\.attn\.c_attn": 8},
                alpha_pattern={"mlp.c_proj": 1}, use_rslora=True)
    h = m.transformer.h
    assert (h[0].attn.c_attn.r, h[1].attn.c_attn.r, h[0].mlp.c_fc.r, h[0].mlp.c_proj.r) == (4, 8, 2, 4)
    assert h[0].attn.c_attn.scaling == pytest.approx(8 / math.sqrt(4))
    assert h[1].attn.c_attn.scaling == pytest.approx(8 / math.sqrt(8))
    assert h[0].mlp.c_fc.scaling == pytest.approx(8 / math.sqrt(2))
    assert h[0].mlp.c_proj.scaling == pytest.approx(1 / math.sqrt(4))
    plain = tiny_gpt2()
    lora.inject(plain, ["c_fc"], r=4, lora_alpha=8)
    assert plain.transformer.h[0].mlp.c_fc.scaling == 2.0


def test_training_only_lora_changes_outputs_and_eval_merges():
    base = tiny_gpt2()
    x = ids()
    ref = base(x).logits.detach()
    model = clone(base)
    lora.inject(model, "all-linear", r=4, lora_alpha=8)
    lora.mark_only_lora_as_trainable(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        out = model(x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # base untouched (unmerged)
    train_logits = model(x).logits.detach()
    assert (train_logits - ref).abs().max() > 1e-3  # the adapter learned something
    model.eval()
    assert all(m.merged for m in model.modules() if isinstance(m, lora.LoRALayer))
    torch.testing.assert_close(model(x).logits, train_logits, rtol=1e-4, atol=1e-5)
    # a merged model still saves the base weights it started from (W + d - d: equal up to rounding)
    saved = model.state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-6)


def test_conv_net_outputs_unchanged_then_merge_consistent():
    base = conv_net()
    x = tokens()
    ref = base(x)
    model = clone(base)
    lora.inject(model, ["emb", "c1", "c2", "c3", "head"], r=2, lora_alpha=4)
    assert isinstance(model.c1, lora.Conv1d) and isinstance(model.c2, lora.Conv2d)
    assert isinstance(model.c3, lora.Conv3d) and isinstance(model.emb, lora.Embedding)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    randomize_lora(model)
    model.train()
    unmerged = model(x)
    assert (unmerged - ref).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)


def test_conv_keeps_the_original_convolution():
    net = conv_net()
    c2 = net.c2
    lora.inject(net, ["c2"], r=2)
    assert net.c2.conv is c2 and not c2.weight.requires_grad
    assert "c2.conv.weight" in net.state_dict()  # loralib's ConvLoRA layout


def test_tied_weights_are_not_merged_in_place():
    base = tiny_gpt2()
    x = ids()
    model = clone(base)
    lora.inject(model, ["wte"], r=2)
    randomize_lora(model)
    model.train()
    want = model(x).logits.detach()
    wte_before = model.transformer.wte.weight.detach().clone()
    model.eval()
    assert torch.equal(model.transformer.wte.weight, wte_before)  # lm_head shares it: never merged in place
    torch.testing.assert_close(model(x).logits, want)
    plain = lora.merge_and_unload(model)
    assert type(plain.transformer.wte) is nn.Embedding
    assert plain.transformer.wte.weight is not plain.lm_head.weight  # untied: the head keeps the base weight
    assert torch.equal(plain.lm_head.weight, wte_before)
    torch.testing.assert_close(plain(x).logits, want, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_gpt2_restores_conv1d():
    base = tiny_gpt2()
    x = ids()
    model = clone(base)
    lora.inject(model, "all-linear", r=4, lora_alpha=8)
    randomize_lora(model)
    model.eval()
    merged_out = model(x).logits
    plain = lora.merge_and_unload(model)
    assert not any(isinstance(m, lora.LoRALayer) for m in plain.modules())
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(plain(x).logits, merged_out, rtol=0, atol=0)
    # the merged weight really holds W + s * (B A)^T
    assert not torch.equal(plain.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


def test_merge_and_unload_from_train_mode_and_named_adapter():
    base = conv_net()
    x = tokens()
    model = clone(base)
    lora.inject(model, ["c1", "c2", "c3", "emb", "head"], r=2)
    lora.add_adapter(model, "other", r=3, lora_alpha=3)
    randomize_lora(model)
    lora.set_adapter(model, "other")
    model.train()
    want = model(x)
    plain = lora.merge_and_unload(model)
    assert [type(m) for m in plain.children()] == [nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


class HandBuilt(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = lora.Linear(6, 8, r=2, fan_in_fan_out=True)
        self.b = lora.MergedLinear(8, 9, r=2, enable_lora=[True, False, True])
        self.c = lora.Linear(9, 3, r=0)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_merge_and_unload_hand_built_layers_become_nn_linear():
    torch.manual_seed(0)
    model = randomize_lora(HandBuilt())
    x = torch.randn(4, 6)
    model.eval()
    want = model(x)
    plain = lora.merge_and_unload(model)
    assert [type(m) for m in plain.children()] == [nn.Linear, nn.Linear, nn.Linear]
    assert plain.a.weight.shape == (8, 6)  # fan_in_fan_out weight transposed into nn.Linear's layout
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-6)
    bare = randomize_lora(lora.Linear(4, 5, r=2))
    assert type(lora.merge_and_unload(bare)) is nn.Linear  # a bare layer comes back replaced


def test_merge_and_unload_result_runs_without_loralib(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Conv1d(7, 3, 1))
    lora.inject(model, ["0", "2"], r=2)
    randomize_lora(model)
    model.eval()
    x = torch.randn(7, 5)
    want = model[2](model[1](model[0](x)).t().unsqueeze(0))
    plain = lora.merge_and_unload(model)
    torch.save({"model": plain, "x": x, "want": want}, tmp_path / "m.pt")
    code = ("import sys, torch; sys.modules['loralib'] = None\n"  # any import of loralib now fails
            "d = torch.load(sys.argv[1], weights_only=False); m = d['model']\n"
            "y = m[2](m[1](m[0](d['x'])).t().unsqueeze(0))\n"
            "assert torch.allclose(y, d['want'], atol=1e-6), (y - d['want']).abs().max()\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_safe_merge_refuses_nan():
    model = tiny_gpt2()
    lora.inject(model, ["c_fc"], r=2, safe_merge=True)
    model.train()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.lora_B[0, 0] = float("nan")
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    with pytest.raises(ValueError, match="safe_merge"):
        model.eval()
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)  # nothing written
    other = tiny_gpt2()
    lora.inject(other, ["c_fc"], r=2)
    other.train()
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.lora_A.fill_(float("inf"))
    with pytest.raises(ValueError, match="safe_merge.*transformer.h.1.mlp.c_fc"):
        lora.merge_and_unload(other, safe_merge=True)
    assert isinstance(other.transformer.h[0].mlp.c_fc, lora.Linear)  # left unchanged


def test_multihead_attention_out_proj_is_not_a_candidate():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="NonDynamicallyQuantizableLinear, which inject cannot adapt"):
        lora.inject(model, ["out_proj"])


def test_injected_conv_net_checkpoint_interop_with_convnet_state_dict():
    """Base keys of a ConvLoRA are conv.weight: loading the plain net's weights needs the same remap as 0.1.2."""
    net = ConvNet()
    lora.inject(net, ["head"], r=2)
    assert {k for k in net.state_dict() if "lora_" in k} == {"head.lora_A", "head.lora_B"}


def test_a_module_used_twice_is_treated_as_tied():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert lora.inject(model, "all-linear", r=2) == ["0"]  # named_children lists a module once
    assert model[2] is shared and model[0].weight is shared.weight
    randomize_lora(model)
    x = torch.randn(4, 3)
    model.train()
    want = model(x)
    model.eval()  # merging in place would change model[2] too
    assert not model[0].merged
    torch.testing.assert_close(model(x), want)


def test_regex_targets_skip_layers_inject_cannot_adapt():
    m = tiny_gpt2()
    # matches c_attn, c_proj (Conv1D) and attn_dropout / resid_dropout (no parameters): only the former count
    assert lora.inject(m, r"transformer\.h\.0\.attn\..*") == ["transformer.h.0.attn.c_attn",
                                                             "transformer.h.0.attn.c_proj"]
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match="'all-linear': Sequential has no linear layer"):
        lora.inject(net, "all-linear")
