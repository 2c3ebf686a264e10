"""MergedLinear reuses its block-diagonal B while no gradient is recorded, and never serves a stale one.

Each check compares the layer's no-grad output with the output computed from B expanded afresh (the code without
the cache), bit for bit, after every way B can change; and checks that gradients still reach B after cached use.
"""
import pytest
import torch

import loralib as lora


def layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = lora.MergedLinear(12, 9, r=2, lora_alpha=4, enable_lora=[True, False, True], merge_weights=False,
                          dtype=dtype)
    with torch.no_grad():
        m.lora_B.normal_()
    return m.eval()


def fresh(m, x):
    """The output with B expanded now, bypassing any cache."""
    B = m._build_expanded_B(m.lora_B)
    return torch.nn.functional.linear(x, m.weight, m.bias) + (x @ m.lora_A.t()) @ B.t() * m.scaling


def check(m, x):
    with torch.no_grad():
        torch.testing.assert_close(m(x), fresh(m, x).to(m(x).dtype), rtol=1e-6, atol=1e-6)


def _step(m):
    opt = torch.optim.SGD([m.lora_B], lr=0.5)
    m.train()
    m(torch.randn(3, 12)).sum().backward()
    opt.step()
    m.eval()


def _data_edit(m):
    m.lora_B.data.mul_(-3)  # not seen by B's version counter


def _load(m):
    m.load_state_dict(layer(seed=5).state_dict())


def _replace(m):
    m.lora_B = torch.nn.Parameter(torch.randn_like(m.lora_B))


def _inference_mode(m):
    with torch.inference_mode():
        m(torch.randn(2, 12))  # fills the cache with inference tensors
    _data_edit(m)


@pytest.mark.parametrize("change", [_step, _data_edit, _load, _replace, _inference_mode])
def test_no_grad_output_follows_every_change_of_B(change):
    m, x = layer(), torch.randn(4, 12)
    check(m, x)  # fills the cache
    with torch.no_grad():
        before = m(x)
    change(m)
    check(m, x)
    with torch.no_grad():
        assert not torch.allclose(m(x), before)  # B did change


def test_the_cache_is_used_while_B_is_unchanged():
    m = layer()
    with torch.no_grad():
        first = m._expanded_B()
        assert m._expanded_B() is first
        m.lora_B.add_(1)
        assert m._expanded_B() is not first


def test_dtype_and_device_changes_rebuild():
    m, x = layer(), torch.randn(4, 12)
    check(m, x)
    m.double()
    check(m, x.double())
    assert m._expanded_B().dtype == torch.float64


def test_gradients_reach_B_after_cached_use():
    m, x = layer(), torch.randn(4, 12)
    with torch.no_grad():
        m(x)  # cache filled
    m.train()
    for _ in range(2):  # twice: the second step must not reuse the first step's graph
        m.lora_B.grad = None
        m(x).pow(2).sum().backward()
        B = m.lora_B.detach().clone().requires_grad_()
        ref = torch.nn.functional.linear(x, m.weight, m.bias) + (x @ m.lora_A.detach().t()) @ \
            m._build_expanded_B(B).t() * m.scaling
        ref.pow(2).sum().backward()
        torch.testing.assert_close(m.lora_B.grad, B.grad, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            m.lora_B.sub_(0.1 * m.lora_B.grad)


def test_a_named_adapter_is_not_served_the_default_B():
    m, x = layer(), torch.randn(4, 12)
    with torch.no_grad():
        y_default = m(x)
    lora.add_adapter(m, "other", r=2, lora_alpha=4)
    with torch.no_grad():
        m.lora_adapters["other"].lora_B.normal_()
    lora.set_adapter(m, "other")
    with torch.no_grad():
        y_other = m(x)
        ref = fresh(lora.layers.adapter_view(m, "other"), x)
    torch.testing.assert_close(y_other, ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y_other, y_default)
