"""The two verbs of loralib: freeze everything but LoRA, and save only LoRA."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from .adapters import adapter_state_dict
from .layers import ConvLoRA, lora_layers, lora_names

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict"]

_BIAS_MODES = ("none", "all", "lora_only")


class BiasModeError(ValueError, NotImplementedError):
    """A bad ``bias`` mode. Also a NotImplementedError, which is what 0.1.2 raised, so old handlers still work."""


def _check_bias(bias) -> None:
    if bias not in _BIAS_MODES:
        raise BiasModeError(f"bias must be one of {_BIAS_MODES}, got bias={bias!r}")


def _lora_bias_names(model: nn.Module):
    """Qualified names of the biases that belong to LoRA layers (r > 0), as parameter names."""
    names = set()
    for mname, m in lora_layers(model):
        owner, local = (m.conv, "conv.bias") if isinstance(m, ConvLoRA) else (m, "bias")
        if getattr(owner, "bias", None) is not None:
            names.add(f"{mname}.{local}" if mname else local)
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except the LoRA ones, which are made trainable.

    LoRA parameters are those of loralib layers (``lora_A``, ``lora_B``, added adapters: see
    :func:`loralib.layers.lora_names`), found by type: a module of yours whose name contains ``lora_`` is frozen.

    Args:
        model: any module containing loralib layers.
        bias: ``"none"`` freezes all biases; ``"all"`` trains every bias parameter; ``"lora_only"`` trains only
            the biases of LoRA layers.

    Raises:
        ValueError: ``bias`` is not one of ``"none"``, ``"all"``, ``"lora_only"``.
    """
    _check_bias(bias)
    lora_biases = _lora_bias_names(model) if bias == "lora_only" else set()
    lora = lora_names(model)
    for n, p in model.named_parameters():
        if n in lora:
            p.requires_grad = True
        elif bias == "all" and "bias" in n:
            p.requires_grad = True
        elif n in lora_biases:
            p.requires_grad = True
        else:
            p.requires_grad = False


def lora_state_dict(model: nn.Module, bias: str = "none", adapter: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The LoRA entries of ``model.state_dict()`` (plus biases, per ``bias``), to save a small adapter.

    Load it back with ``model.load_state_dict(sd, strict=False)`` onto a model holding the base weights.

    Args:
        model: any module containing loralib layers.
        bias: as in :func:`mark_only_lora_as_trainable`; ``"all"`` adds every bias *parameter* (never a buffer
            that happens to be named ``bias``, such as GPT-2's causal mask).
        adapter: ``None`` (0.1.2's behaviour): every LoRA entry, added adapters included. A name: only that
            adapter, under 0.1.2's keys (``<layer>.lora_A`` / ``<layer>.lora_B``), so that the checkpoint of any
            adapter loads into a single-adapter model, loralib 0.1.2's included.

    Returns:
        A dict from state-dict key to tensor.

    Raises:
        ValueError: ``bias`` is not one of ``"none"``, ``"all"``, ``"lora_only"``, or no adapter ``adapter``.
    """
    _check_bias(bias)
    sd = model.state_dict()
    lora = lora_names(model)
    if adapter is not None:
        sd = {k: v for k, v in sd.items() if k not in lora}
        sd.update(adapter_state_dict(model, adapter))
    if bias == "none":
        keep = lambda k: False  # noqa: E731
    elif bias == "all":
        # remove_duplicate=False: a bias shared by two modules has two state-dict keys, keep both.
        bias_params = {n for n, _ in model.named_parameters(remove_duplicate=False) if "bias" in n}
        keep = bias_params.__contains__
    else:
        keep = _lora_bias_names(model).__contains__
    return {k: v for k, v in sd.items() if k in lora or keep(k)}

