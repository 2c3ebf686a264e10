"""Batched greedy and beam-search decoding for ``SimpleGPT2WithLoRA``, with its KV cache.

Prompts of different lengths are padded on the *left* (so every row's next token sits in the last column); the
attention mask hides the padding and ``position_ids`` count only real tokens, so a padded row computes exactly what
it would alone. Decoding stops at ``<|endoftext|>`` (or any of ``stop_ids``, e.g. 628 = "\\n\\n" in Microsoft's E2E
recipe) or after ``max_new_tokens``.

Beam search follows Hugging Face ``transformers``' ``generate(num_beams=K, early_stopping=False)`` (tested to give
the same tokens): 2K candidates per step, only the K best-ranked may finish, a finished hypothesis scores
``sum(log p) / len ** length_penalty`` (``len`` counts generated tokens, end-of-text included), and an input is done
once K hypotheses finished and the best running beam, normalised at its current length, cannot beat the worst.
``no_repeat_ngram_size`` bans n-grams repeated *within the generated text*, as Microsoft's E2E beam search does
(the meaning representation's words are meant to reappear in the description); Hugging Face also counts the prompt.
"""
import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import loralib as lora

from .tokenizer import EOT_ID


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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists into one batch.

    Args:
        prompts: non-empty token lists.
        pad_id: the id padding positions hold (they are masked, so its value does not matter).

    Returns:
        ``(input_ids, attention_mask, position_ids)``, each ``(B, max_len)``; positions start at 0 at each
        row's first real token.

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
    """Tokens that would complete an n-gram already present in ``generated``.

    Args:
        generated: the tokens generated so far (the prompt excluded).
        n: the n-gram size; 0 bans nothing.

    Returns:
        The banned next tokens (possibly with duplicates).
    """
    if n <= 0 or len(generated) < n:
        return []
    if n == 1:
        return list(generated)
    prefix = tuple(generated[len(generated) - n + 1:])
    return [generated[i + n - 1] for i in range(len(generated) - n + 1)
            if tuple(generated[i:i + n - 1]) == prefix]


def _ban(logprobs: torch.Tensor, histories: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    if n <= 0:
        return logprobs
    for row, hist in enumerate(histories):
        bad = banned_tokens(hist, n)
        if bad:
            logprobs[row, bad] = float("-inf")
    return logprobs


def _adapters(model, names: Optional[Sequence[Optional[str]]]):
    """Row i of the batch with adapter ``names[i]`` (``lora.batch_adapters``); no names: the model as it is."""
    return contextlib.nullcontext() if names is None else lora.batch_adapters(model, names)


def _step(model, ids, mask, pos, past, names=None):
    with _adapters(model, names):
        out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
    # float32 log-probabilities: beam scores are sums of many of them, and fp16 sums would reorder beams.
    return F.log_softmax(out.logits[:, -1].float(), dim=-1), out.past_key_values


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, names=None) -> List[List[int]]:
    """Greedy decoding of one batch (argmax at each step, ``no_repeat_ngram_size`` respected); ``names``: each
    prompt's adapter (``generate``'s ``adapter_names``).

    Returns:
        Per prompt, the generated tokens, without the closing end-of-text.
    """
    device = next(model.parameters()).device
    ids, mask, pos = (t.to(device) for t in left_pad(prompts, cfg.pad_id))
    logprobs, past = _step(model, ids, mask, pos, None, names)
    out: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    next_pos = pos[:, -1:] + 1
    stops = {cfg.eos_id, *cfg.stop_ids}
    for t in range(cfg.max_new_tokens):
        logprobs = _ban(logprobs, out, cfg.no_repeat_ngram_size)
        tok = logprobs.argmax(-1)
        for i, k in enumerate(tok.tolist()):
            if done[i]:
                continue
            if k in stops:
                done[i] = True
            else:
                out[i].append(k)
        if all(done) or t + 1 == cfg.max_new_tokens:
            break
        tok = torch.where(torch.tensor(done, device=device), torch.full_like(tok, cfg.pad_id), tok)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logprobs, past = _step(model, tok[:, None], mask, next_pos, past, names)
        next_pos = next_pos + 1
    return out


@torch.no_grad()
def beam_search_batch(model, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, names=None) -> List[List[int]]:
    """Beam search over one batch: ``len(prompts) * beam_size`` rows run through the model at each step;
    ``names``: each prompt's adapter, which its K beams keep (beams are only ever reordered within one prompt).

    Returns:
        Per prompt, the best finished hypothesis's tokens, without the closing end-of-text.
    """
    K, lp, n_gram = cfg.beam_size, cfg.length_penalty, cfg.no_repeat_ngram_size
    device = next(model.parameters()).device
    ids, mask, pos = (t.to(device) for t in left_pad(prompts, cfg.pad_id))
    B = len(prompts)
    logprobs, past = _step(model, ids, mask, pos, None, names)  # the prompt once per input, then to its K beams
    rows = torch.arange(B, device=device).repeat_interleave(K)
    beam_names = None if names is None else [names[b] for b in rows.tolist()]
    logprobs = logprobs[rows]
    past = [(k[rows], v[rows]) for k, v in past]
    mask, next_pos = mask[rows], pos[rows, -1:] + 1
    beams: List[List[int]] = [[] for _ in range(B * K)]  # generated tokens of beam (b, j) at row b*K + j
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # at the first step all K beams are the same prompt: expand only one of them
    finished: List[List[Tuple[float, List[int]]]] = [[] for _ in range(B)]  # best K, sorted by score, descending
    done = [False] * B
    stops = {cfg.eos_id, *cfg.stop_ids}
    for t in range(cfg.max_new_tokens):
        new_len = t + 1
        logprobs = _ban(logprobs, beams, n_gram)
        cand = (scores[:, :, None] + logprobs.view(B, K, -1)).view(B, -1)
        top_val, top_idx = cand.topk(2 * K, dim=1)
        V = logprobs.shape[-1]
        src_beam, token = (top_idx // V).tolist(), (top_idx % V).tolist()
        top_val = top_val.tolist()
        last = new_len == cfg.max_new_tokens
        new_rows, new_scores, new_beams = [], [], []
        for b in range(B):
            keep = []
            for r in range(2 * K):
                j, k, s = src_beam[b][r], token[b][r], top_val[b][r]
                if k in stops or last:
                    if r < K and not done[b] and s > float("-inf"):
                        seq = beams[b * K + j] + ([] if k in stops else [k])
                        _add_finished(finished[b], K, s / new_len ** lp, seq)
                elif len(keep) < K:
                    keep.append((j, k, s))
            while len(keep) < K:  # fewer than K live continuations (e.g. all banned): dead beams fill the rest
                keep.append((0, cfg.pad_id, float("-inf")))
            for j, k, s in keep:
                new_rows.append(b * K + j)
                new_scores.append(s)
                new_beams.append(beams[b * K + j] + [k])
            if not done[b] and len(finished[b]) == K:
                best_running = keep[0][2] / new_len ** lp
                done[b] = best_running <= finished[b][-1][0]
        if last or all(done):
            break
        idx = torch.tensor(new_rows, device=device)
        past = [(k[idx], v[idx]) for k, v in past]
        beams = new_beams
        scores = torch.tensor(new_scores, device=device).view(B, K)
        tok = torch.tensor([bm[-1] for bm in beams], device=device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logprobs, past = _step(model, tok[:, None], mask, next_pos, past, beam_names)
        next_pos = next_pos + 1
    return [fin[0][1] if fin else [] for fin in finished]


def _add_finished(fin: List[Tuple[float, List[int]]], K: int, score: float, seq: List[int]) -> None:
    if len(fin) == K and score <= fin[-1][0]:
        return
    fin.append((score, seq))
    fin.sort(key=lambda x: -x[0])
    del fin[K:]


def generate(model, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, batch_size: int = 16,
             adapter_names: Optional[Sequence[Optional[str]]] = None) -> List[List[int]]:
    """Decode every prompt, ``batch_size`` at a time (greedy when ``cfg.beam_size == 1``, else beam search).

    Args:
        model: a ``SimpleGPT2WithLoRA`` (put it in eval mode first; ``eval()`` also merges LoRA).
        prompts: token lists, each non-empty; its length plus ``max_new_tokens`` must fit ``max_positions``.
        cfg: the decoding settings.
        batch_size: prompts per forward pass (beam search runs ``batch_size * beam_size`` rows).
        adapter_names: per prompt, the adapter that generates it (None: the base model), mixed in one batch
            through ``lora.batch_adapters``; each prompt's tokens are those its adapter gives alone. Keep the
            model unmerged (``merge_weights=False``), or every batch unmerges and re-merges it.

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
    out: List[List[int]] = []
    for i in range(0, len(prompts), batch_size):
        names = None if adapter_names is None else list(adapter_names[i:i + batch_size])
        with _adapters(model, names):  # a merged model is unmerged once per batch, not at every step
            out.extend(fn(model, prompts[i:i + batch_size], cfg, names))
    return out
