"""LoRA layers: drop-in replacements for Microsoft's ``loralib==0.1.2`` layers.

Low-rank adaptation (Hu et al., 2021) freezes a pre-trained weight ``W`` and learns a low-rank update::

    h = W x + (lora_alpha / r) * B A x        A: (r, in), B: (out, r), B = 0 at init

so the adapted layer starts out equal to the frozen one. ``scaling = lora_alpha / r``. With
``merge_weights=True`` the update is folded into ``W`` when the layer enters eval mode (``W += scaling * B A``)
and taken back out when it returns to train mode, so merged inference costs exactly what the base layer costs.

Every class keeps 0.1.2's constructor signature, defaults, attribute names and state-dict keys, so code and
checkpoints move across unchanged. What differs (all of it fixes) is listed in the README.
"""
import itertools
import math
import numbers
import types
import warnings
from typing import Iterator, List, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRALayer", "Embedding", "Linear", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d"]


def check_lora_args(r, lora_alpha, lora_dropout, *, allow_zero_rank: bool = True, where: str = "") -> None:
    """The one check of LoRA hyper-parameters, shared by the layers, ``add_adapter``, ``inject`` (with its
    ``rank_pattern`` / ``alpha_pattern``) and the adapter configs that ``load_adapter`` reads.

    Args:
        r: the rank, an int (numpy ints too, not a bool): > 0, or 0 with ``allow_zero_rank`` (LoRA off).
        lora_alpha: a finite number > 0 (not a bool); not checked when ``r == 0``, which ignores it (as 0.1.2 did).
        lora_dropout: a number in [0, 1) (not a bool).
        allow_zero_rank: whether ``r = 0`` is allowed (a layer without LoRA); an added adapter needs ``r > 0``.
        where: prefixed to the message, e.g. ``"layer 'h.0.attn.c_attn': "``.

    Raises:
        ValueError: one line naming the first bad argument and its value.
    """
    # numbers.Integral / Real, not int / float: values read from numpy arrays or configs worked in 0.1.2.
    def real(x) -> bool:  # a finite real number, not a bool (an int too large for a float is not finite)
        try:
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
        except OverflowError:
            return False

    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise ValueError(f"{where}r must be an int (the LoRA rank), got r={r!r}")
    if r < (0 if allow_zero_rank else 1):
        want = ">= 0 (0 disables LoRA)" if allow_zero_rank else "a positive int (an adapter needs a rank)"
        raise ValueError(f"{where}r must be {want}, got r={r}")
    if r > 0 and not (real(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"{where}lora_alpha must be a positive finite number when r > 0, "
                         f"got lora_alpha={lora_alpha!r}")
    if not (real(lora_dropout) and 0.0 <= lora_dropout < 1.0):
        raise ValueError(f"{where}lora_dropout must be a number in [0, 1), got lora_dropout={lora_dropout!r}")


# --- state-dict hooks --------------------------------------------------------------------------------------------
# A merged layer holds W + scaling*BA in its weight. Checkpoints must always carry the plain W, or loading them
# into a fresh (unmerged) model would apply the update twice. Module-level functions, so modules stay picklable.

def _ours(module) -> bool:
    # User classes built on LoRALayer (as 0.1.2 allowed) keep their own merge logic: leave them alone.
    return type(module).delta_weight is not LoRALayer.delta_weight


def _save_unmerged_weight(module, state_dict, prefix, local_metadata):
    if not _ours(module):
        return
    if module.merged:
        key = prefix + module._weight_key
        delta = module.merged_delta()  # what merge() added, even if the adapter changed since
        if delta is not None:
            state_dict[key] = (state_dict[key] - delta.to(state_dict[key].dtype)).detach()


def _unmerge_before_load(module, state_dict, prefix, *args):
    # Loading replaces W and/or A, B: take the old update out first, put the new one in after (post hook).
    module._remerge_after_load = module.merged and _ours(module)
    if module._remerge_after_load:
        module.unmerge()


def _remerge_after_load(module, incompatible_keys):
    if getattr(module, "_remerge_after_load", False):
        module._remerge_after_load = False
        module.merge()


class LoRALayer():
    """Mixin holding the LoRA hyper-parameters shared by every layer.

    Args:
        r: rank of the update; 0 makes the layer a plain torch layer with no LoRA parameters.
        lora_alpha: the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout probability applied to the input of the LoRA path only.
        merge_weights: fold the update into the frozen weight in eval mode, unfold it in train mode.

    Raises:
        ValueError: for a negative or non-integer ``r``, a non-positive ``lora_alpha`` when ``r > 0``,
            or ``lora_dropout`` outside [0, 1) (:func:`check_lora_args`).

    The layer protocol, the only part of a layer the other loralib modules use: the attributes ``r``,
    ``lora_alpha``, ``scaling``, ``lora_dropout``, ``lora_A``, ``lora_B``, ``merged``, ``merge_weights``,
    ``active_adapter``, ``adapters_disabled``, ``safe_merge``; the methods :meth:`has_lora`,
    :meth:`frozen_weight` (``W``), :meth:`delta_weight` (``scaling * B A`` in ``W``'s layout), :meth:`merge`,
    :meth:`unmerge`, :meth:`merged_delta` (what is merged now); the properties :attr:`merged_is_stale` and
    :attr:`row_adapters`. A layer class of your own (an ``nn.Module`` and a LoRALayer) registers ``lora_A``,
    ``lora_B`` and ``scaling`` when ``r > 0``, provides ``delta_weight`` (and ``frozen_weight`` when its weight is
    not ``self.weight``), adds the update in ``forward`` unless ``merged``, and in ``train(mode)`` calls
    ``unmerge()`` (mode True) or ``merge()`` (False) when ``merge_weights``. Merging, unmerging exactly what was
    merged, the unmerged state dict, ``merged_delta`` and ``merged_is_stale`` then work as for loralib's classes
    (``tests/test_protocol.py``); per-row adapters and named adapters' forward need loralib's own classes.
    """

    _weight_key = "weight"  # where the frozen weight lives in this module's state dict
    # Named adapters (loralib/adapters.py). Class-level defaults, so every layer, however built, behaves as in
    # 0.1.2 until an adapter is added: the default adapter is the layer's own lora_A / lora_B.
    active_adapter = "default"
    adapters_disabled = False
    safe_merge = False  # when True, merge() refuses a merged weight with NaN/Inf (set by lora.inject)
    _lora_merged_update = None  # a _MergedUpdate while merged (class default: layers pickled by older versions)
    _lora_rows = None  # a RowAdapters inside lora.batch_adapters: each row of the batch its own adapter

    def __init__(self, r: int, lora_alpha: int, lora_dropout: float, merge_weights: bool):
        check_lora_args(r, lora_alpha, lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        # A module even when disabled, so that deepcopy / torch.save(model) work (0.1.2 used a lambda).
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        if isinstance(self, nn.Module):
            self.register_state_dict_post_hook(_save_unmerged_weight)
            self.register_load_state_dict_pre_hook(_unmerge_before_load)
            self.register_load_state_dict_post_hook(_remerge_after_load)

    # --- the layer protocol: what the rest of loralib (adapters, inject, save/load, PEFT export) uses of a layer.
    # A layer class built on LoRALayer provides delta_weight() (and frozen_weight() when its weight is not
    # self.weight); the rest is derived here.

    def has_lora(self) -> bool:
        """Whether this layer (or adapter view) holds LoRA factors ``lora_A`` / ``lora_B`` (False for ``r = 0``,
        and for a MergedLinear with no enabled group)."""
        return hasattr(self, "lora_A")

    def delta_weight(self) -> torch.Tensor:
        """The update ``delta W = scaling * B A`` as a dense tensor in the frozen weight's shape and layout,
        computed from the factors this object holds (the layer's own, or an adapter's when called on
        :func:`adapter_view`), in the factors' dtype. Each layer class implements it.

        Raises:
            NotImplementedError: a class built on LoRALayer that does not provide it (0.1.2-style user layers,
                which keep their own merge logic).
        """
        raise NotImplementedError

    def frozen_weight(self) -> torch.Tensor:
        """The pre-trained weight ``W`` the update is added to (the Parameter itself; while :attr:`merged` it
        holds ``W`` plus :meth:`merged_delta`)."""
        return self.weight

    @property
    def merged_is_stale(self) -> bool:
        """True when the layer is merged and the adapter it merged changed since (an optimizer step or an edit in
        eval mode, or the adapter was deleted): eval outputs use the update of merge time."""
        snapshot = self._lora_merged_update if self.merged else None
        return snapshot is not None and snapshot.changed(adapter_factors(self, snapshot.adapter))

    @property
    def row_adapters(self) -> Optional["RowAdapters"]:
        """Inside ``lora.batch_adapters``: the :class:`RowAdapters` plan saying which adapter each row of the batch
        uses; None outside (the active adapter applies to every row). Set only by ``batch_adapters``."""
        return self._lora_rows

    @row_adapters.setter
    def row_adapters(self, plan: Optional["RowAdapters"]) -> None:
        self._lora_rows = plan

    def _lora_view(self):
        """The active adapter as an object this layer's own methods run on: ``self`` for the default adapter."""
        return adapter_view(self, self.active_adapter)

    def _forward_other(self, x):
        # Per-row adapters, a named adapter active, or adapters disabled: run this class's forward on a view.
        if self._lora_rows is not None and not self.adapters_disabled:
            return self._forward_rows(x)
        view = _AdapterView(self, None if self.adapters_disabled else self.lora_adapters[self.active_adapter])
        return type(self).forward(view, x)

    def _lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B A drop(x)`` alone, for layers whose update adds to the base output (not convolutions);
        those also define ``_base_forward(x)``, the frozen layer alone."""
        raise NotImplementedError

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Inside ``lora.batch_adapters``: row ``i`` of ``x`` (its first dimension) gets the update of adapter
        ``names[i]``, or none for ``None``; see :class:`RowAdapters` for how rows are grouped."""
        plan = self._lora_rows
        plan.check(self, x)
        order = plan.order(x.device)
        views = plan.views(self)
        if type(self)._lora_update is LoRALayer._lora_update:
            # A convolution's update is a kernel: each row group runs one convolution with its own W + delta,
            # which costs what the base convolution costs, instead of the base for all rows plus a delta conv.
            xs = x if order is None else x.index_select(0, order[0])  # (B, ...) in adapter order
            out = torch.cat([type(self).forward(view, xs[rows]) for _, rows, view in views])
            return out if order is None else out.index_select(0, order[1])
        result = self._base_forward(x)  # the frozen layer once for the whole batch
        if order is None:
            for name, rows, view in views:
                if name is not None:
                    result[rows].add_(type(self)._lora_update(view, x[rows]))  # in the wider dtype, rounded once
            return result
        # Interleaved rows: each adapter gathers its own rows and adds its update back to them in place.
        for name, rows, view in views:
            if name is not None:
                idx = order[0][rows]  # (n,) the batch rows of this adapter
                update = type(self)._lora_update(view, x.index_select(0, idx))
                if update.dtype == result.dtype:
                    result.index_add_(0, idx, update)
                else:  # e.g. float32 factors on a bf16 base: sum in the wider dtype, round once to the result's
                    result.index_copy_(0, idx, (result.index_select(0, idx) + update).to(result.dtype))
        return result

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * B A`` (of the active adapter) into the frozen weight. Merging a merged layer, or a
        layer inside ``lora.disable_adapters`` or ``lora.batch_adapters``, is a no-op.

        Raises:
            ValueError: ``safe_merge`` is set and the merged weight would contain NaN or Inf.
        """
        if not self.merged and not self.adapters_disabled and self._lora_rows is None:
            lora = self._lora_view()
            snapshot = None
            if lora.r > 0 and lora.has_lora():
                w = self.frozen_weight()
                snapshot = _MergedUpdate(lora, self.active_adapter)
                delta = snapshot.delta(self, w.device).to(w.dtype)
                if self.safe_merge and not torch.isfinite(w + delta).all():
                    raise ValueError(f"safe_merge: merging adapter {self.active_adapter!r} into this "
                                     f"{type(self).__name__} would put NaN/Inf in its weight; the adapter is "
                                     "broken (check the learning rate / loss scaling), the layer stays unmerged")
                w.add_(delta)
            self._lora_merged_update = snapshot
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take out of the frozen weight exactly the update :meth:`merge` put in, even if ``lora_A``, ``lora_B`` or
        ``scaling`` changed in between (an optimizer step or an edit in eval mode); that case warns once per layer,
        since eval-mode outputs did not see the change. Unmerging an unmerged layer is a no-op.

        In float32 the weight comes back within rounding of ``(W + d) - d`` (about one ulp of ``|W| + |d|``); in
        float16 / bfloat16 that rounding is the half-precision ulp, since the low bits ``W + d`` lost cannot be
        recovered without keeping a dense copy of the weight.
        """
        if self.merged:
            delta = self.merged_delta()
            if delta is not None:
                w = self.frozen_weight()
                snapshot = self._lora_merged_update
                if snapshot is not None and not getattr(self, "_lora_warned_stale", False) \
                        and snapshot.changed(adapter_factors(self, snapshot.adapter)):
                    self._lora_warned_stale = True
                    warnings.warn(
                        "a LoRA adapter changed while merged into its layer's weight (an optimizer step or an edit "
                        "of lora_A / lora_B / scaling in eval mode): eval-mode outputs did not use the change. "
                        "unmerge() took out the update that was merged, so the frozen weight is intact; call "
                        "model.train() before changing the adapter", UserWarning, stacklevel=3)
                w.sub_(delta.to(w.dtype))
            self._lora_merged_update = None
            self.merged = False

    def merged_delta(self) -> Optional[torch.Tensor]:
        """The update folded into :meth:`frozen_weight` now, which :meth:`unmerge` will subtract: the update of
        merge time even if the adapter changed since (see :attr:`merged_is_stale`), in the adapter's dtype; None
        when the layer is not merged or merged nothing."""
        if not self.merged:
            return None
        snapshot = self._lora_merged_update
        if snapshot is not None:
            return snapshot.delta(self, self.frozen_weight().device)
        # Merged by a loralib without snapshots (an old pickle): the current factors are all there is.
        lora = self._lora_view()
        if lora.r > 0 and lora.has_lora():
            return lora.delta_weight()
        return None

    def _train_merge(self, mode: bool) -> None:
        if self.merge_weights:
            if mode:
                self.unmerge()
            else:
                self.merge()


class _MergedUpdate:
    """What :meth:`LoRALayer.merge` folded into a weight: copies of the factors A and B (r x (in + out) numbers,
    never the dense out x in update) and the scale. :meth:`LoRALayer.unmerge` recomputes the update from these, so
    it takes out the same bits merge put in, whatever happened to the live adapter in between.

    A plain attribute, not a buffer: it adds no state-dict key (0.1.2's keys stay exact) and no buffer for DDP to
    broadcast. Its tensors move to the weight's device when used; they keep the adapter's dtype of merge time.
    """

    __slots__ = ("adapter", "r", "lora_alpha", "scaling", "lora_dropout", "lora_A", "lora_B")

    def __init__(self, lora, adapter: str):
        self.adapter = adapter
        self.r, self.lora_alpha, self.scaling = lora.r, lora.lora_alpha, lora.scaling
        self.lora_dropout = nn.Identity()
        self.lora_A = lora.lora_A.detach().clone()
        self.lora_B = lora.lora_B.detach().clone()

    def delta(self, layer, device) -> torch.Tensor:
        """The dense update, computed by ``layer``'s own ``delta_weight`` on these factors, on ``device``."""
        if self.lora_A.device != device:
            self.lora_A, self.lora_B = self.lora_A.to(device), self.lora_B.to(device)
        return _AdapterView(layer, self).delta_weight()

    def changed(self, source) -> bool:
        """Whether ``source`` (a layer or a named adapter) no longer holds these factors and scale."""
        if source is None:  # the adapter was deleted
            return True
        a, b = source.lora_A, source.lora_B
        return (source.scaling != self.scaling or a.shape != self.lora_A.shape or b.shape != self.lora_B.shape
                or not torch.equal(self.lora_A.to(a.device, a.dtype), a.detach())
                or not torch.equal(self.lora_B.to(b.device, b.dtype), b.detach()))


class _AdapterView:
    """Reads as ``layer`` except for the LoRA attributes, which come from the named adapter ``adapter``; methods of
    the layer's class run with the view as ``self``, so the layer's own code computes with that adapter.
    ``adapter=None`` reads as a merged layer, which sends every forward down its plain base-layer path (used while
    adapters are disabled, when the layer is never merged).
    """

    _FROM_ADAPTER = frozenset(("r", "lora_alpha", "scaling", "lora_dropout", "lora_A", "lora_B"))

    def __init__(self, layer, adapter):
        self._layer, self._adapter = layer, adapter

    def __getattr__(self, name):
        layer, adapter = self._layer, self._adapter
        if name in ("active_adapter", "adapters_disabled", "_lora_rows"):
            return getattr(LoRALayer, name)  # the view itself is the default, enabled case: no recursion
        if adapter is None and name == "merged":
            return True
        if adapter is not None and name in self._FROM_ADAPTER:
            return getattr(adapter, name)
        attr = getattr(type(layer), name, None)
        if isinstance(attr, types.FunctionType):
            return attr.__get__(self)  # a method: bind it to the view
        return getattr(layer, name)


# --- finding LoRA layers, adapters and tensors by type ------------------------------------------------------------

def lora_layers(model: nn.Module) -> Iterator[Tuple[str, LoRALayer]]:
    """(qualified name, layer) for every loralib layer in ``model`` that carries a LoRA update (r > 0)."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer) and m.r > 0 and m.has_lora():
            yield name, m


def lora_names(model: nn.Module) -> Set[str]:
    """Qualified names (as ``named_parameters()`` and ``state_dict()`` give them) of ``model``'s LoRA tensors.

    A tensor is LoRA when a :class:`LoRALayer` registers it under an attribute whose name starts with ``lora_``
    (``lora_A``, ``lora_B``, ``lora_adapters.<name>.*``), under every path the layer is reachable by. Layers are
    found by type, so a user module whose name merely contains ``lora_`` (``explora_head``) is not LoRA.
    """
    names = set()
    for prefix, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, LoRALayer):
            for local, _ in itertools.chain(m.named_parameters(remove_duplicate=False),
                                            m.named_buffers(remove_duplicate=False)):
                if local.startswith("lora_"):
                    names.add(f"{prefix}.{local}" if prefix else local)
    return names


def adapter_factors(layer: LoRALayer, adapter: str):
    """The object holding adapter ``adapter`` of ``layer`` (its ``r``, ``lora_alpha``, ``scaling``,
    ``lora_dropout``, ``lora_A``, ``lora_B``): the layer itself for ``"default"``, else
    ``layer.lora_adapters[adapter]`` (see ``loralib/adapters.py``).

    Returns:
        That object, or None when the layer has no such adapter.
    """
    if adapter == "default":
        return layer
    adapters = getattr(layer, "lora_adapters", None)
    return adapters[adapter] if adapters is not None and adapter in adapters else None


def adapter_view(layer: LoRALayer, adapter: str):
    """``layer`` computing with adapter ``adapter``: the layer itself for ``"default"``, else a view on which the
    layer's own methods (``delta_weight``, ``forward``, ...) use that adapter's factors.

    Raises:
        KeyError: the layer has no adapter ``adapter``.
    """
    if adapter == "default":
        return layer
    return _AdapterView(layer, layer.lora_adapters[adapter])


# --- the fused LoRA linear path ---------------------------------------------------------------------------------
# Mixed precision: the frozen weight may be half precision (bfloat16 / float16) while lora_A / lora_B stay float32
# (inject's default on a half-precision model). The base matmul then runs in the weight's dtype, as the frozen
# layer's own would, and the LoRA path in the adapter's dtype: x is cast to it (one (N, in) copy, which dropout
# makes anyway), and the (N, out) update is added to the base output in float32 and rounded once.

def _dropout_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """Dropout's drop-mask with probability ``p`` as a bool tensor (True where an element is dropped).

    Drawn once in forward and saved for backward: one byte per input element, a quarter of the dropped float32
    copy of x that a plain autograd graph keeps. From a generator seeded with ``seed`` (one draw of torch's global
    RNG), so ``torch.manual_seed`` reproduces it and the global stream advances as in earlier releases, which drew
    the mask this way twice and kept no mask. The 1 / (1 - p) rescaling is left to the caller, which applies it to
    an (N, r) tensor instead of an (N, in) one.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) < p


def _lora_input(x2: torch.Tensor, dtype: torch.dtype, drop: Optional[torch.Tensor]) -> torch.Tensor:
    """``x2`` with the ``drop`` positions zeroed (or ``x2``) in the adapter's ``dtype``, allocating one (N, in)
    tensor at most."""
    if drop is None:
        return x2.to(dtype)  # the tensor itself when the dtypes agree
    if x2.dtype == dtype:
        return x2.masked_fill(drop, 0.0)
    return x2.to(dtype).masked_fill_(drop, 0.0)


def _add_update(result2: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """``result2 += scaling * h B^T`` in place; ``result2`` is (N, out) in the base dtype, ``h`` and ``B`` in the
    adapter's."""
    if result2.dtype == h.dtype:
        result2.addmm_(h, lora_B.t(), alpha=scaling)  # no (N, out) temporary
    else:
        result2.add_(torch.mm(h, lora_B.t()).mul_(scaling))  # summed in the wider dtype, rounded once


class _LoRALinearFn(torch.autograd.Function):
    """y = x W^T + b + scaling * drop(x) A^T B^T, saving x (already alive), the (N, r) intermediate and, with
    dropout, a one-byte-per-element mask.

    A plain autograd graph would also keep the dropped copy of x (and a mask) for backward. With keep-mask M,
    drop(x) A^T = ((x * M) A^T) / (1 - p): the rescaling acts on the (N, r) intermediate, and backward reuses the
    saved mask for both the input gradient and A's. The gradients of A and B come out in the adapter's dtype, that
    of x (and W, b) in theirs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed):
        result = F.linear(x, weight, bias)  # the frozen matmul: one call, as the base layer makes it
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        drop = _dropout_mask(x2.shape, p, seed, x.device) if p > 0 else None  # (N, in) bool
        h = _lora_input(x2, lora_A.dtype, drop) @ lora_A.t()  # (N, r), adapter dtype
        if p > 0:
            h.mul_(1.0 / (1.0 - p))
        _add_update(result.view(-1, result.shape[-1]), h, lora_B, scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, h, drop)
        ctx.scaling, ctx.p, ctx.has_bias = scaling, p, bias is not None
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, h, drop = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out), base dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        need = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        ga = g.to(lora_B.dtype) if (need[0] or need[3] or need[4]) else None  # g in the adapter's dtype
        if need[0] or need[3]:
            # Gradient at drop(x) A^T, already carrying dropout's 1 / (1 - p): (N, r)
            gh = (ga @ lora_B).mul_(s / (1.0 - p) if p > 0 else s)
        if need[0]:
            gdx = gh @ lora_A  # (N, in), adapter dtype
            if drop is not None:
                gdx.masked_fill_(drop, 0.0)
            if gdx.dtype == x.dtype:
                grad_x = gdx.addmm_(g, weight).view(x.shape)
            else:
                grad_x = torch.mm(g, weight).add_(gdx).view(x.shape)  # in x's dtype, as the base layer's
        if need[1]:
            grad_w = g.t() @ x2
        if need[2] and ctx.has_bias:
            grad_b = g.sum(0)
        if need[3]:
            grad_A = gh.t() @ _lora_input(x2, lora_A.dtype, drop)
        if need[4]:
            grad_B = (ga.t() @ h).mul_(s)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None


def _lora_linear(layer, x: torch.Tensor, weight: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """The unmerged forward of Linear/MergedLinear. ``lora_B`` is (out, R), ``weight`` is (out, in)."""
    dropout = layer.lora_dropout
    p = dropout.p if (isinstance(dropout, nn.Dropout) and dropout.training) else 0.0
    if torch.is_autocast_enabled(x.device.type):
        # Autocast picks each matmul's dtype; out-of-place ops, so that autograd tracks the casts it inserts.
        result = F.linear(x, weight, layer.bias)
        h = F.linear(dropout(x), layer.lora_A)
        return result + F.linear(h, lora_B) * layer.scaling
    if torch.is_grad_enabled():
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return _LoRALinearFn.apply(x, weight, layer.bias, layer.lora_A, lora_B, layer.scaling, p, seed)
    # Inference: add the scaled update into the base output (no (N, out) temporary when the dtypes agree).
    result = F.linear(x, weight, layer.bias)
    h = F.linear(_lora_input(dropout(x), layer.lora_A.dtype, None), layer.lora_A)
    _add_update(result.view(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B, layer.scaling)
    return result


def _linear_update(layer, x: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """``scaling * drop(x) A^T B^T`` of Linear/MergedLinear in the adapter's dtype; ``lora_B`` is (out, R)."""
    h = F.linear(_lora_input(layer.lora_dropout(x), layer.lora_A.dtype, None), layer.lora_A)
    return F.linear(h, lora_B).mul_(layer.scaling)  # F.linear's backward does not need its output


# --- several adapters in one batch ------------------------------------------------------------------------------

class RowAdapters:
    """Which adapter each row of a batch uses, inside ``lora.batch_adapters``: the rows grouped per adapter once,
    when the block starts, so that a layer's forward loops over adapters, never over rows.

    When each adapter's rows are consecutive, every group is a slice of the batch (views, updated in place).
    Otherwise a layer gathers its input once into adapter order (``perm``), where every group is a slice again,
    and gathers the updates back once (``inv``): two copies per layer, however many adapters.

    Args:
        names: one entry per row (the first dimension of every LoRA layer's input): an adapter name, or None for
            the base model.
        layer_names: ``{id(layer): qualified name}``, for error messages.
    """

    def __init__(self, names: List[Optional[str]], layer_names):
        self.size = len(names)
        self.layer_names = layer_names
        rows = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)  # name (None: the base) -> its rows, in order of first appearance
        order = [i for group in rows.values() for i in group]
        self.slices, start = [], 0  # (name, slice of the batch in adapter order)
        for name, group in rows.items():
            self.slices.append((name, slice(start, start + len(group))))
            start += len(group)
        self._order = None if order == list(range(self.size)) else order
        self._on_device = {}
        self._views = {}  # id(layer) -> [(name, rows, view)], built at the layer's first forward in the block

    def views(self, layer) -> List[Tuple[Optional[str], slice, "_AdapterView"]]:
        """Per adapter group: its name, its slice of the batch in adapter order, and ``layer`` computing with it
        (built once per layer and block: a generation step reuses them)."""
        views = self._views.get(id(layer))
        if views is None:
            views = [(name, rows, _AdapterView(layer, None if name is None else adapter_factors(layer, name)))
                     for name, rows in self.slices]
            self._views[id(layer)] = views
        return views

    def order(self, device):
        """``(perm, inv)`` LongTensors on ``device``: ``x[perm]`` is the batch in adapter order and ``u[inv]``
        puts rows in adapter order back; None when the rows already are in adapter order."""
        if self._order is None:
            return None
        key = str(device)
        if key not in self._on_device:
            perm = torch.tensor(self._order, dtype=torch.long, device=device)
            self._on_device[key] = (perm, torch.empty_like(perm).scatter_(0, perm, torch.arange(
                self.size, device=device)))
        return self._on_device[key]

    def check(self, layer, x: torch.Tensor) -> None:
        """Raises ValueError when ``x``'s first dimension is not the number of names."""
        if x.dim() == 0 or x.shape[0] != self.size:
            where = self.layer_names.get(id(layer), type(layer).__name__)
            raise ValueError(f"lora.batch_adapters got {self.size} adapter names but layer {where!r} got a batch "
                             f"of {x.shape[0] if x.dim() else 0} rows (the first dimension of its input, "
                             f"shape {tuple(x.shape)}); give one name (or None) per row")


class Embedding(nn.Embedding, LoRALayer):
    """``nn.Embedding`` with a LoRA update: ``E[x] + scaling * (A^T)[x] B^T``. A: (r, num_embeddings), B: (dim, r).

    As in 0.1.2, A starts at zero and B normal, so the layer starts equal to the plain embedding.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: int = 1,
                 merge_weights: bool = True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0, merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).t() * self.scaling

    def train(self, mode: bool = True):
        nn.Embedding.train(self, mode)
        self._train_merge(mode)
        return self

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Embedding.forward(self, x)

    def _lora_update(self, x: torch.Tensor) -> torch.Tensor:
        after_A = F.embedding(x, self.lora_A.t(), self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)
        return (after_A @ self.lora_B.t()) * self.scaling

    def forward(self, x: torch.Tensor):
        if self.active_adapter != "default" or self.adapters_disabled or self._lora_rows is not None:
            return self._forward_other(x)
        if self.r == 0 or self.merged:
            return nn.Embedding.forward(self, x)
        result = nn.Embedding.forward(self, x)
        after_A = F.embedding(x, self.lora_A.t(), self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)
        # The frozen embedding's dtype, as the plain layer gives (a float32 update on a bfloat16 table is summed
        # in float32 and rounded once).
        return (result + (after_A @ self.lora_B.t()) * self.scaling).to(result.dtype)


class Linear(nn.Linear, LoRALayer):
    """``nn.Linear`` with a LoRA update. A: (r, in_features) Kaiming-uniform, B: (out_features, r) zeros.

    Args:
        fan_in_fan_out: the weight is stored (in, out), as in GPT-2's ``Conv1D``; set it when loading such weights.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0., fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.t().contiguous()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
            nn.init.zeros_(self.lora_B)

    def _T(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self) -> torch.Tensor:
        return self._T(self.lora_B @ self.lora_A) * self.scaling

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._train_merge(mode)
        return self

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._T(self.weight), bias=self.bias)

    def _lora_update(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_update(self, x, self.lora_B)

    def forward(self, x: torch.Tensor):
        if self.active_adapter != "default" or self.adapters_disabled or self._lora_rows is not None:
            return self._forward_other(x)
        if self.r == 0 or self.merged:
            return F.linear(x, self._T(self.weight), bias=self.bias)
        return _lora_linear(self, x, self._T(self.weight), self.lora_B)


class MergedLinear(nn.Linear, LoRALayer):
    """A fused projection (e.g. GPT-2's q|k|v) whose output splits into ``len(enable_lora)`` equal groups; each
    group with ``enable_lora[i]`` gets its own rank-r update. A: (r * n_enabled, in), B: (out / len * n_enabled, r).

    The update is computed on the input (x A^T, then a block-diagonal B), never as a dense out x in matrix.

    Raises:
        ValueError: as :class:`LoRALayer`, or ``enable_lora`` is not a list of bools whose length divides
            ``out_features``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0., enable_lora: List[bool] = [False], fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        try:
            enable_lora = [bool(e) for e in enable_lora]
        except TypeError:
            raise ValueError(f"enable_lora must be a list of bools, one per output group, "
                             f"got enable_lora={enable_lora!r}") from None
        if len(enable_lora) == 0 or out_features % len(enable_lora) != 0:
            raise ValueError(f"len(enable_lora) must divide out_features: got enable_lora={enable_lora} "
                             f"(len {len(enable_lora)}) for out_features={out_features}")
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            n_on = sum(bool(e) for e in enable_lora)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * n_on, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features // len(enable_lora) * n_on, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            # Non-persistent buffers: they follow .to(device) but add no state-dict key (0.1.2 had none).
            ind = torch.zeros((len(enable_lora), out_features // len(enable_lora)), dtype=torch.bool)
            ind[[bool(e) for e in enable_lora], :] = True
            self.register_buffer("lora_ind", ind.view(-1), persistent=False)
            groups = torch.tensor([i for i, e in enumerate(enable_lora) if e], dtype=torch.long)
            self.register_buffer("_lora_groups", groups, persistent=False)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.t().contiguous()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _T(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w

    def expanded_B(self) -> torch.Tensor:
        """B as one (out_features, r * n_enabled) matrix: each enabled group's block of B on the diagonal, zero rows
        for the disabled groups, so that ``expanded_B() @ lora_A`` is the unscaled update of the whole output (the
        form PEFT stores for a fused projection)."""
        n_on, n_all = len(self._lora_groups), len(self.enable_lora)
        per_group = self.out_features // n_all
        blocks = torch.block_diag(*self.lora_B.split(per_group))  # (per_group * n_on, r * n_on)
        full = blocks.new_zeros((n_all, per_group, self.r * n_on))
        return full.index_copy(0, self._lora_groups, blocks.view(n_on, per_group, -1)).view(self.out_features, -1)

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        """Scatter rows of the enabled groups into a zero tensor of out_features rows (0.1.2's helper)."""
        result = x.new_zeros((len(self.lora_ind), *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def merge_AB(self) -> torch.Tensor:
        """The unscaled dense update B A in the weight's storage layout (0.1.2's helper, kept for user code)."""
        return self._T(self.expanded_B() @ self.lora_A)

    def delta_weight(self) -> torch.Tensor:
        return self.merge_AB() * self.scaling

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._train_merge(mode)
        return self

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._T(self.weight), bias=self.bias)

    def _lora_update(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_update(self, x, self.expanded_B())

    def forward(self, x: torch.Tensor):
        if self.active_adapter != "default" or self.adapters_disabled or self._lora_rows is not None:
            return self._forward_other(x)
        if self.merged or not self.has_lora():
            return F.linear(x, self._T(self.weight), bias=self.bias)
        return _lora_linear(self, x, self._T(self.weight), self.expanded_B())


class ConvLoRA(nn.Module, LoRALayer):
    """A convolution (``self.conv``) with a LoRA update of its kernel, reshaped from B A.

    For kernel size (k0, *rest), A is (r * k0, in_channels * prod(rest)) and B is (out_channels / groups * k0,
    r * k0); for a square Conv2d these are 0.1.2's shapes. Any kernel size and dimensionality works.
    """

    _weight_key = "conv.weight"

    def __init__(self, conv_module, in_channels, out_channels, kernel_size, r=0, lora_alpha=1, lora_dropout=0.,
                 merge_weights=True, **kwargs):
        super(ConvLoRA, self).__init__()
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        if r > 0:
            ks = self.conv.kernel_size
            k0, k_rest = ks[0], math.prod(ks[1:])
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * k0, in_channels * k_rest)))
            self.lora_B = nn.Parameter(
                self.conv.weight.new_zeros((out_channels // self.conv.groups * k0, r * k0)))
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()
        self.merged = False

    def reset_parameters(self):
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def frozen_weight(self) -> torch.Tensor:
        return self.conv.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def train(self, mode=True):
        super(ConvLoRA, self).train(mode)
        self._train_merge(mode)
        return self

    def forward(self, x):
        if self.active_adapter != "default" or self.adapters_disabled or self._lora_rows is not None:
            return self._forward_other(x)
        if self.r == 0 or self.merged:
            return self.conv(x)
        # The update is a kernel: it is computed in the adapter's dtype and the convolution runs in the frozen
        # weight's, as the plain layer's does (a half-precision kernel rounds W + delta once, as merging would).
        w = self.conv.weight
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            # Dropout acts on the LoRA path's input only, so that path needs a convolution of its own.
            delta = self.delta_weight().to(w.dtype)
            return self.conv(x) + self.conv._conv_forward(self.lora_dropout(x), delta, None)
        return self.conv._conv_forward(x, (w + self.delta_weight()).to(w.dtype), self.conv.bias)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super(Conv2d, self).__init__(nn.Conv2d, *args, **kwargs)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super(Conv1d, self).__init__(nn.Conv1d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super(Conv3d, self).__init__(nn.Conv3d, *args, **kwargs)


def handles_rows(layer: LoRALayer) -> bool:
    """Whether ``layer``'s forward applies per-row adapters (``lora.batch_adapters``): loralib's own layer classes
    do; a user class built on :class:`LoRALayer` with its own forward does not."""
    return type(layer).forward in (Linear.forward, MergedLinear.forward, Embedding.forward, ConvLoRA.forward)
