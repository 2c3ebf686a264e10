"""Named adapters: several LoRA updates on the same layers, one active at a time (the multi-task case).

Every loralib layer with ``r > 0`` has the *default* adapter: its own ``lora_A`` / ``lora_B``, exactly as in
0.1.2, so default checkpoints keep 0.1.2's keys. :func:`add_adapter` gives each such layer a second (third, ...)
update, stored under ``<layer>.lora_adapters.<name>.lora_A`` / ``.lora_B``; a model with no added adapter has no
such key. :func:`set_adapter` picks the one that forward() and merge() use; a merged layer is unmerged before the
switch and merged again after it, so the frozen weight never holds two updates.
"""
import contextlib
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import ConvLoRA, Embedding, LoRALayer, MergedLinear, RowAdapters, adapter_factors, check_lora_args, \
    handles_rows, lora_layers
from .patterns import pattern_value

__all__ = ["add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "list_adapters", "batch_adapters"]

DEFAULT = "default"
INIT_MODES = ("kaiming", "gaussian", "zeros")


def lora_shapes(layer: LoRALayer, r: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The shapes of A and B of a rank-``r`` update for ``layer``, in the layout its class uses."""
    if isinstance(layer, Embedding):
        return (r, layer.num_embeddings), (layer.embedding_dim, r)
    if isinstance(layer, MergedLinear):
        n_on = sum(bool(e) for e in layer.enable_lora)
        return (r * n_on, layer.in_features), (layer.out_features // len(layer.enable_lora) * n_on, r)
    if isinstance(layer, ConvLoRA):
        ks = layer.conv.kernel_size
        k0, k_rest = ks[0], math.prod(ks[1:])
        conv = layer.conv
        return (r * k0, conv.in_channels * k_rest), (conv.out_channels // conv.groups * k0, r * k0)
    return (r, layer.in_features), (layer.out_features, r)


@torch.no_grad()
def init_lora(A: torch.Tensor, B: torch.Tensor, how: str, embedding: bool, r: int) -> None:
    """Initialise an update so that it starts at zero: B A = 0.

    ``"kaiming"``: loralib's choice (A Kaiming-uniform, B zero; for embeddings A zero, B normal).
    ``"gaussian"``: A ~ N(0, 1/r^2), B zero (PEFT's "gaussian"; embeddings as "kaiming").
    ``"zeros"``: A and B zero; the update stays zero under gradient descent, for layers that will be loaded into.
    """
    if how not in INIT_MODES:
        raise ValueError(f"init_lora_weights must be one of {INIT_MODES}, got {how!r}")
    if how == "zeros":
        A.zero_()
        B.zero_()
    elif embedding:
        A.zero_()
        nn.init.normal_(B)
    else:
        if how == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1.0 / r)
        B.zero_()


def default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision (bfloat16 / float16) frozen weight, else the weight's own dtype: an adapter
    trained in half precision loses the small updates that the optimizer makes to it."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def rslora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """``lora_alpha / sqrt(r)`` with rank-stabilised LoRA (Kalajdzievski, 2023), else loralib's ``lora_alpha / r``."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRAAdapter(nn.Module):
    """One named update of one layer: ``lora_A``, ``lora_B`` (the layer's layout), ``r``, ``lora_alpha``,
    ``scaling`` and its own ``lora_dropout``. Built by :func:`add_adapter`."""

    def __init__(self, layer: LoRALayer, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: str = "kaiming"):
        super().__init__()
        check_lora_args(r, lora_alpha, lora_dropout, allow_zero_rank=False)
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = rslora_scaling(lora_alpha, r, use_rslora)
        # loralib's Embedding has no LoRA dropout; keep that for its added adapters too.
        p = 0.0 if isinstance(layer, Embedding) else lora_dropout
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        w = layer.frozen_weight()
        a_shape, b_shape = lora_shapes(layer, r)
        # The dtype of the layer's own adapter (float32 on a half-precision base after inject), else the default.
        own = getattr(layer, "lora_A", None)
        dtype = own.dtype if isinstance(own, torch.Tensor) else default_adapter_dtype(w.dtype)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=w.device, dtype=dtype))
        init_lora(self.lora_A, self.lora_B, init_lora_weights, isinstance(layer, Embedding), r)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def _check_name(name) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"adapter name must be an identifier-like string without dots, got {name!r}")


def list_adapters(model: nn.Module) -> List[str]:
    """The adapter names ``model``'s LoRA layers hold: ``"default"`` first, then the added ones in order."""
    names = [DEFAULT]
    for _, layer in lora_layers(model):
        for n in getattr(layer, "lora_adapters", {}):
            if n not in names:
                names.append(n)
    return names


def _require_layers(model: nn.Module, what: str) -> List[Tuple[str, LoRALayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layer (r > 0); add some with "
                         "lora.inject(model, target_modules=...) or build it with loralib layers first")
    return layers


def add_adapter(model: nn.Module, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, *,
                rank_pattern: Optional[Dict[str, int]] = None, use_rslora: bool = False,
                init_lora_weights: str = "kaiming") -> List[str]:
    """Give every LoRA layer of ``model`` a new, inactive adapter ``name`` (activate it with :func:`set_adapter`).

    Args:
        model: a model with loralib layers (built with them, or after :func:`lora.inject`).
        name: the adapter's name, identifier-like, not ``"default"`` (the layers' own ``lora_A`` / ``lora_B``).
        r, lora_alpha, lora_dropout: the new update's rank, scale (``lora_alpha / r``) and dropout.
        rank_pattern: per-layer ranks, ``{pattern: r}``; a pattern matches a layer name exactly, as a dotted
            suffix, or as a regular expression over the whole name or a dotted suffix of it (PEFT's rule). The
            first matching pattern wins.
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``"kaiming"`` (loralib), ``"gaussian"`` or ``"zeros"``; see :func:`init_lora`.

    The new adapter takes the dtype of the layer's own ``lora_A`` (float32 on a half-precision model after
    :func:`lora.inject`).

    Returns:
        The names of the layers that got the adapter.

    Raises:
        ValueError: a bad or taken name, bad hyper-parameters, or a model without LoRA layers.
    """
    _check_name(name)
    if name == DEFAULT:
        raise ValueError("'default' is the layers' own lora_A / lora_B and always exists; pick another name")
    layers = _require_layers(model, "add_adapter")
    if name in list_adapters(model):
        raise ValueError(f"adapter {name!r} already exists; delete it first with lora.delete_adapter(model, {name!r})")
    built = []
    for lname, layer in layers:
        rank = pattern_value(rank_pattern, lname, r)
        check_lora_args(rank, lora_alpha, lora_dropout, allow_zero_rank=False, where=f"layer {lname!r}: ")
        built.append((lname, layer, LoRAAdapter(layer, rank, lora_alpha, lora_dropout, use_rslora, init_lora_weights)))
    for lname, layer, adapter in built:  # all built before any is attached: a bad argument changes nothing
        if not hasattr(layer, "lora_adapters"):
            layer.lora_adapters = nn.ModuleDict()
        adapter.train(layer.training)
        layer.lora_adapters[name] = adapter
    return [lname for lname, _, _ in built]


@torch.no_grad()
def _switch(layer: LoRALayer, name: str) -> None:
    was_merged = layer.merged
    layer.unmerge()  # takes the old adapter's update out of the weight
    layer.active_adapter = name
    if was_merged:
        layer.merge()


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter every LoRA layer of ``model`` uses, in forward() and when merging.

    Raises:
        ValueError: no adapter of that name (the message lists the ones there are).
    """
    layers = _require_layers(model, "set_adapter")
    known = list_adapters(model)
    missing = [n for n, layer in layers if name != DEFAULT and name not in getattr(layer, "lora_adapters", {})]
    if name not in known or missing:
        raise ValueError(f"no adapter {name!r} in {'layer ' + missing[0] if missing else 'the model'}; "
                         f"adapters: {known}")
    for _, layer in layers:
        _switch(layer, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; when it is the active one, ``"default"`` becomes active.

    Raises:
        ValueError: ``name`` is ``"default"`` (it is the layers' own parameters) or does not exist.
    """
    if name == DEFAULT:
        raise ValueError("the 'default' adapter is the layers' own lora_A / lora_B and cannot be deleted; "
                         "use lora.merge_and_unload(model) to drop LoRA altogether")
    layers = _require_layers(model, "delete_adapter")
    if name not in list_adapters(model):
        raise ValueError(f"no adapter {name!r}; adapters: {list_adapters(model)}")
    for _, layer in layers:
        if layer.active_adapter == name:
            _switch(layer, DEFAULT)
        adapters = getattr(layer, "lora_adapters", None)
        if adapters is not None and name in adapters:
            del adapters[name]
            if len(adapters) == 0:  # back to the exact 0.1.2 layout
                del layer.lora_adapters


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run ``model`` as its base model: inside the block every LoRA layer computes its frozen layer only.

    Merged layers are unmerged on entry and merged again on exit; ``model.eval()`` inside the block does not
    merge. Example::

        with lora.disable_adapters(model):
            base_logits = model(x)
    """
    layers = [layer for _, layer in lora_layers(model)]
    states = []
    for layer in layers:
        states.append((layer, layer.merged, layer.adapters_disabled))
        layer.unmerge()
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, was_merged, was_disabled in states:
            layer.adapters_disabled = was_disabled
            if not was_disabled and (was_merged or (layer.merge_weights and not layer.training)):
                layer.merge()


def _row_names(model: nn.Module, layers, names) -> List[Optional[str]]:
    """``names`` as a list, each an adapter every LoRA layer has, or None; raises ValueError naming the problem."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ValueError(f"lora.batch_adapters needs a list with one adapter name (or None) per row of the batch, "
                         f"got {type(names).__name__} {names!r}")
    names = list(names)
    if not names:
        raise ValueError("lora.batch_adapters got an empty list of adapter names; give one name (or None) per row")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise ValueError(f"lora.batch_adapters: {bad[0]!r} is not an adapter name (a str) or None")
    known = list_adapters(model)
    for name in dict.fromkeys(names):
        if name is not None and name not in known:
            raise ValueError(f"lora.batch_adapters: no adapter {name!r} in the model; adapters: {known}")
        for lname, layer in layers:
            if name is not None and adapter_factors(layer, name) is None:
                raise ValueError(f"lora.batch_adapters: layer {lname!r} has no adapter {name!r}; adapters: {known}")
    return names


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[Optional[str]]):
    """Run each row of a batch with its own adapter: row ``i`` (the first dimension of the input) uses adapter
    ``names[i]`` (``"default"``, an added adapter, or None for the base model), whatever adapter is active::

        with lora.batch_adapters(model, ["fr", "de", None, "fr"]):
            logits = model(x)  # x: (4, T)

    Every LoRA layer (Linear, MergedLinear, Embedding, Conv1d/2d/3d, injected ones too) computes its frozen layer
    once for the whole batch and adds each adapter's update to that adapter's rows; a convolution instead runs
    each row group with its own kernel ``W + delta`` (one convolution per row, as the base costs). Adapters of
    different ranks, alphas and dtypes mix. Each row's output equals what the model gives that row with
    ``set_adapter(model, names[i])`` (or inside ``disable_adapters`` for None), within float rounding, and so do
    the gradients of A and B (without dropout: a row's dropout mask is drawn differently).

    A merged model is unmerged on entry and merged again on exit (as ``disable_adapters`` does): per-row updates
    need the plain frozen weight. For serving, keep the model unmerged (``merge_weights=False`` or ``train()``
    under ``torch.no_grad()``), which makes entering the block free. On exit the active adapter and every layer's
    merged state are as before (``model.eval()`` inside the block merges on exit). Blocks nest: the inner one's
    names apply until it exits.

    Args:
        model: a model with loralib layers.
        names: one adapter name or None per row of every batch run inside the block.

    Raises:
        ValueError: ``names`` is not a list of names / None, names an adapter the model (or one of its layers)
            lacks, or a LoRA layer is a user class with its own forward; at forward time, a batch whose size is
            not ``len(names)``.
    """
    layers = _require_layers(model, "batch_adapters")
    for lname, layer in layers:
        if not handles_rows(layer):
            raise ValueError(f"lora.batch_adapters: layer {lname!r} is a {type(layer).__name__} with its own "
                             "forward, which knows nothing of per-row adapters; use loralib's layer classes")
    plan = RowAdapters(_row_names(model, layers, names), {id(layer): lname for lname, layer in layers})
    states = []
    for _, layer in layers:
        states.append((layer, layer.merged, layer.training, layer.row_adapters))
        layer.unmerge()
        layer.row_adapters = plan
    try:
        yield model
    finally:
        for layer, was_merged, was_training, previous in states:
            layer.row_adapters = previous
            if was_merged or (layer.merge_weights and was_training and not layer.training):
                layer.merge()


def adapter_state_dict(model: nn.Module, adapter: str) -> Dict[str, torch.Tensor]:
    """The factors of adapter ``adapter`` (``"default"``: the layers' own) under loralib 0.1.2's keys.

    Returns:
        ``{<layer>.lora_A: A, <layer>.lora_B: B}`` for every LoRA layer, the tensors detached (not copied).

    Raises:
        ValueError: a LoRA layer without that adapter, or a model without LoRA layers.
    """
    out = {}
    for name, m in lora_layers(model):
        src = adapter_factors(m, adapter)
        if src is None:
            raise ValueError(f"layer {name!r} has no adapter {adapter!r} (it has 'default'"
                             f"{''.join(', ' + repr(a) for a in getattr(m, 'lora_adapters', {}))})")
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = src.lora_A.detach()
        out[prefix + "lora_B"] = src.lora_B.detach()
    if not out:
        raise ValueError(f"{type(model).__name__} has no LoRA layer, so no adapter {adapter!r}")
    return out
