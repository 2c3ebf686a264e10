"""A half-precision frozen base with a float32 adapter (issue 16): every LoRA layer, in and outside autocast.

Each case runs a layer whose frozen weight (and bias) is bfloat16 or float16 and whose lora_A / lora_B are float32,
and compares its output and the gradients of x, A and B with a float64 evaluation of the same formula on the same
values (the half-precision tensors upcast exactly). Tolerances are stated per dtype and scaled, element by element,
to the magnitude of the computation: the same formula evaluated on |x|, |W|, |b|, |A|, |B| and |g|, which bounds
every partial sum a matmul or convolution can form in any order.

- Outside autocast: output and x's gradient in the base dtype within ``2 eps(base)`` (the base matmul's result and
  the update's sum are each rounded once); A's and B's gradients in float32 within ``1e-5`` (float32 arithmetic on
  exact inputs), except for convolutions: their update is part of the kernel, so the kernel's gradient comes out of
  the half-precision convolution and A's and B's are within ``2 eps(base)``.
- Under autocast (dtype = the base dtype): autocast rounds every matmul input and output to that dtype, so the
  reference takes the inputs rounded to it and everything is checked within ``4 eps(autocast dtype)``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import loralib as lora
from inject_helpers import ids, tiny_gpt2

HALF = [torch.bfloat16, torch.float16]
EPS = {dt: torch.finfo(dt).eps for dt in (torch.bfloat16, torch.float16, torch.float32)}
OUT_K = 2  # outside autocast: output / grad of x within OUT_K * eps(base) * magnitude
ADAPTER_GRAD_TOL = 1e-5  # outside autocast: grads of A, B (float32) within this * magnitude
AUTOCAST_K = 4  # under autocast: everything within AUTOCAST_K * eps(autocast dtype) * magnitude
S = 1.5  # lora_alpha / r for every case below (alpha 3, r 2)

LAYERS = ["Linear", "Linear_fifo", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d"]


def build(kind: str, dropout: float = 0.0, seed: int = 0):
    """A float32 layer of ``kind`` in train mode, r=2, alpha=3, with random A, B (B = 0 would hide mistakes), and
    an input of the matching shape."""
    torch.manual_seed(seed)
    lk = dict(r=2, lora_alpha=3)
    if kind == "Linear":
        layer, shape = lora.Linear(16, 12, lora_dropout=dropout, **lk), (2, 5, 16)
    elif kind == "Linear_fifo":
        layer, shape = lora.Linear(16, 12, lora_dropout=dropout, fan_in_fan_out=True, **lk), (2, 5, 16)
    elif kind == "MergedLinear":
        layer = lora.MergedLinear(16, 12, lora_dropout=dropout, enable_lora=[True, False, True],
                                  fan_in_fan_out=True, **lk)
        shape = (2, 5, 16)
    elif kind == "Embedding":
        layer, shape = lora.Embedding(20, 12, **lk), None
    else:
        dims = {"Conv1d": (7,), "Conv2d": (6, 5), "Conv3d": (4, 5, 3)}[kind]
        layer = getattr(lora, kind)(4, 6, 3, padding=1, lora_dropout=dropout, **lk)
        shape = (2, 4, *dims)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape) * 0.3)
    x = torch.randint(0, 20, (2, 7)) if shape is None else torch.randn(shape)
    return layer.train(), x


def to_mixed(layer, base_dtype):
    """The layer with its frozen weight and bias in ``base_dtype`` and its adapter in float32 (as after
    ``model.to(base_dtype)`` with the ``lora_`` parameters cast back)."""
    m = copy.deepcopy(layer).to(base_dtype)
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    return m


def params(layer):
    """W, b, A, B of a layer as float64 (exact upcasts), W in (out, in[, kernel]) layout."""
    w = layer.frozen_weight()
    if getattr(layer, "fan_in_fan_out", False):
        w = w.t()
    b = layer.conv.bias if isinstance(layer, lora.ConvLoRA) else getattr(layer, "bias", None)
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return d(w), d(b), d(layer.lora_A), d(layer.lora_B)


def reference(layer, x, W, b, A, B):
    """The layer's formula in float64, written out independently of loralib's code. x: float64 or indices."""
    if isinstance(layer, lora.Embedding):
        return F.embedding(x, W) + S * (F.embedding(x, A.t()) @ B.t())
    if isinstance(layer, lora.ConvLoRA):
        kernel = W + S * (B @ A).view(W.shape)
        return layer.conv._conv_forward(x, kernel, b)
    if isinstance(layer, lora.MergedLinear):
        # B's groups placed at the enabled output groups, zero rows elsewhere
        r, per = layer.r, layer.out_features // len(layer.enable_lora)
        full = torch.zeros(layer.out_features, A.shape[0], dtype=B.dtype)
        for k, g in enumerate(i for i, e in enumerate(layer.enable_lora) if e):
            full[g * per:(g + 1) * per, k * r:(k + 1) * r] = B[k * per:(k + 1) * per]
        B = full
    return F.linear(x, W, b) + S * ((x @ A.t()) @ B.t())


def ref_and_grads(layer, x, W, b, A, B, g):
    """Output of :func:`reference` and the gradients of sum(y * g) w.r.t. x (None for indices), A and B."""
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    xr = x.clone().requires_grad_() if x.is_floating_point() else x  # token indices have no gradient
    y = reference(layer, xr, W, b, A, B)
    grads = torch.autograd.grad((y * g).sum(), [xr, A, B] if x.is_floating_point() else [A, B])
    return (y.detach(), *grads) if x.is_floating_point() else (y.detach(), None, *grads)


def check(name, got, want, mag, tol):
    err = (got.double() - want).abs()
    bound = tol * mag + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: error {err.max().item():.3g} exceeds {tol:.3g} x magnitude ({worst:.2f}x the bound)"


def run(layer, x, g, autocast_dtype=None):
    x = x.clone().requires_grad_() if x.is_floating_point() else x
    with torch.autocast("cpu", autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = layer(x)
    y.backward(g.to(y.dtype))
    return y, (x.grad if x.is_floating_point() else None), layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("base_dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", LAYERS)
def test_outside_autocast_matches_float64(kind, base_dtype):
    """The fused training path (Linear, MergedLinear) and every other layer, no autocast."""
    layer, x = build(kind)
    mixed = to_mixed(layer, base_dtype)
    x = x.to(base_dtype) if x.is_floating_point() else x
    W, b, A, B = params(mixed)
    xd = x.double() if x.is_floating_point() else x
    y_ref = reference(mixed, xd, W, b, A, B)
    g = torch.randn(y_ref.shape).to(base_dtype)  # an upstream gradient exactly representable in the base dtype
    y, gx, gA, gB = run(mixed, x, g)

    assert y.dtype == base_dtype and gA.dtype == torch.float32 and gB.dtype == torch.float32
    assert mixed.lora_A.dtype == torch.float32 and mixed.frozen_weight().dtype == base_dtype
    want = ref_and_grads(mixed, xd, W, b, A, B, g.double())
    absx = xd.abs() if x.is_floating_point() else xd
    mag = ref_and_grads(mixed, absx, W.abs(), None if b is None else b.abs(), A.abs(), B.abs(), g.double().abs())
    eps = EPS[base_dtype]
    check("output", y, want[0], mag[0], OUT_K * eps)
    if gx is not None:
        assert gx.dtype == base_dtype
        check("grad x", gx, want[1], mag[1], OUT_K * eps)
    adapter_tol = OUT_K * eps if isinstance(mixed, lora.ConvLoRA) else ADAPTER_GRAD_TOL
    check("grad A", gA, want[2], mag[2], adapter_tol)
    check("grad B", gB, want[3], mag[3], adapter_tol)


@pytest.mark.parametrize("base_dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", LAYERS)
def test_under_autocast_matches_float64(kind, base_dtype):
    """Under autocast (its dtype = the base dtype), with a float32 input as from a float32 LayerNorm."""
    layer, x = build(kind)
    mixed = to_mixed(layer, base_dtype)
    W, b, A, B = params(mixed)
    rnd = lambda t: None if t is None else t.to(base_dtype).double()  # noqa: E731 - autocast's rounding
    xd = rnd(x) if x.is_floating_point() else x
    y_ref = reference(mixed, xd, W, b, rnd(A), rnd(B))
    g = torch.randn(y_ref.shape).to(base_dtype)
    y, gx, gA, gB = run(mixed, x, g, autocast_dtype=base_dtype)

    assert y.dtype == base_dtype and gA.dtype == torch.float32 and gB.dtype == torch.float32
    want = ref_and_grads(mixed, xd, W, b, rnd(A), rnd(B), g.double())
    absx = xd.abs() if x.is_floating_point() else xd
    mag = ref_and_grads(mixed, absx, W.abs(), None if b is None else b.abs(), A.abs(), B.abs(), g.double().abs())
    tol = AUTOCAST_K * EPS[base_dtype]
    check("output", y, want[0], mag[0], tol)
    if gx is not None:
        assert gx.dtype == torch.float32  # x came in as float32; autocast's cast hands its gradient back so
        check("grad x", gx, want[1], mag[1], tol)
    check("grad A", gA, want[2], mag[2], tol)
    check("grad B", gB, want[3], mag[3], tol)


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear", "Conv2d"])
def test_dropout_outside_autocast_matches_float64_copy(kind):
    """With dropout the mask is random: the float64 copy of the layer, run from the same RNG state, draws the same
    mask (it does not depend on the dtype), so its output and gradients are the float64 evaluation of the same
    computation. (The p = 0 formula is checked independently above.)"""
    layer, x = build(kind, dropout=0.25)
    mixed = to_mixed(layer, torch.bfloat16)
    ref = copy.deepcopy(mixed).double()
    x = x.to(torch.bfloat16)
    g = torch.randn(reference(mixed, x.double(), *params(mixed)).shape).to(torch.bfloat16)
    torch.manual_seed(11)
    y, gx, gA, gB = run(mixed, x, g)
    torch.manual_seed(11)
    want = run(ref, x.double(), g.double())
    W, b, A, B = params(mixed)
    # |mask| <= 1 / (1 - p): the magnitude of the p = 0 formula, scaled by that
    mag = ref_and_grads(mixed, x.double().abs(), W.abs(), None if b is None else b.abs(), A.abs(), B.abs(),
                        g.double().abs())
    eps = EPS[torch.bfloat16]
    check("output", y, want[0].detach(), mag[0] / 0.75, OUT_K * eps)
    check("grad x", gx, want[1], mag[1] / 0.75, OUT_K * eps)
    adapter_tol = OUT_K * eps if isinstance(mixed, lora.ConvLoRA) else ADAPTER_GRAD_TOL
    check("grad A", gA, want[2], mag[2] / 0.75, adapter_tol)
    check("grad B", gB, want[3], mag[3] / 0.75, adapter_tol)
    no_dropout = reference(mixed, x.double(), W, b, A, B)
    assert (y.double() - no_dropout).abs().max() > 0.05 * mag[0].max()  # dropout did drop something


@pytest.mark.parametrize("kind", LAYERS)
def test_no_grad_and_merged_eval_match_training_forward(kind):
    """The inference paths: no_grad in train mode (unmerged, its own code path for Linear / MergedLinear) gives
    the training forward exactly; eval mode merges the float32 update into the bfloat16 weight, which is allowed
    and stays within bfloat16 rounding of the unmerged output (the merged kernel rounds W + delta once more)."""
    layer, x = build(kind)
    mixed = to_mixed(layer, torch.bfloat16)
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    y_train = mixed(x).detach()
    with torch.no_grad():
        assert torch.equal(mixed(x), y_train)
        mixed.eval()
        assert mixed.merged and mixed.frozen_weight().dtype == torch.bfloat16
        y_merged = mixed(x)
    W, b, A, B = params(mixed.train())
    xd = x.double().abs() if x.is_floating_point() else x
    mag = reference(mixed, xd, W.abs(), None if b is None else b.abs(), A.abs(), B.abs())
    assert y_merged.dtype == torch.bfloat16
    check("merged vs unmerged", y_merged, y_train.double(), mag, 3 * EPS[torch.bfloat16])


def test_float64_base_with_float32_adapter_and_bf16_adapter_on_float32_base():
    """The rule is general: the base matmul in the weight's dtype, the update in the adapter's."""
    layer, x = build("MergedLinear")
    for base, adapter in ((torch.float64, torch.float32), (torch.float32, torch.bfloat16)):
        m = copy.deepcopy(layer).to(base)
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(adapter)
        y, gx, gA, gB = run(m, x.to(base), torch.ones(2, 5, 12, dtype=base))
        assert (y.dtype, gx.dtype, gA.dtype, gB.dtype) == (base, base, adapter, adapter)
        want = reference(m, x.to(base).double(), *params(m))
        assert torch.allclose(y.double(), want, rtol=0, atol=8 * EPS[adapter] * want.abs().max().item())


# --- inject, state dicts, checkpoints ---------------------------------------------------------------------------

def test_inject_on_half_model_makes_float32_adapter_outputs_unchanged():
    base = tiny_gpt2().to(torch.bfloat16)
    tok = ids()
    with torch.no_grad():
        before = base(tok).logits
    names = lora.inject(base, ["c_attn", "c_fc"], r=4, lora_alpha=8)
    layers = [base.get_submodule(n) for n in names]
    assert {(m.lora_A.dtype, m.lora_B.dtype, m.weight.dtype) for m in layers} == \
        {(torch.float32, torch.float32, torch.bfloat16)}
    for mode in ("train", "eval"):
        getattr(base, mode)()
        with torch.no_grad():
            after = base(tok).logits
        assert after.dtype == torch.bfloat16 and torch.equal(after, before), mode  # the update starts at zero
    sd = lora.lora_state_dict(base)
    assert sd and all(v.dtype == torch.float32 for v in sd.values())
    lora.add_adapter(base, "second", r=2)  # an added adapter follows the layer's own
    assert all(m.lora_adapters["second"].lora_A.dtype == torch.float32 for m in layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inject_adapter_dtype_choice(dtype):
    model = tiny_gpt2().to(torch.bfloat16)
    lora.inject(model, ["c_attn"], adapter_dtype=dtype)
    sd = lora.lora_state_dict(model)
    assert sd and {v.dtype for v in sd.values()} == {dtype}
    float_model = tiny_gpt2()
    lora.inject(float_model, ["c_attn"])
    assert {v.dtype for v in lora.lora_state_dict(float_model).values()} == {torch.float32}
    f64 = tiny_gpt2().double()
    lora.inject(f64, ["c_attn"])  # only half precision is promoted by default
    assert {v.dtype for v in lora.lora_state_dict(f64).values()} == {torch.float64}


@pytest.mark.parametrize("bad", ["float32", torch.int8, 32])
def test_inject_bad_adapter_dtype(bad):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="adapter_dtype must be a floating-point torch.dtype"):
        lora.inject(model, ["c_attn"], adapter_dtype=bad)
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())  # nothing changed


def test_adapter_trained_on_bf16_base_loads_into_float32_base(tmp_path):
    """save_adapter keeps the float32 adapter; it loads into a float32 base unchanged, and back."""
    half = tiny_gpt2().to(torch.bfloat16)
    lora.inject(half, ["c_attn"], r=4)
    with torch.no_grad():
        for n, p in half.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    lora.save_adapter(half, str(tmp_path / "a"))
    full = tiny_gpt2()
    lora.inject(full, ["c_attn"], r=4)
    lora.load_adapter(full, str(tmp_path / "a"))
    mine, theirs = lora.lora_state_dict(half), lora.lora_state_dict(full)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


class _Net(torch.nn.Module):
    def __init__(self, lib):
        super().__init__()
        self.emb = lib.Embedding(20, 16, r=2, lora_alpha=4)
        self.qkv = lib.MergedLinear(16, 48, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                    fan_in_fan_out=True)
        self.out = lib.Linear(48, 16, r=2, lora_alpha=4)
        self.conv = lib.Conv2d(16, 16, 3, padding=1, r=2, lora_alpha=4)  # 0.1.2's conv: square Conv2d only

    def forward(self, tok):
        h = self.out(self.qkv(self.emb(tok)))
        return self.conv(h.transpose(1, 2).unsqueeze(-1))


def test_loralib_0_1_2_checkpoint_loads_into_bf16_model(loralib_ms):
    """A float32 checkpoint of Microsoft's 0.1.2 into a bfloat16 model: load_state_dict's copy_ casts each tensor
    to the parameter's dtype, so a float32 adapter gets the exact values and a bfloat16 one their rounding; the
    bfloat16 model then computes the 0.1.2 model's output within bfloat16 rounding."""
    torch.manual_seed(0)
    theirs = _Net(loralib_ms)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.2)
    full_sd, adapter_sd = theirs.state_dict(), loralib_ms.lora_state_dict(theirs)
    tok = torch.randint(0, 20, (2, 6))
    theirs.train()
    want = theirs(tok).detach().double()

    for adapter_dtype in (torch.float32, torch.bfloat16):
        ours = _Net(lora).to(torch.bfloat16)
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(adapter_dtype)
        ours.load_state_dict({k: v for k, v in full_sd.items() if "lora_" not in k}, strict=False)
        ours.load_state_dict(adapter_sd, strict=False)  # the adapter alone, as 0.1.2's lora_state_dict saved it
        got_sd = ours.state_dict()
        for k, v in adapter_sd.items():
            assert got_sd[k].dtype == adapter_dtype and torch.equal(got_sd[k], v.to(adapter_dtype)), k
        ours.train()
        got = ours(tok)
        assert got.dtype == torch.bfloat16
        # bf16 rounding of inputs, weights and outputs through four layers: a few bf16 eps of the values' scale
        assert (got.double() - want).abs().max() <= 16 * EPS[torch.bfloat16] * want.abs().max()
