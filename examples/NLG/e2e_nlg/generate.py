"""Batched greedy and beam-search decoding for this example's models (GPT-2, Llama), with their KV cache.

Prompts are padded on the *left*; the attention mask hides the padding and ``position_ids`` count only real tokens,
so a padded row computes what it would alone. Decoding stops at end-of-text (or any of ``stop_ids``, e.g. 628 =
"\\n\\n" in Microsoft's E2E recipe) or after ``max_new_tokens``.

Beam search follows ``transformers``' ``generate(num_beams=K, early_stopping=False)`` (tested to give the same
tokens): 2K candidates per step, only the K best-ranked may finish, a finished hypothesis scores
``sum(log p) / len ** length_penalty``, and an input is done once K hypotheses finished and its best running beam
cannot beat the worst. ``no_repeat_ngram_size`` bans n-grams repeated *within the generated text*, as Microsoft's
E2E beam search does (transformers also counts the prompt).

:func:`generate` decodes prompts sorted by length, does the beams' bookkeeping and n-gram bans as tensor operations
over all rows, and drops inputs that are done from the batch; none of this changes a token in float32. With a
bfloat16 base, oneDNN may round a row differently for another number of rows, so a text can depend on which MRs
share its batch (measured: 14 of the first 64 greedy SmolLM2 test texts differed decoded alone and within all 630).
Its linear layers run with their weights packed once for oneDNN (:func:`packed_linears`): float32 sums in another
order than ``F.linear``'s, so a near-tie between two tokens can break the other way (benchmarks/RESULTS.md);
``generate(..., packed=False)`` keeps ``F.linear``.
"""
import contextlib
import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

import loralib as lora

from .model import KVCache, LabelPositionLM
from .tokenizer import EOT_ID

DEFAULT_BATCH_SIZE = 64  # prompts per batch; beam search runs batch_size * beam_size rows (benchmarks/RESULTS.md)


@dataclass
class DecodeConfig:
    """How to decode. ``beam_size=1`` is greedy; Microsoft's E2E recipe is beam 10, length penalty 0.8, no-repeat 4."""
    max_new_tokens: int = 64
    beam_size: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_id: int = EOT_ID
    pad_id: int = EOT_ID
    stop_ids: Tuple[int, ...] = ()  # more tokens that end a text as eos_id does (not part of the output)

    def __post_init__(self):
        self.stop_ids = tuple(int(t) for t in self.stop_ids)
        if any(t < 0 for t in self.stop_ids):
            raise ValueError(f"stop_ids must be token ids >= 0, got {list(self.stop_ids)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


# run_inference.py's default decoding, which compare_lora_vs_full.py's --score uses too (chosen on valid.txt: README).
DEFAULT_DECODING = DecodeConfig(beam_size=5, no_repeat_ngram_size=4)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad non-empty token lists with ``pad_id`` (masked) into ``(input_ids, attention_mask, position_ids)``,
    each ``(B, max_len)``; positions start at 0 at each row's first real token.

    Raises:
        ValueError: an empty prompt (there would be no position to predict from).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


def banned_tokens(generated: Sequence[int], n: int) -> List[int]:
    """The next tokens (with duplicates) that would complete an n-gram already in ``generated``, the tokens generated
    so far; ``n`` 0 bans nothing. The reference :func:`ban_ngrams` is tested against."""
    if n <= 0 or len(generated) < n:
        return []
    if n == 1:
        return list(generated)
    prefix = tuple(generated[len(generated) - n + 1:])
    return [generated[i + n - 1] for i in range(len(generated) - n + 1)
            if tuple(generated[i:i + n - 1]) == prefix]


def ban_ngrams(logprobs: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf, in place, every token of ``logprobs`` (R, V) that would repeat an n-gram of its row of
    ``history`` (R, t), the tokens generated so far; all rows at once. ``n`` 0 bans nothing. Returns ``logprobs``."""
    R, t = history.shape
    if n <= 0 or t < n:
        return logprobs
    if n == 1:
        return logprobs.scatter_(1, history, float("-inf"))
    windows = history.unfold(1, n - 1, 1)[:, :t - n + 1]  # (R, t-n+1, n-1): the (n-1)-grams that have a successor
    hit = (windows == history[:, None, t - n + 1:]).all(-1)  # (R, t-n+1): equal to the last n-1 tokens
    rows, cols = hit.nonzero(as_tuple=True)
    logprobs[rows, history[:, n - 1:][rows, cols]] = float("-inf")
    return logprobs


def _adapters(model, names: Optional[Sequence[Optional[str]]]):
    """Row i of the batch with adapter ``names[i]`` (``lora.batch_adapters``); no names: the model as it is."""
    return contextlib.nullcontext() if names is None else lora.batch_adapters(model, names)


def _row_names(names, live: torch.Tensor, K: int = 1):
    """The adapter of each row still running: ``K`` rows per input in ``live`` (None when there are no names)."""
    return None if names is None else [names[i] for i in live.tolist() for _ in range(K)]


def _step(model, ids, mask, pos, past, names=None, log_probs: bool = True):
    # Only the last position's logits: a model that takes transformers' logits_to_keep skips the output layer at the
    # prompt's other positions; another is called as before and its last position is used.
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    with _adapters(model, names):
        out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True, **keep)
    # float32 log-probabilities: beam scores are sums of many of them, and fp16 sums would reorder beams. In place:
    # with beams the (R, V) logits are tens of MB per step, and a fresh block that size is page-faulted in anew.
    logits = out.logits[:, -1].float()  # (R, V)
    if not log_probs:  # greedy takes the argmax, which normalising cannot move (but could tie by rounding)
        return logits, out.past_key_values
    return torch.log_softmax(logits, dim=-1, out=logits), out.past_key_values


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _plain_linear(m: torch.nn.Module) -> bool:
    """Whether ``m`` computes exactly ``F.linear(x, weight, bias)``: an ``nn.Linear``, or a LoRA linear layer whose
    update is merged (or has none), with the default adapter and no per-row adapters; or a module that says so
    (``plain_linear = True``, e.g. Llama's tied output layer)."""
    if getattr(m, "plain_linear", False):
        return True
    if not isinstance(m, torch.nn.Linear) or getattr(m, "fan_in_fan_out", False):
        return False
    if not isinstance(m, lora.LoRALayer):
        return type(m) is torch.nn.Linear
    return (m.active_adapter == "default" and not m.adapters_disabled and m.row_adapters is None
            and (m.merged or not m.has_lora()))


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module):
    """Inside the block, the model's plain linear layers (:func:`_plain_linear`) on the CPU run through oneDNN with
    their weights reordered once into its blocked layout (a second copy of them while the block runs), instead of
    re-reading the plain layout at every step: on the AMD EPYC of benchmarks/RESULTS.md, up to 2.5x faster per
    layer at 32 rows. The sums are ordered differently than MKL's (float32 results differ in the last bits) and a
    row's result does not depend on the other rows. A layer whose weight or LoRA state changes inside the block, a
    call that needs gradients, or one that autocast would cast to another dtype, runs its own forward; a layer whose
    ``forward`` is already replaced on the instance (an enclosing block, or user code) is left as it is, and so are
    bfloat16 layers where oneDNN has no bfloat16 support. Elsewhere (CUDA, no oneDNN) nothing changes.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    usable = torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
    dtypes = (torch.float32, torch.bfloat16) if usable and ops._is_mkldnn_bf16_supported() else (torch.float32,)
    patched = []
    try:
        for m in model.modules() if usable else ():
            w = m.weight if _plain_linear(m) else None
            if (w is None or "forward" in vars(m) or w.device.type != "cpu" or w.dtype not in dtypes
                    or (m.bias is not None and m.bias.dtype != w.dtype)):
                continue
            m.forward = _packed_forward(m, ops._reorder_linear_weight(w.detach()), m.forward)
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def _packed_forward(m: torch.nn.Linear, packed: torch.Tensor, own_forward):
    version = m.weight._version  # in-place updates (optimizer steps, merging) bump it

    def forward(x):
        if (m.weight._version != version or x.dtype != m.weight.dtype or torch.is_grad_enabled()
                or (torch.is_autocast_enabled("cpu") and x.dtype != torch.get_autocast_dtype("cpu"))
                or not _plain_linear(m)):
            return own_forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, m.bias, "none", [], "")
    return forward


def _select(past, mask, pos, idx: torch.Tensor):
    """The cache, attention mask and next positions of the rows ``idx`` (in that order)."""
    if isinstance(past, KVCache):
        past.select(idx)  # in place, into the cache's spare buffers
        return past, mask[idx], pos[idx]
    return [(k[idx], v[idx]) for k, v in past], mask[idx], pos[idx]


def _new_cache(model, rows: int, prompt_len: int, cfg: DecodeConfig) -> Optional[KVCache]:
    """A cache with room for the whole decoding (this example's models); None lets another model build its own."""
    return KVCache(rows, prompt_len + cfg.max_new_tokens) if isinstance(model, LabelPositionLM) else None


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, names=None) -> List[List[int]]:
    """Greedy decoding of one batch (argmax at each step, ``no_repeat_ngram_size`` respected); ``names``: each
    prompt's adapter (``generate``'s ``adapter_names``), which follows its row as finished rows leave the batch.

    Returns:
        Per prompt, the generated tokens, without the closing end-of-text.
    """
    device = next(model.parameters()).device
    ids, mask, pos = (t.to(device) for t in left_pad(prompts, cfg.pad_id))
    cache = _new_cache(model, len(prompts), ids.shape[1], cfg)
    logits, past = _step(model, ids, mask, pos, cache, names, log_probs=False)
    stops = torch.tensor(sorted({cfg.eos_id, *cfg.stop_ids}), device=device)
    live = torch.arange(len(prompts), device=device)  # the prompts still running, one row each
    history = torch.empty((len(prompts), 0), dtype=torch.long, device=device)
    out: List[List[int]] = [[] for _ in prompts]
    next_pos = pos[:, -1:] + 1
    for t in range(cfg.max_new_tokens):
        tok = ban_ngrams(logits, history, cfg.no_repeat_ngram_size).argmax(-1)  # (R,)
        go = ~torch.isin(tok, stops)
        for i, k in zip(live[go].tolist(), tok[go].tolist()):
            out[i].append(k)
        if not bool(go.any()) or t + 1 == cfg.max_new_tokens:
            break
        if not bool(go.all()):  # rows that stopped leave the batch
            keep = go.nonzero().squeeze(1)
            live, tok, history = live[keep], tok[keep], history[keep]
            past, mask, next_pos = _select(past, mask, next_pos, keep)
        history = torch.cat([history, tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, past = _step(model, tok[:, None], mask, next_pos, past, _row_names(names, live), log_probs=False)
        next_pos = next_pos + 1
    return out


@torch.no_grad()
def beam_search_batch(model, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, names=None) -> List[List[int]]:
    """Beam search over one batch: ``K = beam_size`` rows per input still running go through the model each step;
    ``names``: each prompt's adapter, which its K beams keep (beams are only ever reordered within one input).

    Returns:
        Per prompt, the best finished hypothesis's tokens, without the closing end-of-text.
    """
    K, lp, n_gram = cfg.beam_size, cfg.length_penalty, cfg.no_repeat_ngram_size
    device = next(model.parameters()).device
    ids, mask, pos = (t.to(device) for t in left_pad(prompts, cfg.pad_id))
    cache = _new_cache(model, len(prompts) * K, ids.shape[1], cfg)
    logprobs, past = _step(model, ids, mask, pos, cache, names)  # the prompt once per input, then to its K beams
    rows = torch.arange(len(prompts), device=device).repeat_interleave(K)
    past, mask, next_pos = _select(past, mask, pos[:, -1:] + 1, rows)
    logprobs = logprobs[rows]
    live = torch.arange(len(prompts), device=device)  # the inputs still running, K rows each (row b*K + j)
    history = torch.empty((len(rows), 0), dtype=torch.long, device=device)  # (B*K, t) each beam's tokens
    scores = torch.full((len(prompts), K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # at the first step all K beams are the same prompt: expand only one of them
    finished: List[List[Tuple[float, List[int]]]] = [[] for _ in prompts]  # best K, sorted by score, descending
    stops = torch.tensor(sorted({cfg.eos_id, *cfg.stop_ids}), device=device)
    rank = torch.arange(2 * K, device=device)
    for t in range(cfg.max_new_tokens):
        new_len, B, V = t + 1, len(live), logprobs.shape[-1]
        ban_ngrams(logprobs, history, n_gram)
        cand = logprobs.view(B, K, V).add_(scores[:, :, None])  # (B, K, V) each continuation's score, in place
        top_val, top_idx = cand.view(B, -1).topk(2 * K, dim=1)  # (B, 2K)
        src, tok = top_idx // V, top_idx % V
        last = new_len == cfg.max_new_tokens
        stopped = torch.isin(tok, stops)
        ends = torch.ones_like(stopped) if last else stopped
        # Hypotheses that end here: only among the K best-ranked, and never a dead (-inf) beam.
        fin = ends & (rank < K) & (top_val > float("-inf"))
        if bool(fin.any()):
            _finish(finished, live, history, fin, src, tok, top_val, stopped, K, new_len ** lp)
        # The K best continuations that do not end; fewer than K (e.g. all banned): dead beams fill the rest.
        order = torch.where(ends, rank + 2 * K, rank).argsort(dim=1)[:, :K]  # (B, K)
        ok = ~ends.gather(1, order)
        src = torch.where(ok, src.gather(1, order), 0)
        tok = torch.where(ok, tok.gather(1, order), cfg.pad_id)
        scores = torch.where(ok, top_val.gather(1, order), float("-inf"))
        going = _still_running(finished, live.tolist(), scores[:, 0].tolist(), K, new_len ** lp)
        if last or not any(going):
            break
        keep = torch.tensor([b for b, g in enumerate(going) if g], device=device)  # inputs still running
        src_rows = (keep[:, None] * K + src[keep]).view(-1)  # (B'*K,) the row each new beam continues
        live, scores, tok = live[keep], scores[keep], tok[keep].view(-1)
        history = torch.cat([history[src_rows], tok[:, None]], dim=1)
        past, mask, next_pos = _select(past, mask, next_pos, src_rows)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logprobs, past = _step(model, tok[:, None], mask, next_pos, past, _row_names(names, live, K))
        next_pos = next_pos + 1
    return [fin[0][1] if fin else [] for fin in finished]


def _finish(finished, live, history, fin, src, tok, top_val, stopped, K: int, norm: float) -> None:
    """Add the hypotheses ``fin`` (B, 2K) marks (the few that end this step) to their inputs' finished lists; a
    hypothesis cut by ``max_new_tokens`` keeps its last token, one that stopped does not."""
    b_idx, r_idx = fin.nonzero(as_tuple=True)
    beams = history[b_idx * K + src[b_idx, r_idx]].tolist()
    for i, seq, k, s, stop in zip(live[b_idx].tolist(), beams, tok[b_idx, r_idx].tolist(),
                                  top_val[b_idx, r_idx].tolist(), stopped[b_idx, r_idx].tolist()):
        _add_finished(finished[i], K, s / norm, seq if stop else seq + [k])


def _still_running(finished, live: List[int], best: List[float], K: int, norm: float) -> List[bool]:
    """Per live input: False once K hypotheses finished and its best running beam (score ``best``), normalised at
    the current length, cannot beat the worst of them."""
    return [len(finished[i]) < K or b / norm > finished[i][-1][0] for i, b in zip(live, best)]


def _add_finished(fin: List[Tuple[float, List[int]]], K: int, score: float, seq: List[int]) -> None:
    if len(fin) == K and score <= fin[-1][0]:
        return
    fin.append((score, seq))
    fin.sort(key=lambda x: -x[0])
    del fin[K:]


def generate(model, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, batch_size: int = DEFAULT_BATCH_SIZE,
             adapter_names: Optional[Sequence[Optional[str]]] = None, packed: bool = True) -> List[List[int]]:
    """Decode every prompt, ``batch_size`` at a time (greedy when ``cfg.beam_size == 1``, else beam search).

    Prompts are decoded in order of length (a stable sort, so equal lengths keep their order) and returned in
    the caller's order: in float32, a row's tokens do not depend on the rows batched with it.

    Args:
        model: a ``SimpleGPT2WithLoRA`` (put it in eval mode first; ``eval()`` also merges LoRA).
        prompts: token lists, each non-empty; its length plus ``max_new_tokens`` must fit ``max_positions``.
        cfg: the decoding settings.
        batch_size: prompts per forward pass (beam search runs ``batch_size * beam_size`` rows).
        adapter_names: per prompt, the adapter that generates it (None: the base model), mixed in one batch
            through ``lora.batch_adapters``; each prompt's tokens are those its adapter gives alone. Keep the
            model unmerged (``merge_weights=False``), or every batch unmerges and re-merges it.
        packed: run the plain linear layers on packed weights (:func:`packed_linears`; not with
            ``adapter_names``). False: ``F.linear`` (slower on the CPU; its sums are those of transformers' layers).

    Returns:
        Per prompt, in order, the generated token ids without the closing end-of-text.

    Raises:
        ValueError: an empty prompt, a prompt too long for the model's positions, or ``adapter_names`` of
            another length than ``prompts`` or naming an adapter the model lacks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts; give one "
                         "adapter name (or None) per prompt")
    limit = model.config.max_positions
    for p in prompts:
        if len(p) + cfg.max_new_tokens > limit:
            raise ValueError(f"a prompt of {len(p)} tokens plus max_new_tokens={cfg.max_new_tokens} exceeds the "
                             f"model's {limit} positions")
    fn = greedy_batch if cfg.beam_size == 1 else beam_search_batch
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: List[List[int]] = [[] for _ in prompts]
    with packed_linears(model) if packed and adapter_names is None else contextlib.nullcontext():
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            names = None if adapter_names is None else [adapter_names[i] for i in chunk]
            with _adapters(model, names):  # a merged model is unmerged once per batch, not at every step
                for i, tokens in zip(chunk, fn(model, [prompts[i] for i in chunk], cfg, names)):
                    out[i] = tokens
    return out
