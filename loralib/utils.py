"""The two verbs of loralib: freeze everything but LoRA, and save only LoRA."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from .layers import ConvLoRA, LoRALayer

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
    for mname, m in model.named_modules():
        if isinstance(m, LoRALayer) and m.r > 0 and m._has_lora():
            owner, local = (m.conv, "conv.bias") if isinstance(m, ConvLoRA) else (m, "bias")
            if getattr(owner, "bias", None) is not None:
                names.add(f"{mname}.{local}" if mname else local)
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except the LoRA ones (names containing ``lora_``), which are made trainable.

    Args:
        model: any module containing loralib layers.
        bias: ``"none"`` freezes all biases; ``"all"`` trains every bias parameter; ``"lora_only"`` trains only
            the biases of LoRA layers.

    Raises:
        ValueError: ``bias`` is not one of ``"none"``, ``"all"``, ``"lora_only"``.
    """
    _check_bias(bias)
    lora_biases = _lora_bias_names(model) if bias == "lora_only" else set()
    for n, p in model.named_parameters():
        if "lora_" in n:
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
    if adapter is not None:
        lora = _adapter_entries(model, adapter)
        sd = {k: v for k, v in sd.items() if "lora_" not in k}
        sd.update(lora)
    if bias == "none":
        keep = lambda k: False  # noqa: E731
    elif bias == "all":
        # remove_duplicate=False: a bias shared by two modules has two state-dict keys, keep both.
        bias_params = {n for n, _ in model.named_parameters(remove_duplicate=False) if "bias" in n}
        keep = bias_params.__contains__
    else:
        keep = _lora_bias_names(model).__contains__
    return {k: v for k, v in sd.items() if "lora_" in k or keep(k)}


def _adapter_entries(model: nn.Module, adapter: str) -> Dict[str, torch.Tensor]:
    """``{<layer>.lora_A: A, <layer>.lora_B: B}`` of adapter ``adapter`` (``"default"``: the layers' own)."""
    out = {}
    for name, m in model.named_modules():
        if not (isinstance(m, LoRALayer) and m.r > 0 and m._has_lora()):
            continue
        if adapter == "default":
            src = m
        else:
            adapters = getattr(m, "lora_adapters", {})
            if adapter not in adapters:
                raise ValueError(f"layer {name!r} has no adapter {adapter!r} (it has 'default'"
                                 f"{''.join(', ' + repr(a) for a in adapters)})")
            src = adapters[adapter]
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = src.lora_A.detach()
        out[prefix + "lora_B"] = src.lora_B.detach()
    if not out:
        raise ValueError(f"{type(model).__name__} has no LoRA layer, so no adapter {adapter!r}")
    return out
