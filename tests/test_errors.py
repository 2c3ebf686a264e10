"""Every bad argument raises a ValueError whose message names the argument and the value it got."""
import json

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


# --- one rule for r / lora_alpha / lora_dropout, wherever they enter ---------------------------------------------
# The layers, add_adapter, inject (and its rank / alpha patterns), and the loralib and PEFT adapter configs that
# load_adapter reads all go through loralib.layers.check_lora_args: the same values are refused everywhere.

HPARAMS_BAD = [  # (r, lora_alpha, lora_dropout), the text the message must hold
    ((2, float("inf"), 0.0), "lora_alpha=inf"),
    ((2, float("nan"), 0.0), "lora_alpha=nan"),
    ((2, 0, 0.0), "lora_alpha=0"),
    ((2, -4, 0.0), "lora_alpha=-4"),
    ((2, True, 0.0), "lora_alpha=True"),
    ((2, 10 ** 400, 0.0), "lora_alpha=1000"),  # an int no float holds is not finite
    ((2, 4, 1.0), "lora_dropout=1.0"),
    ((2, 4, -0.5), "lora_dropout=-0.5"),
    ((2, 4, float("nan")), "lora_dropout=nan"),
    ((2, 4, True), "lora_dropout=True"),
    ((-1, 4, 0.0), "r=-1"),
    ((2.0, 4, 0.0), "r=2.0"),
    ((True, 4, 0.0), "r=True"),
]
GOOD_DROPOUT = 0.1


def _layer(r, alpha, dropout):
    lora.Linear(4, 6, r=r, lora_alpha=alpha, lora_dropout=dropout)


def _add_adapter(r, alpha, dropout):
    model = nn.Sequential(lora.Linear(4, 6, r=2))
    try:
        lora.add_adapter(model, "extra", r=r, lora_alpha=alpha, lora_dropout=dropout)
    except ValueError:
        assert lora.list_adapters(model) == ["default"]  # refused before anything was attached
        raise


def _inject(r, alpha, dropout):
    model = nn.Sequential(nn.Linear(4, 6))
    try:
        lora.inject(model, ["0"], r=r, lora_alpha=alpha, lora_dropout=dropout)
    except ValueError:
        assert type(model[0]) is nn.Linear  # the model is untouched
        raise


def _saved(tmp_path, fmt):
    model = nn.Sequential(nn.Linear(4, 6))
    lora.inject(model, ["0"], r=2, lora_alpha=4, lora_dropout=GOOD_DROPOUT)
    d = tmp_path / fmt
    lora.save_adapter(model, str(d), format=fmt)
    return d, json.loads((d / "adapter_config.json").read_text())


def _load_edited(d, config):
    (d / "adapter_config.json").write_text(json.dumps(config))  # inf / nan written as JSON's Infinity / NaN
    model = nn.Sequential(nn.Linear(4, 6))
    try:
        lora.load_adapter(model, str(d))
    except ValueError:
        assert type(model[0]) is nn.Linear  # the model is untouched
        raise


def _loralib_config(tmp_path):
    def load(r, alpha, dropout):
        d, config = _saved(tmp_path, "loralib")
        config["layers"]["0"].update(r=r, lora_alpha=alpha, lora_dropout=dropout)
        _load_edited(d, config)
    return load


def _peft_config(tmp_path):
    def load(r, alpha, dropout):
        d, config = _saved(tmp_path, "peft")
        config.update(r=r, lora_alpha=alpha, lora_dropout=dropout)
        _load_edited(d, config)
    return load


ENTRY_POINTS = {"layer": lambda tmp: _layer, "add_adapter": lambda tmp: _add_adapter, "inject": lambda tmp: _inject,
                "loralib config": _loralib_config, "PEFT config": _peft_config}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("args,text", [pytest.param(a, t, id=t[:16]) for a, t in HPARAMS_BAD + [((0, 4, 0.0), "r=0")]])
def test_every_entry_point_refuses_the_same_hyper_parameters(tmp_path, entry, args, text):
    call = ENTRY_POINTS[entry](tmp_path)
    if entry == "layer" and args[0] == 0:  # a layer with r=0 is a plain layer (0.1.2); an adapter needs a rank
        call(*args)
        return
    with pytest.raises(ValueError) as info:
        call(*args)
    message = str(info.value)
    assert text in message and f"{text.split('=')[0]} must be" in message and "\n" not in message, message


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_accepts_valid_hyper_parameters(tmp_path, entry):
    ENTRY_POINTS[entry](tmp_path)(2, 2.5, GOOD_DROPOUT)  # the rank the saved factors have


def test_per_layer_patterns_are_checked_and_named():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6))
    with pytest.raises(ValueError, match=r"layer '1': lora_alpha must be .* got lora_alpha=inf"):
        lora.inject(model, ["0", "1"], r=2, alpha_pattern={"1": float("inf")})
    with pytest.raises(ValueError, match=r"layer '0': r must be a positive int .* got r=0"):
        lora.inject(model, ["0", "1"], r=2, rank_pattern={"0": 0})
    assert all(type(m) is nn.Linear for m in model)
    lora.inject(model, ["0", "1"], r=2)
    with pytest.raises(ValueError, match=r"layer '1': r must be an int .* got r='4'"):
        lora.add_adapter(model, "x", r=2, rank_pattern={"1": "4"})
    assert lora.list_adapters(model) == ["default"]


def test_peft_alpha_pattern_values_are_checked(tmp_path):
    d, config = _saved(tmp_path, "peft")
    config["alpha_pattern"] = {"0": -1}
    with pytest.raises(lora.AdapterError, match=r"alpha_pattern\['0'\]: lora_alpha must be .* got lora_alpha=-1"):
        _load_edited(d, config)


def test_check_lora_args_directly():
    from loralib.layers import check_lora_args
    check_lora_args(0, "ignored when r is 0", 0.0)
    check_lora_args(4, 8, 0.5, allow_zero_rank=False)
    with pytest.raises(ValueError, match=r"^layer 'q': r must be a positive int \(an adapter needs a rank\), got r=0$"):
        check_lora_args(0, 8, 0.0, allow_zero_rank=False, where="layer 'q': ")
    with pytest.raises(ValueError, match=r"^lora_dropout must be a number in \[0, 1\), got lora_dropout='0.1'$"):
        check_lora_args(0, 8, "0.1")
