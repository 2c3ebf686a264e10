"""Self-describing adapter directories: ``save_adapter`` / ``load_adapter``, and export to PEFT's layout.

A directory holds ``adapter_config.json`` (which layers, their ranks, alphas, dropout and scaling, the library
version, a fingerprint of the base weights' names and shapes, and the name and SHA-256 of the weights file) and
``adapter_model.safetensors`` (the adapter's tensors under loralib 0.1.2's keys, ``<layer>.lora_A`` /
``<layer>.lora_B``, so that the weights file alone also loads with ``model.load_state_dict(sd, strict=False)``), or
with ``weights_format="bin"`` the same tensors as ``pytorch_model.bin`` (``torch.save``, as Microsoft's loralib
examples save them). Loading checks the config against the model and names the
first thing that differs; files are written atomically (temporary file + ``os.replace``), the config last.

``format="peft"`` writes what ``peft.PeftModel.from_pretrained`` reads instead, and ``load_adapter`` reads such
directories too (the PEFT side is ``peft_format.py``).
"""
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from typing import BinaryIO, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .adapters import DEFAULT, LoRAAdapter, adapter_state_dict, delete_adapter, list_adapters
from .errors import AdapterError, is_number
from .injection import injected_base, inject, layer_kind, merge_and_unload
from .layers import ConvLoRA, LoRALayer, MergedLinear, adapter_factors, check_lora_args, lora_layers, \
    lora_names
from .peft_format import check_peft_config, peft_export, peft_specs
from .safetensors_format import load_bytes, save_bytes
from .version import __version__

__all__ = ["save_adapter", "load_adapter", "AdapterError", "base_shapes_fingerprint", "base_values_sha256",
           "base_fingerprint", "atomic_write", "safe_load", "read_adapter_config"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_FILES = {"safetensors": WEIGHTS_NAME, "bin": BIN_WEIGHTS_NAME}  # save_adapter's weights_format -> file
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
FORMAT, FORMAT_VERSION = "loralib-adapter", 1


# --- files -------------------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: Union[bytes, Callable[[BinaryIO], None]]) -> None:
    """Write a file so that readers see the old file or the new one, never a partial one.

    Args:
        path: the file to create or replace; its directory is created if needed.
        data: the bytes to write, or a function that writes them to the binary file object it is given
            (``lambda f: torch.save(obj, f)``).

    The file gets the permissions a plain ``open(path, "wb")`` would give it (``0o666`` less the umask), not the
    owner-only ``0o600`` of the temporary file it is written as.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _prev_path(path: str) -> str:
    """Where the weights that the current config describes are kept while a save replaces them."""
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".prev")


def _file_sha256(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _keep_previous(directory: str) -> Tuple[Optional[str], bool]:
    """Before a save replaces a weights/config pair, keep the weights the current config describes reachable as
    ``.<weights>.prev`` (a hard link, a copy where links are not supported). A save killed between the two
    renames then leaves the old config, the new weights and the old weights under ``.prev``: loading finds the
    old pair complete. Returns the path of the weights file the current config names (None without a readable
    config) and whether a ``.prev`` now holds the weights it describes."""
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            old = json.load(f)
        expected, name = old.get("weights_sha256"), old.get("weights_file", WEIGHTS_NAME)
    except (OSError, ValueError, AttributeError, RecursionError):
        return None, False
    if name not in WEIGHTS_FILES.values():
        return None, False
    weights = os.path.join(directory, name)
    prev = _prev_path(weights)
    if not isinstance(expected, str):
        return weights, False
    if _file_sha256(weights) != expected:
        # A torn earlier save: the weights on disk are not the config's. Its .prev still is; leave it alone.
        return weights, _file_sha256(prev) == expected
    tmp = prev + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(weights, tmp)
    except OSError:
        shutil.copyfile(weights, tmp)
    os.replace(tmp, prev)
    return weights, True


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


# --- what describes an adapter -------------------------------------------------------------------------------------

def _base_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The base (non-LoRA) state-dict entries under the names the un-injected model gives them."""
    conv_layers = {n for n, m in model.named_modules() if isinstance(m, ConvLoRA)}
    lora = lora_names(model)
    tensors = {}
    for key, t in model.state_dict().items():
        if key in lora:
            continue
        owner, _, leaf = key.rpartition(".")
        head, _, last = owner.rpartition(".")
        if last == "conv" and head in conv_layers:  # ConvLoRA keeps the convolution as its child `conv`
            key = f"{head}.{leaf}" if head else leaf
        tensors[key] = t
    return tensors


def base_shapes_fingerprint(model: nn.Module) -> Dict[str, object]:
    """Which base architecture an adapter fits: the names and shapes of the base (non-LoRA) state-dict entries, as
    the un-injected model names them, and their SHA-256. Values are not read, so two checkpoints of the same
    architecture have the same fingerprint (:func:`base_values_sha256` tells them apart). ``save_adapter`` stores
    it as the config's ``"base_fingerprint"`` and ``load_adapter`` checks the model against it.

    Args:
        model: the model, with or without LoRA layers (merged or not: the state dict holds the unmerged weights).

    Returns:
        ``{"sha256", "num_tensors", "shapes"}``.
    """
    shapes = {k: list(t.shape) for k, t in _base_tensors(model).items()}
    text = "\n".join(f"{k}:{tuple(v)}" for k, v in sorted(shapes.items()))
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "num_tensors": len(shapes), "shapes": shapes}


def base_values_sha256(model: nn.Module) -> str:
    """Which base checkpoint: the SHA-256 of the base (non-LoRA) weights' names and values (as float32, in name
    order). It reads every base weight: compute it before casting the base to a lower precision if it is to match
    a float32 rebuild.

    Args:
        model: the model, with or without LoRA layers (merged or not).

    Returns:
        64 hex digits.
    """
    tensors = _base_tensors(model)
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def base_fingerprint(model: nn.Module, values: bool = False) -> Dict[str, object]:
    """Deprecated: :func:`base_shapes_fingerprint`, plus ``"values_sha256"`` (:func:`base_values_sha256`) with
    ``values=True``. Kept for code written before the split; warns ``DeprecationWarning``."""
    warnings.warn("lora.serialization.base_fingerprint is deprecated: use base_shapes_fingerprint(model) (names and "
                  "shapes) or base_values_sha256(model) (values)", DeprecationWarning, stacklevel=2)
    out = base_shapes_fingerprint(model)
    if values:
        out["values_sha256"] = base_values_sha256(model)
    return out


def _layer_spec(layer: LoRALayer, adapter: str) -> dict:
    src = adapter_factors(layer, adapter)
    base = injected_base(layer)
    rslora = getattr(src, "use_rslora", False)
    spec = {
        "type": type(layer).__name__,
        "base_type": type(base).__name__ if base is not None else None,
        "r": src.r,
        "lora_alpha": src.lora_alpha,
        "use_rslora": bool(rslora),
        "scaling": src.scaling,
        "lora_dropout": src.lora_dropout.p if isinstance(src.lora_dropout, nn.Dropout) else 0.0,
        "fan_in_fan_out": bool(getattr(layer, "fan_in_fan_out", False)),
    }
    if isinstance(layer, MergedLinear):
        spec["enable_lora"] = [bool(e) for e in layer.enable_lora]
    return spec


def _model_layers(model: nn.Module, adapter: str) -> Dict[str, LoRALayer]:
    layers = dict(lora_layers(model))
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no LoRA layer to save; add some with lora.inject(...)")
    if adapter not in list_adapters(model):
        raise AdapterError(f"no adapter {adapter!r}; adapters: {list_adapters(model)}")
    return layers


# --- save ----------------------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, save_directory: str, adapter: str = DEFAULT, format: str = "loralib",
                 task_type: Optional[str] = None, extra: Optional[dict] = None,
                 weights_format: str = "safetensors") -> dict:
    """Write adapter ``adapter`` of ``model`` to ``save_directory``.

    Args:
        model: a model with LoRA layers (``lora.inject`` or built with loralib layers).
        save_directory: created if needed; existing adapter files in it are replaced atomically.
        adapter: which adapter (``"default"``: the layers' own ``lora_A`` / ``lora_B``).
        format: ``"loralib"``, or ``"peft"`` for ``peft.PeftModel.from_pretrained(hf_model, save_directory)``.
        task_type: ``format="peft"`` only: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``); None loads as a PeftModel.
        extra: ``format="loralib"`` only: JSON-serialisable information stored as the config's ``"extra"``
            (how the base model was built, training arguments, ...); ``load_adapter`` returns it untouched.
        weights_format: ``format="loralib"`` only: ``"safetensors"`` writes ``adapter_model.safetensors``;
            ``"bin"`` writes the same tensors with ``torch.save`` as ``pytorch_model.bin``, which Microsoft's
            loralib users load with ``model.load_state_dict(torch.load(path), strict=False)``. The config names the
            file and its SHA-256 either way; ``load_adapter`` reads both.

    Returns:
        The config written to ``adapter_config.json``.

    Raises:
        AdapterError: no such adapter, no LoRA layer, or (PEFT) a layer PEFT cannot represent.
        ValueError: an unknown ``format`` or ``weights_format``.
    """
    if format not in ("loralib", "peft"):
        raise ValueError(f"format must be 'loralib' or 'peft', got {format!r}")
    if weights_format not in WEIGHTS_FILES:
        raise ValueError(f"weights_format must be one of {sorted(WEIGHTS_FILES)}, got {weights_format!r}")
    if format == "peft" and extra is not None:
        raise ValueError("extra is stored only with format='loralib' (PEFT's config has no place for it)")
    if format == "peft" and weights_format != "safetensors":
        raise ValueError(f"weights_format='bin' is only for format='loralib' (PEFT reads {WEIGHTS_NAME})")
    layers = _model_layers(model, adapter)
    if format == "peft":
        config, tensors = peft_export(layers, adapter, task_type)
    else:
        tensors = {k: v.detach().cpu() for k, v in adapter_state_dict(model, adapter).items()}
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library": "loralib",
            "library_version": __version__,
            "adapter_name": adapter,
            "target_modules": list(layers),
            "layers": {name: _layer_spec(layer, adapter) for name, layer in layers.items()},
            "base_fingerprint": base_shapes_fingerprint(model),
        }
        if extra is not None:
            try:
                json.dumps(extra)
            except (TypeError, ValueError) as e:
                raise ValueError(f"extra must be JSON-serialisable: {e}") from e
            config["extra"] = extra
    if weights_format == "bin":
        buf = io.BytesIO()
        torch.save(tensors, buf)
        data = buf.getvalue()
    else:
        data = save_bytes(tensors, metadata={"format": "pt"})
    name = WEIGHTS_FILES[weights_format]
    if format == "loralib":  # PEFT warns about keys it does not know
        config["weights_file"] = name
        config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    os.makedirs(save_directory, exist_ok=True)
    old_weights, kept = _keep_previous(save_directory)
    weights = os.path.join(save_directory, name)
    atomic_write(weights, data)
    atomic_write(os.path.join(save_directory, CONFIG_NAME), _json_bytes(config))  # last: config => complete
    # The new pair is complete: the weights the old config named (kept aside, or a file of the other format,
    # which no config names any more) are no longer needed.
    if kept:
        os.unlink(_prev_path(old_weights))
    if old_weights is not None and old_weights != weights and os.path.isfile(old_weights):
        os.unlink(old_weights)
    return config


# --- load ----------------------------------------------------------------------------------------------------------

def _inside(directory: str, name: str) -> Optional[str]:
    """``directory/name`` if it is a regular file whose real path lies inside ``directory``, None if it does not
    exist. A link out of the directory (to ``/etc/passwd``, to another adapter) is refused before anything is read,
    except Hugging Face's cache layout, where ``snapshots/<revision>/<file>`` links to ``../../blobs/<hash>``.

    Raises:
        AdapterError: the name leads outside the directory, or is not a regular file.
    """
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        return None
    root, real = os.path.realpath(directory), os.path.realpath(path)
    in_hf_cache = (os.path.basename(os.path.dirname(root)) == "snapshots"
                   and os.path.dirname(real) == os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    if os.path.commonpath([root, real]) != root and not in_hf_cache:
        raise AdapterError(f"{path} leads to {real}, outside the adapter directory: refusing to read it (copy the "
                           "file into the directory instead of linking it)")
    if not os.path.isfile(real):
        raise AdapterError(f"{path} is not a regular file (a broken link, a directory or a device)")
    return path


def _check_specs(specs: dict, path: str) -> None:
    """Every per-layer spec of a loralib config is well formed; a hostile or corrupted config fails here, with the
    field it got wrong, before any layer is built from it."""
    types = ("Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d")
    for name, spec in specs.items():
        def bad(field, want):
            raise AdapterError(f"{path}: layer {name!r} has {field}={spec.get(field)!r} ({want}); the config is "
                               "corrupted")
        if not isinstance(spec, dict):
            raise AdapterError(f"{path}: the spec of layer {name!r} is not a JSON object; the config is corrupted")
        if spec.get("type") not in types:
            bad("type", f"expected one of {list(types)}")
        try:
            check_lora_args(spec.get("r"), spec.get("lora_alpha"), spec.get("lora_dropout", 0.0),
                            allow_zero_rank=False)
        except ValueError as e:
            raise AdapterError(f"{path}: layer {name!r}: {e}; the config is corrupted") from None
        if not (is_number(spec.get("scaling")) and spec["scaling"] > 0):
            bad("scaling", "a positive finite number")
        for field in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(spec.get(field, False), bool):
                bad(field, "true or false")
        if "enable_lora" in spec and not (isinstance(spec["enable_lora"], list) and spec["enable_lora"]
                                          and all(isinstance(e, bool) for e in spec["enable_lora"])):
            bad("enable_lora", "a non-empty list of booleans")
        if not isinstance(spec.get("base_type"), (str, type(None))):
            bad("base_type", "a class name or null")


def _read_json_config(directory: str) -> Tuple[dict, str]:
    """The directory's config file parsed (a JSON object, read only from inside the directory), and its path."""
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory {directory!r} does not exist (write one with lora.save_adapter)")
    path = _inside(directory, CONFIG_NAME)
    if path is None:
        raise AdapterError(f"{os.path.join(directory, CONFIG_NAME)} is missing: {directory!r} is not a complete "
                           "adapter directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    # ValueError: JSONDecodeError and integers too long to parse; RecursionError: absurdly deep nesting
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); the file is "
                           "corrupted") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} does not hold a JSON object")
    return config, path


def _check_config(config: dict, path: str) -> dict:
    if config.get("peft_type") is not None:
        if config["peft_type"] != "LORA":
            raise AdapterError(f"{path} is a PEFT {config['peft_type']!r} adapter; only LoRA adapters load here")
        check_peft_config(config, path)
        return config
    if config.get("format") != FORMAT or not isinstance(config.get("layers"), dict) or not config["layers"]:
        raise AdapterError(f"{path} is neither a loralib adapter config ('format': '{FORMAT}' with 'layers') "
                           "nor a PEFT LoRA config")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {version!r}, written by loralib "
                           f"{config.get('library_version')}; this loralib ({__version__}) reads version "
                           f"{FORMAT_VERSION}: upgrade loralib")
    _check_specs(config["layers"], path)
    fp = config.get("base_fingerprint")
    if not (isinstance(fp, dict) and isinstance(fp.get("sha256"), str) and isinstance(fp.get("shapes"), dict)
            and all(isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v)
                    for v in fp["shapes"].values())):
        raise AdapterError(f"{path}: base_fingerprint is missing or malformed; the config is corrupted")
    if not isinstance(config.get("weights_sha256"), (str, type(None))):
        raise AdapterError(f"{path}: weights_sha256 is not a string; the config is corrupted")
    if config.get("weights_file") not in (None, *WEIGHTS_FILES.values()):  # never an absolute or ../ path
        raise AdapterError(f"{path} names weights_file {config.get('weights_file')!r}; expected one of "
                           f"{sorted(WEIGHTS_FILES.values())}; the config is corrupted")
    return config


def read_adapter_config(directory: str, validate: bool = True) -> dict:
    """Read and check the ``adapter_config.json`` of an adapter directory (loralib's or PEFT's) without loading any
    weights or building anything: what a caller needs to construct the base model before :func:`load_adapter`.

    Args:
        directory: the adapter directory.
        validate: False: only refuse a missing, linked-out or non-JSON-object file, for a caller that reads
            configs of its own older format too and checks those itself.

    Returns:
        The config; a loralib config's ``"extra"`` is what ``save_adapter(..., extra=...)`` stored.

    Raises:
        AdapterError: a missing directory or config, invalid JSON, or a malformed config (the field named).
    """
    config, path = _read_json_config(directory)
    return _check_config(config, path) if validate else config


def safe_load(path: str, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Read a file of named tensors without running any code from it.

    ``*.safetensors`` is decoded by loralib's own reader; anything else is a pickle loaded with
    ``torch.load(weights_only=True)``, which refuses a pickle that would import or call anything. A link leading
    out of the file's directory is refused before anything is read.

    Args:
        path: the file.
        sha256: the SHA-256 the file was written with, if known. Where the file differs and ``.<name>.prev`` beside
            it matches (a save killed between its weights' and its config's renames), that file is read instead.

    Returns:
        The tensors by name (on the CPU).

    Raises:
        AdapterError: a missing, truncated, corrupted or unsafe file, another file than ``sha256`` names, or
            contents that are not a dict of tensors; one line naming the file.
    """
    directory, name = os.path.dirname(path) or ".", os.path.basename(path)
    if _inside(directory, name) is None:
        raise AdapterError(f"{path} is missing")
    with open(path, "rb") as f:
        data = f.read()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        prev = _inside(directory, os.path.basename(_prev_path(path)))
        prev_data = b""
        if prev is not None:
            with open(prev, "rb") as f:
                prev_data = f.read()
        if hashlib.sha256(prev_data).hexdigest() != sha256:
            raise AdapterError(f"cannot load {path}: it is not the file {CONFIG_NAME} was written with (SHA-256 "
                               "differs): truncated, corrupted or half-overwritten; save the adapter again")
        data = prev_data
    try:
        if name.endswith(".safetensors"):
            state = load_bytes(data, source=path)[0]
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle, a forbidden global: all mean "do not trust this file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        first = first[len(path) + 2:] if first.startswith(path + ": ") else first
        raise AdapterError(f"cannot load {path}: {type(e).__name__}: {first} (truncated, corrupted, or a pickle "
                           "that is not a plain dict of tensors; nothing in it was run)") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterError(f"{path} does not hold a dict of tensors")
    return state


def _read_weights(directory: str, config: dict) -> Dict[str, torch.Tensor]:
    name = config.get("weights_file")
    for candidate in [name] if name else [WEIGHTS_NAME, *PICKLE_NAMES]:  # no name: written before it was recorded
        path = _inside(directory, candidate)
        if path is not None:
            return safe_load(path, config.get("weights_sha256"))
    if name:
        raise AdapterError(f"{os.path.join(directory, name)} is missing: {directory!r} has {CONFIG_NAME} but no "
                           "weights under the name it records; save the adapter again")
    raise AdapterError(f"{directory!r} has {CONFIG_NAME} but no weights ({' / '.join([WEIGHTS_NAME, *PICKLE_NAMES])})")


def _check_base(model: nn.Module, config: dict, directory: str) -> None:
    saved = config.get("base_fingerprint")
    if not isinstance(saved, dict) or not isinstance(saved.get("shapes"), dict):
        raise AdapterError(f"{directory}/{CONFIG_NAME} has no base_fingerprint; it is corrupted")
    mine = base_shapes_fingerprint(model)
    if mine["sha256"] == saved.get("sha256"):
        return
    theirs, ours = saved["shapes"], mine["shapes"]
    for name in sorted(set(theirs) | set(ours)):
        if name not in ours:
            raise AdapterError(f"base model mismatch: the adapter's base has {name!r} {tuple(theirs[name])}, "
                               f"this {type(model).__name__} has no such weight")
        if name not in theirs:
            raise AdapterError(f"base model mismatch: this {type(model).__name__} has {name!r} "
                               f"{tuple(ours[name])}, which the adapter's base did not have")
        if list(theirs[name]) != list(ours[name]):
            raise AdapterError(f"base model mismatch: {name!r} is {tuple(ours[name])} here but was "
                               f"{tuple(theirs[name])} in the adapter's base (another model size?)")
    raise AdapterError(f"base model mismatch: the fingerprint in {directory}/{CONFIG_NAME} does not match its "
                       "own shapes; the config is corrupted")


def _check_layers(model: nn.Module, specs: Dict[str, dict], adapter: str, directory: str) -> None:
    have = dict(lora_layers(model))
    for name in sorted(set(specs) | set(have)):
        if name not in have:
            raise AdapterError(f"layer mismatch: the adapter in {directory} adapts {name!r}, which is not a LoRA "
                               f"layer of this model")
        if name not in specs:
            raise AdapterError(f"layer mismatch: this model has the LoRA layer {name!r}, which the adapter in "
                               f"{directory} does not cover")
        if adapter != DEFAULT and adapter not in getattr(have[name], "lora_adapters", {}):
            continue  # will be created from the spec
        mine, theirs = _layer_spec(have[name], adapter), specs[name]
        fields = ("type", "r", "fan_in_fan_out") if theirs.get("from_peft") else (
            "type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "enable_lora")
        for field in fields:
            if field in theirs and mine.get(field) != theirs.get(field):
                raise AdapterError(f"layer mismatch: {name!r} has {field}={mine.get(field)!r} here but "
                                   f"{theirs.get(field)!r} in {directory}")
        if not math.isclose(mine["scaling"], float(theirs["scaling"]), rel_tol=1e-6):
            raise AdapterError(f"layer mismatch: {name!r} has scaling {mine['scaling']} here but "
                               f"{theirs['scaling']} in {directory}")


def _inject_from_specs(model: nn.Module, specs: Dict[str, dict], directory: str) -> None:
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        module = modules.get(name)
        if module is None:
            raise AdapterError(f"the adapter in {directory} adapts {name!r}, which this {type(model).__name__} "
                               "does not have")
        kind = layer_kind(module)
        want = {"Linear": ("conv1d_t",) if spec.get("fan_in_fan_out") else ("linear",),
                "Embedding": ("embedding",), "Conv1d": ("conv",), "Conv2d": ("conv",),
                "Conv3d": ("conv",)}.get(spec.get("type"), ())
        if kind not in want:
            raise AdapterError(f"{name!r} is a {type(module).__name__} here, but the adapter in {directory} was "
                               f"saved from a {spec.get('type')} (base {spec.get('base_type')}); "
                               "build the model the way it was built when the adapter was saved")
    for name, spec in specs.items():
        inject(model, [name], r=int(spec["r"]), lora_alpha=spec["lora_alpha"],
               lora_dropout=float(spec.get("lora_dropout", 0.0)), use_rslora=bool(spec.get("use_rslora")),
               init_lora_weights="zeros")


def _add_from_specs(model: nn.Module, specs: Dict[str, dict], adapter: str) -> None:
    layers = dict(lora_layers(model))
    built = {name: LoRAAdapter(layers[name], int(s["r"]), s["lora_alpha"], float(s.get("lora_dropout", 0.0)),
                               bool(s.get("use_rslora")), "zeros") for name, s in specs.items()}
    for name, ad in built.items():
        layer = layers[name]
        if not hasattr(layer, "lora_adapters"):
            layer.lora_adapters = nn.ModuleDict()
        ad.train(layer.training)
        layer.lora_adapters[adapter] = ad


def _check_tensors(specs: Dict[str, dict], tensors: Dict[str, torch.Tensor], directory: str) -> None:
    """The factors are finite floating-point matrices whose shapes agree with the rank the config declares
    (which bounds what building the layers allocates by what the file holds)."""
    for name, spec in specs.items():
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        for key, t in ((f"{name}.lora_A", A), (f"{name}.lora_B", B)):
            if not t.is_floating_point() or t.dim() != 2:
                raise AdapterError(f"{key} in {directory} is a {t.dim()}-d {t.dtype} tensor; LoRA factors are "
                                   "2-d floating-point matrices: the file is corrupted")
            if not torch.isfinite(t).all():
                raise AdapterError(f"{key} in {directory} holds NaN or Inf: the adapter is broken (diverged "
                                   "training?); it was not loaded")
        r = spec["r"]
        if A.shape[0] % r:  # A has r (times the groups / kernel rows) rows: r cannot exceed what the file holds
            raise AdapterError(f"{name}.lora_A in {directory} has shape {tuple(A.shape)}, which does not fit rank "
                               f"r={r} in its config; the directory is corrupted")


def load_adapter(model: nn.Module, load_directory: str, adapter: str = DEFAULT) -> dict:
    """Load an adapter directory (loralib's or PEFT's LoRA format) into ``model``, checking that it fits.

    A model without LoRA layers gets them first (as ``lora.inject`` would), so ``load_adapter(plain_model, dir)``
    rebuilds the adapted model. A model with LoRA layers must have exactly the adapter's layers, ranks and
    scalings. ``adapter`` names an existing adapter to overwrite, or a new one to add (inactive: see
    ``lora.set_adapter``).

    Args:
        model: the base model, plain or with LoRA layers.
        load_directory: a directory written by :func:`save_adapter` (or by PEFT's ``save_pretrained``).
        adapter: the adapter to load into.

    Returns:
        The directory's config.

    Raises:
        AdapterError: missing or corrupted files, a pickle that is not plain tensors, a base model with other
            weight names or shapes, other LoRA layers / ranks / scalings, or tensors of the wrong shape. The
            message names the first mismatch and the directory; on error the model is unchanged.
    """
    try:
        return _load_adapter(model, load_directory, adapter)
    except AdapterError as e:
        if str(load_directory) in str(e):
            raise
        raise AdapterError(f"{load_directory}: {e}") from e


def _load_adapter(model: nn.Module, load_directory: str, adapter: str) -> dict:
    config = read_adapter_config(load_directory)
    tensors = _read_weights(load_directory, config)
    if "peft_type" in config:
        specs, tensors = peft_specs(config, tensors, model)
    else:
        specs = config["layers"]
        _check_base(model, config, load_directory)
    has_lora = bool(dict(lora_layers(model)))
    if has_lora:
        _check_layers(model, specs, adapter, load_directory)
    elif adapter != DEFAULT:
        raise AdapterError(f"{type(model).__name__} has no LoRA layer yet: load the first adapter as 'default' "
                           f"(lora.load_adapter(model, dir)), then others with adapter={adapter!r}")
    expected = [f"{name}.lora_{ab}" for name in specs for ab in "AB"]
    unexpected = sorted(set(tensors) - set(expected))
    missing = [k for k in expected if k not in tensors]
    if unexpected or missing:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which no adapted layer has"
        raise AdapterError(f"the weights in {load_directory} do not match its config: it {what}")
    _check_tensors(specs, tensors, load_directory)
    created = None
    if not has_lora:
        _inject_from_specs(model, specs, load_directory)
        created = "layers"
    elif adapter not in list_adapters(model):
        _add_from_specs(model, specs, adapter)
        created = "adapter"
    layers = dict(lora_layers(model))
    for name in specs:
        src = adapter_factors(layers[name], adapter)
        for ab in "AB":
            want, got = getattr(src, f"lora_{ab}").shape, tensors[f"{name}.lora_{ab}"].shape
            if want != got:
                if created == "layers":  # the new update is zero: unloading gives the original model back
                    merge_and_unload(model)
                elif created == "adapter":
                    delete_adapter(model, adapter)
                raise AdapterError(f"{name}.lora_{ab} in {load_directory} has shape {tuple(got)}, the model "
                                   f"expects {tuple(want)}")
    with torch.no_grad():
        for name in specs:
            layer = layers[name]
            remerge = layer.merged and layer.active_adapter == adapter
            if remerge:
                layer.unmerge()
            src = adapter_factors(layer, adapter)
            src.lora_A.copy_(tensors[f"{name}.lora_A"])
            src.lora_B.copy_(tensors[f"{name}.lora_B"])
            if remerge:
                layer.merge()
    return config
