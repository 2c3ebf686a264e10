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
import json
import os
import tempfile
from typing import Optional, Tuple

import torch

import loralib as lora
from loralib.safetensors_format import load_file, save_bytes

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
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(state, f))
    # A weights file of the other format left by an earlier run would no longer match the config: remove it.
    for name in WEIGHTS_FILES.values():
        if name != WEIGHTS_FILES[weights_format] and os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))
    atomic_json(os.path.join(out_dir, CONFIG_NAME), config)  # last: a dir with a config is complete
    return config


def read_adapter_config(adapter_dir: str) -> dict:
    """Read and check ``adapter_config.json``. Raises AdapterError with the fix when it is missing or malformed."""
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"adapter directory {adapter_dir!r} does not exist; train one with "
                           f"`python examples/NLG/run_training.py --output_dir {adapter_dir}`")
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing: {adapter_dir!r} is not a complete adapter directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); the file is corrupted") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model_config" not in config:
        raise AdapterError(f"{path} is not a {FORMAT} config (no 'format': '{FORMAT}' / 'model_config')")
    return config


def weights_path(adapter_dir: str) -> str:
    """The weights file of ``adapter_dir``: the one its config names, else ``pytorch_model.bin``."""
    try:
        with open(os.path.join(adapter_dir, CONFIG_NAME)) as f:
            name = json.load(f).get("weights_file", WEIGHTS_NAME)
    except (OSError, ValueError, AttributeError):
        name = WEIGHTS_NAME  # read_adapter_config reports a broken config; here only the file name matters
    if name not in WEIGHTS_FILES.values():
        raise AdapterError(f"{adapter_dir}/{CONFIG_NAME} names weights_file {name!r}; expected one of "
                           f"{sorted(WEIGHTS_FILES.values())}")
    return os.path.join(adapter_dir, name)


def read_adapter_weights(adapter_dir: str) -> dict:
    """Load the adapter weights safely: safetensors holds no code, and ``.bin`` loads with ``weights_only=True``
    (a pickle that would run code is refused)."""
    path = weights_path(adapter_dir)
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing: {adapter_dir!r} has a config but no adapter weights")
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, forbidden global: all mean "do not trust this file"
        raise AdapterError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                           "(truncated, corrupted, or not a plain tensor checkpoint)") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path} does not hold a dict of tensors")
    return state


def load_adapter_weights(model: SimpleGPT2WithLoRA, state: dict, source: str = "adapter") -> None:
    """Load LoRA weights into ``model``; every key must exist in the model with the same shape."""
    own = model.state_dict()
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
    model.load_state_dict(state, strict=False)


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
    try:
        cfg = GPTConfig.from_dict(config["model_config"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"model_config in {adapter_dir}/{CONFIG_NAME} is invalid: {e}") from e
    base = config.get("base", {})
    ckpt = init_checkpoint or base.get("init_checkpoint")
    # The recorded Hub commit pins the very weights trained on; an overriding --init_checkpoint takes its own.
    revision = None if init_checkpoint else base.get("init_revision")
    model = build_model(cfg, base_seed=base.get("base_seed") or 0)
    if ckpt:
        from .hf_checkpoint import load_hf_gpt2_weights, resolve_init_checkpoint  # the trainer's importer

        load_hf_gpt2_weights(model, resolve_init_checkpoint(ckpt, revision).path)
    expected = base.get("fingerprint")
    if expected and base_fingerprint(model) != expected:
        raise AdapterError(f"the base weights rebuilt for {adapter_dir} (fingerprint {base_fingerprint(model)}) "
                           f"are not the ones it was trained on ({expected}); pass the same --init_checkpoint")
    load_adapter_weights(model, read_adapter_weights(adapter_dir), source=weights_path(adapter_dir))
    return model.to(device), config
