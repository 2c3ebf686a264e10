"""Read and write the safetensors format with torch alone (loralib depends on nothing else).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header length N, N bytes
of JSON ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the tensors' raw little-endian bytes, offsets relative to the end of the header. Files written here are read
by the ``safetensors`` package and the other way round (tested).
"""
import ctypes
import json
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


def load_bytes(buf: bytes, source: str = "<bytes>") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Decode a safetensors byte string into (tensors on CPU, metadata); every offset and size is checked."""
    if len(buf) < 8:
        raise SafetensorsError(f"{source}: {len(buf)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > _MAX_HEADER or 8 + n > len(buf):
        raise SafetensorsError(f"{source}: header length {n} does not fit a {len(buf)}-byte file "
                               "(truncated or not safetensors)")
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{source}: the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{source}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(buf)[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{source}: entry {name!r} is malformed or has an unsupported dtype "
                                   f"({info!r})") from e
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) or end - begin != size:
            raise SafetensorsError(f"{source}: entry {name!r} (shape {shape}, {info['dtype']}) points at bytes "
                                   f"[{begin}, {end}) of {len(data)}: the file is truncated or corrupted")
        if size == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)
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
