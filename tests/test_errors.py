"""Every bad argument raises a ValueError whose message names the argument and the value it got."""
import pytest
import torch
import torch.nn as nn

import loralib as lora

LAYERS = {
    "Linear": lambda **kw: lora.Linear(4, 6, **kw),
    "MergedLinear": lambda **kw: lora.MergedLinear(4, 6, enable_lora=[True, False], **kw),
    "Conv1d": lambda **kw: lora.Conv1d(2, 4, 3, **kw),
    "Conv2d": lambda **kw: lora.Conv2d(2, 4, 3, **kw),
    "Conv3d": lambda **kw: lora.Conv3d(2, 4, 1, **kw),
}
ALL = list(LAYERS) + ["Embedding"]


def _build(name, **kw):
    if name == "Embedding":
        return lora.Embedding(10, 4, **kw)
    return LAYERS[name](**kw)


BAD = [  # (kwargs, the text the message must contain)
    (dict(r=-1), "r=-1"),
    (dict(r=-3, lora_alpha=0), "r=-3"),
    (dict(r=2.0), "r=2.0"),
    (dict(r="4"), "r='4'"),
    (dict(r=True), "r=True"),
    (dict(r=None), "r=None"),
    (dict(r=2, lora_alpha=0), "lora_alpha=0"),
    (dict(r=2, lora_alpha=-8), "lora_alpha=-8"),
    (dict(r=2, lora_alpha="16"), "lora_alpha='16'"),
    (dict(r=2, lora_alpha=float("nan")), "lora_alpha=nan"),
    (dict(r=2, lora_alpha=float("inf")), "lora_alpha=inf"),
]
BAD_DROPOUT = [
    (dict(r=2, lora_dropout=1.0), "lora_dropout=1.0"),
    (dict(r=2, lora_dropout=-0.1), "lora_dropout=-0.1"),
    (dict(r=2, lora_dropout=1.5), "lora_dropout=1.5"),
    (dict(r=0, lora_dropout=2), "lora_dropout=2"),
    (dict(r=2, lora_dropout="0.1"), "lora_dropout='0.1'"),
]


def _cases():
    for name in ALL:
        # Embedding has no lora_dropout argument (as in 0.1.2).
        for kwargs, text in BAD + ([] if name == "Embedding" else BAD_DROPOUT):
            yield pytest.param(name, kwargs, text, id=f"{name}-{text}")


@pytest.mark.parametrize("name,kwargs,text", list(_cases()))
def test_bad_lora_arguments(name, kwargs, text):
    with pytest.raises(ValueError) as info:
        _build(name, **kwargs)
    assert text in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_lora_alpha_is_not_checked_when_lora_is_off(name):
    """r=0 ignores lora_alpha (0.1.2 accepted any value there), so configs that zero both still load."""
    layer = _build(name, r=0, lora_alpha=0)
    assert not any("lora_" in n for n, _ in layer.named_parameters())


def test_numpy_scalars_are_accepted():
    """Ranks and alphas read from numpy arrays worked in 0.1.2 and must keep working."""
    np = pytest.importorskip("numpy")
    layer = lora.Linear(4, 6, r=np.int64(2), lora_alpha=np.float32(4.0), lora_dropout=np.float64(0.1))
    assert layer.lora_A.shape == (2, 4) and layer.scaling == 2.0
    layer(torch.randn(3, 4)).sum().backward()
    assert layer.lora_A.grad is not None


@pytest.mark.parametrize("enable_lora,text", [
    ([True, False, True, False], "enable_lora=[True, False, True, False] (len 4) for out_features=6"),
    ([True] * 5, "(len 5) for out_features=6"),
    ([], "enable_lora=[] (len 0)"),
    (True, "enable_lora=True"),
    (None, "enable_lora=None"),
])
def test_merged_linear_bad_enable_lora(enable_lora, text):
    with pytest.raises(ValueError) as info:
        lora.MergedLinear(4, 6, r=2, enable_lora=enable_lora)
    assert text in str(info.value)


def test_merged_linear_enable_lora_checked_even_when_r0():
    """0.1.2 asserted the divisibility for every r; a silent r=0 layer with a bad split would hide a config bug."""
    with pytest.raises(ValueError, match="out_features=6"):
        lora.MergedLinear(4, 6, r=0, enable_lora=[True] * 4)


@pytest.mark.parametrize("fn", [lora.mark_only_lora_as_trainable, lora.lora_state_dict])
@pytest.mark.parametrize("bias", ["lora", "All", None, ""])
def test_bad_bias_mode(fn, bias):
    model = nn.Sequential(lora.Linear(4, 4, r=2))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as info:
        fn(model, bias=bias)
    assert f"bias={bias!r}" in str(info.value) and "lora_only" in str(info.value)
    assert isinstance(info.value, NotImplementedError)  # what 0.1.2 raised, so old handlers still catch it
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # nothing changed half-way
