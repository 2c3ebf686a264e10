"""Hostile and corrupted GGUF files: each is refused with a one-line ``GGUFError`` naming the file, or read correctly.

The good file is the tiny random Llama of ``tests/nlg/gguf_fixtures.py`` (F32, Q8_0 and Q4_1 tensors, a byte-level
BPE). Mutations (a seeded RNG, so every run fuzzes the same files): truncation at every byte of the first 256 and
at hundreds of points after, flipped header and data bytes, and hand-made headers: wrong magic and versions,
counts of 2^63 entries, strings and arrays longer than the file, unknown value types, another architecture,
block counts of 10^9, heads that do not divide the width, tensors of 2^80 elements, unknown and unreadable ggml
types, offsets past the end, misaligned or overlapping, missing, extra and misshapen tensors, bad alignment,
tokenizers that cannot be built, NaN / Inf weights. Each is loaded by ``read_llama_gguf`` and by
``tokenizer_from_gguf``.

For each load: only ``GGUFError`` (any other exception fails), its message one line starting with the file's path;
or a load whose tensors equal a reference decoding by llama.cpp's ``gguf.GGUFReader``. The traced Python/numpy
allocation of every load is measured (``tracemalloc``) and bounded, so no load allocates from a size the file only
claims, and so is the process's peak resident memory over the whole fuzz (torch's allocations included); a
watchdog fails a load that hangs (``guarded_load`` of ``test_loader_fuzz.py``).
"""
import collections
import os
import random
import struct
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from .test_loader_fuzz import guarded_load

for _dir in (("..", "nlg"), ("..", "..", "examples", "NLG")):  # gguf_fixtures, and the example's e2e_nlg package
    _path = os.path.abspath(os.path.join(os.path.dirname(__file__), *_dir))
    if _path not in sys.path:
        sys.path.insert(0, _path)
import gguf_fixtures  # noqa: E402
from e2e_nlg import gguf_checkpoint  # noqa: E402
from e2e_nlg.measure import PeakRSS  # noqa: E402

gguf = pytest.importorskip("gguf")

SEED = 20261206
ALLOC_LIMIT = 8 << 20  # traced peak per load; the file is ~60 KiB, its model ~0.4 MiB, its claims up to 2^128 bytes
RSS_LIMIT = 256 << 20  # the process's peak resident memory over the whole fuzz, above its start (torch included)
T = gguf.GGUFValueType
_FMT = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
        T.FLOAT32: "<f", T.BOOL: "<B", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


ANY = "any outcome"  # a case that may load or be refused (with any wording)


KV = collections.namedtuple("KV", "key vtype value sub")  # sub: an array's item type
Tensor = collections.namedtuple("Tensor", "name dims ggml_type offset")  # dims in ggml order; offset in the data


class Raw(bytes):
    """Bytes written verbatim where a key, a value or a tensor entry would be packed."""


# --- a GGUF writer that writes anything ---------------------------------------------------------------------------

def _str(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype, value, sub=None) -> bytes:
    if isinstance(value, Raw):
        return value
    if vtype == T.STRING:
        return _str(value)
    if vtype == T.ARRAY:
        return struct.pack("<IQ", sub, len(value)) + b"".join(_value(sub, v) for v in value)
    return struct.pack(_FMT[vtype], value)


def pack(kvs, tensors, data, version=3, n_kv=None, n_tensors=None, alignment=32, magic=b"GGUF") -> bytes:
    """A GGUF file: ``kvs`` [(key, type, value, array item type)], ``tensors`` [(name, ggml dims, type, offset)]
    (either may be a ``Raw``), ``data`` after the table padded to ``alignment``."""
    out = [magic, struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kvs) if n_kv is None else n_kv)]
    for kv in kvs:
        out.append(kv if isinstance(kv, Raw) else _str(kv[0]) + struct.pack("<I", kv[1]) + _value(*kv[1:]))
    for t in tensors:
        if isinstance(t, Raw):
            out.append(t)
            continue
        name, dims, ggml_type, offset = t
        out.append(_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset))
    head = b"".join(out)
    return head + b"\0" * (-len(head) % alignment) + data


def decompose(path):
    """(kvs, tensors) of a GGUF file, as llama.cpp's ``GGUFReader`` reads it."""
    r = gguf.GGUFReader(path)
    kvs = [KV(key, f.types[0], f.contents(), f.types[1] if len(f.types) > 1 else None)
           for key, f in r.fields.items() if not key.startswith("GGUF.")]
    tensors = [Tensor(t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset) - r.data_offset)
               for t in r.tensors]
    return kvs, tensors


def reference_state_dict(path):
    """The file's tensors decoded by ``GGUFReader`` + ``gguf.quants`` and un-permuted here (numpy): what a correct
    reader returns, or None where GGUFReader refuses the file."""
    try:
        r = gguf.GGUFReader(path)
        heads = {"attn_q": int(r.fields["llama.attention.head_count"].contents()),
                 "attn_k": int(r.fields["llama.attention.head_count_kv"].contents())}
        out = {}
        for t in r.tensors:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            w = w.reshape([int(d) for d in reversed(t.shape)])
            kind = t.name.split(".")[-2]
            if kind in heads:  # llama.cpp interleaves the rotary halves of each head's rows
                n, o = heads[kind], w.shape[0]
                w = w.reshape(n, o // n // 2, 2, -1).swapaxes(1, 2).reshape(o, -1)
            out[gguf_checkpoint.hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
        return out
    except Exception:  # noqa: BLE001 - any refusal by the reference counts as a refusal
        return None


# --- the mutations ------------------------------------------------------------------------------------------------

def _edit(entries, name, drop=False, **changes):
    """``entries`` (``KV`` or ``Tensor`` tuples) with the one called ``name`` dropped or its fields changed."""
    if drop:
        return [e for e in entries if e[0] != name]
    return [e._replace(**changes) if e[0] == name else e for e in entries]


def hostile_files(kvs, tensors, data):
    """{label: (bytes, words the error must contain, or None where the file must load)}."""
    k, t = kvs, tensors
    first = t[0].name  # token_embd.weight, Q8_0
    norm = next(x for x in t if x.ggml_type == 0)  # an F32 norm
    q41 = next(x for x in t if x.ggml_type == 3)
    tokens = next(x.value for x in k if x.key == "tokenizer.ggml.tokens")
    good = pack(k, t, data)

    def first_kv(vtype, value, sub=None):  # the good file with an entry "x" written first
        return pack([KV("x", vtype, value, sub)] + k, t, data)

    def aligned(vtype, value):  # the good file with general.alignment, the data padded to it where it is valid
        return pack(k + [KV("general.alignment", vtype, value, None)], t, data,
                    alignment=value if isinstance(value, int) and 0 < value < 1 << 20 else 32)

    def patched(at, raw):  # the good file with the data at ``at`` overwritten
        return pack(k, t, data[:at] + raw + data[at + len(raw):])

    def kv(key, **changes):  # the good file with one metadata entry changed
        return pack(_edit(k, key, **changes), t, data)

    def tv(name, **changes):  # the good file with one tensor entry changed
        return pack(k, _edit(t, name, **changes), data)

    cases = {
        "empty file": (b"", "truncated"),
        "10 bytes": (good[:10], "truncated"),
        "magic GGUG": (pack(k, t, data, magic=b"GGUG"), "not a GGUF file"),
        "version 1": (pack(k, t, data, version=1), "version 1"),
        "version 4": (pack(k, t, data, version=4), "version 4"),
        "2^63 tensors": (pack(k, t, data, n_tensors=2**63), "claims"),
        "2^64-1 metadata entries": (pack(k, t, data, n_kv=2**64 - 1), "claims"),
        "10^9 metadata entries": (pack(k, t, data, n_kv=10**9), "claims"),
        "one metadata entry more than written": (pack(k, t, data, n_kv=len(k) + 1), ANY),
        "key of 2^62 bytes": (pack([Raw(struct.pack("<Q", 2**62) + b"general")] + k, t, data), "allowed"),
        "key of 60000 bytes past the end": (pack([Raw(struct.pack("<Q", 60000) + b"general")], [], b""),
                                            "truncated"),
        "key not UTF-8": (pack([KV(b"gen\xffral.x", T.UINT32, 1, None)] + k, t, data), "UTF-8"),
        "key twice": (pack(k + [k[0]], t, data), "twice"),
        "value type 13": (first_kv(13, Raw(b"\0" * 8)), "value type 13"),
        "value type 2^31": (first_kv(2**31, Raw(b"")), "value type"),
        "string of 2^62 bytes": (first_kv(T.STRING, Raw(struct.pack("<Q", 2**62))), "truncated"),
        "2^60 uint32 values": (first_kv(T.ARRAY, Raw(struct.pack("<IQ", T.UINT32, 2**60))), "truncated"),
        "2^61 strings": (first_kv(T.ARRAY, Raw(struct.pack("<IQ", T.STRING, 2**61))), "truncated"),
        "array of arrays": (first_kv(T.ARRAY, Raw(struct.pack("<IQ", T.ARRAY, 1))), "array of value type 9"),
        "boolean 7": (first_kv(T.BOOL, 7), "boolean"),
        "boolean array holding 2": (first_kv(T.ARRAY, [0, 2], T.BOOL), "boolean"),
        "architecture gpt2": (kv("general.architecture", value="gpt2"), "'gpt2' model"),
        "architecture qwen2 with IQ4_NL tensors": (pack(_edit(k, "general.architecture", value="qwen2"),
                                                        _edit(t, first, ggml_type=20), data), "'qwen2' model"),
        "architecture missing": (kv("general.architecture", drop=True), "'llama'"),
        "architecture a number": (kv("general.architecture", value=7, vtype=T.UINT32), "'llama'"),
        "architecture an array": (kv("general.architecture", value=["llama"], vtype=T.ARRAY, sub=T.STRING),
                                  "'llama'"),
        "block_count 10^9": (kv("llama.block_count", value=10**9), "block_count"),
        "block_count 0": (kv("llama.block_count", value=0), "block_count"),
        "block_count 1": (kv("llama.block_count", value=1), "holds tensor"),
        "block_count a string": (kv("llama.block_count", value="2", vtype=T.STRING), "block_count"),
        "block_count a float": (kv("llama.block_count", value=2.0, vtype=T.FLOAT32), "block_count"),
        "block_count missing": (kv("llama.block_count", drop=True), "missing"),
        "head_count 0": (kv("llama.attention.head_count", value=0), "head_count"),
        "head_count 7": (kv("llama.attention.head_count", value=7), "do not split"),
        "head_count_kv 3": (kv("llama.attention.head_count_kv", value=3), "do not split"),
        "head_count 2^32-1": (kv("llama.attention.head_count", value=2**32 - 1), "do not split"),
        "embedding_length 128": (kv("llama.embedding_length", value=128), "rope.dimension_count"),
        "feed_forward_length 2^31": (kv("llama.feed_forward_length", value=2**31), "shape"),
        "rope scaling linear": (pack(k + [KV("llama.rope.scaling.type", T.STRING, "linear", None)], t, data),
                                "RoPE scaling"),
        "vocab_size 10^9": (kv("llama.vocab_size", value=10**9), "vocab_size"),
        "rms eps negative": (kv("llama.attention.layer_norm_rms_epsilon", value=-1e-5), "positive finite"),
        "rms eps NaN": (kv("llama.attention.layer_norm_rms_epsilon", value=float("nan")), "positive finite"),
        "rope base inf": (kv("llama.rope.freq_base", value=float("inf")), "positive finite"),
        "context_length missing": (kv("llama.context_length", drop=True), "missing"),
        "a token missing": (kv("tokenizer.ggml.tokens", value=tokens[:-1]), "tokens"),
        "tokens missing": (kv("tokenizer.ggml.tokens", drop=True), "tokens"),
        "token types empty": (kv("tokenizer.ggml.token_type", value=[]), "token_type"),
        "eos 10^6": (kv("tokenizer.ggml.eos_token_id", value=10**6), "token id"),
        "eos missing": (kv("tokenizer.ggml.eos_token_id", drop=True), "eos_token_id"),
        "bos a string": (kv("tokenizer.ggml.bos_token_id", value="1", vtype=T.STRING), "token id"),
        "merges a number": (kv("tokenizer.ggml.merges", value=5, vtype=T.UINT32), "merges"),
        "tensor with 0 dimensions": (tv(first, dims=[]), "dimensions"),
        "tensor with 5 dimensions": (tv(first, dims=[64, 1, 1, 1, 1]), "dimensions"),
        "tensor with 2^32-1 dimensions": (pack(k, [Raw(_str(first) + struct.pack("<I", 2**32 - 1))], data),
                                          "dimensions"),
        "tensor of 2^80 elements": (tv(first, dims=[2**40, 2**40]), "outside"),
        "tensor of (2^64-1)^2 elements": (tv(first, dims=[2**64 - 32, 2**64 - 1]), "outside"),
        "dims whose product wraps to 0 in 64 bits": (tv(first, dims=[2**32, 2**32, 2**32]), "outside"),
        "dimension 0": (tv(first, dims=[64, 0]), "blocks"),
        "row not whole blocks": (tv(q41.name, dims=[48, q41.dims[1]]), "blocks"),
        "ggml type 99": (tv(first, ggml_type=99), "ggml type 99"),
        "ggml type Q4_K on rows of 64": (tv(first, ggml_type=12), "256-element blocks"),
        "ggml type IQ2_XXS": (tv(first, ggml_type=16), "cannot dequantise"),
        "ggml type IQ4_NL": (tv(first, ggml_type=20), "cannot dequantise"),
        "ggml type I8": (tv(first, ggml_type=24), "cannot dequantise"),
        "ggml type Q8_1": (tv(first, ggml_type=9), "cannot dequantise"),
        "ggml type 2^32-1": (tv(first, ggml_type=2**32 - 1), "cannot dequantise"),
        "offset 2^63": (tv(first, offset=2**63), "outside"),
        "offset 2^64-32": (tv(first, offset=2**64 - 32), "outside"),
        "offset past the end": (tv(t[-1].name, offset=len(data) + 32), "outside"),
        "offset misaligned": (tv(t[-1].name, offset=t[-1].offset + 4), "alignment"),
        "tensors overlapping": (tv(t[1].name, offset=t[0].offset), "overlap"),
        "tensor twice": (pack(k, t + [t[-1]], data), "twice"),
        "tensor missing": (tv("blk.1.ffn_up.weight", drop=True), "missing"),
        "extra tensor rope_freqs": (pack(k, t + [Tensor("rope_freqs.weight", [8], 0, len(data))],
                                         data + b"\0" * 32), "holds tensor"),
        "attn_k misshapen": (pack(k, _edit(t, "blk.0.attn_k.weight", dims=[64, 64], offset=len(data)),
                                  data + b"\0" * 2560), "shape"),
        "token_embd 1-D": (tv(first, dims=[64]), "token_embd"),
        "alignment 0": (aligned(T.UINT32, 0), "alignment"),
        "alignment 3": (aligned(T.UINT32, 3), "alignment"),
        "alignment 2^40": (aligned(T.UINT64, 2**40), "alignment"),
        "alignment a string": (aligned(T.STRING, "32"), "alignment"),
        "alignment 64": (aligned(T.UINT32, 64), None if all(x.offset % 64 == 0 for x in t) else "alignment"),
        "data cut short": (good[:-100], "outside"),
        "data cut at the table": (good[:len(good) - len(data)], "outside"),
        "trailing bytes": (good + b"\0" * 64, None),
        "unchanged": (good, None),
        "NaN in a norm": (patched(norm.offset, struct.pack("<f", float("nan"))), "NaN or infinite"),
        "Inf in a norm": (patched(norm.offset, struct.pack("<f", float("-inf"))), "NaN or infinite"),
        "Inf as a Q8_0 scale": (patched(t[0].offset, struct.pack("<e", float("inf"))), "NaN or infinite"),
        "NaN as a Q4_1 scale": (patched(q41.offset, struct.pack("<e", float("nan"))), "NaN or infinite"),
    }
    return cases


def tokenizer_hostile_files(kvs, tensors, data):
    """Files ``read_llama_gguf`` reads but ``tokenizer_from_gguf`` must refuse: {label: (bytes, words)}."""
    merges = next(x.value for x in kvs if x.key == "tokenizer.ggml.merges")
    tokens = next(x.value for x in kvs if x.key == "tokenizer.ggml.tokens")

    def kv(key, value):
        return pack(_edit(kvs, key, value=value), tensors, data)

    return {
        "tokenizer llama": (kv("tokenizer.ggml.model", "llama"), "'llama' tokenizer"),
        "pre-tokenizer llama-bpe": (kv("tokenizer.ggml.pre", "llama-bpe"), "pre-tokenizer 'llama-bpe'"),
        "merge of an unknown token": (kv("tokenizer.ggml.merges", ["zz qq"] + merges[1:]), "merge 'zz qq'"),
        "merge of three parts": (kv("tokenizer.ggml.merges", ["a b c"] + merges[1:]), "merge 'a b c'"),
        "merge without a result": (kv("tokenizer.ggml.merges", ["q z"] + merges[1:]), "merge 'q z'"),
        "token twice": (kv("tokenizer.ggml.tokens", tokens[:-1] + [tokens[100]]), "twice"),
    }


def generated_files(good: bytes, header_len: int, rng: random.Random):
    """(label, bytes): truncations and byte flips, in the header and in the data."""
    cuts = sorted(set(range(256)) | {rng.randrange(256, header_len) for _ in range(300)}
                  | {rng.randrange(header_len, len(good)) for _ in range(60)})
    out = [(f"truncated at {i}", good[:i]) for i in cuts]
    for i in range(300):
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(header_len)] = rng.randrange(256)
        out.append((f"header flip {i}", bytes(b)))
    for i in range(60):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(header_len, len(good))] = rng.randrange(256)
        out.append((f"data flip {i}", bytes(b)))
    return out


# --- the test -----------------------------------------------------------------------------------------------------

def load_traced(fn):
    """``fn()``'s result or its GGUFError, and the traced peak allocation (bytes) while it ran."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except gguf_checkpoint.GGUFError as e:
            result = e
        except ValueError as e:  # a ValueError that is not a GGUFError is a defect, not a refusal
            raise AssertionError(f"{type(e).__name__} instead of GGUFError: {e}") from e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_one(path, label, want, counts):
    """Load ``path`` with both loaders under the watchdog. ``want``: the words ``read_llama_gguf``'s error must
    contain, None where the file must load, ANY for either. A refusal must be a one-line GGUFError starting with
    the path; a load must give GGUFReader's tensors. Returns read_llama_gguf's error message or None."""
    outcome = None
    for loader in (gguf_checkpoint.read_llama_gguf, gguf_checkpoint.tokenizer_from_gguf):
        _, (result, peak) = guarded_load(lambda: load_traced(lambda: loader(path)), os.path.dirname(path), label)
        assert peak < ALLOC_LIMIT, f"{label}: {loader.__name__} allocated {peak / 2**20:.1f} MiB"
        counts["peak"] = max(counts["peak"], peak)
        weights = loader is gguf_checkpoint.read_llama_gguf
        if isinstance(result, gguf_checkpoint.GGUFError):
            msg = str(result)
            assert msg.startswith(f"{path}: ") and "\n" not in msg and msg.endswith(")"), f"{label}: {msg!r}"
            assert want is ANY or (want is not None and (want in msg or not weights)), \
                f"{label}: {loader.__name__} said {msg!r}, expected " + ("a load" if want is None else repr(want))
            outcome = msg if weights else outcome
            counts["refused"] += 1
            continue
        assert want is ANY or want is None or not weights, f"{label}: loaded, expected an error with {want!r}"
        if weights:
            ref = reference_state_dict(path)
            assert ref is not None, f"{label}: read a file llama.cpp's GGUFReader refuses"
            assert ref.keys() == result.state_dict.keys() and all(
                torch.equal(ref[n], result.state_dict[n]) for n in ref), f"{label}: tensors differ from GGUFReader's"
        else:
            assert result.n_vocab > 256 and result.decode(result.encode_ordinary("name : Café")) == "name : Café"
        counts["loaded"] += 1
    return outcome


def _write(path, buf: bytes) -> str:
    with open(path, "wb") as f:
        f.write(buf)
    return str(path)


def test_gguf_fuzz(tmp_path, tally):
    good_path = str(tmp_path / "good.gguf")
    gguf_fixtures.write_tiny_llama(good_path, seed=5)
    good = open(good_path, "rb").read()
    kvs, tensors = decompose(good_path)
    header_len = gguf_checkpoint.read_gguf_header(good_path).data_start
    data = good[header_len:]
    assert pack(kvs, tensors, data) == good  # the test's writer reproduces gguf's byte for byte
    counts = {"refused": 0, "loaded": 0, "peak": 0}
    cases = [(label, buf, want) for label, (buf, want) in hostile_files(kvs, tensors, data).items()]
    cases += [(label, buf, ANY) for label, buf in generated_files(good, header_len, random.Random(SEED))]
    with PeakRSS() as rss:
        for i, (label, buf, want) in enumerate(cases):
            check_one(_write(tmp_path / f"m{i}.gguf", buf), label, want, counts)
    assert rss.delta < RSS_LIMIT, f"the GGUF fuzz peaked {rss.delta / 2**20:.0f} MiB above its start"
    tokenizer_cases = tokenizer_hostile_files(kvs, tensors, data)
    for i, (label, (buf, want)) in enumerate(tokenizer_cases.items()):
        path = _write(tmp_path / f"t{i}.gguf", buf)
        assert gguf_checkpoint.read_llama_gguf(path).state_dict  # the weights load, the tokenizer does not
        with pytest.raises(gguf_checkpoint.GGUFError) as e:
            gguf_checkpoint.tokenizer_from_gguf(path)
        msg = str(e.value)
        assert want in msg and msg.startswith(f"{path}: ") and "\n" not in msg, f"{label}: {msg}"
    assert counts["refused"] > 500 and counts["loaded"] > 10
    tally.add("files fuzzed: GGUF reader", len(cases) + len(tokenizer_cases))
    tally.note(f"GGUF fuzz: {counts['refused']} refusals, {counts['loaded']} loads equal to GGUFReader's; the "
               f"largest traced allocation of one load {counts['peak'] / 2**20:.2f} MiB (limit "
               f"{ALLOC_LIMIT >> 20} MiB; headers claimed up to 2^128 bytes), peak RSS +{rss.delta / 2**20:.1f} MiB "
               f"over the fuzz ({rss.method})")
