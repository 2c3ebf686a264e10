"""Add LoRA to a model you did not write, and take it out again.

:func:`inject` swaps chosen ``nn.Linear`` / ``nn.Embedding`` / ``nn.Conv1d/2d/3d`` layers (and GPT-2's ``Conv1D``,
whose weight is stored (in, out)) for the loralib layer of the same kind. The new layer adopts the old one's weight
and bias *Parameters* (same storage, device and dtype: nothing is copied) and gets a fresh LoRA update that starts at
zero, so the model computes exactly what it did before. :func:`merge_and_unload` folds the update into the weight
and puts plain layers back, so the result runs without loralib.
"""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .adapters import INIT_MODES, default_adapter_dtype, init_lora, rslora_scaling
from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, adapter_view, check_lora_args
from .patterns import matches, pattern_value

__all__ = ["inject", "merge_and_unload"]

_CONVS = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
_SUPPORTED = "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d and GPT-2's Conv1D"


def layer_kind(m: nn.Module) -> Optional[str]:
    """What inject can turn ``m`` into: ``"linear"``, ``"conv1d_t"`` (GPT-2's ``Conv1D``, weight (in, out)),
    ``"embedding"``, ``"conv"``, or None. Exact classes only: a subclass may compute something else
    (nn.MultiheadAttention's out_proj, an nn.Linear subclass, never runs its own forward)."""
    if type(m) is nn.Linear:
        return "linear"
    # transformers' GPT-2 Conv1D, recognised by name so that transformers is never imported here
    if type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2:
        return "conv1d_t"
    if type(m) is nn.Embedding:
        return "embedding"
    if type(m) in _CONVS:
        return "conv"
    return None


def _walk(module: nn.Module, prefix: str = ""):
    """named_modules() that does not look inside loralib layers (their ``conv`` child is not a candidate)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, LoRALayer):
            yield from _walk(child, full)


def _output_head_names(model: nn.Module, modules: Dict[str, nn.Module]) -> set:
    """Names of output heads, which "all-linear" leaves alone: the model's get_output_embeddings(), layers named
    lm_head, and linear layers whose weight is an input embedding's weight (tied)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in modules.items():
        if m is out or name.split(".")[-1] == "lm_head" or id(getattr(m, "weight", None)) in emb_weights:
            heads.add(name)
    return heads


def _describe(names: Sequence[str], limit: int = 12) -> str:
    kinds = sorted({n.split(".")[-1] for n in names})
    listed = ", ".join(list(names)[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"short names {kinds}; full names: {listed}"


def _select(model: nn.Module, target_modules, exclude_modules) -> List[str]:
    if isinstance(target_modules, (list, tuple, set)) and target_modules and all(
            isinstance(t, str) and t for t in target_modules):
        target_modules = list(target_modules)
    elif not (isinstance(target_modules, str) and target_modules):
        raise ValueError(f"target_modules must be a non-empty list of module names, a regex string, or "
                         f"'all-linear'; got {target_modules!r}")
    if exclude_modules is not None and not isinstance(exclude_modules, (str, list, tuple, set)):
        raise ValueError(f"exclude_modules must be a list of names or a regex string, got {exclude_modules!r}")
    modules = dict(_walk(model))
    candidates = [n for n, m in modules.items() if layer_kind(m) is not None]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no layer inject can adapt ({_SUPPORTED})")

    if target_modules == "all-linear":
        heads = _output_head_names(model, modules)
        chosen = [n for n in candidates if layer_kind(modules[n]) in ("linear", "conv1d_t") and n not in heads]
        if not chosen:
            raise ValueError(f"'all-linear': {type(model).__name__} has no linear layer besides its output head. "
                             f"Candidates: {_describe(candidates)}")
    else:
        matched = [n for n in modules if matches(n, target_modules)]
        already = [n for n in matched if isinstance(modules[n], LoRALayer)]
        if already:
            raise ValueError(f"{already[0]!r} is already a loralib layer; add a second update to it with "
                             "lora.add_adapter(model, name, ...) instead of injecting again")
        if isinstance(target_modules, list):
            # A name given explicitly must be a layer inject can adapt. (Names of containers, e.g. "attn",
            # and parameter-free leaves are not layers anyone means to adapt: they only count as unmatched.)
            for n in matched:
                m = modules[n]
                if layer_kind(m) is None and not list(m.children()) and list(m.parameters(recurse=False)):
                    raise ValueError(f"target {n!r} is a {type(m).__name__}, which inject cannot adapt "
                                     f"(supported: {_SUPPORTED}); remove it from target_modules")
        chosen = [n for n in matched if layer_kind(modules[n]) is not None]
        if isinstance(target_modules, list):
            unmatched = [t for t in target_modules if not any(matches(n, [t]) for n in chosen)]
        else:
            unmatched = [target_modules] if not chosen else []
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no layer of {type(model).__name__} that inject "
                             f"can adapt. Candidates: {_describe(candidates)}")
    if exclude_modules:
        chosen = [n for n in chosen if not matches(n, exclude_modules)]
        if not chosen:
            raise ValueError(f"exclude_modules={exclude_modules!r} leaves no layer to adapt. "
                             f"Candidates: {_describe(candidates)}")
    return chosen


def _shared_weights(model: nn.Module) -> set:
    """ids of Parameters reachable under more than one module path (tied weights, or a module used twice)."""
    seen, shared = set(), set()
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                if id(p) in seen:
                    shared.add(id(p))
                seen.add(id(p))
    return shared


def _make_layer(m: nn.Module, r: int, lora_alpha, lora_dropout: float, merge_weights: bool) -> LoRALayer:
    """A loralib layer built on the meta device (no memory), then given ``m``'s own Parameters."""
    kind, w = layer_kind(m), m.weight
    meta = dict(device="meta", dtype=w.dtype)
    lk = dict(r=r, lora_alpha=lora_alpha, merge_weights=merge_weights)
    if kind == "linear":
        layer = Linear(m.in_features, m.out_features, lora_dropout=lora_dropout, bias=m.bias is not None, **lk, **meta)
    elif kind == "conv1d_t":
        n_in, n_out = w.shape
        layer = Linear(n_in, n_out, lora_dropout=lora_dropout, fan_in_fan_out=True, bias=m.bias is not None,
                       **lk, **meta)
    elif kind == "embedding":
        layer = Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, max_norm=m.max_norm,
                          norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                          **lk, **meta)
    else:
        layer = _CONVS[type(m)](m.in_channels, m.out_channels, m.kernel_size, lora_dropout=lora_dropout,
                                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                                bias=m.bias is not None, padding_mode=m.padding_mode, **lk, **meta)
    if isinstance(layer, ConvLoRA):
        layer.conv = m  # the original convolution itself
    else:
        layer.weight = w
        if kind != "embedding":
            layer.bias = m.bias
    layer.frozen_weight().requires_grad = False
    # Where merge_and_unload puts things back; kept out of _modules so state_dict and .to() never see it.
    object.__setattr__(layer, "_lora_base_module", m)
    return layer


def inject(model: nn.Module, target_modules: Union[List[str], str], r: int = 8, lora_alpha: float = 8,
           lora_dropout: float = 0.0, exclude_modules: Union[List[str], str, None] = None, *,
           rank_pattern: Optional[Dict[str, int]] = None, alpha_pattern: Optional[Dict[str, float]] = None,
           use_rslora: bool = False, init_lora_weights: str = "kaiming", safe_merge: bool = False,
           merge_weights: bool = True, adapter_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Replace layers of ``model``, in place, by loralib layers that keep their weights and add a LoRA update.

    Args:
        model: any ``nn.Module``.
        target_modules: which layers: a list of names, each matching a module name exactly or as a dotted suffix
            (``"c_attn"`` matches ``transformer.h.0.attn.c_attn``); one string, matched the same way or as a
            regular expression over the whole name; or ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except
            the output head (``get_output_embeddings()``, ``lm_head``, or a layer tied to an input embedding).
        r, lora_alpha, lora_dropout: rank, scale (``lora_alpha / r``) and dropout of the update.
        exclude_modules: names or a regex (as ``target_modules``) to leave alone.
        rank_pattern, alpha_pattern: per-layer rank / alpha, ``{pattern: value}``, first match wins.
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
        init_lora_weights: ``"kaiming"`` (loralib's), ``"gaussian"`` or ``"zeros"``; the update starts at zero in
            every case, so outputs are unchanged.
        safe_merge: merging (``model.eval()``, :func:`merge_and_unload`) raises instead of writing NaN/Inf.
        merge_weights: as in loralib's layers, merge in eval mode. A target whose weight is tied to another
            module (GPT-2's ``wte`` and ``lm_head``) never merges in place, since the other module would change too;
            :func:`merge_and_unload` unties it, giving it its own merged weight.
        adapter_dtype: dtype of the new ``lora_A`` / ``lora_B``. ``None`` (default): float32 when the layer's
            weight is half precision (bfloat16 / float16), else the weight's dtype. A half-precision base with a
            float32 adapter trains the adapter in full precision while the frozen matmuls run in half precision;
            each layer's output keeps the base layer's dtype (or autocast's).

    Returns:
        The names of the replaced layers, in model order.

    Raises:
        ValueError: bad arguments, a target that matches nothing (the message lists the candidate layers), a
            target that is not a supported layer or is already a loralib layer.
    """
    if init_lora_weights not in INIT_MODES:
        raise ValueError(f"init_lora_weights must be one of {INIT_MODES}, got {init_lora_weights!r}")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise ValueError(f"adapter_dtype must be a floating-point torch.dtype (e.g. torch.float32) or None, "
                         f"got {adapter_dtype!r}")
    chosen = _select(model, target_modules, exclude_modules)
    modules = dict(_walk(model))
    tied = _shared_weights(model)
    seen = {}
    for name in chosen:
        other = seen.setdefault(id(modules[name]), name)
        if other != name:  # one module object reachable under two names: two LoRA layers would share one weight
            raise ValueError(f"{other!r} and {name!r} are the same module object; target only one of them")
    layers = {}
    for name in chosen:  # build everything first: a bad per-layer value leaves the model untouched
        rank = pattern_value(rank_pattern, name, r)
        alpha = pattern_value(alpha_pattern, name, lora_alpha)
        check_lora_args(rank, alpha, lora_dropout, allow_zero_rank=False, where=f"layer {name!r}: ")
        # A weight tied to another module (GPT-2's wte and lm_head) is never merged in place: the other module
        # would see the update too. Such a layer computes its update on the fly in eval mode as well.
        is_tied = id(modules[name].weight) in tied
        layers[name] = _make_layer(modules[name], rank, alpha, lora_dropout, merge_weights and not is_tied)
        layers[name]._lora_tied = is_tied
    for name, layer in layers.items():
        orig = modules[name]
        w = layer.frozen_weight()
        dtype = adapter_dtype or default_adapter_dtype(w.dtype)
        layer.lora_A = nn.Parameter(torch.empty(layer.lora_A.shape, device=w.device, dtype=dtype))
        layer.lora_B = nn.Parameter(torch.empty(layer.lora_B.shape, device=w.device, dtype=dtype))
        init_lora(layer.lora_A, layer.lora_B, init_lora_weights, isinstance(layer, Embedding), layer.r)
        layer.scaling = rslora_scaling(layer.lora_alpha, layer.r, use_rslora)
        layer.use_rslora = use_rslora
        layer.safe_merge = safe_merge
        layer.train(orig.training)  # in eval mode this merges a zero update: a no-op on the values
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return chosen


def injected_base(layer: LoRALayer) -> Optional[nn.Module]:
    """The module :func:`inject` replaced by ``layer`` (what :func:`merge_and_unload` puts back: a GPT-2 ``Conv1D``
    stays a ``Conv1D``), or None for a layer built with loralib's classes."""
    return getattr(layer, "_lora_base_module", None)


def _plain_layer(layer: LoRALayer) -> nn.Module:
    """A torch layer computing what the (merged) ``layer`` computes."""
    base = injected_base(layer)
    if isinstance(layer, ConvLoRA):
        return layer.conv
    if base is not None:  # put the injected module back (GPT-2's Conv1D stays a Conv1D), on the current tensors
        base.weight = layer.weight
        if hasattr(layer, "bias"):
            base.bias = layer.bias
        return base
    if isinstance(layer, Embedding):
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                             max_norm=layer.max_norm, norm_type=layer.norm_type,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse, device="meta")
        plain.weight = layer.weight
        return plain
    # Linear / MergedLinear: nn.Linear, with a fan_in_fan_out weight transposed into nn.Linear's (out, in) layout
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    if layer.fan_in_fan_out:
        plain.weight = nn.Parameter(layer.weight.detach().t().contiguous(), requires_grad=layer.weight.requires_grad)
    else:
        plain.weight = layer.weight
    plain.bias = layer.bias
    return plain


@torch.no_grad()
def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Fold each LoRA layer's active update into its weight and replace the layer by a plain torch layer.

    Layers that :func:`inject` created become the module they replaced (a GPT-2 ``Conv1D`` stays a ``Conv1D``);
    layers built with loralib's classes become ``nn.Linear`` (weight in (out, in) layout, transposed if
    ``fan_in_fan_out``), ``nn.Embedding`` or the ``nn.ConvNd`` inside. Other adapters are dropped. The result
    holds no loralib object: it can be saved and run without loralib installed.

    Args:
        model: the model, changed in place (a bare loralib layer cannot be replaced in place: it is returned).
        safe_merge: raise instead of merging an update that would put NaN/Inf in a weight.

    Returns:
        The model.

    Raises:
        ValueError: ``safe_merge`` and a non-finite merged weight (the model is left unchanged).
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    for name, layer in targets:  # check all before changing any
        if safe_merge and layer.r > 0 and layer.has_lora() and not layer.adapters_disabled:
            delta, w = adapter_view(layer, layer.active_adapter).delta_weight(), layer.frozen_weight()
            if not layer.merged:
                merged_w = w + delta.to(w.dtype)
            elif layer.merged_is_stale:  # changed while merged: the result will hold the current update
                merged_w = w - layer.merged_delta().to(w.dtype) + delta.to(w.dtype)
            else:
                merged_w = w
            if not torch.isfinite(merged_w).all():
                raise ValueError(f"safe_merge: the merged weight of {name or type(layer).__name__!r} has NaN/Inf; "
                                 "the adapter is broken, nothing was merged")
    plain_root = None
    for name, layer in targets:
        layer.adapters_disabled = False
        if layer.merged_is_stale:
            layer.unmerge()  # the adapter changed while merged: fold in its current update, not the old one
        if getattr(layer, "_lora_tied", False) and not layer.merged:
            # Untie: this layer gets its own merged weight; the module it shared the weight with keeps the old one.
            w, delta = layer.frozen_weight(), adapter_view(layer, layer.active_adapter).delta_weight()
            merged = nn.Parameter(w + delta.to(w.dtype), requires_grad=w.requires_grad)
            if isinstance(layer, ConvLoRA):
                layer.conv.weight = merged
            else:
                layer.weight = merged
            layer.merged = True
        layer.merge()
        plain = _plain_layer(layer)
        plain.train(layer.training)
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        else:
            plain_root = plain
    return plain_root if plain_root is not None else model
