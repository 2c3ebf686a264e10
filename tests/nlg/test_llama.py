"""The Llama model (e2e_nlg/llama.py) against Hugging Face's LlamaForCausalLM with the same weights: logits, the loss
at label positions, KV-cache decoding, greedy and beam generation; LoRA placement; weight import errors."""
import pytest
import torch

import loralib as lora
from e2e_nlg import llama
from gguf_fixtures import hf_llama, smollm2_file, write_tiny_llama
from e2e_nlg.generate import DecodeConfig, generate

transformers = pytest.importorskip("transformers")

V, PAD, EOS = 97, 0, 96


def _hf_pair(lora_targets=None, lora_dim=4, seed=0):
    """A tiny random transformers LlamaForCausalLM (tied head, grouped-query attention) and ours with its weights."""
    torch.manual_seed(seed)
    hc = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                  rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=128)
    ref = transformers.LlamaForCausalLM(hc).eval()
    cfg = llama.LlamaConfig(vocab_size=V, hidden_dim=64, intermediate_dim=96, num_layers=3, num_heads=4,
                            num_kv_heads=2, rope_theta=5000.0, max_positions=128, lora_dim=lora_dim,
                            lora_targets=lora_targets)
    ours = llama.build_model(cfg)
    llama.load_weights(ours, ref.state_dict(), "hf")
    return ref, ours.eval()


def _ids(B=3, T=15, seed=1):
    return torch.randint(1, V - 1, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_and_loss_equal_transformers():
    ref, ours = _hf_pair()
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
        labels = ids.clone()
        labels[:, :6] = -100  # the prompt
        labels[0, 12:] = -100  # right padding
        assert ours(ids, labels=labels).loss.item() == pytest.approx(ref(ids, labels=labels).loss.item(), abs=1e-5)


def test_kv_cache_decoding_equals_the_full_forward():
    _, ours = _hf_pair()
    ids = _ids()
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :9], use_cache=True)
        k, v = first.past_key_values[0]
        assert k.shape == (3, 2, 9, 16) and v.shape == (3, 2, 9, 16)  # (B, nkv, T, hs): the key/value heads only
        rest = ours(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True).logits
    assert (rest - full[:, 9:]).abs().max() <= 1e-4


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_equals_transformers_generate(beams):
    ref, ours = _hf_pair()
    prompts = [_ids(1, 5, seed=2)[0].tolist(), _ids(1, 9, seed=3)[0].tolist()]  # left-padded together
    got = generate(ours, prompts, DecodeConfig(max_new_tokens=8, beam_size=beams, eos_id=EOS, pad_id=PAD))
    for p, g in zip(prompts, got):
        out = ref.generate(torch.tensor([p]), max_new_tokens=8, num_beams=beams, do_sample=False, eos_token_id=EOS,
                           pad_token_id=PAD, early_stopping=False)
        want = out[0, len(p):].tolist()
        assert g == [t for t in want if t != EOS][:len(g)] and len(g) > 0


def test_tied_head_is_the_embedding_and_generate_packs_it():
    ref, ours = _hf_pair()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert not any(k.startswith("lm_head") for k in ours.state_dict())  # the embedding keeps its one name
    h = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(h), ref.lm_head(h), rtol=0, atol=1e-6)
        if torch.backends.mkldnn.is_available():
            from e2e_nlg.generate import packed_linears

            with packed_linears(ours):
                assert "forward" in vars(ours.lm_head)  # runs through oneDNN with the blocked weight
                torch.testing.assert_close(ours.lm_head(h), ref.lm_head(h), rtol=0, atol=1e-5)


def test_lora_sits_on_the_named_projections_and_trains():
    ref, ours = _hf_pair(lora_targets=["q_proj", "down_proj"])
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, lora.LoRALayer)})
    assert adapted == ["down_proj", "q_proj"]
    lora.mark_only_lora_as_trainable(ours)
    ours.train()
    ids = _ids()
    labels = ids.clone()
    labels[:, :5] = -100
    ours(ids, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 2 * 3 and all(g is not None for g in grads.values())  # A and B, 2 targets, 3 blocks
    default = llama.build_model(llama.LlamaConfig(vocab_size=V, hidden_dim=64, intermediate_dim=96, num_layers=1,
                                                  num_heads=4, num_kv_heads=2))
    assert sorted(n for n, m in default.named_modules() if isinstance(m, lora.LoRALayer)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_merged_model_gives_the_unmerged_logits():
    _, ours = _hf_pair()
    ours.train()  # unmerged while the adapter changes
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = _ids()
    with torch.no_grad():
        unmerged = ours(ids).logits
        merged = ours.eval()(ids).logits
    assert (merged - unmerged).abs().max() <= 1e-4 * unmerged.abs().max()


def test_bad_configs_and_weights_are_named():
    with pytest.raises(ValueError, match="lora_targets"):
        llama.LlamaConfig(lora_targets=["c_attn"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        llama.LlamaConfig(num_heads=9, num_kv_heads=2)
    ref, ours = _hf_pair()
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="missing .*model.norm.weight"):
        llama.load_weights(ours, {k: v for k, v in sd.items() if k != "model.norm.weight"}, "x.gguf")
    bad = dict(sd)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(3, 3\)"):
        llama.load_weights(ours, bad, "x.gguf")
    untied = dict(sd)
    untied["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="ties them"):
        llama.load_weights(ours, untied, "x.gguf")


def _ours_and_reference(path):
    from e2e_nlg import family
    from e2e_nlg.train_config import TrainConfig

    base = family.resolve(path)
    return base, base.build(TrainConfig(init_checkpoint=path)).eval(), hf_llama(path)


def test_tiny_gguf_logits_and_cached_decoding_equal_transformers(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_llama(path)
    base, ours, ref = _ours_and_reference(path)
    ids = torch.tensor([base.tokenizer.enc.encode_ordinary("name : Blue Spice | eatType : pub || Blue Spice is")])
    with torch.no_grad():
        want = ref(ids).logits
        assert (ours(ids).logits - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
        first = ours(ids[:, :6], use_cache=True)
        rest = ours(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True).logits
    assert (rest - want[:, 6:]).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_smollm2_logits_equal_transformers_on_e2e_lines():
    base, ours, ref = _ours_and_reference(smollm2_file())
    lines = ["name : The Eagle | Type : coffee shop | food : French | near : Burger King || The Eagle is a French",
             "name : Zizzi | customer rating : 5 out of 5 | area : riverside || Zizzi , rated 5 out of 5 ,"]
    for line in lines:
        ids = torch.tensor([base.tokenizer.enc.encode_ordinary(line)])
        with torch.no_grad():
            want, got = ref(ids).logits, ours(ids).logits
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
