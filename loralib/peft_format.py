"""PEFT's LoRA directories: what ``save_adapter(..., format="peft")`` writes for
``peft.PeftModel.from_pretrained``, and how ``load_adapter`` reads a directory PEFT saved. loralib's own format
and the file handling live in ``serialization.py``."""
import math
import re
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .errors import AdapterError
from .injection import layer_kind
from .layers import ConvLoRA, Embedding, LoRALayer, MergedLinear, adapter_factors, adapter_view, check_lora_args
from .patterns import pattern_value

PEFT_PREFIX = "base_model.model."  # the prefix of every key in a PEFT adapter's weights file


def _number(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def peft_export(layers: Dict[str, LoRALayer], adapter: str, task_type) -> Tuple[dict, dict]:
    """PEFT's ``adapter_config.json`` and weights for adapter ``adapter`` of ``layers``.

    Args:
        layers: ``{qualified name: LoRA layer}``, as ``loralib.layers.lora_layers`` gives them.
        adapter: the adapter to export (``"default"``: the layers' own factors).
        task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``), or None.

    Returns:
        ``(config, tensors)``: the config as a dict, the tensors (on the CPU) under PEFT's keys.

    Raises:
        AdapterError: a convolution layer, whose update PEFT cannot hold.
    """
    # PEFT scales by lora_alpha / r (no rsLoRA here): each layer's alpha is chosen so that this equals the
    # layer's own scaling, which also covers rsLoRA and MergedLinear's wider rank.
    tensors, ranks, alphas, dropouts = {}, {}, {}, []
    for name, layer in layers.items():
        src = adapter_factors(layer, adapter)
        view = adapter_view(layer, adapter)
        A, B = src.lora_A.detach().cpu(), src.lora_B.detach().cpu()
        if isinstance(layer, ConvLoRA):
            raise AdapterError(f"{name!r} is a {type(layer).__name__}: PEFT factorises a convolution's update as "
                               "a convolution followed by a 1x1 convolution, which cannot hold loralib's update; "
                               "save it with format='loralib'")
        if isinstance(layer, MergedLinear):
            B = view.expanded_B().detach().cpu()  # (out, r * n_enabled), zero rows for the disabled groups
        key = PEFT_PREFIX + name
        if isinstance(layer, Embedding):
            tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = A, B
        else:
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = A, B
        ranks[name] = A.shape[0]
        alphas[name] = _number(src.scaling * A.shape[0])
        if isinstance(src.lora_dropout, nn.Dropout):
            dropouts.append(src.lora_dropout.p)
    names = list(layers)
    r0, a0 = ranks[names[0]], alphas[names[0]]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": names,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != a0},
        "lora_dropout": max(dropouts, default=0.0),
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return config, tensors


def check_peft_config(config: dict, path: str) -> None:
    """Check the fields of PEFT config ``config`` (read from ``path``) that loading uses.

    Raises:
        AdapterError: a field that is not what PEFT writes there, naming the field.
    """
    r, alpha, dropout = config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0) or 0.0
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
        raise AdapterError(f"{path}: alpha_pattern must map layer patterns to positive numbers")
    for where, a in [("", alpha)] + [(f"alpha_pattern[{k!r}]: ", v) for k, v in patterns.items()]:
        try:
            check_lora_args(r, a, dropout, allow_zero_rank=False, where=where)
        except ValueError as e:
            raise AdapterError(f"{path}: {e}") from None
    for k in patterns:
        try:
            re.compile(k)
        except re.error as e:
            raise AdapterError(f"{path}: alpha_pattern key {k!r} is not a regular expression ({e})") from None
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{path}: use_rslora={config.get('use_rslora')!r} is not true or false")


def peft_specs(config: dict, tensors: Dict[str, torch.Tensor], model: nn.Module):
    """Turn a PEFT LoRA directory into loralib layer specs and tensors under loralib's keys.

    Args:
        config: the directory's checked config (:func:`check_peft_config`).
        tensors: its weights, under PEFT's keys.
        model: the model the adapter is loaded into (plain, or with LoRA layers).

    Returns:
        ``(specs, tensors)``: ``{layer name: spec}`` in the form of a loralib config's ``"layers"``, and the
        tensors under ``<layer>.lora_A`` / ``<layer>.lora_B``.

    Raises:
        AdapterError: DoRA, trained biases, an entry that is not a LoRA factor, or a convolution adapter.
    """
    if config.get("use_dora") or config.get("lora_bias") or (config.get("bias") not in (None, "none")):
        raise AdapterError("this PEFT adapter uses DoRA or trained biases, which loralib does not represent")
    modules = dict(model.named_modules())
    specs, out = {}, {}
    pat = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                     r"lora_embedding_B)")
    for key, t in tensors.items():
        m = pat.fullmatch(key)
        if not m:
            raise AdapterError(f"PEFT adapter entry {key!r} is not a LoRA A/B weight loralib can load")
        if t.dim() != 2 or 0 in t.shape:
            raise AdapterError(f"PEFT adapter entry {key!r} has shape {tuple(t.shape)}, not a non-empty matrix")
        name, part = m.groups()
        out[f"{name}.lora_{part.split('.')[0][-1]}"] = t  # lora_A.weight / lora_embedding_A -> A
    for key in [k for k in out if k.endswith(".lora_A")]:
        name = key[: -len(".lora_A")]
        module = modules.get(name)
        r = out[key].shape[0]
        alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        rslora = bool(config.get("use_rslora", False))
        if isinstance(module, LoRALayer):  # already adapted: its own class and layout
            kind = "conv" if isinstance(module, ConvLoRA) else None
            ltype, fan_in_fan_out = type(module).__name__, bool(getattr(module, "fan_in_fan_out", False))
        else:
            kind = layer_kind(module) if module is not None else None
            ltype, fan_in_fan_out = ("Embedding" if kind == "embedding" else "Linear"), kind == "conv1d_t"
        specs[name] = {
            "type": ltype,
            "r": r, "lora_alpha": alpha, "use_rslora": rslora,
            "scaling": alpha / math.sqrt(r) if rslora else alpha / r,
            "lora_dropout": float(config.get("lora_dropout", 0.0) or 0.0),
            "fan_in_fan_out": fan_in_fan_out,
            "from_peft": True,  # alpha and rsLoRA are PEFT's spelling of the scaling: compare the scaling only
        }
        if kind == "conv":
            raise AdapterError(f"{name!r}: PEFT convolution adapters cannot be represented by loralib's ConvLoRA")
    return specs, out
