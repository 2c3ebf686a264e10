"""LlamaWithLoRA: a Llama-architecture decoder (SmolLM2's) with loralib layers on the projections named as targets.

RMSNorm, rotary position embeddings (rotate-half layout), SwiGLU, grouped-query attention, a head tied to the
embedding. Module names follow Hugging Face's ``LlamaForCausalLM``, so its state dict (or a GGUF file's) imports key
by key (:func:`load_weights`). GPT-2's interface (``model.py``): loss only at label positions, the same KV cache.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as lora

from .model import KVPairs, LabelPositionLM, ModelConfigJSON, advance, attend, extend_kv

# The projections LoRA can sit on, by their Hugging Face names; DEFAULT_TARGETS: the paper's query and value.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclass
class LlamaConfig(ModelConfigJSON):
    vocab_size: int = 49152  # SmolLM2's byte-level BPE
    max_positions: int = 8192  # the context the model was trained for (RoPE has no table to run out of)
    hidden_dim: int = 576  # SmolLM2-135M
    intermediate_dim: int = 1536  # SwiGLU width
    num_layers: int = 30
    num_heads: int = 9  # query heads; head size = hidden_dim / num_heads = 64
    num_kv_heads: int = 3  # key/value heads, each shared by num_heads / num_kv_heads query heads
    rope_theta: float = 100000.0  # RoPE base, from the checkpoint
    rms_norm_eps: float = 1e-5
    lora_dim: int = 8  # LoRA rank r; 0 makes every layer a plain one
    lora_alpha: int = 16  # LoRA scaling = lora_alpha / lora_dim
    lora_dropout: float = 0.0  # dropout on the LoRA path's input
    # Which projections get LoRA, from LORA_TARGETS; None: DEFAULT_TARGETS.
    lora_targets: Optional[Sequence[str]] = None
    TARGETS: ClassVar[Tuple[str, ...]] = LORA_TARGETS

    def __post_init__(self):
        self._check(("vocab_size", "max_positions", "hidden_dim", "intermediate_dim", "num_layers", "num_heads",
                     "num_kv_heads"))
        if self.hidden_dim % self.num_heads or self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError(f"hidden_dim {self.hidden_dim} / num_heads {self.num_heads} / num_kv_heads "
                             f"{self.num_kv_heads}: heads must divide the width, key/value heads the heads, and "
                             "the head size must be even (RoPE rotates pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def linear(self, target: str, n_in: int, n_out: int) -> nn.Module:
        """The projection ``target``: a loralib ``Linear`` when it is a LoRA target, else a plain ``nn.Linear``
        (no bias in Llama)."""
        if target in (self.lora_targets or DEFAULT_TARGETS) and self.lora_dim > 0:
            return lora.Linear(n_in, n_out, r=self.lora_dim, lora_alpha=self.lora_alpha,
                               lora_dropout=self.lora_dropout, bias=False)
        return nn.Linear(n_in, n_out, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In float32 whatever x is, as Hugging Face's LlamaRMSNorm: a bf16 mean of squares loses the small ones.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(x, cos, sin):
    """Rotate the pairs (i, i + hs/2) of x (B, nh, T, hs) by the angles whose cos/sin are (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hs = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        C = cfg.hidden_dim
        self.q_proj = cfg.linear("q_proj", C, self.nh * self.hs)
        self.k_proj = cfg.linear("k_proj", C, self.nkv * self.hs)
        self.v_proj = cfg.linear("v_proj", C, self.nkv * self.hs)
        self.o_proj = cfg.linear("o_proj", self.nh * self.hs, C)

    def forward(self, x, cos, sin, attn_mask=None, past=None, q_index=None):
        """As GPT-2's attention (``model.CausalSelfAttention``); the cache holds the nkv key/value heads,
        (B, nkv, T, hs), after RoPE."""
        B, T, C = x.shape
        if q_index is not None:
            xq = x.gather(1, q_index.unsqueeze(-1).expand(-1, -1, C))  # (B, Tq, C): only these rows' queries
            cq, sq = (t.gather(2, q_index[:, None, :, None].expand(-1, 1, -1, self.hs)) for t in (cos, sin))
        else:
            xq, cq, sq = x, cos, sin
        Tq = xq.shape[1]
        q = rope(self.q_proj(xq).view(B, Tq, self.nh, self.hs).transpose(1, 2), cq, sq)  # (B, nh, Tq, hs)
        k = rope(self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2), cos, sin)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if past is not None:
            k, v = extend_kv(*past, k, v)  # (B, nkv, T_past + T, hs)
        present = (k, v)
        # Each key/value head serves nh / nkv query heads. enable_gqa reads it for each of them (the same outputs
        # as copying it nh / nkv times, without copying the whole cache at every decoding step); with gradients,
        # the copies: enable_gqa's backward sums the heads' gradients in another order, and training stays bitwise
        # what it was when this example's adapters were trained.
        if torch.is_grad_enabled():
            rep = self.nh // self.nkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, T_all, hs)
        y = attend(q, k, v, attn_mask, q_index, enable_gqa=True)  # (B, nh, Tq, hs)
        y = y.transpose(1, 2).reshape(B, Tq, self.nh * self.hs)
        return self.o_proj(y), present


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        C, H = cfg.hidden_dim, cfg.intermediate_dim
        self.gate_proj = cfg.linear("gate_proj", C, H)
        self.up_proj = cfg.linear("up_proj", C, H)
        self.down_proj = cfg.linear("down_proj", H, C)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, past=None, q_index=None):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past, q_index)
        if q_index is not None:
            x = x.gather(1, q_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # the residual at those positions
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class TiedHead(nn.Module):
    """The output layer on the input embedding's weight E (tied): ``F.linear(h, E)``. A module with no parameter of
    its own (E keeps its one name in the state dict) that ``generate`` can run as a plain linear layer."""
    plain_linear = True  # forward(h) is F.linear(h, self.weight, self.bias) when h has the weight's dtype
    bias = None

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = (embedding,)  # in a tuple: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, h):
        """Logits (..., V) of hidden states (..., C)."""
        return F.linear(h, self.weight.to(h.dtype))


class LlamaWithLoRA(LabelPositionLM, nn.Module):
    """Llama with LoRA. ``forward`` is GPT-2's (``model.LabelPositionLM``): with labels the tied 49,152-way head
    runs only at the label positions."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_dim),
            layers=nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)]),
            norm=RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps),
        ))
        hs = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.lm_head = TiedHead(self.model.embed_tokens)  # logits (..., V) of hidden states (..., C)

    def _rope_angles(self, position_ids, dtype):
        """cos and sin, (B, 1, T, hs), of positions (B, T): in float32, then the activations' dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, q_index=None):
        """Final hidden states (B, T, C) and the per-layer key/value cache; arguments as GPT-2's
        (``SimpleGPT2WithLoRA.hidden_states``)."""
        position_ids, attn_mask = self._positions(input_ids, attention_mask, position_ids, past_key_values)
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # RoPE and the residual stream in autocast's dtype
        cos, sin = self._rope_angles(position_ids.expand(B, -1), x.dtype)
        presents: KVPairs = []
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            x, present = block(x, cos, sin, attn_mask, None if past_key_values is None else (past_key_values, i),
                               q_index if i == last else None)
            presents.append(present)
        return self.model.norm(x), advance(past_key_values, presents, T)


def build_model(cfg: LlamaConfig, base_seed: int = 0) -> LlamaWithLoRA:
    """The model with placeholder base weights (to be replaced by :func:`load_weights`) and LoRA initialised from
    ``base_seed``; the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        return LlamaWithLoRA(cfg)


@torch.no_grad()
def load_weights(model: LlamaWithLoRA, state: Dict[str, torch.Tensor], source: str) -> None:
    """Copy a Hugging Face ``LlamaForCausalLM`` state dict into the model's base weights, key by key.

    Args:
        model: the model, built with the checkpoint's sizes.
        state: ``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ...; an
            ``lm_head.weight`` must equal the embedding (the head is tied).
        source: the checkpoint's name, for messages.

    Raises:
        ValueError: a missing or unexpected key, a shape mismatch, or an untied head (each named).
    """
    state = dict(state)
    head = state.pop("lm_head.weight", None)
    emb = state.get("model.embed_tokens.weight")
    if head is not None and (emb is None or not torch.equal(head, emb)):
        raise ValueError(f"{source}: lm_head.weight differs from the embedding; this model ties them")
    own = {k: v for k, v in model.state_dict().items() if k not in lora.layers.lora_names(model)}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model ({model.config.num_layers} layers): missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    for k, target in own.items():
        if tuple(state[k].shape) != tuple(target.shape):
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, the model {tuple(target.shape)}")
        target.copy_(state[k])
