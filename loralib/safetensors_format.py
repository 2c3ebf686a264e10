"""Read and write the safetensors format with torch alone (loralib depends on nothing else).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header length N, N bytes
of JSON ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the tensors' raw little-endian bytes, offsets relative to the end of the header. Files written here are read
by the ``safetensors`` package and the other way round (tested).
"""
import ctypes
import json
import math
import struct
import sys
from typing import Dict, Optional, Tuple

import torch

__all__ = ["save_file", "load_file", "SafetensorsError"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ORDER = ["I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL"]  # the reference's dtype order
_MAX_HEADER = 100_000_000  # the reference implementation's limit too


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (truncated, corrupted, or with an unsupported dtype)."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def save_bytes(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The safetensors encoding of ``tensors``, byte for byte what the reference writer produces."""
    if sys.byteorder != "little":
        raise SafetensorsError("writing safetensors needs a little-endian machine")
    header, chunks, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise SafetensorsError(f"{name!r} is a {type(t).__name__}, not a tensor")
    # The reference writer's order: by dtype, widest first (keeps every tensor aligned), then by name.
    for name in sorted(tensors, key=lambda n: (_ORDER.index(_NAMES.get(tensors[n].dtype, "BOOL")), n)):
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise SafetensorsError(f"{name!r} has dtype {t.dtype}, which this writer does not support")
        data = _tensor_bytes(t)
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so that the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def save_file(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` (not atomically: see ``loralib.serialization.atomic_write``)."""
    with open(path, "wb") as f:
        f.write(save_bytes(tensors, metadata))


def _object_without_duplicates(source: str):
    def hook(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise SafetensorsError(f"{source}: the header names {key!r} twice; the file is corrupted")
            obj[key] = value
        return obj
    return hook


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(raw: bytes, source: str) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_duplicates(source),
                            parse_constant=_no_constants)
    except SafetensorsError:
        raise
    # ValueError covers JSONDecodeError, NaN/Infinity and integers too long to parse; RecursionError deep nesting
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{source}: the header is not valid JSON ({type(e).__name__}: "
                               f"{str(e)[:200]}); the file is corrupted or not safetensors") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{source}: the header is not a JSON object; the file is corrupted or not safetensors")
    return header


def load_bytes(buf: bytes, source: str = "<bytes>") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Decode a safetensors byte string into (tensors on CPU, metadata).

    Everything is checked before any tensor is built: the header length against the buffer, the JSON (no duplicate
    names, no NaN), each entry's dtype, shape and offsets (sizes computed with Python integers, so a shape whose
    product overflows 64 bits is caught), and that the entries tile the data exactly, without overlap or gap, as
    the reference implementation requires. Nothing is allocated from a size the file declares.

    Raises:
        SafetensorsError: naming ``source`` and what is wrong.
    """
    if len(buf) < 8:
        raise SafetensorsError(f"{source}: {len(buf)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > _MAX_HEADER or 8 + n > len(buf):
        raise SafetensorsError(f"{source}: header length {n} does not fit a {len(buf)}-byte file "
                               "(truncated or not safetensors)")
    header = _parse_header(bytes(buf[8:8 + n]), source)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{source}: __metadata__ must map strings to strings; the file is corrupted")
    data = memoryview(buf)[8 + n:]
    entries = []
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise SafetensorsError(f"{source}: entry {name!r} has dtype {dtype!r}; this reader knows "
                                   f"{sorted(_DTYPES)} (the file is corrupted or uses an unsupported dtype)")
        # The product of the non-zero dimensions bounds the strides torch would compute, even for an empty tensor.
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
                and math.prod(d for d in shape if d) < 2**63):
            raise SafetensorsError(f"{source}: entry {name!r} has shape {shape!r}, not a list of non-negative "
                                   "integers whose product fits 64 bits; the file is corrupted")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise SafetensorsError(f"{source}: entry {name!r} has data_offsets {offsets!r}, not [begin, end]; "
                                   "the file is corrupted")
        begin, end = offsets
        size = math.prod(shape) * torch.empty((), dtype=_DTYPES[dtype]).element_size()  # exact: Python ints
        if not 0 <= begin <= end <= len(data) or end - begin != size:
            raise SafetensorsError(f"{source}: entry {name!r} (shape {shape}, {dtype}: {size} bytes) points at "
                                   f"bytes [{begin}, {end}) of {len(data)}: the file is truncated or corrupted")
        entries.append((begin, end, name, dtype, shape))
    position = 0
    for begin, end, name, _, _ in sorted(entries):
        if begin != position:
            what = "overlaps the entry before it" if begin < position else f"leaves bytes [{position}, {begin}) unused"
            raise SafetensorsError(f"{source}: entry {name!r} at [{begin}, {end}) {what}; the file is corrupted")
        position = end
    if position != len(data):
        raise SafetensorsError(f"{source}: {len(data) - position} bytes after the last tensor; the file is "
                               "corrupted or two files were concatenated")
    tensors = {}
    for begin, end, name, dtype, shape in entries:
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=_DTYPES[dtype])
        else:
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=_DTYPES[dtype]).reshape(shape)
    return tensors, metadata


def load_file(path: str) -> Dict[str, torch.Tensor]:
    """Read the tensors of a safetensors file onto the CPU.

    Raises:
        SafetensorsError: the file is truncated, corrupted, or holds a dtype this reader does not know.
    """
    with open(path, "rb") as f:
        return load_bytes(f.read(), source=path)[0]


def load_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file."""
    with open(path, "rb") as f:
        return load_bytes(f.read(), source=path)[1]
