"""The public layer protocol of ``LoRALayer`` (README, "The layer protocol"): what each method returns on loralib's
own layers, computed here from the paper's formula, and that a layer class of a user's own that provides only
what the protocol asks (``delta_weight``, a forward, a ``train`` that merges) gets merging, exact unmerging and the
unmerged state dict."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as lora


def randomized(layer, seed=0):
    """``layer`` with non-zero factors (B starts at zero), so every update below is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return layer


def expected_delta(layer):
    """``scaling * B A`` in the frozen weight's layout, from the layer's factors, in float64."""
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    if isinstance(layer, lora.Embedding):
        return (B @ A).t() * layer.scaling  # the weight is (num_embeddings, dim)
    if isinstance(layer, lora.MergedLinear):
        groups = [i for i, e in enumerate(layer.enable_lora) if e]
        per, r = layer.out_features // len(layer.enable_lora), layer.r
        full = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
        for k, g in enumerate(groups):  # group g's rows get B's k-th block times A's k-th block
            full[g * per:(g + 1) * per] = B[k * per:(k + 1) * per] @ A[k * r:(k + 1) * r]
        delta = full * layer.scaling
    elif isinstance(layer, lora.ConvLoRA):
        return (B @ A).view(layer.conv.weight.shape) * layer.scaling
    else:
        delta = (B @ A) * layer.scaling
    return delta.t() if layer.fan_in_fan_out else delta


LAYERS = {
    "Linear": lambda: lora.Linear(5, 6, r=2, lora_alpha=3),
    "Linear fan_in_fan_out": lambda: lora.Linear(5, 6, r=2, lora_alpha=3, fan_in_fan_out=True),
    "MergedLinear": lambda: lora.MergedLinear(5, 9, r=2, lora_alpha=3, enable_lora=[True, False, True]),
    "Embedding": lambda: lora.Embedding(7, 4, r=2, lora_alpha=3),
    "Conv2d": lambda: lora.Conv2d(2, 4, 3, r=2, lora_alpha=3),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_protocol_of_loralibs_layers(kind):
    layer = randomized(LAYERS[kind]())
    w = layer.frozen_weight()
    assert w is (layer.conv.weight if kind == "Conv2d" else layer.weight) and not w.requires_grad
    assert layer.has_lora() and not lora.Linear(5, 6, r=0).has_lora()
    torch.testing.assert_close(layer.delta_weight().double(), expected_delta(layer), rtol=1e-6, atol=1e-6)
    if kind == "MergedLinear":  # expanded_B() @ A is the unscaled update of the whole output
        torch.testing.assert_close((layer.expanded_B() @ layer.lora_A).double() * layer.scaling,
                                   expected_delta(layer), rtol=1e-6, atol=1e-6)
    w0 = w.detach().clone()
    assert layer.merged_delta() is None and not layer.merged_is_stale
    layer.eval()
    torch.testing.assert_close(layer.merged_delta(), layer.delta_weight(), rtol=0, atol=0)
    torch.testing.assert_close(w.detach().double(), w0.double() + expected_delta(layer), rtol=1e-6, atol=1e-6)
    delta_at_merge = layer.merged_delta().clone()
    with torch.no_grad():
        layer.lora_B.mul_(2)
    assert layer.merged_is_stale  # what is merged is the update of merge time, not the current one
    torch.testing.assert_close(layer.merged_delta(), delta_at_merge, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.train()
    assert not layer.merged_is_stale and layer.merged_delta() is None
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=1e-6)


def test_row_adapters_is_set_inside_batch_adapters_only():
    model = nn.Sequential(lora.Linear(4, 4, r=2))
    lora.add_adapter(model, "b")
    assert model[0].row_adapters is None
    with lora.batch_adapters(model, ["b", None]):
        plan = model[0].row_adapters
        assert isinstance(plan, lora.layers.RowAdapters) and plan.size == 2
    assert model[0].row_adapters is None


class ScaledLinear(nn.Linear, lora.LoRALayer):
    """A user's own layer written against the documented protocol only: factors, ``scaling``, ``delta_weight``,
    a forward that adds the update unless merged, a ``train`` that merges."""

    def __init__(self, n_in, n_out, r, lora_alpha):
        nn.Linear.__init__(self, n_in, n_out)
        lora.LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0.0, merge_weights=True)
        self.lora_A = nn.Parameter(torch.randn(r, n_in))
        self.lora_B = nn.Parameter(torch.randn(n_out, r))
        self.scaling = lora_alpha / r
        self.weight.requires_grad = False

    def delta_weight(self):
        return self.lora_B @ self.lora_A * self.scaling

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return out if self.merged else out + x @ self.delta_weight().t()

    def train(self, mode=True):
        nn.Linear.train(self, mode)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self


def test_a_user_layer_on_the_protocol_merges_unmerges_and_saves_the_plain_weight():
    torch.manual_seed(0)
    layer = ScaledLinear(5, 6, r=2, lora_alpha=4)
    w0, x = layer.weight.detach().clone(), torch.randn(3, 5)
    want = layer(x).detach()
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.delta_weight().detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.state_dict()["weight"], w0, rtol=0, atol=1e-6)  # the plain W, not W + BA
    with torch.no_grad():
        layer.lora_A.add_(1.0)  # changed while merged
    assert layer.merged_is_stale
    with pytest.warns(UserWarning, match="changed while merged"):
        layer.train()
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-6)  # exactly the merged update came out
    assert set(lora.lora_state_dict(nn.Sequential(layer))) == {"0.lora_A", "0.lora_B"}
