"""One test per known defect of Microsoft's ``loralib==0.1.2`` (issue 2, defects 1-7, plus the others README's
"Differences from Microsoft's loralib 0.1.2" lists; the merged-then-changed one is in tests/reliability).

Each body runs unchanged against both libraries (the ``lib`` fixture): it must pass on ours and is marked
``xfail(strict=True)`` on 0.1.2, so if 0.1.2 ever passed one of these the suite would fail and tell us the test
does not demonstrate the defect.
"""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


def ms_fails(reason: str, raises=AssertionError):
    """Parametrize ``lib`` over both libraries, expecting 0.1.2's case to fail with ``raises`` (strictly: if it
    passes, or fails some other way, the test fails)."""
    return pytest.mark.parametrize("lib", [
        "ours",
        pytest.param("ms", marks=pytest.mark.xfail(strict=True, reason=f"0.1.2 defect: {reason}", raises=raises)),
    ], indirect=True)


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _all_layers(lib, lora_dropout=0.0):
    torch.manual_seed(0)
    return nn.ModuleDict({
        "emb": lib.Embedding(10, 6, r=2),
        "block": nn.Sequential(
            lib.Linear(6, 8, r=2, lora_alpha=4, lora_dropout=lora_dropout),
            lib.MergedLinear(8, 9, r=2, enable_lora=[True, False, True], fan_in_fan_out=True,
                             lora_dropout=lora_dropout),
        ),
        "conv": lib.Conv2d(2, 4, 3, r=2, padding=1, lora_dropout=lora_dropout),
    })


def _run_all(model, ids, img):
    return torch.cat([model["block"](model["emb"](ids)).flatten(), model["conv"](img).flatten()])


def _frozen_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


IDS, IMG = torch.tensor([[1, 4, 7], [0, 9, 2]]), torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(1))


# --- defect 1: merging follows the mode set on a parent, and stays right when weights change while merged --------

@pytest.mark.parametrize("lib", ["ours", "ms"], indirect=True)
def test_1_parent_eval_merges_every_lora_layer(lib):
    """``.eval()`` / ``.train()`` on a parent merges / unmerges every LoRA layer inside. 0.1.2 passes this one
    (nn.Module.train recurses into children, which calls each layer's own ``train``)."""
    model = _all_layers(lib)
    _randomize_lora(model)
    w0 = _frozen_weights(model)
    y_train = _run_all(model, IDS, IMG)
    model.eval()
    assert all(m.merged for m in model.modules() if hasattr(m, "merged"))
    assert not torch.equal(model["block"][0].weight, w0["block.0.weight"])  # the update really went in
    torch.testing.assert_close(_run_all(model, IDS, IMG), y_train, rtol=1e-5, atol=1e-5)
    model.train()
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))
    for n, w in _frozen_weights(model).items():
        torch.testing.assert_close(w, w0[n], rtol=1e-6, atol=1e-6)


@ms_fails("an adapter loaded after .eval() is ignored, and the next .train() corrupts the frozen weight")
def test_1_loading_into_merged_model_takes_effect(lib):
    """The common pattern ``model.eval(); model.load_state_dict(lora_sd, strict=False)`` must apply the adapter,
    and a later ``.train()`` must give back the exact pre-trained weights."""
    model = _all_layers(lib)
    w0 = _frozen_weights(model)
    trained = _all_layers(lib)
    _randomize_lora(trained)
    expected = _run_all(trained, IDS, IMG).detach()
    model.eval()  # merges the (zero) initial update
    model.load_state_dict(lib.lora_state_dict(trained), strict=False)
    with torch.no_grad():
        applied = torch.allclose(_run_all(model, IDS, IMG), expected, rtol=1e-5, atol=1e-5)
    still_merged = all(m.merged for m in model.modules() if hasattr(m, "merged"))  # eval stays cheap
    model.train()
    restored = all(torch.allclose(w, w0[n], rtol=1e-6, atol=1e-6) for n, w in _frozen_weights(model).items())
    assert applied and restored and still_merged, \
        f"adapter applied: {applied}, still merged: {still_merged}, frozen weights restored: {restored}"



@ms_fails("Linear/MergedLinear/Embedding.train() return None, so `layer = lora.Linear(...).eval()` is None")
def test_1_train_and_eval_return_the_layer(lib):
    for layer in (lib.Linear(3, 4, r=2), lib.MergedLinear(3, 4, r=2, enable_lora=[True, False]),
                  lib.Embedding(5, 3, r=2), lib.Conv2d(2, 2, 1, r=2)):
        assert layer.eval() is layer and layer.merged
        assert layer.train() is layer and not layer.merged

# --- defect 2: MergedLinear ------------------------------------------------------------------------------------

class _BigAllocations(TorchDispatchMode):
    """Records every op output whose storage holds at least ``limit`` elements and is not an existing weight's."""

    def __init__(self, limit, known):
        super().__init__()
        self.limit, self.known, self.hits = limit, known, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known \
                    and t.untyped_storage().nbytes() >= self.limit * t.element_size():
                self.hits.append((str(func), tuple(t.shape)))
        return out


@ms_fails("forward builds the dense out x in update B A (merge_AB) on every call")
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_2_merged_linear_never_builds_dense_update(lib, fan_in_fan_out):
    layer = lib.MergedLinear(64, 96, r=2, enable_lora=[True, False, True], fan_in_fan_out=fan_in_fan_out)
    _randomize_lora(layer)
    x = torch.randn(4, 64, requires_grad=True)
    known = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in known:
            saved.append(t.numel())
        return t

    with _BigAllocations(64 * 96, known) as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).square().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert mode.hits == [], f"dense out x in tensors built: {mode.hits}"
    assert max(saved) < 64 * 96


@ms_fails("r > 0 with no enabled group: forward raises AttributeError (no lora_A)", raises=AttributeError)
def test_2_merged_linear_r_positive_no_group_enabled(lib):
    layer = lib.MergedLinear(4, 6, r=2, enable_lora=[False, False])
    assert not any("lora_" in n for n, _ in layer.named_parameters())
    x = torch.randn(3, 4)
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.testing.assert_close(layer(x), expected)


@ms_fails("lora_ind is a plain tensor attribute: .to(device) leaves it behind")
def test_2_merged_linear_index_follows_to(lib):
    layer = lib.MergedLinear(4, 6, r=2, enable_lora=[True, False, True])
    layer.to("meta")
    assert layer.lora_ind.device.type == "meta"
    assert "lora_ind" not in layer.state_dict()  # no new key: 0.1.2 checkpoints still load strictly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_2_merged_linear_cuda(loralib_ours):
    layer = loralib_ours.MergedLinear(4, 6, r=2, enable_lora=[True, False, True]).cuda()
    _randomize_lora(layer)
    assert layer.lora_ind.is_cuda
    x = torch.randn(3, 4, device="cuda")
    y = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.zero_pad(torch.ones(4, 1, device="cuda")).sum().item(), 4.0)


# --- defect 3: convolutions of any kernel size and dimensionality ---------------------------------------------

CONV_CASES = [  # (class, in, out, kernel, kwargs, input spatial shape, 0.1.2 supports it)
    ("Conv1d", 3, 4, 3, dict(padding=1), (9,), False),
    ("Conv1d", 3, 4, 1, dict(), (9,), True),
    ("Conv2d", 2, 4, (3, 5), dict(padding=(1, 2)), (6, 7), False),
    ("Conv2d", 4, 6, 3, dict(groups=2, stride=2), (7, 7), True),
    ("Conv3d", 2, 4, 3, dict(padding=1), (4, 5, 3), False),
    ("Conv3d", 2, 3, (1, 3, 2), dict(), (3, 5, 4), False),
]


def _conv_params():
    for case in CONV_CASES:
        name = f"{case[0]}-k{case[3]}"
        yield pytest.param("ours", case, id=f"ours-{name}")
        marks = () if case[-1] else pytest.mark.xfail(strict=True, reason="0.1.2 defect: kernel > 1 or tuple",
                                                      raises=(AssertionError, RuntimeError))
        yield pytest.param("ms", case, id=f"ms-{name}", marks=marks)


@pytest.mark.parametrize("lib,case", list(_conv_params()), indirect=["lib"])
def test_3_conv_any_kernel_merge_exact(lib, case):
    cls, cin, cout, k, kwargs, spatial, _ = case
    torch.manual_seed(0)
    layer = getattr(lib, cls)(cin, cout, k, r=2, lora_alpha=4, **kwargs).double()
    _randomize_lora(layer)
    w0 = layer.conv.weight.detach().clone()
    # Reference: the plain torch convolution with weight W + (alpha / r) B A reshaped to the kernel's shape.
    ref = copy.deepcopy(layer.conv)
    with torch.no_grad():
        ref.weight += (layer.lora_B @ layer.lora_A).view(w0.shape) * 2.0
    x = torch.randn(2, cin, *spatial, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-10, atol=1e-10)
    y.sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0 and layer.conv.weight.grad is None
    layer.eval()
    torch.testing.assert_close(layer.conv.weight, ref.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-10, atol=1e-10)
    layer.train()
    torch.testing.assert_close(layer.conv.weight, w0, rtol=1e-12, atol=1e-12)


@ms_fails("ConvLoRA ignores lora_dropout")
def test_3_conv_applies_lora_dropout(lib):
    torch.manual_seed(0)
    layer = lib.Conv2d(2, 4, 3, r=2, lora_dropout=0.5, padding=1, merge_weights=False)
    _randomize_lora(layer)
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        no_dropout = layer.conv._conv_forward(x, layer.conv.weight + (layer.lora_B @ layer.lora_A).view(
            layer.conv.weight.shape) * layer.scaling, layer.conv.bias)
        torch.manual_seed(1)
        y = layer(x)
        # Same mask by hand: the base conv on x plus the LoRA conv on dropout(x).
        torch.manual_seed(1)
        dx = F.dropout(x, 0.5, training=True)
        by_hand = layer.conv(x) + F.conv2d(dx, (layer.lora_B @ layer.lora_A).view(layer.conv.weight.shape)
                                           * layer.scaling, padding=1)
        layer.eval()
        torch.testing.assert_close(layer(x), no_dropout)  # dropout off in eval
    assert not torch.allclose(y, no_dropout)
    torch.testing.assert_close(y, by_hand)


# --- defect 4: a full state dict taken while merged -----------------------------------------------------------

@ms_fails("the merged weight is saved, so a fresh model applies the update twice")
def test_4_state_dict_while_merged_loads_into_fresh_model(lib):
    model = _all_layers(lib)
    _randomize_lora(model)
    with torch.no_grad():
        y_train = _run_all(model, IDS, IMG)
        model.eval()
        y_eval = _run_all(model, IDS, IMG)
        sd = model.state_dict()  # taken while merged
        torch.manual_seed(123)
        fresh = _all_layers(lib)
        fresh.load_state_dict(sd, strict=True)
        torch.testing.assert_close(_run_all(fresh, IDS, IMG), y_train, rtol=1e-5, atol=1e-5)
        fresh.eval()
        torch.testing.assert_close(_run_all(fresh, IDS, IMG), y_eval, rtol=1e-5, atol=1e-5)
    assert model.training is False and all(m.merged for m in model.modules() if hasattr(m, "merged"))


# --- defect 5: lora_dropout=0 is a module ---------------------------------------------------------------------

@ms_fails("lora_dropout=0 stores a lambda, which cannot be pickled", raises=(AttributeError, pickle.PicklingError))
def test_5_save_pickle_deepcopy_whole_model(lib):
    model = _all_layers(lib)
    _randomize_lora(model)
    expected = _run_all(model, IDS, IMG).detach()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for other in copies:
        torch.testing.assert_close(_run_all(other, IDS, IMG), expected)
        other.eval()  # each copy merges its own weights, not the original's
    for n, w in _frozen_weights(model).items():
        assert torch.equal(w, dict(model.named_parameters())[n])
    assert all(isinstance(m.lora_dropout, nn.Module) for m in model.modules() if hasattr(m, "lora_dropout"))


# --- defect 6: mark_only_lora_as_trainable ---------------------------------------------------------------------

@ms_fails("LoRA parameters frozen beforehand stay frozen")
def test_6_mark_only_lora_unfreezes_lora(lib):
    model = _all_layers(lib)
    model.requires_grad_(False)
    lib.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n} and trainable


# --- defect 7: lora_state_dict(bias='all') ----------------------------------------------------------------------

class _Attention(nn.Module):
    """GPT-2 style: a causal-mask *buffer* called ``bias`` beside a LoRA projection."""

    def __init__(self, lib):
        super().__init__()
        self.c_attn = lib.MergedLinear(4, 12, r=2, enable_lora=[True, False, True])
        self.register_buffer("bias", torch.tril(torch.ones(1, 1, 8, 8)))


@ms_fails("bias='all' also returns buffers named 'bias' (GPT-2's causal mask)")
def test_7_lora_state_dict_bias_all_only_parameters(lib):
    model = nn.Sequential(_Attention(lib), nn.Linear(12, 3))
    sd = lib.lora_state_dict(model, bias="all")
    assert set(sd) == {"0.c_attn.lora_A", "0.c_attn.lora_B", "0.c_attn.bias", "1.bias"}


# --- more: bias='lora_only' trains exactly the biases it saves ------------------------------------------------

@ms_fails("'lora_only' trains r=0 layers' biases but never saves them, and skips conv biases")
def test_lora_only_bias_trained_equals_saved(lib):
    model = nn.Sequential(lib.Linear(4, 4, r=2), lib.Linear(4, 4, r=0), lib.Conv1d(4, 4, 1, r=2), nn.Linear(4, 4))
    lib.mark_only_lora_as_trainable(model, bias="lora_only")
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    saved = {k for k in lib.lora_state_dict(model, bias="lora_only") if "lora_" not in k}
    assert trained == saved == {"0.bias", "2.conv.bias"}


# --- more: a bad argument is a ValueError that names it ---------------------------------------------------------

BAD_ARGUMENTS = [  # (case, call, what the message names). 0.1.2 accepted the first two silently.
    ("negative r", lambda lib: lib.Linear(4, 4, r=-1), "r=-1"),
    ("lora_alpha 0", lambda lib: lib.Linear(4, 4, r=2, lora_alpha=0), "lora_alpha=0"),
    ("lora_dropout 1.5", lambda lib: lib.Linear(4, 4, r=2, lora_dropout=1.5), "lora_dropout=1.5"),
    ("enable_lora not dividing", lambda lib: lib.MergedLinear(4, 6, r=2, enable_lora=[True] * 4), "out_features=6"),
    ("unknown bias mode", lambda lib: lib.mark_only_lora_as_trainable(nn.Linear(2, 2), bias="All"), "bias='All'"),
]


@ms_fails("bad arguments pass silently, or raise AssertionError / NotImplementedError / torch's own ValueError, "
          "none naming the argument")
@pytest.mark.parametrize("case,call,text", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_is_a_value_error_naming_it(lib, case, call, text):
    try:
        call(lib)
        err = None
    except Exception as exc:  # noqa: BLE001 - which exception 0.1.2 raises is what this test looks at
        err = exc
    assert isinstance(err, ValueError) and text in str(err), f"{case}: {err!r}"
    if case == "unknown bias mode":
        assert isinstance(err, NotImplementedError)  # what 0.1.2 raised: old handlers still catch it


# --- more: the training path keeps a bool dropout mask, not the dropped input -------------------------------------

@ms_fails("lora_dropout > 0 keeps the dropped float input for backward")
@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
def test_dropout_keeps_only_a_bool_mask_for_backward(lib, kind):
    def saved_bytes(p):
        torch.manual_seed(0)
        layer = lib.Linear(64, 96, r=2, lora_dropout=p) if kind == "Linear" else \
            lib.MergedLinear(64, 96, r=2, enable_lora=[True, False, True], lora_dropout=p)
        _randomize_lora(layer)
        x = torch.randn(4, 64, requires_grad=True)
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.square().sum().backward()
        assert layer.lora_A.grad.abs().sum() > 0  # the LoRA branch really trained
        return sum(sizes)

    assert saved_bytes(0.1) - saved_bytes(0.0) == 4 * 64  # one byte per input element: x is (4, 64)
