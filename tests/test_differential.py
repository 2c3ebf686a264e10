"""Differential tests: our layers against Microsoft's ``loralib==0.1.2`` on the same weights.

For every layer type and the shapes 0.1.2 supports: same state-dict keys and shapes, same outputs in train and
eval mode, same gradients, same merged weights, and state dicts that load both ways with ``strict=True``.
B (A for Embedding) is made non-zero so the LoRA path is exercised.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as ours

# (class name, positional args, keyword args, input shape); Embedding inputs are token ids below its vocab size.
CASES = [
    ("Linear", (7, 5), dict(r=2, lora_alpha=4), (3, 7)),
    ("Linear", (16, 12), dict(r=4, lora_alpha=8, fan_in_fan_out=True), (2, 3, 16)),
    ("Linear", (5, 9), dict(r=1, bias=False), (4, 5)),
    ("MergedLinear", (8, 12), dict(r=2, lora_alpha=2, enable_lora=[True, False, True]), (2, 3, 8)),
    ("MergedLinear", (8, 12), dict(r=3, lora_alpha=6, enable_lora=[False, True, False], fan_in_fan_out=True),
     (5, 8)),
    ("MergedLinear", (6, 8), dict(r=2, lora_alpha=16, enable_lora=[True, True]), (2, 2, 6)),
    ("MergedLinear", (6, 9), dict(r=2, enable_lora=[True], fan_in_fan_out=True, bias=False), (3, 6)),
    ("Embedding", (11, 6), dict(r=3, lora_alpha=6), (2, 5)),
    ("Embedding", (11, 4), dict(r=2, padding_idx=0), (3, 4)),
    ("Conv2d", (3, 4, 3), dict(r=2, lora_alpha=4, padding=1), (2, 3, 6, 6)),
    ("Conv2d", (4, 6, 3), dict(r=1, groups=2, stride=2), (1, 4, 7, 7)),
    ("Conv2d", (2, 4, 1), dict(r=2, bias=False), (2, 2, 3, 5)),
    ("Conv1d", (3, 5, 1), dict(r=2, lora_alpha=3), (2, 3, 9)),
    ("Conv3d", (2, 4, 1), dict(r=2), (1, 2, 3, 4, 5)),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _build(lib, case, dtype, seed):
    name, args, kwargs, _ = case
    torch.manual_seed(seed)
    layer = getattr(lib, name)(*args, **kwargs).to(dtype)
    with torch.no_grad():  # every parameter random, so B A != 0 and biases matter
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _input(case, dtype, seed):
    name, args, _, shape = case
    g = torch.Generator().manual_seed(seed)
    if name == "Embedding":
        return torch.randint(0, args[0], shape, generator=g)
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_()


def _weights(layer):
    return {n: p.detach().clone() for n, p in layer.named_parameters()}


def _fwd_bwd(layer, x, seed):
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), (x.grad.clone() if x.is_floating_point() else None), grads


def _assert_dicts_close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_as_loralib_012(loralib_ms, case, dtype):
    tol = TOL[dtype]
    theirs = _build(loralib_ms, case, dtype, seed=1)
    mine = _build(ours, case, dtype, seed=2)  # different init: everything must come from the state dict

    # Same keys, shapes and dtypes; and 0.1.2's state dict loads into ours strictly.
    sd_theirs = theirs.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in mine.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in sd_theirs.items()}
    assert any("lora_A" in k for k in sd_theirs) and any("lora_B" in k for k in sd_theirs)
    mine.load_state_dict(sd_theirs, strict=True)
    assert {n for n, p in mine.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    before = _weights(theirs)

    # Train mode: outputs, input gradients and parameter gradients.
    x = _input(case, dtype, seed=3)
    y_t, gx_t, grads_t = _fwd_bwd(theirs, x, seed=4)
    y_m, gx_m, grads_m = _fwd_bwd(mine, x, seed=4)
    torch.testing.assert_close(y_m, y_t, **tol)
    if gx_t is not None:
        torch.testing.assert_close(gx_m, gx_t, **tol)
    assert any(k.endswith("lora_B") for k in grads_t)
    _assert_dicts_close(grads_m, grads_t, tol)

    # Eval mode merges: same merged weights, same outputs.
    theirs.eval()
    mine.eval()
    assert mine.merged and theirs.merged
    _assert_dicts_close(_weights(mine), _weights(theirs), tol)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), **tol)
        torch.testing.assert_close(mine(x), y_t, **tol)

    # Back to train mode: both unmerge to the original weights.
    theirs.train()
    mine.train()
    _assert_dicts_close(_weights(mine), before, tol)
    _assert_dicts_close(_weights(theirs), before, tol)

    # Our state dict loads strictly into a fresh 0.1.2 layer and gives the same outputs.
    fresh = _build(loralib_ms, case, dtype, seed=5)
    fresh.load_state_dict(mine.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_t, **tol)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "MergedLinear"],
                         ids=[i for i in IDS if i.startswith("MergedLinear")])
def test_merged_linear_helpers_match(loralib_ms, case):
    """``merge_AB`` and ``zero_pad`` are public in 0.1.2; user code calling them must get the same tensors."""
    theirs = _build(loralib_ms, case, torch.float64, seed=1)
    mine = _build(ours, case, torch.float64, seed=2)
    mine.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mine.merge_AB(), theirs.merge_AB(), rtol=1e-12, atol=1e-12)
        rows = torch.randn(int(theirs.lora_ind.sum()), 3, dtype=torch.float64)
        torch.testing.assert_close(mine.zero_pad(rows), theirs.zero_pad(rows))
    assert torch.equal(mine.lora_ind, theirs.lora_ind)


def _small_model(lib):
    torch.manual_seed(0)
    return nn.Sequential(
        lib.Embedding(10, 8, r=2),
        lib.Linear(8, 12, r=4, lora_alpha=8),
        nn.LayerNorm(12),
        lib.MergedLinear(12, 12, r=2, enable_lora=[True, False, True], fan_in_fan_out=True),
        nn.Linear(12, 6),
    )


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_utils_match(loralib_ms, bias):
    """Same trainable set and same saved keys on a model where 0.1.2's utilities behave correctly."""
    mine, theirs = _small_model(ours), _small_model(loralib_ms)
    ours.mark_only_lora_as_trainable(mine, bias=bias)
    loralib_ms.mark_only_lora_as_trainable(theirs, bias=bias)
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    sd_m, sd_t = ours.lora_state_dict(mine, bias=bias), loralib_ms.lora_state_dict(theirs, bias=bias)
    assert sd_m.keys() == sd_t.keys()
    # Same seed, same construction: the two models start identical. Give ours a trained-looking adapter,
    # move it to 0.1.2's model through lora_state_dict + strict=False, and both must compute the same thing.
    assert torch.equal(torch.cat([p.flatten() for p in mine.state_dict().values()]),
                       torch.cat([p.flatten() for p in theirs.state_dict().values()]))
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    theirs.load_state_dict(ours.lora_state_dict(mine, bias=bias), strict=False)
    x = torch.randint(0, 10, (2, 7))
    for mode in (True, False):
        mine.train(mode)
        theirs.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-5)


def _user_layer_class(lib):
    """A custom layer built on ``LoRALayer`` with its own merge logic, as third-party code does with 0.1.2."""

    class UserLoRALinear(nn.Linear, lib.LoRALayer):
        def __init__(self, n):
            nn.Linear.__init__(self, n, n)
            lib.LoRALayer.__init__(self, r=2, lora_alpha=2, lora_dropout=0., merge_weights=True)
            self.lora_A = nn.Parameter(torch.randn(2, n))
            self.lora_B = nn.Parameter(torch.randn(n, 2))

        def train(self, mode=True):
            nn.Linear.train(self, mode)
            if mode == self.merged:  # merge on eval, unmerge on train
                sign = -1 if mode else 1
                self.weight.data += sign * (self.lora_B @ self.lora_A)
                self.merged = not mode
            return self

        def forward(self, x):
            y = F.linear(x, self.weight, self.bias)
            return y if self.merged else y + x @ self.lora_A.t() @ self.lora_B.t()

    return UserLoRALinear


def test_user_subclass_of_loralayer_behaves_as_in_012(loralib_ms):
    """Our state-dict hooks leave such user layers alone: saving and loading do exactly what 0.1.2 does."""
    torch.manual_seed(0)
    theirs = _user_layer_class(loralib_ms)(4)
    torch.manual_seed(0)
    mine = _user_layer_class(ours)(4)
    x = torch.randn(3, 4)
    for layer in (theirs, mine):
        layer.eval()
    _assert_dicts_close(mine.state_dict(), theirs.state_dict(), dict(rtol=0, atol=0))
    mine.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x))
    mine.train()
    theirs.train()
    torch.testing.assert_close(mine(x), theirs(x))
