"""Import Hugging Face GPT-2 weights (``GPT2LMHeadModel`` / ``GPT2Model``) into ``SimpleGPT2WithLoRA``.

Hugging Face stores GPT-2's projections as ``Conv1D`` with weights laid out (in, out); ours are ``nn.Linear``
(out, in), so those four weights per block are transposed. LoRA weights are untouched: they start as loralib made
them, on top of the imported base.
"""
import json
import os
import re
from typing import Dict

import torch

SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")  # HF's causal-mask buffers in older checkpoints


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message names keys and shapes."""


def resolve_checkpoint_path(path: str) -> str:
    """A file path, or a directory holding ``model.safetensors`` (preferred) or ``pytorch_model.bin``."""
    if os.path.isdir(path):
        for name in (SAFETENSORS_NAME, BIN_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"--init_checkpoint {path!r} is a directory without {SAFETENSORS_NAME} or {BIN_NAME} "
                              "(sharded checkpoints are not supported)")
    if not os.path.isfile(path):
        raise CheckpointError(f"--init_checkpoint {path!r} does not exist; pass a Hugging Face GPT-2 "
                              f"{SAFETENSORS_NAME} / {BIN_NAME} or the directory holding it")
    return path


def read_hf_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint into ``{key: tensor}`` with keys normalised to ``transformer.*`` / ``lm_head.weight``.

    ``.bin``/``.pt`` files load with ``weights_only=True``: a pickle that would run code is refused.

    Raises:
        CheckpointError: unreadable file, or not a dict of tensors.
    """
    path = resolve_checkpoint_path(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              " (corrupted, truncated, or not a plain tensor checkpoint)") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    out = {}
    for k, v in sd.items():
        if _BUFFERS.search(k):
            continue
        # GPT2Model checkpoints have no "transformer." prefix; GPT2LMHeadModel ones do.
        key = k if (k.startswith("transformer.") or k == "lm_head.weight") else "transformer." + k
        out[key] = v
    return out


def infer_config(path: str) -> dict:
    """GPTConfig fields implied by a checkpoint (shapes, plus ``num_heads``/eps from a ``config.json`` beside it).

    Returns:
        A dict with ``vocab_size``, ``hidden_dim``, ``max_positions``, ``num_layers`` and, when a ``config.json`` is
        found, ``num_heads`` and ``layer_norm_eps``.
    """
    sd = read_hf_state_dict(path)
    if "transformer.wte.weight" not in sd or "transformer.wpe.weight" not in sd:
        raise CheckpointError(f"{path} has no transformer.wte.weight / transformer.wpe.weight: not a GPT-2 checkpoint")
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"transformer\.h\.(\d+)\.", k)] if m}
    cfg = dict(vocab_size=sd["transformer.wte.weight"].shape[0], hidden_dim=sd["transformer.wte.weight"].shape[1],
               max_positions=sd["transformer.wpe.weight"].shape[0], num_layers=len(layers))
    cfg_json = os.path.join(os.path.dirname(resolve_checkpoint_path(path)), "config.json")
    if os.path.isfile(cfg_json):
        with open(cfg_json) as f:
            hf = json.load(f)
        if "n_head" in hf:
            cfg["num_heads"] = hf["n_head"]
        if "layer_norm_epsilon" in hf:
            cfg["layer_norm_eps"] = hf["layer_norm_epsilon"]
    return cfg


@torch.no_grad()
def load_hf_gpt2_weights(model, path: str) -> None:
    """Copy a Hugging Face GPT-2 checkpoint into ``model``'s base weights, key by key.

    Args:
        model: a ``SimpleGPT2WithLoRA`` whose config matches the checkpoint (see :func:`infer_config`).
        path: ``model.safetensors``, ``pytorch_model.bin``, or a directory holding one.

    The LM head gets ``lm_head.weight`` when the checkpoint has one and a copy of ``wte`` otherwise (GPT-2 ties
    them); it stays a separate tensor, so merging the head's LoRA never changes the input embedding.

    Raises:
        CheckpointError: missing or extra keys, or a shape mismatch (each named with both shapes).
    """
    src = read_hf_state_dict(path)
    own = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    if "lm_head.weight" not in src and "transformer.wte.weight" in src:
        src["lm_head.weight"] = src["transformer.wte.weight"]
    missing = sorted(set(own) - set(src))
    unexpected = sorted(set(src) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model (num_layers={model.config.num_layers}, hidden_dim="
            f"{model.config.hidden_dim}): missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}. Build the model with the checkpoint's "
            "sizes (run_training.py reads them from the checkpoint)")
    new = {}
    bad = []
    for k, target in own.items():
        v = src[k]
        if _CONV1D.match(k):
            v = v.t()
        if tuple(v.shape) != tuple(target.shape):
            bad.append(f"{k}: checkpoint {tuple(src[k].shape)}{' (transposed from Conv1D)' if _CONV1D.match(k) else ''}"
                       f" vs model {tuple(target.shape)}")
        new[k] = v.to(target.dtype).contiguous().clone()
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:6]))
    result = model.load_state_dict(new, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
