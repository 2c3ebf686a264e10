"""Decoding: greedy with the KV cache equals a naive no-cache loop, batching and left padding change nothing,
beam 1 is greedy, no-repeat n-grams really never repeat, and beam search picks the tokens transformers' does."""
from collections import Counter

import pytest
import torch

import loralib as lora
from e2e_nlg.generate import (DecodeConfig, ban_ngrams, banned_tokens, beam_search_batch, generate, greedy_batch,
                            left_pad, packed_linears)
from e2e_nlg.model import GPTConfig, build_model

V = 67
PROMPTS = [[5, 9, 2, 40, 11, 3, 8], [17], [30, 31, 32, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def dc(**kw):
    return DecodeConfig(pad_id=0, **kw)  # the tiny vocabulary has no id 50256


@pytest.fixture(scope="module")
def model():
    cfg = GPTConfig(vocab_size=V, max_positions=64, hidden_dim=32, num_layers=2, num_heads=4, lora_dim=4,
                    lora_alpha=8)
    m = build_model(cfg, base_seed=0)
    with torch.no_grad():  # sharper distributions than GPT-2's init, and a LoRA update that is not zero
        g = torch.Generator().manual_seed(1)
        for n, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_" in n else 0.15) + (1.0 if "ln_" in n and
                                                                                          n.endswith("weight") else 0))
    return m.eval()


@torch.no_grad()
def naive_greedy(model, prompt, n, eos=None, ban=0):
    """Argmax by re-running the whole sequence, no cache, no padding."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].clone()
        if ban:
            logits[banned_tokens(out, ban)] = float("-inf")
        k = int(logits.argmax())
        if k == eos:
            break
        seq.append(k)
        out.append(k)
    return out


def test_left_pad_positions_and_mask():
    ids, mask, pos = left_pad([[7, 8, 9], [4]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos[1, 2].item() == 0 and pos[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[1], []], 0)


def test_greedy_with_cache_and_padding_equals_naive_loop(model):
    cfg = dc(max_new_tokens=12, eos_id=V + 1)  # an id never produced: every row runs 12 steps
    got = greedy_batch(model, PROMPTS, cfg)
    want = [naive_greedy(model, p, 12) for p in PROMPTS]
    assert got == want
    assert all(len(g) == 12 for g in got)


def test_logits_to_keep_is_the_last_positions(model):
    ids = torch.tensor(PROMPTS[3][:9]).view(1, 9).repeat(2, 1)
    with torch.no_grad():
        full = model(ids).logits
        for n in (1, 3):
            last = model(ids, logits_to_keep=n).logits
            assert last.shape == (2, n, V)
            torch.testing.assert_close(last, full[:, -n:], rtol=1e-5, atol=1e-5)


def test_prefill_output_layer_is_one_matrix_product(model):
    # The kept positions are a strided slice of the states; handed to the output layer as they are, torch runs a
    # batched bmm, several times slower on CPU than the mm of the same size, at every batch's prefill.
    from torch.profiler import profile

    ids = torch.tensor(PROMPTS[3][:9]).view(1, 9).repeat(4, 1)
    with torch.no_grad(), profile() as prof:
        model(ids, logits_to_keep=1)
    ops = {e.name for e in prof.events()}
    assert "aten::bmm" not in ops and "aten::mm" in ops


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")


@needs_onednn
def test_packed_linears_match_the_layers_and_are_removed_after(model):
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 3, m.in_features, generator=g) for m in layers]
    with torch.no_grad():
        plain = [m(x) for m, x in zip(layers, xs)]
        with packed_linears(model):
            assert all("forward" in vars(m) for m in layers)  # every layer of the merged model runs packed
            packed = [m(x) for m, x in zip(layers, xs)]
            firsts = [m(x[:2]) for m, x in zip(layers, xs)]
    assert not any("forward" in vars(m) for m in layers)
    with packed_linears(model):
        outer = {m: vars(m)["forward"] for m in layers}
        with packed_linears(model):  # nested (generate inside generate): the inner block changes nothing
            assert all(vars(m)["forward"] is outer[m] for m in layers)
        assert all(vars(m)["forward"] is outer[m] for m in layers)
    assert not any("forward" in vars(m) for m in layers)
    for p, q, f in zip(plain, packed, firsts):
        torch.testing.assert_close(q.double(), p.double(), rtol=0, atol=1e-5 * p.abs().max().item())
        assert torch.equal(f, q[:2])  # a row's result does not depend on the rows beside it


@needs_onednn
def test_generate_packs_the_weights_unless_told_not_to(model):
    """packed=False: every layer runs its own forward (F.linear's sums, as transformers'); the default packs them."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append("forward" in vars(m))) for m in layers]
    try:
        unpacked = generate(model, PROMPTS, dc(max_new_tokens=5), packed=False)
        assert seen and not any(seen)
        seen.clear()
        packed = generate(model, PROMPTS, dc(max_new_tokens=5))
        assert seen and all(seen)
    finally:
        for h in hooks:
            h.remove()
    assert unpacked == packed == [naive_greedy(model, p, 5) for p in PROMPTS]


@needs_onednn
def test_bfloat16_layers_are_packed_only_where_onednn_runs_bfloat16(monkeypatch):
    lin = torch.nn.Linear(8, 6).to(torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for supported in ((True, False) if native else (False,)):  # never claim a support this CPU lacks
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
        with torch.no_grad(), packed_linears(lin):
            assert ("forward" in vars(lin)) is supported
            if supported:  # bfloat16 in, bfloat16 out, within bfloat16's rounding of the float64 result
                y, want = lin(x), torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
                assert y.dtype == torch.bfloat16
                torch.testing.assert_close(y.double(), want, rtol=0, atol=2 ** -7 * want.abs().max().item())


@needs_onednn
def test_packed_linears_fall_back_to_the_layer_when_it_changes():
    lin = lora.Linear(8, 6, r=2).eval()  # merged
    x = torch.randn(4, 8)
    with packed_linears(lin):
        with torch.no_grad():
            lin.weight.add_(1.0)  # an in-place edit after packing: the packed copy is stale
            assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        lin.train()  # unmerged: the LoRA update runs again
        with torch.no_grad():
            lin.lora_B.fill_(0.5)
            assert torch.equal(lin(x), lin.__class__.forward(lin, x))
        plain = torch.nn.Linear(8, 6)
    with packed_linears(plain):
        assert plain(x).requires_grad  # a call that needs gradients runs the layer's own forward
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = plain(x)  # autocast computes a float32 layer in bfloat16: the packed float32 weight would not
            assert y.dtype == torch.bfloat16 and torch.equal(y, torch.nn.Linear.forward(plain, x))


def test_stops_at_end_of_text(model):
    full = naive_greedy(model, PROMPTS[0], 12)
    eos = full[4]  # pretend the token generated 5th is end-of-text: generation must stop before it
    cut = full.index(eos)
    cfg = dc(max_new_tokens=12, eos_id=eos)
    got = generate(model, PROMPTS, cfg, batch_size=3)
    assert got[0] == full[:cut]
    for p, g in zip(PROMPTS[1:], got[1:]):
        assert g == naive_greedy(model, p, 12, eos=eos) and eos not in g


@pytest.mark.parametrize("beam", [1, 3])
def test_batched_equals_one_at_a_time(model, beam):
    cfg = dc(max_new_tokens=10, beam_size=beam, length_penalty=0.8, no_repeat_ngram_size=2,
                       eos_id=naive_greedy(model, PROMPTS[2], 6)[3])
    alone = [generate(model, [p], cfg)[0] for p in PROMPTS]
    assert len({len(a) for a in alone}) > 1  # rows finish at different steps: some leave the batch early
    # generate sorts the prompts by length: batches of 2 and 3 mix them differently, the order returned is the caller's
    for bs in (4, 3, 2):
        assert generate(model, PROMPTS, cfg, batch_size=bs) == alone


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ban_ngrams_equals_the_list_reference(n):
    g = torch.Generator().manual_seed(n)
    history = torch.randint(0, 4, (64, 12), generator=g)  # 4 symbols: many repeated n-grams
    got = ban_ngrams(torch.zeros(64, 6), history, n)
    want = torch.zeros(64, 6)
    for row, h in enumerate(history.tolist()):
        want[row, banned_tokens(h, n)] = float("-inf")
    assert torch.equal(got, want) and bool(torch.isinf(want).any())
    assert torch.equal(ban_ngrams(torch.zeros(64, 6), history[:, :n - 1], n), torch.zeros(64, 6))  # too short
    assert torch.equal(ban_ngrams(torch.zeros(64, 6), history, 0), torch.zeros(64, 6))


def test_beam_size_one_is_greedy(model):
    cfg = dc(max_new_tokens=10, beam_size=1, eos_id=naive_greedy(model, PROMPTS[0], 6)[2])
    assert beam_search_batch(model, PROMPTS, cfg) == greedy_batch(model, PROMPTS, cfg)


def test_banned_tokens():
    assert banned_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert sorted(banned_tokens([1, 2, 1, 3, 1], 2)) == [2, 3]
    assert banned_tokens([4, 4], 1) == [4, 4] and banned_tokens([1, 2, 3], 0) == []
    assert banned_tokens([1, 2], 3) == []


def _ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


@pytest.mark.parametrize("beam", [1, 4])
def test_no_repeat_ngram_really_prevents_repeats(model, beam):
    free = generate(model, PROMPTS, dc(max_new_tokens=20, beam_size=beam, eos_id=V + 1))
    # Without the ban this model loops, so the assertion below can fail.
    assert any(len(set(_ngrams(g, 2))) < len(_ngrams(g, 2)) for g in free)
    banned = generate(model, PROMPTS, dc(max_new_tokens=20, beam_size=beam, no_repeat_ngram_size=2,
                                                  eos_id=V + 1))
    for g in banned:
        assert len(g) == 20 and len(set(_ngrams(g, 2))) == len(_ngrams(g, 2))
    if beam == 1:
        assert banned == [naive_greedy(model, p, 20, ban=2) for p in PROMPTS]


def test_prompt_too_long_and_bad_config(model):
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate(model, [[1] * 60], dc(max_new_tokens=5))
    with pytest.raises(ValueError, match="beam_size"):
        DecodeConfig(beam_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeConfig(max_new_tokens=0)


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random transformers GPT-2 and the same weights in our model."""
    from e2e_nlg.hf_checkpoint import infer_config, load_hf_gpt2_weights

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    ours = build_model(GPTConfig(**infer_config(str(d)), lora_dim=4, lora_alpha=8), base_seed=0)
    load_hf_gpt2_weights(ours, str(d))
    return hf, ours.eval()


@pytest.mark.parametrize("beam, lp, eos_rank", [(3, 1.0, 0), (4, 0.8, 1), (5, 0.0, 0), (3, 0.6, 1)])
def test_beam_search_equals_transformers(hf_pair, beam, lp, eos_rank):
    hf, ours = hf_pair
    # An end-of-text that is likely somewhere in the beams, so hypotheses finish at different lengths.
    counts = Counter(t for p in PROMPTS for t in naive_greedy(ours, p, 9))
    eos = counts.most_common()[eos_rank][0]
    cfg = dc(max_new_tokens=9, beam_size=beam, length_penalty=lp, eos_id=eos)
    got = generate(ours, PROMPTS, cfg, batch_size=4)
    ids, mask, _ = left_pad(PROMPTS, 0)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, num_beams=beam, length_penalty=lp, max_new_tokens=9,
                          eos_token_id=eos, pad_token_id=0, do_sample=False, early_stopping=False)
    want = []
    for row in ref[:, ids.shape[1]:].tolist():
        want.append(row[:row.index(eos)] if eos in row else row)
    assert got == want
    assert any(len(w) < 9 for w in want)  # some hypothesis ended at end-of-text: the EOS path is exercised
