"""generate(..., adapter_names=...): prompts of several adapters (and the base) decoded in the same batches, greedy
and beam search with the KV cache, give each prompt the tokens its adapter gives it alone."""
import pytest
import torch

import loralib as lora
from e2e_nlg.generate import DecodeConfig, generate
from e2e_nlg.model import GPTConfig, build_model

V = 67
PROMPTS = [[5, 9, 2, 40, 11, 3, 8], [17], [30, 31, 32, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7, 3],
           [60, 2, 9, 14, 51]]
NAMES = ["t2", None, "default", "t1", "t2", "t1"]


@pytest.fixture
def model():
    """A tiny example model with its default adapter and two added ones of other ranks, all random (not zero)."""
    cfg = GPTConfig(vocab_size=V, max_positions=64, hidden_dim=32, num_layers=2, num_heads=4, lora_dim=4,
                    lora_alpha=8)
    m = build_model(cfg, base_seed=0)
    lora.add_adapter(m, "t1", r=2, lora_alpha=4)
    lora.add_adapter(m, "t2", r=6, lora_alpha=3)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_" in n else 0.15) + (1.0 if "ln_" in n and
                                                                                          n.endswith("weight") else 0))
    for _, layer in lora.layers.lora_layers(m):
        layer.merge_weights = False
    return m.eval()


def alone(model, prompts, cfg, name, batch_size):
    if name is None:
        with lora.disable_adapters(model):
            return generate(model, prompts, cfg, batch_size=batch_size)
    lora.set_adapter(model, name)
    try:
        return generate(model, prompts, cfg, batch_size=batch_size)
    finally:
        lora.set_adapter(model, "default")


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("batch_size", [6, 4])
def test_each_prompt_gets_its_adapters_tokens(model, beams, batch_size):
    cfg = DecodeConfig(pad_id=0, max_new_tokens=10, beam_size=beams, no_repeat_ngram_size=2)
    got = generate(model, PROMPTS, cfg, batch_size=batch_size, adapter_names=NAMES)
    want = {n: alone(model, PROMPTS, cfg, n, batch_size) for n in dict.fromkeys(NAMES)}
    assert got == [want[n][i] for i, n in enumerate(NAMES)]
    assert len({tuple(w[0]) for w in want.values()}) == len(want)  # the adapters really decode differently
    assert all(layer.row_adapters is None and layer.active_adapter == "default"
               for _, layer in lora.layers.lora_layers(model))


def test_a_merged_model_is_merged_again_after_mixed_generation(model):
    for _, layer in lora.layers.lora_layers(model):
        layer.merge_weights = True
    model.train().eval()
    cfg = DecodeConfig(pad_id=0, max_new_tokens=6, beam_size=2)
    got = generate(model, PROMPTS, cfg, batch_size=6, adapter_names=NAMES)
    assert all(layer.merged for _, layer in lora.layers.lora_layers(model))
    for _, layer in lora.layers.lora_layers(model):
        layer.merge_weights = False
    model.train().eval()
    assert got == generate(model, PROMPTS, cfg, batch_size=6, adapter_names=NAMES)


def test_bad_adapter_names(model):
    cfg = DecodeConfig(pad_id=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="adapter_names has 2 entries for 6 prompts"):
        generate(model, PROMPTS, cfg, adapter_names=["t1", "t2"])
    with pytest.raises(ValueError, match="no adapter 'nope' in the model"):
        generate(model, PROMPTS, cfg, adapter_names=["nope"] * 6)
