"""lora.batch_adapters: each row of a batch with its own adapter (or None: the base), on every layer kind.

The reference for a row is the same batch run with that row's adapter active (``set_adapter``; None: inside
``disable_adapters``), then the row taken: the same matmul shapes, so float32 agrees within 1e-5.
"""

import pytest
import torch
import torch.nn as nn

import loralib as lora
from inject_helpers import conv_net, ids, randomize_lora, tiny_gpt2

# Row orders: grouped (each adapter's rows consecutive: slices) and interleaved (index tensors), None rows in both.
ORDERS = {
    "grouped": ["default", "default", "a", "b", "b", None],
    "interleaved": ["b", None, "a", "default", "b", "a"],
}


class Net(nn.Module):
    """One loralib layer of each kind (Embedding, Linear with fan_in_fan_out, MergedLinear, Conv1d/2d/3d)."""

    def __init__(self):
        super().__init__()
        self.emb = lora.Embedding(11, 6, r=2, lora_alpha=4)
        self.lin = lora.Linear(6, 9, r=2, lora_alpha=4, fan_in_fan_out=True)
        self.qkv = lora.MergedLinear(9, 12, r=2, lora_alpha=4, enable_lora=[True, False, True])
        self.c1 = lora.Conv1d(12, 4, 3, r=2, lora_alpha=3, padding=1)
        self.c2 = lora.Conv2d(4, 4, (3, 2), r=2, lora_alpha=3, padding=1)
        self.c3 = lora.Conv3d(4, 2, 3, r=1, lora_alpha=2, padding=1, groups=2)

    def forward(self, tok):  # tok (B, L)
        h = self.qkv(self.lin(self.emb(tok)))  # (B, L, 12)
        h = self.c1(h.transpose(1, 2))  # (B, 4, L)
        h = self.c2(h.unsqueeze(-1))  # (B, 4, L + 1, 3)
        return self.c3(h.unsqueeze(-1))  # (B, 2, L + 1, 3, 3)


def with_adapters(model, seed=0):
    """``model`` with adapters "a" (r 3, alpha 5) and "b" (r 5, alpha 2, rsLoRA) besides its default, all random."""
    lora.add_adapter(model, "a", r=3, lora_alpha=5)
    lora.add_adapter(model, "b", r=5, lora_alpha=2, use_rslora=True)
    return randomize_lora(model, seed=seed + 10)


def net(seed=0):
    torch.manual_seed(seed)
    return with_adapters(Net(), seed)


def injected_conv_net(seed=0):
    model = conv_net(seed)
    lora.inject(model, ["emb", "c1", "c2", "c3", "head"], r=2, lora_alpha=4)
    return with_adapters(model, seed)


def injected_gpt2(seed=0, dtype=None):
    model = tiny_gpt2(seed)
    if dtype is not None:
        model = model.to(dtype)
    lora.inject(model, ["c_attn", "c_proj", "c_fc", "wte"], r=2, lora_alpha=4)
    return with_adapters(model, seed).train()  # unmerged (dropout is 0)


def tok6(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (6, 5), generator=g)


def out(y):
    return y.logits if hasattr(y, "logits") else y


def run_as(model, name, *args, **kw):
    """The model's output with ``name`` active for every row (None: the base)."""
    if name is None:
        with lora.disable_adapters(model):
            return out(model(*args, **kw))
    before = model.transformer.h[0].attn.c_attn.active_adapter if hasattr(model, "transformer") else None
    lora.set_adapter(model, name)
    try:
        return out(model(*args, **kw))
    finally:
        lora.set_adapter(model, before or "default")


def expected(model, names, *args, **kw):
    """Row i from a run of the whole batch with names[i] active."""
    runs = {n: run_as(model, n, *args, **kw) for n in dict.fromkeys(names)}
    return torch.stack([runs[n][i] for i, n in enumerate(names)])


def mixed(model, names, *args, **kw):
    with lora.batch_adapters(model, names):
        return out(model(*args, **kw))


def assert_rows_equal(got, want, atol=1e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


MODELS = {
    "loralib layers": (net, tok6),
    "injected Embedding/Conv1d/2d/3d/Linear": (injected_conv_net, tok6),
    "injected GPT-2 (Conv1D, tied wte)": (injected_gpt2, lambda: ids(batch=6)),
}


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("kind", sorted(MODELS))
@torch.no_grad()
def test_each_row_equals_its_adapter_alone(kind, order):
    build, make_input = MODELS[kind]
    model, x = build(), make_input()
    names = ORDERS[order]
    got = mixed(model, names, x)
    assert_rows_equal(got, expected(model, names, x))
    # The adapters really differ: rows of different adapters would otherwise hide a wrong assignment.
    assert not torch.allclose(run_as(model, "a", x), run_as(model, "b", x), atol=1e-3)
    assert not torch.allclose(run_as(model, "a", x), run_as(model, None, x), atol=1e-3)


@torch.no_grad()
def test_a_single_adapter_for_all_rows_is_that_adapter():
    model, x = net(), tok6()
    for name in ("default", "a", None):
        assert_rows_equal(mixed(model, [name] * 6, x), run_as(model, name, x))


@torch.no_grad()
def test_every_layer_is_touched_by_the_rows_adapter():
    """Changing one layer's adapter "a" changes exactly the rows that use "a"."""
    model, x = net(), tok6()
    names = ORDERS["interleaved"]
    before = mixed(model, names, x)
    for layer_name in ("emb", "lin", "qkv", "c1", "c2", "c3"):
        layer = getattr(model, layer_name)
        layer.lora_adapters["a"].lora_B.add_(0.5)
        after = mixed(model, names, x)
        changed = (after - before).flatten(1).abs().amax(1) > 1e-6
        assert changed.tolist() == [n == "a" for n in names], layer_name
        before = after


@torch.no_grad()
def test_bf16_base_with_float32_adapters():
    model, x = injected_gpt2(dtype=torch.bfloat16), ids(batch=6)
    assert model.transformer.h[0].attn.c_attn.lora_A.dtype == torch.float32
    names = ORDERS["interleaved"]
    got = mixed(model, names, x)
    assert got.dtype == torch.bfloat16
    # Each row's update is summed with the base in float32 and rounded once, as in the single-adapter run.
    assert torch.equal(got, expected(model, names, x))


def cached_logits(model, x, prompt_len):
    """Last-position logits of a prefill of ``x[:, :prompt_len]``, then of one cached step per further token."""
    y = model(x[:, :prompt_len], use_cache=True)
    logits = [y.logits[:, -1]]
    for t in range(prompt_len, x.shape[1]):
        y = model(x[:, t:t + 1], past_key_values=y.past_key_values, use_cache=True)
        logits.append(y.logits[:, -1])
    return torch.stack(logits, 1)  # (B, steps, V)


@torch.no_grad()
def test_kv_cache_prefill_then_steps():
    model, x = injected_gpt2(), ids(batch=6, length=9)
    names = ORDERS["interleaved"]
    with lora.batch_adapters(model, names):
        got = cached_logits(model, x, 5)
    alone = {}
    for n in dict.fromkeys(names):
        if n is None:
            with lora.disable_adapters(model):
                alone[n] = cached_logits(model, x, 5)
        else:
            lora.set_adapter(model, n)
            alone[n] = cached_logits(model, x, 5)
    lora.set_adapter(model, "default")
    assert_rows_equal(got, torch.stack([alone[n][i] for i, n in enumerate(names)]))


def grads(model, x, g, names):
    """Gradients of every lora_ parameter from loss = sum(y * g) over the rows run."""
    model.zero_grad()
    y = mixed(model, names, x) if names else out(model(x))
    (y * g).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_each_adapters_gradient_equals_its_own_rows_alone(kind):
    build, make_input = MODELS[kind]
    model, x = build(), make_input()
    lora.mark_only_lora_as_trainable(model)
    model.train()
    names = ORDERS["interleaved"]
    g = torch.randn(out(model(x)).shape, generator=torch.Generator().manual_seed(9))
    together = grads(model, x, g, names)
    for name in ("default", "a", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        lora.set_adapter(model, name)
        alone = grads(model, x[rows], g[rows], None)
        lora.set_adapter(model, "default")
        mine = {k: v for k, v in alone.items() if (f".lora_adapters.{name}." in k) == (name != "default")}
        assert mine and all(v.abs().sum() > 0 for v in mine.values())
        for k, v in mine.items():
            torch.testing.assert_close(together[k], v, rtol=1e-5, atol=1e-5, msg=k)


@torch.no_grad()
def test_merged_model_is_unmerged_for_the_block_and_merged_again():
    model, x = net(), tok6()
    names = ORDERS["grouped"]
    want = expected(model.train(), names, x)
    lora.set_adapter(model, "b")
    model.eval()
    layers = [m for _, m in lora.layers.lora_layers(model)]
    assert all(m.merged for m in layers)
    weights = [m.frozen_weight().clone() for m in layers]
    merged_out = model(x)
    got = mixed(model, names, x)
    assert_rows_equal(got, want)
    assert all(m.merged and m.active_adapter == "b" and m.row_adapters is None for m in layers)
    for m, w in zip(layers, weights):
        torch.testing.assert_close(m.frozen_weight(), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), merged_out, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_state_is_restored_after_the_block_and_after_an_error():
    model, x = net(), tok6()
    lora.set_adapter(model, "a")
    layers = [m for _, m in lora.layers.lora_layers(model)]
    with pytest.raises(RuntimeError, match="inside"):
        with lora.batch_adapters(model, ORDERS["grouped"]):
            raise RuntimeError("inside")
    assert all(m.row_adapters is None and not m.merged and m.active_adapter == "a" for m in layers)
    assert_rows_equal(model(x), run_as(model, "a", x))
    lora.set_adapter(model, "a")
    model.train()
    with lora.batch_adapters(model, ORDERS["grouped"]):
        model.eval()  # does not merge inside the block: the rows need the plain frozen weight
        assert not any(m.merged for m in layers)
        assert_rows_equal(model(x), expected(model, ORDERS["grouped"], x))
    assert all(m.merged for m in layers)  # ... and merges on exit, as eval() asked


@torch.no_grad()
def test_blocks_nest_and_disable_adapters_wins_inside():
    model, x = net(), tok6()
    outer, inner = ORDERS["grouped"], ORDERS["interleaved"]
    with lora.batch_adapters(model, outer):
        with lora.batch_adapters(model, inner):
            assert_rows_equal(model(x), expected(model, inner, x))
        assert_rows_equal(model(x), expected(model, outer, x))
        with lora.disable_adapters(model):
            assert_rows_equal(model(x), run_as(model, None, x))
    assert all(m.row_adapters is None for _, m in lora.layers.lora_layers(model))


def test_bad_names_and_lengths_give_one_line_errors():
    model, x = net(), tok6()
    cases = [
        (["a", "nope", None, "a", "a", "a"], r"no adapter 'nope' in the model; adapters: \['default', 'a', 'b'\]"),
        ("a", "one adapter name \\(or None\\) per row"),
        ([], "empty list"),
        (["a", 3, None, "a", "a", "a"], "3 is not an adapter name"),
    ]
    for names, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            with lora.batch_adapters(model, names):
                pass
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"got 4 adapter names but layer 'emb' got a batch of 6 rows") as e:
        with lora.batch_adapters(model, ["a", "b", None, "a"]):
            model(x)
    assert "\n" not in str(e.value)
    assert all(m.row_adapters is None for _, m in lora.layers.lora_layers(model))


def test_a_layer_without_the_adapter_and_models_without_lora_are_refused():
    model = injected_conv_net()
    model.extra = nn.Linear(3, 3)
    lora.inject(model, ["extra"], r=2)  # added after the adapters: it has "default" only
    with pytest.raises(ValueError, match="layer 'extra' has no adapter 'a'"):
        with lora.batch_adapters(model, ["a"]):
            pass
    with pytest.raises(ValueError, match="has no LoRA layer"):
        with lora.batch_adapters(nn.Linear(2, 2), [None]):
            pass


def test_a_user_layer_class_with_its_own_forward_is_refused():
    class Mine(lora.Linear):  # 0.1.2 allowed building on the layers; this forward ignores per-row adapters
        def forward(self, x):
            return lora.Linear.forward(self, x) * 2

    model = nn.Sequential(Mine(3, 3, r=2))
    with pytest.raises(ValueError, match=r"layer '0' is a Mine with its own forward"):
        with lora.batch_adapters(model, ["default"]):
            pass


def test_equals_peft_adapter_names_on_the_same_gpt2(tmp_path):
    """The same four adapters exported to PEFT (lora.save_adapter(format="peft")) and run with PEFT's
    ``adapter_names``: the same logits, row by row."""
    peft = pytest.importorskip("peft")
    model = injected_gpt2()
    lora.add_adapter(model, "c", r=4, lora_alpha=8)
    randomize_lora(model, seed=21)
    names = ["c", "default", "a", "__base__", "b", "c", "a", "default"]
    for n in ("default", "a", "b", "c"):
        lora.save_adapter(model, str(tmp_path / n), adapter=n, format="peft")
    pm = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "default"), adapter_name="default")
    for n in ("a", "b", "c"):
        pm.load_adapter(str(tmp_path / n), adapter_name=n)
    pm.eval()
    x = ids(batch=8)
    with torch.no_grad():
        theirs = pm(input_ids=x, adapter_names=names).logits
        ours = mixed(model, [None if n == "__base__" else n for n in names], x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
