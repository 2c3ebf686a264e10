"""Invariants of our layers that hold whatever the reference does: init, merge algebra, r=0, trainable sets,
dtypes, the fused dropout path, serialization and autocast."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as lora
import loralib.layers as layers

# name -> (constructor taking LoRA kwargs, input generator)
LAYERS = {
    "Linear": (lambda **kw: lora.Linear(6, 5, **kw), lambda g: torch.randn(3, 6, generator=g)),
    "Linear-fifo": (lambda **kw: lora.Linear(6, 5, fan_in_fan_out=True, **kw),
                    lambda g: torch.randn(2, 3, 6, generator=g)),
    "MergedLinear": (lambda **kw: lora.MergedLinear(6, 9, enable_lora=[True, False, True], **kw),
                     lambda g: torch.randn(2, 4, 6, generator=g)),
    "MergedLinear-fifo": (lambda **kw: lora.MergedLinear(6, 8, enable_lora=[False, True], fan_in_fan_out=True,
                                                         **kw), lambda g: torch.randn(5, 6, generator=g)),
    "Embedding": (lambda **kw: lora.Embedding(10, 4, padding_idx=1, **kw),
                  lambda g: torch.randint(0, 10, (2, 5), generator=g)),
    "Conv1d": (lambda **kw: lora.Conv1d(3, 4, 3, padding=1, **kw), lambda g: torch.randn(2, 3, 7, generator=g)),
    "Conv2d": (lambda **kw: lora.Conv2d(2, 4, 3, groups=2, **kw), lambda g: torch.randn(2, 2, 5, 6, generator=g)),
    "Conv3d": (lambda **kw: lora.Conv3d(2, 3, (1, 3, 2), **kw), lambda g: torch.randn(1, 2, 3, 4, 5, generator=g)),
}
NAMES = list(LAYERS)


def _make(name, seed=0, randomize=True, **kw):
    torch.manual_seed(seed)
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    layer = LAYERS[name][0](**kw)
    if randomize and kw["r"] > 0:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
    return layer


def _x(name, seed=0):
    return LAYERS[name][1](torch.Generator().manual_seed(seed))


def _frozen(layer):
    return layer.conv.weight if isinstance(layer, lora.ConvLoRA) else layer.weight


def _plain_twin(layer):
    """The plain torch layer holding ``layer``'s frozen weights (stored the torch way)."""
    if isinstance(layer, lora.ConvLoRA):
        return copy.deepcopy(layer.conv)
    if isinstance(layer, lora.Embedding):
        twin = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx)
    else:
        twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        if layer.bias is not None:
            twin.bias.data.copy_(layer.bias)
    w = layer.weight.t() if getattr(layer, "fan_in_fan_out", False) else layer.weight
    twin.weight.data.copy_(w)
    return twin


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", NAMES)
def test_fresh_layer_equals_plain_layer(name):
    """B = 0 (A = 0 for Embedding) at init: the adapted layer computes exactly what the frozen one does."""
    layer = _make(name, randomize=False, lora_alpha=16)
    assert any(p.abs().sum() > 0 for n, p in layer.named_parameters() if "lora_" in n)  # the other factor is random
    x = _x(name)
    torch.testing.assert_close(layer(x), _plain_twin(layer)(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_merge_unmerge_restores_and_is_idempotent(name):
    layer = _make(name)
    w0 = _frozen(layer).detach().clone()
    layer.merge()
    once = _frozen(layer).detach().clone()
    assert _rel(once, w0) > 1e-3  # the update is really there
    layer.merge()  # merging a merged layer is a no-op
    assert torch.equal(_frozen(layer), once)
    layer.unmerge()
    layer.unmerge()
    assert _rel(_frozen(layer), w0) < 1e-6
    assert not layer.merged


@pytest.mark.parametrize("name", NAMES)
def test_eval_equals_train_output_and_toggling_does_not_drift(name):
    layer = _make(name)
    x = _x(name)
    w0 = _frozen(layer).detach().clone()
    with torch.no_grad():
        y_train = layer(x)
        layer.eval()
        assert layer.merged
        torch.testing.assert_close(layer(x), y_train, rtol=1e-5, atol=1e-5)
        for _ in range(1000):
            layer.train()
            layer.eval()
        layer.train()
    assert not layer.merged
    assert _rel(_frozen(layer), w0) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_train, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge_weights", [True, False])
def test_merge_weights_false_never_touches_weight(merge_weights):
    layer = _make("Linear", merge_weights=merge_weights)
    w0 = layer.weight.detach().clone()
    x = _x("Linear")
    y = layer(x)
    layer.eval()
    assert layer.merged is merge_weights
    assert torch.equal(layer.weight, w0) is (not merge_weights)
    torch.testing.assert_close(layer(x), y)


@pytest.mark.parametrize("name", NAMES)
def test_r0_is_a_plain_layer(name):
    layer = _make(name, r=0)
    assert not any("lora_" in n for n, _ in layer.state_dict().items())
    twin = _plain_twin(layer)
    if not isinstance(layer, lora.ConvLoRA) and not getattr(layer, "fan_in_fan_out", False):
        assert layer.state_dict().keys() == twin.state_dict().keys()
    assert all(p.requires_grad for p in layer.parameters())  # nothing frozen: nothing to adapt
    x = _x(name)
    w0 = _frozen(layer).detach().clone()
    torch.testing.assert_close(layer(x), twin(x), rtol=1e-6, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), twin(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(_frozen(layer), w0)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        lora.Embedding(10, 6, r=2),
        lora.Linear(6, 8, r=2),
        nn.LayerNorm(8),
        lora.MergedLinear(8, 8, r=2, enable_lora=[True, False]),
        lora.Linear(8, 8, r=0),
        nn.Linear(8, 8),
        nn.Unflatten(-1, (2, 4)),
        lora.Conv2d(3, 3, 1, r=2),  # treats the 3 tokens as channels
    )


@pytest.mark.parametrize("bias,extra", [
    ("none", set()),
    ("all", {"1.bias", "2.bias", "3.bias", "4.bias", "5.bias", "7.conv.bias"}),
    ("lora_only", {"1.bias", "3.bias", "7.conv.bias"}),
])
def test_only_lora_and_chosen_biases_get_gradients(bias, extra):
    model = _model()
    with torch.no_grad():  # B != 0 so every LoRA factor receives a gradient
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    lora.mark_only_lora_as_trainable(model, bias=bias)
    model(torch.randint(0, 10, (2, 3))).square().sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    lora_names = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert got == lora_names | extra
    assert set(lora.lora_state_dict(model, bias=bias)) == lora_names | (extra if bias != "none" else set())


def test_lora_state_dict_keeps_every_key_of_a_shared_bias():
    """A bias tied between two modules has two state-dict keys; bias='all' must save both (0.1.2 did)."""
    first, second = lora.Linear(4, 4, r=2), nn.Linear(4, 4)
    second.bias = first.bias
    model = nn.Sequential(first, second)
    assert set(lora.lora_state_dict(model, bias="all")) == {"0.lora_A", "0.lora_B", "0.bias", "1.bias"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_forward_backward_cpu(name, dtype):
    ref = _make(name).double()
    layer = copy.deepcopy(ref).to(dtype)
    x = _x(name)
    xs = [x.double(), x.to(dtype)] if x.is_floating_point() else [x, x]
    outs = []
    for mod, xi in zip((ref, layer), xs):
        xi = xi.clone().requires_grad_(xi.is_floating_point())
        y = mod(xi)
        y.float().square().sum().backward()
        outs.append((y, {n: p.grad for n, p in mod.named_parameters() if p.grad is not None}))
    (y_ref, g_ref), (y, g) = outs
    assert y.dtype == dtype and g.keys() == g_ref.keys() and g
    # Errors relative to each tensor's largest entry: bf16 keeps ~3 significant digits, f16 ~4.
    atol = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]

    def close(a, b):
        scale = b.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(a.double() / scale, b.detach() / scale, rtol=0, atol=atol)

    close(y, y_ref)
    for n in g:
        assert g[n].dtype == dtype
        close(g[n], g_ref[n])
    layer.eval()
    with torch.no_grad():
        close(layer(xs[1]), y_ref)


# --- the fused Linear / MergedLinear path with dropout ---------------------------------------------------------

@pytest.mark.parametrize("name", ["Linear", "MergedLinear"])
def test_dropout_gradients_match_autograd_with_same_mask(name, monkeypatch):
    p = 0.3
    masks = []
    real = layers._dropout_mask

    def recording(*args, **kwargs):
        masks.append(real(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(layers, "_dropout_mask", recording)
    layer = _make(name, lora_dropout=p).double()
    x = _x(name).double().requires_grad_()
    g_out = torch.randn(layer(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    masks.clear()
    y = layer(x)
    (y * g_out).sum().backward()
    y = y.detach()
    assert len(masks) == 1 and masks[0].dtype == torch.bool  # drawn once in forward, kept (1 byte) for backward
    mask = (~masks[0]).view(x.shape)  # the keep-mask; built for the flattened (N, in) input
    assert mask.shape == x.shape and 0.4 < mask.float().mean().item() < 0.95
    got = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]

    # Reference: plain autograd on x * mask / (1 - p); MergedLinear's block-diagonal B is built here by hand.
    x2 = x.detach().clone().requires_grad_()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    if name == "MergedLinear":
        r, per = layer.r, layer.out_features // len(layer.enable_lora)
        Bfull = torch.zeros(layer.out_features, A.shape[0], dtype=B.dtype)
        for k, group in enumerate(i for i, on in enumerate(layer.enable_lora) if on):
            Bfull[group * per:(group + 1) * per, k * r:(k + 1) * r] = B[k * per:(k + 1) * per]
    else:
        Bfull = B
    dx = x2 * mask.to(x2.dtype) / (1 - p)
    y_ref = F.linear(x2, layer.weight, layer.bias) + layer.scaling * (dx @ A.t() @ Bfull.t())
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-12, atol=1e-12)
    (y_ref * g_out).sum().backward()
    for a, b in zip(got, [x2.grad, A.grad, B.grad]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dropout_reproducible_under_manual_seed():
    layer = _make("Linear", lora_dropout=0.5)
    x = _x("Linear")

    def run(seed):
        torch.manual_seed(seed)
        layer.zero_grad()
        y = layer(x)
        y.sum().backward()
        return y.detach(), layer.lora_A.grad.clone()

    (y1, g1), (y2, g2), (y3, _) = run(0), run(0), run(1)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert not torch.equal(y1, y3)
    layer.eval()  # no dropout in eval: merged output is deterministic and equals the no-dropout path
    with torch.no_grad():
        y_eval = layer(x)
    ref = F.linear(x, layer.weight - layer.delta_weight(), layer.bias) + layer.scaling * (
        x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(y_eval, ref.detach(), rtol=1e-5, atol=1e-5)


# --- serialization and autocast ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
@pytest.mark.parametrize("merged", [False, True])
def test_torch_save_pickle_deepcopy(lora_dropout, merged):
    model = nn.Sequential(_make("Linear", lora_dropout=lora_dropout), _make("Conv1d", lora_dropout=lora_dropout))
    model.train(not merged)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        model.eval()
        expected = model(x)
        model.train(not merged)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert [m.merged for m in other] == [merged, merged]
        other.eval()
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=1e-6, atol=1e-6)
        other.train()
        torch.testing.assert_close(other[0].weight, model[0].weight - (model[0].delta_weight() if merged else 0))


@pytest.mark.parametrize("name", ["Linear", "MergedLinear", "Linear-fifo"])
def test_cpu_bfloat16_autocast(name):
    layer = _make(name)
    x = _x(name)
    with torch.no_grad():
        ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert layer.weight.grad is None


def test_readme_usage_block_runs(tmp_path, monkeypatch):
    """The five-step example in README.md's Usage section runs as written and ends with the adapter loaded."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Usage", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md#usage", "exec"), ns)
    model = ns["model"]
    assert model[0].merged and model[0].lora_B.abs().sum() > 0  # trained adapter loaded, merged for inference
    saved = torch.load(tmp_path / "lora.pt", weights_only=True)
    assert set(saved) == {"0.lora_A", "0.lora_B"}
    assert torch.equal(saved["0.lora_B"], model[0].lora_B)


@pytest.mark.parametrize("name", ["Linear", "MergedLinear"])
def test_unmerged_inference_path_equals_training_path(name):
    """Under no_grad the unmerged layer adds its update in place into the base output (no temporaries); it must
    compute what the fused training path computes, and leave the weights alone."""
    layer = _make(name, merge_weights=False)
    layer.eval()
    x = _x(name)
    w0 = _frozen(layer).detach().clone()
    y_grad = layer(x)
    assert y_grad.requires_grad
    with torch.no_grad():
        y_inf = layer(x)
    torch.testing.assert_close(y_inf, y_grad.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(_frozen(layer), w0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes: the out-of-place path
        torch.testing.assert_close(layer(x).float(), y_grad.detach(), rtol=3e-2, atol=3e-2)
