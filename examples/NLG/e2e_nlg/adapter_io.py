"""The adapter directory run_training.py writes and run_inference.py reads: a loralib adapter directory
(``lora.save_adapter`` / ``lora.load_adapter``) holding ``pytorch_model.bin`` (``lora.lora_state_dict``, as
Microsoft's loralib saves it) or ``adapter_model.safetensors``, and ``adapter_config.json``, whose ``extra`` holds
what rebuilds the example's model: ``model_config``, ``base`` (checkpoint or random ``base_seed``, fingerprint),
``tokenizer``, and the trainer's record. Directories of the previous release (``"format": "loralib-nlg-adapter"``,
the example's fields at the top level) still load.
"""
import json
import math
import os
from typing import Iterable, Optional, Tuple

import torch

import loralib as lora
from loralib.serialization import AdapterError, atomic_write, read_adapter_config as read_loralib_config, safe_load

from .model import GPTConfig, SimpleGPT2WithLoRA, base_fingerprint, build_model

__all__ = ["AdapterError", "atomic_write", "atomic_json", "save_adapter_dir", "read_adapter_config", "weights_path",
           "read_adapter_weights", "load_adapter_weights", "load_model_from_adapter_dir"]

CONFIG_NAME = lora.serialization.CONFIG_NAME
WEIGHTS_FILES = lora.serialization.WEIGHTS_FILES  # --adapter_format -> file name
WEIGHTS_NAME, SAFETENSORS_NAME = WEIGHTS_FILES["bin"], WEIGHTS_FILES["safetensors"]
LEGACY_FORMAT = "loralib-nlg-adapter"  # the previous release's own config format


def atomic_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def save_adapter_dir(model: SimpleGPT2WithLoRA, out_dir: str, *, base_seed: int,
                     init_checkpoint: Optional[str] = None, extra: Optional[dict] = None,
                     lora_bias: str = "none", weights_format: str = "bin", init_revision: Optional[str] = None,
                     fingerprint: Optional[str] = None) -> dict:
    """Write the adapter atomically with ``lora.save_adapter``, the model's description in the config's ``extra``.

    Args:
        base_seed: the random base's seed (recorded when there is no ``init_checkpoint``).
        init_checkpoint: the base's checkpoint (a local one as an absolute path), ``init_revision`` its Hub commit.
        extra: more fields for the config's ``extra``.
        lora_bias: only ``"none"``: the example trains no bias.
        weights_format: ``"bin"`` or ``"safetensors"``.
        fingerprint: the base's, when its frozen weights were cast after building; default: computed.

    Returns:
        The config written.

    Raises:
        ValueError: an unknown ``weights_format`` or a ``lora_bias`` other than ``"none"``.
    """
    if weights_format not in WEIGHTS_FILES:
        raise ValueError(f"unknown adapter format {weights_format!r}; use one of {sorted(WEIGHTS_FILES)}")
    if lora_bias != "none":
        raise ValueError(f"lora_bias={lora_bias!r}: this example trains no bias, so it saves none; use 'none'")
    info = {
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
        "lora_params": sum(v.numel() for v in lora.lora_state_dict(model).values()),
        **(extra or {}),
    }
    return lora.save_adapter(model, out_dir, extra=info, weights_format=weights_format)


def _previous_release(raw: dict, path: str) -> dict:
    """The previous release's config in the current form: its fields under ``extra``, ``layers`` None (its weights
    are checked key by key against the model when they load). Raises AdapterError on a bad weights_file / sha256."""
    name = raw.get("weights_file", WEIGHTS_NAME)
    if not isinstance(name, str) or name not in WEIGHTS_FILES.values():  # never an absolute or ../ path
        raise AdapterError(f"{path} names weights_file {name!r}; expected one of "
                           f"{sorted(WEIGHTS_FILES.values())}; the config is corrupted")
    if not isinstance(raw.get("weights_sha256"), (str, type(None))):
        raise AdapterError(f"{path}: weights_sha256 is not a string; the config is corrupted")
    return {"weights_file": name, "weights_sha256": raw.get("weights_sha256"), "layers": None, "extra": raw}


def _read(adapter_dir: str) -> dict:
    """The directory's config, checked, in the current form (a previous release's converted)."""
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"adapter directory {adapter_dir!r} does not exist; train one with "
                           f"`python examples/NLG/run_training.py --output_dir {adapter_dir}`")
    path = os.path.join(adapter_dir, CONFIG_NAME)
    raw = read_loralib_config(adapter_dir, validate=False)
    if raw.get("format") == LEGACY_FORMAT:
        raw = _previous_release(raw, path)
    else:
        raw = read_loralib_config(adapter_dir)
        if "peft_type" in raw or not isinstance(raw.get("extra"), dict):
            raise AdapterError(f"{path} is an adapter without this example's model description (its 'extra'); "
                               "load it with lora.load_adapter into the model it was trained on")
    if "model_config" not in raw["extra"]:
        raise AdapterError(f"{path} has no model_config; it was not written by run_training.py")
    return raw


def read_adapter_config(adapter_dir: str) -> dict:
    """The example's fields of ``adapter_dir``'s config (``model_config``, ``base``, ``data``, ...).

    Raises:
        AdapterError: with the fix, when the directory or config is missing, malformed or not the example's.
    """
    return _read(adapter_dir)["extra"]


def weights_path(adapter_dir: str, raw: Optional[dict] = None) -> str:
    """The weights file ``adapter_dir``'s config (``raw``: as read already) names (default pytorch_model.bin)."""
    return os.path.join(adapter_dir, (raw or _read(adapter_dir)).get("weights_file") or WEIGHTS_NAME)


def read_adapter_weights(adapter_dir: str, raw: Optional[dict] = None) -> dict:
    """The adapter's tensors, read safely (no code runs, the recorded SHA-256 checked), finite floating point.

    Raises:
        AdapterError: a missing, corrupted, unsafe or non-finite file, named.
    """
    raw = raw or _read(adapter_dir)
    path = weights_path(adapter_dir, raw)
    if not os.path.lexists(path):
        raise AdapterError(f"{path} is missing: {adapter_dir!r} has a config but no adapter weights")
    state = safe_load(path, raw.get("weights_sha256"))
    for k, v in state.items():
        if not v.is_floating_point():
            raise AdapterError(f"{path}: {k} is a {v.dtype} tensor; adapter weights are floating point (the file "
                               "is corrupted)")
        if not torch.isfinite(v).all():
            raise AdapterError(f"{path}: {k} holds NaN or Inf: the adapter is broken (diverged training?); "
                               "it was not loaded")
    return state


def load_adapter(model: torch.nn.Module, adapter_dir: str, adapter: str = "default") -> None:
    """Load ``adapter_dir``'s weights into ``model`` as ``adapter`` (``"default"``: the layers' own; another name:
    an added adapter, inactive until ``lora.set_adapter``); a previous release's directory key by key.

    Raises:
        AdapterError: a missing or corrupted file, or weights that do not fit (the first key named); an adapter
            added for the load is removed again.
    """
    raw = _read(adapter_dir)
    if raw["layers"] is not None:
        lora.load_adapter(model, adapter_dir, adapter=adapter)
        return
    state, source = read_adapter_weights(adapter_dir, raw), weights_path(adapter_dir, raw)
    if adapter == "default":
        load_adapter_weights(model, state, source=source)
        return
    cfg = raw["extra"]["model_config"]
    lora.add_adapter(model, adapter, r=cfg["lora_dim"], lora_alpha=cfg["lora_alpha"], init_lora_weights="zeros")
    target = lora.adapters.adapter_state_dict(model, adapter)
    if state.keys() != target.keys():
        problem = f" holds other LoRA layers than the first adapter's, e.g. {sorted(state.keys() ^ target.keys())[:3]}"
    else:
        problem = next((f": {k} has shape {tuple(state[k].shape)} but the model expects {tuple(t.shape)}"
                        for k, t in target.items() if t.shape != state[k].shape), None)
    if problem:
        lora.delete_adapter(model, adapter)
        raise AdapterError(source + problem)
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(state[k])


def check_adapter_fits(model: torch.nn.Module, state: dict, source: str = "adapter") -> None:
    """Raises AdapterError naming the first key of ``state`` not in ``model`` with its shape, or LoRA weight of
    ``model`` not in ``state``."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise AdapterError(f"{source} has keys the model lacks, e.g. {unexpected[:3]} (was it trained with "
                           f"another model config?)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise AdapterError(f"{source}: {k} has shape {tuple(v.shape)} but the model expects "
                               f"{tuple(own[k].shape)} (lora_dim / hidden_dim / vocab_size differ)")
    missing = sorted((lora.layers.lora_names(model) & own.keys()) - state.keys())  # names saved by state_dict()
    if missing:
        raise AdapterError(f"{source} lacks LoRA weights the model has, e.g. {missing[:3]}")


def load_adapter_weights(model: SimpleGPT2WithLoRA, state: dict, source: str = "adapter") -> None:
    """Load LoRA weights into ``model`` after :func:`check_adapter_fits`."""
    check_adapter_fits(model, state, source)
    model.load_state_dict(state, strict=False)


_INT_FIELDS = ("vocab_size", "max_positions", "hidden_dim", "num_layers", "num_heads", "lora_dim")


def _model_config(config: dict, path: str) -> GPTConfig:
    """The GPTConfig a config describes, its fields type-checked first (a hostile file fails here, named)."""
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


def _base(config: dict, path: str) -> dict:
    """The config's ``base`` record, its fields type-checked."""
    base = config.get("base", {})
    if not isinstance(base, dict):
        raise AdapterError(f"'base' in {path} is not a JSON object; the config is corrupted")
    for key, types in (("base_seed", (int, type(None))), ("init_checkpoint", (str, type(None))),
                       ("fingerprint", (str, type(None))), ("init_revision", (str, type(None)))):
        if not isinstance(base.get(key), types) or isinstance(base.get(key), bool):
            raise AdapterError(f"base.{key}={base.get(key)!r} in {path} has the wrong type; the config is corrupted")
    return base


def _check_size(cfg: GPTConfig, names: Iterable[str], path: str) -> None:
    """Refuse a config that disagrees with its adapter's layers (``names``) on the number of blocks, or whose model
    (12 d^2 + 13 d per block, embeddings, head) exceeds this machine's memory, before even a meta model is built."""
    layers = {int(k.split(".")[2]) for k in names
              if k.startswith("transformer.h.") and len(k.split(".")) > 2 and k.split(".")[2].isdigit()}
    if layers and layers != set(range(cfg.num_layers)):
        raise AdapterError(f"model_config in {path} has num_layers={cfg.num_layers} but the adapter holds blocks "
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
        init_checkpoint: overrides the base checkpoint recorded in the config.

    Returns:
        (model in train mode, :func:`read_adapter_config`'s fields). ``model.eval()`` merges the adapter.

    Raises:
        AdapterError: missing/corrupted files, a config that does not build, or weights that do not fit.
    """
    raw = _read(adapter_dir)
    config, path = raw["extra"], os.path.join(adapter_dir, CONFIG_NAME)
    cfg, base = _model_config(config, path), _base(config, path)
    if raw["layers"] is None:
        # Checked against a meta-device model first: a config claiming a huge model fails without allocating it.
        state = read_adapter_weights(adapter_dir, raw)
        _check_size(cfg, state, path)
        with torch.device("meta"):
            shell = SimpleGPT2WithLoRA(cfg)
        check_adapter_fits(shell, state, source=weights_path(adapter_dir, raw))
    else:
        _check_size(cfg, raw["layers"], path)
    model = build_model(cfg, base_seed=base.get("base_seed") or 0)
    ckpt = init_checkpoint or base.get("init_checkpoint")
    if ckpt:
        from .hf_checkpoint import load_hf_gpt2_weights, resolve_init_checkpoint
        # The recorded Hub commit pins the very weights trained on; an overriding --init_checkpoint takes its own.
        revision = None if init_checkpoint else base.get("init_revision")
        load_hf_gpt2_weights(model, resolve_init_checkpoint(ckpt, revision).path)
    expected = base.get("fingerprint")
    if expected and base_fingerprint(model) != expected:
        raise AdapterError(f"the base weights rebuilt for {adapter_dir} (fingerprint {base_fingerprint(model)}) "
                           f"are not the ones it was trained on ({expected}); pass the same --init_checkpoint")
    load_adapter(model, adapter_dir)
    return model.to(device), config
