"""--recipe paper: the values a run trains with equal Microsoft's examples/NLG README for GPT-2 M on E2E (table
written here, independently of e2e_nlg/recipes.py), explicit flags win, the run records it, LoRA sits on query and value
only, and inference decodes an adapter trained with it by the recipe's beam search, stopping at 628 too."""
import json

import pytest
import torch

import run_inference
import run_training
from conftest import tiny_args
from e2e_nlg.generate import DecodeConfig, generate
from e2e_nlg.model import GPTConfig, build_model
from e2e_nlg.train_config import TrainConfig

# From github.com/microsoft/LoRA examples/NLG/README.md, GPT-2 M: gpt2_ft.py flags -> our flags.
MICROSOFT_TRAIN = {
    "batch_size": 8,            # --train_batch_size 8
    "grad_accum": 1,            # --grad_acc 1
    "seq_len": 512,             # --seq_len 512
    "max_grad_norm": 0.0,       # --clip 0.0
    "lr": 0.0002,               # --lr 0.0002
    "weight_decay": 0.01,       # --weight_decay 0.01
    "adam_beta2": 0.999,        # --adam_beta2 0.999
    "adam_eps": 1e-6,           # src/optimizer.py: --adam_epislon default 1e-6
    "warmup_steps": 500,        # --scheduler linear --warmup_step 500
    "num_epochs": 5,            # --max_epoch 5
    "lora_dim": 4,              # --lora_dim 4
    "lora_alpha": 32,           # --lora_alpha 32
    "lora_dropout": 0.1,        # --lora_dropout 0.1
    "label_smoothing": 0.1,     # --label_smooth 0.1
    "seed": 110,                # --random_seed 110
    "lora_targets": ["attn"],   # the paper's E2E setup: W_q and W_v only
    "max_train_examples": 0,    # the whole train set ...
    "val_examples": 0,          # ... and validation set
    "max_steps": 0,
}
# gpt2_beam.py flags -> ours.
MICROSOFT_DECODE = {
    "beam_size": 10,             # --beam 10
    "length_penalty": 0.8,       # --length_penalty 0.8 (the paper's Table 11: 0.9)
    "no_repeat_ngram_size": 4,   # --no_repeat_ngram_size 4
    "max_new_tokens": 64,        # --eval_len 64
    "stop_token_ids": [628],     # --eos_token_id 628, besides 50256
}


def test_recipe_applies_to_args_built_without_parse_args():
    # tests and other scripts build args with get_parser(): values other than the defaults count as given
    ns = run_training.get_parser().parse_args(["--recipe", "paper", "--lr", "0.5"])
    cfg = run_training.make_config(ns)
    assert (cfg.lr, cfg.batch_size, cfg.recipe_info["overridden"]) == (0.5, 8, {"lr": 0.5})
    # parse_args knows what was typed: --lr at its default value still overrides the recipe
    cfg = run_training.make_config(run_training.parse_args(["--recipe", "paper", "--lr", str(TrainConfig.lr)]))
    assert (cfg.lr, cfg.batch_size, cfg.recipe_info["overridden"]) == (TrainConfig.lr, 8, {"lr": TrainConfig.lr})


def test_lora_on_query_and_value_only():
    cfg = GPTConfig(hidden_dim=32, num_layers=2, num_heads=2, lora_dim=4, lora_targets=["attn"])
    model = build_model(cfg)
    lora_names = sorted(n for n, _ in model.named_parameters() if "lora_" in n)
    assert lora_names == [f"transformer.h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"]
    assert model.transformer.h[0].attn.c_attn.lora_A.shape == (8, 32)  # q and v: 2 x r rows
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    everywhere = build_model(GPTConfig(hidden_dim=32, num_layers=2, num_heads=2, lora_dim=4))
    assert {n.split(".lora_")[0].split(".", 3)[-1] for n, _ in everywhere.named_parameters() if "lora_" in n} == \
        {"attn.c_attn", "mlp.c_fc", "mlp.c_proj", "lm_head"}  # default placement unchanged
    with pytest.raises(ValueError, match="lora_targets must be a non-empty subset"):
        GPTConfig(lora_targets=["attn", "ffn"])


def test_train_with_recipe_records_it_and_inference_decodes_by_it(e2e_dir, tmp_path, capsys, monkeypatch):
    clips = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(1))
    out = tmp_path / "out"
    # The tiny set-up's flags are explicit, so they override the recipe's sizes and budget; so does --seed 42,
    # although 42 is also the default seed (an explicit flag wins even when it equals the default).
    argv = tiny_args(e2e_dir, out, "--recipe", "paper", "--max_steps", "2", "--warmup_steps", "1", "--seed", "42")
    assert run_training.main(argv) == 0
    assert clips == []  # max_grad_norm 0: never clipped
    cfg = json.load(open(out / "adapter_config.json"))["extra"]  # the example's fields
    r, ta = cfg["recipe"], cfg["training_args"]
    assert r["name"] == "paper" and r["decode"] == MICROSOFT_DECODE
    given = {"batch_size": 4, "lr": 1e-2, "seed": 42, "lora_dim": 4, "lora_alpha": 8, "warmup_steps": 1,
             "num_epochs": 1, "max_train_examples": 16, "val_examples": 8, "max_steps": 2}
    assert r["overridden"] == given  # lora_dim 4 too: given explicitly, though equal to the recipe's
    # Every other value of Microsoft's recipe is what the run used.
    assert {k: ta[k] for k in MICROSOFT_TRAIN} == {**MICROSOFT_TRAIN, **given}
    assert (ta["adam_eps"], ta["adam_beta2"], ta["max_grad_norm"], ta["label_smoothing"], ta["lora_dropout"]) == \
        (1e-6, 0.999, 0.0, 0.1, 0.1)
    assert cfg["model_config"]["lora_targets"] == ["attn"] and cfg["model_config"]["lora_dropout"] == 0.1
    state = torch.load(out / "training_state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-6, 0.01)
    assert all(".attn.c_attn.lora_" in k for k in torch.load(out / "pytorch_model.bin", weights_only=True))
    capsys.readouterr()

    base = ["--adapter_dir", str(out), "--input", "name : The Eagle | Type : pub", "--no_unmerged", "--device", "cpu",
            "--max_new_tokens", "3"]
    assert run_inference.main(base) == 0
    printed = capsys.readouterr().out
    assert "decoding: beam 10, length penalty 0.8, no-repeat 4-grams, at most 3 new tokens, stop also at [628] " \
           "(recipe paper)" in printed
    assert run_inference.main(base + ["--beam_size", "2", "--length_penalty", "0.9"]) == 0
    assert "beam 2, length penalty 0.9, no-repeat 4-grams" in capsys.readouterr().out
    assert run_inference.main(base + ["--recipe", "none"]) == 0  # the script's own defaults
    assert "decoding: beam 5, length penalty 1.0, no-repeat 4-grams, at most 3 new tokens\n" in \
        capsys.readouterr().out


@pytest.mark.parametrize("beam", [1, 3])
def test_extra_stop_token_ends_the_text(beam):
    cfg = GPTConfig(vocab_size=67, max_positions=64, hidden_dim=32, num_layers=2, num_heads=4, lora_dim=4)
    model = build_model(cfg, base_seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15 + (1.0 if "ln_" in n and n.endswith("weight") else 0))
    model.eval()
    prompts = [[5, 9, 2, 40], [17, 3]]
    free = generate(model, prompts, DecodeConfig(max_new_tokens=12, beam_size=beam, eos_id=66, pad_id=0))
    stop = free[0][2]  # a token the first text produces at its third step
    assert stop not in free[0][:2]
    got = generate(model, prompts, DecodeConfig(max_new_tokens=12, beam_size=beam, eos_id=66, pad_id=0,
                                                stop_ids=(stop,)))
    # Same as making that token the end-of-text: the two stop rules are one.
    same = generate(model, prompts, DecodeConfig(max_new_tokens=12, beam_size=beam, eos_id=stop, pad_id=0))
    assert got == same and stop not in got[0] and stop not in got[1]
    if beam == 1:
        assert got[0] == free[0][:2]
    with pytest.raises(ValueError, match="stop_ids"):
        DecodeConfig(stop_ids=(-1,))
