"""The adapter directory that run_training.py writes and run_inference.py reads.

Layout of ``--output_dir`` (default ``lora_model``):
    pytorch_model.bin     ``lora.lora_state_dict(model)``: loads with ``load_state_dict(strict=False)``, as with
                          Microsoft's loralib (``--adapter_format bin``, the default)
    adapter_model.safetensors   the same tensors as a safetensors file, written by loralib itself
                          (``--adapter_format safetensors``): no pickle at all on the way back in
    adapter_config.json   everything needed to rebuild the model: ``model_config`` (GPTConfig), ``base``
                          (``init_checkpoint`` or the random ``base_seed``, and the base weights' fingerprint),
                          ``tokenizer``, ``lora_bias``, plus whatever the trainer adds (training args, data hashes)
"""
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from typing import Optional, Tuple

import torch

import loralib as lora
from loralib.safetensors_format import load_bytes, save_bytes

from .model import GPTConfig, SimpleGPT2WithLoRA, base_fingerprint, build_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "pytorch_model.bin"
SAFETENSORS_NAME = "adapter_model.safetensors"
WEIGHTS_FILES = {"bin": WEIGHTS_NAME, "safetensors": SAFETENSORS_NAME}
FORMAT = "loralib-nlg-adapter"


class AdapterError(ValueError):
    """An adapter directory that is missing, incomplete, corrupted or does not fit the model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    """Write a file so that readers see the old or the new content, never a partial one.

    ``write_fn(f)`` writes to a temporary file in the same directory, which then replaces ``path``.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_json(path: str, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True), mode="w")


def save_adapter_dir(model: SimpleGPT2WithLoRA, out_dir: str, *, base_seed: int,
                     init_checkpoint: Optional[str] = None, extra: Optional[dict] = None,
                     lora_bias: str = "none", weights_format: str = "bin", init_revision: Optional[str] = None,
                     fingerprint: Optional[str] = None) -> dict:
    """Write the weights (``pytorch_model.bin``, or ``adapter_model.safetensors`` with ``weights_format=
    "safetensors"``) and ``adapter_config.json`` atomically; return the config written.
    ``fingerprint``: the base's, when the model's frozen weights were cast after it was built (half precision);
    by default it is computed from the model.

    ``init_checkpoint`` is recorded as an absolute path when it is a local one, as given otherwise (a Hugging Face
    Hub name), with ``init_revision`` (the Hub commit sha) beside it.

    Raises:
        ValueError: an unknown ``weights_format``.
    """
    if weights_format not in WEIGHTS_FILES:
        raise ValueError(f"unknown adapter format {weights_format!r}; use one of {sorted(WEIGHTS_FILES)}")
    state = {k: v.detach().cpu() for k, v in lora.lora_state_dict(model, bias=lora_bias).items()}
    config = {
        "format": FORMAT,
        "format_version": 1,
        "loralib_version": lora.__version__,
        "model_config": model.config.to_dict(),
        "base": {
            "init_checkpoint": (os.path.abspath(init_checkpoint) if os.path.exists(init_checkpoint)
                                else init_checkpoint) if init_checkpoint else None,
            "init_revision": init_revision,
            "base_seed": None if init_checkpoint else base_seed,
            "fingerprint": fingerprint or base_fingerprint(model),
        },
        "tokenizer": "gpt2",
        "lora_bias": lora_bias,
        "lora_params": sum(v.numel() for k, v in state.items() if "lora_" in k),
        "weights_file": WEIGHTS_FILES[weights_format],
    }
    config.update(extra or {})
    path = os.path.join(out_dir, WEIGHTS_FILES[weights_format])
    if weights_format == "safetensors":
        data = save_bytes(state, metadata={"format": FORMAT})
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    # The config names its weights by SHA-256: a save killed between the weights' rename and the config's leaves
    # a pair that does not match, and the loader then takes the previous weights, kept aside (see _keep_previous).
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    os.makedirs(out_dir, exist_ok=True)
    kept = _keep_previous(out_dir)
    atomic_write(path, lambda f: f.write(data))
    atomic_json(os.path.join(out_dir, CONFIG_NAME), config)  # last: a dir with a config is complete
    if kept is not None:
        os.unlink(kept)
    # A weights file of the other format left by an earlier run no longer matches the config: remove it (only now,
    # since until the new config was in place the old one may have named it).
    for name in WEIGHTS_FILES.values():
        if name != WEIGHTS_FILES[weights_format] and os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))
    return config


def _sha256_of(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _prev_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".prev")


def _keep_previous(out_dir: str) -> Optional[str]:
    """Keep the weights the current config describes reachable as ``.<weights>.prev`` (hard link, else copy)
    while a save replaces them; return that path, or None when there is nothing consistent to keep."""
    try:
        with open(os.path.join(out_dir, CONFIG_NAME), encoding="utf-8") as f:
            old = json.load(f)
        expected, name = old.get("weights_sha256"), old.get("weights_file", WEIGHTS_NAME)
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(expected, str) or name not in WEIGHTS_FILES.values():
        return None
    current, prev = os.path.join(out_dir, name), _prev_path(os.path.join(out_dir, name))
    if _sha256_of(current) != expected:
        # A torn earlier save: the weights on disk are not the config's; its .prev still is: leave it.
        return prev if _sha256_of(prev) == expected else None
    tmp = prev + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(current, tmp)
    except OSError:
        shutil.copyfile(current, tmp)
    os.replace(tmp, prev)
    return prev


def _inside(adapter_dir: str, name: str) -> str:
    """``adapter_dir/name``, refusing a link that leads out of the directory (to /etc/passwd, to another run's
    files) before anything is read from it."""
    path = os.path.join(adapter_dir, name)
    root, real = os.path.realpath(adapter_dir), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise AdapterError(f"{path} leads to {real}, outside the adapter directory: refusing to read it (copy the "
                           "file into the directory instead of linking it)")
    return path


def read_adapter_config(adapter_dir: str) -> dict:
    """Read and check ``adapter_config.json``. Raises AdapterError with the fix when it is missing or malformed."""
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"adapter directory {adapter_dir!r} does not exist; train one with "
                           f"`python examples/NLG/run_training.py --output_dir {adapter_dir}`")
    path = _inside(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing: {adapter_dir!r} is not a complete adapter directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    # ValueError: JSONDecodeError and integers too long to parse; RecursionError: absurdly deep nesting
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); the file is "
                           "corrupted") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model_config" not in config:
        raise AdapterError(f"{path} is not a {FORMAT} config (no 'format': '{FORMAT}' / 'model_config')")
    return config


def weights_path(adapter_dir: str) -> str:
    """The weights file of ``adapter_dir``: the one its config names, else ``pytorch_model.bin``."""
    try:
        with open(_inside(adapter_dir, CONFIG_NAME), encoding="utf-8") as f:
            name = json.load(f).get("weights_file", WEIGHTS_NAME)
    except (OSError, ValueError, AttributeError, RecursionError):
        name = WEIGHTS_NAME  # read_adapter_config reports a broken config; here only the file name matters
    if not isinstance(name, str) or name not in WEIGHTS_FILES.values():  # never an absolute or ../ path
        raise AdapterError(f"{adapter_dir}/{CONFIG_NAME} names weights_file {name!r}; expected one of "
                           f"{sorted(WEIGHTS_FILES.values())}")
    return _inside(adapter_dir, name)


def read_adapter_weights(adapter_dir: str) -> dict:
    """Load the adapter weights safely: safetensors holds no code, and ``.bin`` loads with ``weights_only=True``
    (a pickle that would run code is refused)."""
    path = weights_path(adapter_dir)
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing: {adapter_dir!r} has a config but no adapter weights")
    try:
        with open(_inside(adapter_dir, CONFIG_NAME), encoding="utf-8") as f:
            expected = json.load(f).get("weights_sha256")
    except (OSError, ValueError, AttributeError, RecursionError):
        expected = None  # read_adapter_config reports a broken config
    if isinstance(expected, str) and _sha256_of(path) != expected:
        prev = _inside(adapter_dir, os.path.basename(_prev_path(path)))
        if _sha256_of(prev) != expected:
            raise AdapterError(f"cannot load {path}: it is not the file {CONFIG_NAME} was written with (SHA-256 "
                               "differs): truncated, corrupted or half-overwritten; save the adapter again")
        path = prev  # a save killed between its renames: the previous weights, kept aside, match this config
    try:
        if path.endswith(".safetensors") or path.endswith(".safetensors.prev"):
            with open(path, "rb") as f:
                state = load_bytes(f.read(), source=path)[0]
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, forbidden global: all mean "do not trust this file"
        raise AdapterError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                           "(truncated, corrupted, or not a plain tensor checkpoint)") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterError(f"{path} does not hold a dict of tensors")
    for k, v in state.items():
        if not v.is_floating_point():
            raise AdapterError(f"{path}: {k} is a {v.dtype} tensor; adapter weights are floating point (the file "
                               "is corrupted)")
        if not torch.isfinite(v).all():
            raise AdapterError(f"{path}: {k} holds NaN or Inf: the adapter is broken (diverged training?); "
                               "it was not loaded")
    return state


def check_adapter_fits(own: dict, state: dict, source: str = "adapter") -> None:
    """Every key of ``state`` exists in ``own`` (a state dict) with the same shape, and ``state`` has every LoRA
    weight ``own`` has. Raises AdapterError naming the first difference."""
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise AdapterError(f"{source} has keys the model lacks, e.g. {unexpected[:3]} (was it trained with "
                           f"another model config?)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise AdapterError(f"{source}: {k} has shape {tuple(v.shape)} but the model expects "
                               f"{tuple(own[k].shape)} (lora_dim / hidden_dim / vocab_size differ)")
    missing = [k for k in own if "lora_" in k and k not in state]
    if missing:
        raise AdapterError(f"{source} lacks LoRA weights the model has, e.g. {missing[:3]}")


def load_adapter_weights(model: SimpleGPT2WithLoRA, state: dict, source: str = "adapter") -> None:
    """Load LoRA weights into ``model``; every key must exist in the model with the same shape."""
    check_adapter_fits(model.state_dict(), state, source)
    model.load_state_dict(state, strict=False)


_INT_FIELDS = ("vocab_size", "max_positions", "hidden_dim", "num_layers", "num_heads", "lora_dim")


def _model_config(config: dict, path: str) -> GPTConfig:
    """The GPTConfig a config describes, its fields type-checked first (a corrupted or hostile file must fail
    here with the field named, not deep inside the model's constructor)."""
    d = config.get("model_config")
    if not isinstance(d, dict):
        raise AdapterError(f"model_config in {path} is not a JSON object; the config is corrupted")
    for k, v in d.items():
        if k == "lora_targets":  # None (every target) or a list of names, which GPTConfig checks
            ok = v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v))
        elif k in _INT_FIELDS:
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if k in GPTConfig.__dataclass_fields__ and not ok:
            want = {"lora_targets": "null or a list of names"}.get(
                k, "an integer" if k in _INT_FIELDS else "a finite number")
            raise AdapterError(f"model_config in {path}: {k}={v!r} is not {want}; the config is corrupted")
    try:
        return GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"model_config in {path} is invalid: {e}") from e


def _check_size(cfg: GPTConfig, state: dict, path: str) -> None:
    """Refuse a config that disagrees with its weights on the number of layers, or whose model (its frozen
    weights, counted from the config: 12 d^2 + 13 d per block, embeddings and head) exceeds this machine's memory:
    checked before even a meta-device model is built, since building a million blocks would itself hang."""
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    if layers and layers != set(range(cfg.num_layers)):
        raise AdapterError(f"model_config in {path} has num_layers={cfg.num_layers} but the weights hold blocks "
                           f"{min(layers)}..{max(layers)} ({len(layers)}); the directory is corrupted")
    d = cfg.hidden_dim
    need = 4 * (cfg.num_layers * (12 * d * d + 13 * d) + 2 * cfg.vocab_size * d + cfg.max_positions * d + 2 * d)
    have = _physical_memory()
    if have is not None and need > have:
        raise AdapterError(f"model_config in {path} describes a model of {need / 2**30:.1f} GiB, more than this "
                           f"machine's {have / 2**30:.1f} GiB of memory; the config is corrupted or not this model's")


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_model_from_adapter_dir(adapter_dir: str, device="cpu",
                                init_checkpoint: Optional[str] = None) -> Tuple[SimpleGPT2WithLoRA, dict]:
    """Rebuild ``SimpleGPT2WithLoRA`` from ``adapter_config.json`` alone, load its base and the adapter.

    Args:
        adapter_dir: a directory written by :func:`save_adapter_dir`.
        device: where to put the model.
        init_checkpoint: overrides the base checkpoint (path or Hub name) recorded in the config.

    Returns:
        (model in train mode, config dict). Call ``model.eval()`` to merge the adapter.

    Raises:
        AdapterError: missing/corrupted files, a config that does not build, or weights that do not fit.
    """
    config = read_adapter_config(adapter_dir)
    path = os.path.join(adapter_dir, CONFIG_NAME)
    cfg = _model_config(config, path)
    base = config.get("base", {})
    if not isinstance(base, dict):
        raise AdapterError(f"'base' in {path} is not a JSON object; the config is corrupted")
    for key, types in (("base_seed", (int, type(None))), ("init_checkpoint", (str, type(None))),
                       ("fingerprint", (str, type(None))), ("init_revision", (str, type(None)))):
        if not isinstance(base.get(key), types) or isinstance(base.get(key), bool):
            raise AdapterError(f"base.{key}={base.get(key)!r} in {path} has the wrong type; the config is corrupted")
    ckpt = init_checkpoint or base.get("init_checkpoint")
    # The recorded Hub commit pins the very weights trained on; an overriding --init_checkpoint takes its own.
    revision = None if init_checkpoint else base.get("init_revision")
    # The weights and the config must agree before the model is built for real: built on the meta device first,
    # a config claiming a huge model (corrupted or hostile) fails here instead of allocating it.
    state = read_adapter_weights(adapter_dir)
    _check_size(cfg, state, path)
    with torch.device("meta"):
        shell = SimpleGPT2WithLoRA(cfg)
    check_adapter_fits(shell.state_dict(), state, source=weights_path(adapter_dir))
    model = build_model(cfg, base_seed=base.get("base_seed") or 0)
    if ckpt:
        from .hf_checkpoint import load_hf_gpt2_weights, resolve_init_checkpoint  # the trainer's importer

        load_hf_gpt2_weights(model, resolve_init_checkpoint(ckpt, revision).path)
    expected = base.get("fingerprint")
    if expected and base_fingerprint(model) != expected:
        raise AdapterError(f"the base weights rebuilt for {adapter_dir} (fingerprint {base_fingerprint(model)}) "
                           f"are not the ones it was trained on ({expected}); pass the same --init_checkpoint")
    load_adapter_weights(model, state, source=weights_path(adapter_dir))
    return model.to(device), config
