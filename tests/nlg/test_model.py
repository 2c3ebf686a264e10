"""SimpleGPT2WithLoRA's training forward: with labels, the last block and the output layer run only at the
positions the loss uses. That must be the same loss and the same gradients as computing every position."""
import pytest
import torch
import torch.nn.functional as F

import loralib as lora
from e2e_nlg.model import GPTConfig, build_model


def _model(num_layers, **kw):
    cfg = GPTConfig(hidden_dim=32, num_layers=num_layers, num_heads=4, lora_dim=4, vocab_size=97, **kw)
    model = build_model(cfg, 0)
    lora.mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 would make every LoRA gradient but B's vanish
    return model.train()


def _model64(num_layers, **kw):
    # The labelled-rows path sums in another order (gather, then matmul), so float32 results differ by rounding
    # that depends on the CPU's kernels; in float64 that rounding is far below the tolerances asserted here.
    return _model(num_layers, **kw).double()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (4, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # prompt, then completion
    labels[1, :] = -100  # a row with no label at all
    labels[2, :9] = -100
    labels[2, 10:] = -100  # one label, then right padding
    return ids, labels


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("num_layers", [1, 3])
def test_label_positions_only_equals_every_position(num_layers):
    model = _model64(num_layers)
    ids, labels = _batch()
    loss = model(ids, labels=labels).loss
    loss.backward()
    fast = _grads(model)

    h, _ = model.hidden_states(ids)  # (B, T, C): every position through every block
    targets = labels[:, 1:]
    keep = targets != -100
    ref = F.cross_entropy(model.lm_head(h[:, :-1][keep]), targets[keep])
    ref.backward()
    full = _grads(model)

    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert fast.keys() == full.keys() and any("h.%d." % (num_layers - 1) in n for n in fast)
    for n in fast:
        torch.testing.assert_close(fast[n], full[n], rtol=1e-10, atol=1e-12, msg=n)


def test_last_block_computes_only_the_labelled_rows():
    model = _model(2)
    ids, labels = _batch()
    rows = []
    hook = model.transformer.h[-1].mlp.register_forward_hook(lambda m, i, o: rows.append(o.shape[:2]))
    model(ids, labels=labels)
    hook.remove()
    n_per_row = (labels[:, 1:] != -100).sum(1)
    assert rows == [torch.Size([4, int(n_per_row.max())])]  # padded to the longest row's labels, not T = 12


def test_paths_that_need_every_position_still_get_it():
    model = _model64(2).eval()
    ids, labels = _batch()
    with torch.no_grad():
        cached = model(ids, labels=labels, use_cache=True)  # the cache needs every position's keys and values
        masked = model(ids, labels=labels, attention_mask=torch.ones_like(ids))
        plain = model(ids, labels=labels)
    assert len(cached.past_key_values) == 2 and cached.past_key_values[0][0].shape[2] == ids.shape[1]
    torch.testing.assert_close(cached.loss, plain.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked.loss, plain.loss, rtol=1e-12, atol=1e-12)


def test_dropout_and_too_long_input():
    model = _model(2, dropout=0.1, lora_dropout=0.1)
    ids, labels = _batch()
    loss = model(ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    long = torch.zeros(1, model.config.max_positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_positions"):
        model(long, labels=long)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_buffers_equal_concatenated_pairs(family):
    """The preallocated KVCache (written in place, rows reordered into its spare buffers) gives the logits the
    (keys, values) pairs give, bitwise, through a prefill, steps, a beam-like reorder and rows leaving."""
    from e2e_nlg.model import KVCache
    if family == "gpt2":
        model = _model(2).eval()
    else:
        from e2e_nlg.llama import LlamaConfig, build_model as build_llama
        model = build_llama(LlamaConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_dim=48, max_positions=64), 0).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 7), generator=g)
    cache = KVCache(rows=6, capacity=12)
    with torch.no_grad():
        a = model(ids, use_cache=True)
        b = model(ids, past_key_values=cache, use_cache=True)
        assert b.past_key_values is cache and cache.length == 7
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
        pairs = a.past_key_values
        for step, rows in enumerate([[0, 0, 1, 2, 2, 1], [5, 4, 3], [1]]):
            idx = torch.tensor(rows)
            pairs = [(k[idx], v[idx]) for k, v in pairs]
            cache.select(idx)
            tok = torch.randint(0, 97, (len(rows), 1), generator=g)
            a = model(tok, past_key_values=pairs, use_cache=True)
            b = model(tok, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
            pairs = a.past_key_values
            for (k1, v1), (k2, v2) in zip(pairs, [cache[i] for i in range(len(cache))]):
                assert torch.equal(k1, k2) and torch.equal(v1, v2)
        assert cache.length == 10
        with pytest.raises(ValueError, match="12 positions; 1 rows need 13"):
            model(torch.zeros(1, 3, dtype=torch.long), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="holds 6 rows; cannot select 7"):
            cache.select(torch.zeros(7, dtype=torch.long))


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=0), "num_heads must be positive, got 0"),  # checked before hidden_dim % num_heads divides by it
    (dict(num_layers=-1), "num_layers must be positive, got -1"),
    (dict(hidden_dim=30, num_heads=4), "divisible by num_heads"),
    (dict(lora_targets=["attn", "q_proj"]), "lora_targets must be a non-empty subset"),
    (dict(lora_targets=[]), "lora_targets must be a non-empty subset"),
])
def test_config_errors(bad, message):
    from e2e_nlg.llama import LlamaConfig

    with pytest.raises(ValueError, match=message):
        GPTConfig(**bad)
    if "hidden_dim" not in bad:  # the same shared checks in the other family's config
        llama_bad = {k: (["q_proj", "attn"] if k == "lora_targets" and v else v) for k, v in bad.items()}
        with pytest.raises(ValueError, match=message):
            LlamaConfig(**llama_bad)
