"""Named sets of flags, overridden by flags given on the command line. ``paper``: the GPT-2 M commands of
github.com/microsoft/LoRA's examples/NLG README (AdamW eps 1e-6 from its ``src/optimizer.py``; length penalty 0.8
as that README, the paper's Table 11 says 0.9).
"""
import argparse
from typing import Callable, Dict, Optional, Sequence, Set

PAPER_TRAIN = {
    "lora_dim": 4, "lora_alpha": 32, "lora_dropout": 0.1, "lora_targets": ["attn"],  # query and value only
    "lr": 2e-4, "adam_beta2": 0.999, "adam_eps": 1e-6, "weight_decay": 0.01,
    "max_grad_norm": 0.0,  # --clip 0.0: no clipping
    "warmup_steps": 500, "batch_size": 8, "grad_accum": 1, "num_epochs": 5, "seq_len": 512,
    "label_smoothing": 0.1, "seed": 110,
    "max_train_examples": 0, "val_examples": 0, "max_steps": 0,  # all of train.txt and valid.txt, to the end
    "delex": "none",  # Microsoft's model writes the names itself (a pre-trained GPT-2 copies them)
}
PAPER_DECODE = {
    "beam_size": 10, "length_penalty": 0.8, "no_repeat_ngram_size": 4, "max_new_tokens": 64,
    "stop_token_ids": [628],  # "\n\n", besides <|endoftext|> (50256)
}
# SmolLM2-135M (--init_checkpoint smollm2): LoRA on query and value as the paper, names as placeholders as the GPT-2
# example; lr as the probe, and as many steps as fit the 10-minute budget on a quiet 2-core CPU (330: 534 s
# for the whole command). Decoding chosen on valid.txt: beam 5 beat greedy on BLEU and slot error rate (README,
# "SmolLM2-135M", has the figures).
SMOLLM2_TRAIN = {
    "lora_dim": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_targets": ["q_proj", "v_proj"],
    "lr": 1e-3, "warmup_steps": 15, "batch_size": 8, "max_steps": 330, "val_examples": 50,
}
SMOLLM2_DECODE = {"beam_size": 5, "no_repeat_ngram_size": 4, "max_new_tokens": 64}
RECIPES: Dict[str, Dict[str, dict]] = {
    "paper": {"train": PAPER_TRAIN, "decode": PAPER_DECODE},
    "smollm2": {"train": SMOLLM2_TRAIN, "decode": SMOLLM2_DECODE,
                "source": "this repository's recipe for SmolLM2-135M (README.md, SmolLM2)"},
}
SOURCE = "github.com/microsoft/LoRA examples/NLG README, GPT-2 M on E2E (train: gpt2_ft.py, decode: gpt2_beam.py)"


def explicit_dests(make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> Set[str]:
    """The ``dest`` of every option typed in ``argv``, even with its default value (parsed with defaults
    suppressed)."""
    p = make_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    ns, _ = p.parse_known_args(list(argv))
    return set(vars(ns))


def apply_recipe(args: argparse.Namespace, name: Optional[str], stage: str, explicit: Set[str]) -> dict:
    """Set the recipe's values on ``args`` for every flag not in ``explicit``.

    Args:
        args: changed in place.
        name: a key of :data:`RECIPES`, or None / "none".
        stage: "train" or "decode".

    Returns:
        ``{"name", "source", "values", "overridden": {dest: value given instead}}``, or ``{}`` without a recipe.

    Raises:
        ValueError: an unknown recipe name.
    """
    if not name or name == "none":
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown --recipe {name!r}; known: none, {', '.join(sorted(RECIPES))}")
    values = RECIPES[name][stage]
    overridden = {}
    for dest, value in values.items():
        if dest in explicit:
            overridden[dest] = getattr(args, dest)
        else:
            setattr(args, dest, list(value) if isinstance(value, list) else value)
    return {"name": name, "source": RECIPES[name].get("source", SOURCE), "values": dict(values), "overridden": overridden}
