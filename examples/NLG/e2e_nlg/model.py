"""SimpleGPT2WithLoRA: a real GPT-2 (the Hugging Face layout, module for module) with loralib layers in it.

LoRA sits on the attention's query and value projections (one ``MergedLinear`` over the fused q|k|v projection,
``enable_lora=[True, False, True]``), on both MLP projections, and on the output projection to the vocabulary.
Module names follow Hugging Face's ``GPT2LMHeadModel`` so its weights import key by key (see ``hf_checkpoint.py``).
Weights are stored in ``nn.Linear`` layout (out, in); GPT-2's ``Conv1D`` (in, out) weights are transposed on import.
"""
import math
from dataclasses import asdict, dataclass
from typing import ClassVar, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as lora


# Where LoRA can sit: "attn" = the attention's query and value (c_attn, enable_lora=[True, False, True]), "attn_k" =
# its key too, "attn_proj" = the attention's output projection, "mlp" = both MLP projections, "lm_head" = the output
# projection to the vocabulary. DEFAULT_TARGETS: where it sits when lora_targets is None.
LORA_TARGETS = ("attn", "attn_k", "attn_proj", "mlp", "lm_head")
DEFAULT_TARGETS = ("attn", "mlp", "lm_head")


class ModelConfigJSON:
    """What the model families' config dataclasses share: their checks (sizes positive, ``lora_targets`` among the
    class's ``TARGETS``) and the round trip through adapter_config.json."""
    TARGETS: ClassVar[Tuple[str, ...]] = ()

    def _check(self, positive: Sequence[str]) -> None:
        """Every field named in ``positive`` > 0, and ``lora_targets`` a non-empty subset of ``TARGETS``."""
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)  # a JSON list in adapter_config.json
            bad = [t for t in self.lora_targets if t not in self.TARGETS]
            if bad or not self.lora_targets:
                raise ValueError(f"lora_targets must be a non-empty subset of {self.TARGETS}, got "
                                 f"{list(self.lora_targets)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["lora_targets"] is not None:
            d["lora_targets"] = list(d["lora_targets"])
        return d

    @classmethod
    def from_dict(cls, d: dict):
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class GPTConfig(ModelConfigJSON):
    vocab_size: int = 50257  # GPT-2 BPE vocabulary; 50256 is <|endoftext|>
    max_positions: int = 1024  # learned position embeddings (GPT-2: n_positions)
    hidden_dim: int = 768  # GPT-2 small: n_embd
    num_layers: int = 2  # GPT-2 small has 12; 2 keeps a CPU run to minutes
    num_heads: int = 12  # head size = hidden_dim / num_heads = 64
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0  # base-model dropout (attention, residual, embedding); the base is frozen anyway
    lora_dim: int = 16  # LoRA rank r; 0 makes every layer a plain one
    lora_alpha: int = 128  # LoRA scaling = lora_alpha / lora_dim
    lora_dropout: float = 0.0  # dropout on the LoRA path's input
    # Which modules get LoRA, from LORA_TARGETS; None: DEFAULT_TARGETS.
    lora_targets: Optional[Sequence[str]] = None
    TARGETS: ClassVar[Tuple[str, ...]] = LORA_TARGETS

    def __post_init__(self):
        self._check(("vocab_size", "max_positions", "hidden_dim", "num_layers", "num_heads"))
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")

    def lora_r(self, target: str) -> int:
        """The LoRA rank of ``target`` (one of LORA_TARGETS): ``lora_dim`` where LoRA is placed, else 0."""
        return self.lora_dim if target in (self.lora_targets or DEFAULT_TARGETS) else 0


KVPairs = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, each (B, nh, T_past, hs)


class KVCache:
    """Every layer's keys and values for incremental decoding, in buffers allocated once for ``rows`` rows and
    ``capacity`` positions and written in place (concatenating would copy the whole cache at every step and layer).
    Laid out (rows, nh, capacity, hs), so attention reads each head's positions contiguously; :meth:`select` (beams
    reordered, finished rows leaving) copies the kept rows' filled positions into a spare buffer. ``cache[i]`` is
    layer i's ``(keys, values)``, each (B, nh, T, hs).
    """

    def __init__(self, rows: int, capacity: int):
        self.rows, self.capacity = rows, capacity
        self.length = 0  # positions filled; a forward pass advances it once all layers have written
        self._bufs: List[List[torch.Tensor]] = []  # per layer: keys, values, spare keys, spare values (flat)
        self._kv: List[Tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (batch, nh, capacity, hs) views

    def __len__(self) -> int:
        return len(self._kv)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self._kv[i]
        return k[:, :, :self.length], v[:, :, :self.length]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write layer ``i``'s new keys and values (B, nh, T, hs) after the cached ones; return all of them,
        (B, nh, T_past + T, hs) views of the buffers."""
        B, nh, T, hs = k.shape
        end = self.length + T
        if end > self.capacity or B > self.rows:
            raise ValueError(f"KVCache holds {self.rows} rows and {self.capacity} positions; {B} rows need "
                             f"{end}: build it with more room")
        if i == len(self._kv):  # first pass: this layer's buffers
            self._bufs.append([k.new_empty(self.capacity * self.rows * nh * hs) for _ in range(4)])
            self._kv.append(tuple(self._view(b, B, nh, hs) for b in self._bufs[i][:2]))
        kb, vb = self._kv[i]
        kb[:, :, self.length:end] = k
        vb[:, :, self.length:end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def _view(self, flat: torch.Tensor, n: int, nh: int, hs: int) -> torch.Tensor:
        """The start of a flat buffer as the (n, nh, capacity, hs) cache of n rows (contiguous)."""
        return flat[:self.capacity * n * nh * hs].view(n, nh, self.capacity, hs)

    def select(self, idx: torch.Tensor) -> None:
        """Keep the rows ``idx`` (B',), in that order (repeats allowed): beams reordered, finished rows gone."""
        n, L = len(idx), self.length
        if n > self.rows:
            raise ValueError(f"KVCache holds {self.rows} rows; cannot select {n}")
        for i, (kb, vb) in enumerate(self._kv):
            bufs = self._bufs[i]
            new = tuple(self._view(b, n, kb.shape[1], kb.shape[3]) for b in bufs[2:])
            torch.index_select(kb[:, :, :L], 0, idx, out=new[0][:, :, :L])  # the filled positions only
            torch.index_select(vb[:, :, :L], 0, idx, out=new[1][:, :, :L])
            self._kv[i] = new
            bufs[:] = bufs[2:] + bufs[:2]  # the old buffers are the next spare ones


def extend_kv(past, i: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s keys and values (B, nh, T_past + T, hs): the cached ones then the new (B, nh, T, hs) ones.
    ``past`` is a :class:`KVCache` (written in place) or the ``(keys, values)`` pairs a previous call returned."""
    if isinstance(past, KVCache):
        return past.append(i, k, v)
    return torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)


def advance(past, presents: KVPairs, T: int):
    """The cache a forward pass returns: a :class:`KVCache` it wrote T positions into, else the new pairs."""
    if isinstance(past, KVCache):
        past.length += T
        return past
    return presents


def past_length(past) -> int:
    """Positions already in ``past`` (None, a :class:`KVCache` or (keys, values) pairs)."""
    if past is None:
        return 0
    return past.length if isinstance(past, KVCache) else past[0][0].shape[2]


class GPTOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # (B, T, V), or None when only the loss was asked for
    loss: Optional[torch.Tensor]
    past_key_values: Optional[Union[KVPairs, KVCache]]


def causal_padding_mask(attention_mask, B: int, T: int, t_past: int, device, cached: bool) -> Optional[torch.Tensor]:
    """The boolean attention mask (B or 1, 1, T, T_past + T) of T new tokens after ``t_past`` cached ones: causal,
    and never attending to padding (``attention_mask`` (B, T_past + T), 0 on padding); None when there is neither
    padding nor a cache (plain causal attention then)."""
    if attention_mask is None and not cached:
        return None
    causal = torch.ones(T, t_past + T, dtype=torch.bool, device=device).tril(t_past)
    attn_mask = causal.view(1, 1, T, t_past + T)
    if attention_mask is not None:
        attn_mask = attn_mask & attention_mask.bool().view(B, 1, 1, t_past + T)
    return attn_mask


def attend(q, k, v, attn_mask=None, q_index=None, dropout_p: float = 0.0, enable_gqa: bool = False):
    """Causal attention of queries q (B, nh, Tq, hs) over keys and values (B, nkv, T, hs), as both families run it:
    with ``q_index`` (B, Tq) the queries are those positions' (the query at position t sees keys 0..t); else with
    ``attn_mask`` (from :func:`causal_padding_mask`); else plain causal (no left padding and no cache: right
    padding never leaks backwards). Returns (B, nh, Tq, hs)."""
    if q_index is not None:
        T = k.shape[2]
        causal = torch.arange(T, device=q.device).view(1, 1, T) <= q_index.unsqueeze(-1)  # (B, Tq, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal.unsqueeze(1), dropout_p=dropout_p,
                                              enable_gqa=enable_gqa)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=enable_gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        C = cfg.hidden_dim
        self.c_attn = lora.MergedLinear(C, 3 * C, r=cfg.lora_r("attn"), lora_alpha=cfg.lora_alpha,
                                        lora_dropout=cfg.lora_dropout,
                                        enable_lora=[True, cfg.lora_r("attn_k") > 0, True])
        # A plain nn.Linear unless adapted: building a LoRA layer draws from the RNG, which would change the
        # random base that every adapter trained without it was fitted to.
        self.c_proj = lora.Linear(C, C, r=cfg.lora_r("attn_proj"), lora_alpha=cfg.lora_alpha,
                                  lora_dropout=cfg.lora_dropout) if cfg.lora_r("attn_proj") else nn.Linear(C, C)
        self.dropout = cfg.dropout

    def forward(self, x, attn_mask=None, past=None, q_index=None):
        """``q_index`` (B, Tq), without ``attn_mask`` and ``past``: compute the output only at those positions
        (every position still provides its key and value). Returns (B, Tq, C) then, else (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        if q_index is not None:
            q = q.gather(1, q_index.unsqueeze(-1).expand(-1, -1, C))  # (B, Tq, C)
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tq, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if past is not None:
            k, v = extend_kv(*past, k, v)  # (B, nh, T_past + T, hs)
        p = self.dropout if self.training else 0.0
        y = attend(q, k, v, attn_mask, q_index, dropout_p=p)  # (B, nh, Tq, hs)
        y = y.transpose(1, 2).contiguous().view(B, Tq, C)
        return F.dropout(self.c_proj(y), p, self.training), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C, kw = cfg.hidden_dim, dict(r=cfg.lora_r("mlp"), lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
        self.c_fc = lora.Linear(C, 4 * C, **kw)
        self.c_proj = lora.Linear(4 * C, C, **kw)
        self.dropout = cfg.dropout

    def forward(self, x):
        h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_dim, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, past=None, q_index=None):
        a, present = self.attn(self.ln_1(x), attn_mask, past, q_index)  # pre-LN
        if q_index is not None:
            x = x.gather(1, q_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # the residual at those positions
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class LabelPositionLM:
    """The training and decoding forward of a causal LM that has ``hidden_states(input_ids, attention_mask,
    position_ids, past_key_values, q_index=None)`` and ``lm_head(h)``: with labels, the output layer (and the
    last block's attention output and MLP) run only at the positions the loss uses. GPT-2 and Llama share it.
    """

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = False, label_smoothing: float = 0.0, logits_to_keep: int = 0) -> GPTOutput:
        """Logits, or the next-token loss when ``labels`` (aligned with ``input_ids``, -100 = ignore) are given.

        With labels, logits are not returned: the output layer runs only on the positions the loss uses.
        ``logits_to_keep=n > 0`` (transformers' argument of that name): logits (B, n, V) of the last n positions
        only; generation's prefill needs one, and the output layer is most of a small model's cost.
        """
        if labels is None:
            h, presents = self.hidden_states(input_ids, attention_mask, position_ids, past_key_values)
            if logits_to_keep > 0:  # contiguous: a strided slice would take bmm, several times slower than mm
                h = h[:, -logits_to_keep:].contiguous()  # (B, n, C)
            return GPTOutput(self.lm_head(h), None, presents if use_cache else None)
        targets = labels[:, 1:]
        keep = targets != -100  # (B, T-1): the position t predicts the token t + 1
        if attention_mask is None and past_key_values is None and not use_cache and bool(keep.any()):
            h = self._hidden_at(input_ids, keep, position_ids)  # (N_kept, C)
            presents = None
        else:
            h, presents = self.hidden_states(input_ids, attention_mask, position_ids, past_key_values)
            h = h[:, :-1][keep]  # (N_kept, C)
        logits = self.lm_head(h)  # (N_kept, V)
        # At least float32 (a half-precision head's logits), never lower than they are (float64 in tests).
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits, targets[keep], label_smoothing=label_smoothing)
        return GPTOutput(None, loss, presents if use_cache else None)

    def _positions(self, input_ids, attention_mask, position_ids, past_key_values):
        """``hidden_states``' position ids (B or 1, T) and attention mask (:func:`causal_padding_mask`) for T new
        tokens after the cached ones. Raises ValueError when they would pass ``config.max_positions``."""
        B, T = input_ids.shape
        t_past = past_length(past_key_values)
        if t_past + T > self.config.max_positions:
            raise ValueError(f"sequence of {t_past + T} tokens exceeds max_positions={self.config.max_positions}")
        if position_ids is None:
            position_ids = torch.arange(t_past, t_past + T, device=input_ids.device).unsqueeze(0)
        return position_ids, causal_padding_mask(attention_mask, B, T, t_past, input_ids.device,
                                                 past_key_values is not None)

    def _hidden_at(self, input_ids, keep, position_ids=None):
        """Final hidden states at the positions ``keep`` (B, T-1) marks, (N_kept, C), in the order of
        ``h[:, :-1][keep]``; the last block computes only those rows (what the loss uses)."""
        B, T = input_ids.shape
        n = keep.sum(1)  # (B,)
        pos = torch.arange(T - 1, device=input_ids.device).expand(B, -1)
        # Each row's kept positions in order, then its others (padding queries, dropped below): (B, Tq)
        q_index = torch.where(keep, pos, pos + T).argsort(dim=1)[:, :int(n.max())]
        valid = torch.arange(q_index.shape[1], device=input_ids.device) < n.unsqueeze(1)  # (B, Tq)
        h, _ = self.hidden_states(input_ids, position_ids=position_ids, q_index=q_index)  # (B, Tq, C)
        return h[valid]


class SimpleGPT2WithLoRA(LabelPositionLM, nn.Module):
    """GPT-2 with LoRA. ``forward(input_ids, labels=...)`` computes the 50,257-way output layer only at the
    positions whose label is not -100, which is where a fine-tuning step on CPU spends most of its time; the last
    block, too, computes its attention output and MLP only there (earlier positions still give it keys and values).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.hidden_dim),
            wpe=nn.Embedding(cfg.max_positions, cfg.hidden_dim),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)]),
            ln_f=nn.LayerNorm(cfg.hidden_dim, eps=cfg.layer_norm_eps),
        ))
        # Its own weight (not tied to wte): merging the head's LoRA must never change the input embedding.
        self.lm_head = lora.Linear(cfg.hidden_dim, cfg.vocab_size, r=cfg.lora_r("lm_head"), lora_alpha=cfg.lora_alpha,
                                   lora_dropout=cfg.lora_dropout, bias=False)
        self._init_base_weights()

    @torch.no_grad()
    def _init_base_weights(self):
        # GPT-2's initialisation for a random base; LoRA's own A/B initialisation is left as loralib made it.
        std_resid = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std_resid if name.endswith("c_proj") else 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.lm_head.weight.copy_(self.transformer.wte.weight)  # as GPT-2, whose head is the embedding

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, q_index=None):
        """Final hidden states (B, T, C) and the per-layer key/value cache.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T_past + T), 1 for real tokens, 0 for (left) padding. Optional.
            position_ids: (B, T). Defaults to T_past .. T_past + T - 1.
            past_key_values: the cache returned by a previous call, for incremental decoding.
            q_index: (B, Tq) positions; the last block computes only those rows and the states are (B, Tq, C).
                Only without ``attention_mask`` and ``past_key_values``.
        """
        position_ids, attn_mask = self._positions(input_ids, attention_mask, position_ids, past_key_values)
        T = input_ids.shape[1]
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        presents = []
        last = len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, attn_mask, None if past_key_values is None else (past_key_values, i),
                               q_index if i == last else None)
            presents.append(present)
        return self.transformer.ln_f(x), advance(past_key_values, presents, T)


def build_model(cfg: GPTConfig, base_seed: int = 0) -> SimpleGPT2WithLoRA:
    """The model with its random base drawn from ``base_seed`` (the global RNG state restored afterwards). Without
    pretrained weights the base *is* this draw, so training records ``base_seed`` and inference re-draws it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        return SimpleGPT2WithLoRA(cfg)


@torch.no_grad()
def base_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without its LoRA tensors: the frozen base's weights (LoRA tensors found by type,
    ``lora.layers.lora_names``, not by a ``lora_`` in their name)."""
    lora_keys = lora.layers.lora_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in lora_keys}


def base_fingerprint(model: nn.Module) -> str:
    """Which frozen base weights ``model`` has: the first 16 hex digits of loralib's hash of the base's names and
    values (``lora.serialization.base_values_sha256(model)``), the form adapter configs record (the
    previous release's configs too: it hashed the same bytes)."""
    return lora.serialization.base_values_sha256(model)[:16]
