"""Import Hugging Face GPT-2 weights (``GPT2LMHeadModel`` / ``GPT2Model``) into ``SimpleGPT2WithLoRA``'s base,
transposing HF's ``Conv1D`` weights (in, out) into ``nn.Linear``'s (out, in); the LoRA weights stay as made.
``--init_checkpoint`` is a local file or directory or a Hub name (``gpt2``, ``gpt2-medium``, any ``org/name`` in the
GPT-2 layout), fetched into huggingface_hub's cache (``$HF_HOME``; ``HF_HUB_OFFLINE=1``: the cache only).
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .model import base_state_dict

SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")  # HF's causal-mask buffers in older checkpoints
CONFIG_NAME = "config.json"
HUB_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four sizes; any repo id in the layout works
# A Hub repo id: "name" or "org/name" (letters, digits, '-', '_', '.'); a path with more parts or a file suffix is not.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# config.json values of plain GPT-2, the only variant this model computes.
_PLAIN_GPT2 = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
               "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,)}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message names keys and shapes."""


@dataclass
class ResolvedCheckpoint:
    """Where an ``--init_checkpoint`` value was found: a local file or directory, and the Hub commit sha it came
    from (None for a local path)."""
    spec: str
    path: str
    revision: Optional[str] = None
    from_hub: bool = False

    @property
    def recorded(self) -> str:
        """What adapter_config.json keeps: the Hub name as given, or the local path made absolute."""
        return self.spec if self.from_hub else os.path.abspath(self.spec)


def _hub_download(repo_id: str, revision: Optional[str]):
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise CheckpointError(f"--init_checkpoint {repo_id!r} is not a local file or directory, and fetching it from "
                              "the Hugging Face Hub by name needs huggingface_hub: `pip install huggingface_hub`, or "
                              "pass a local directory holding config.json and model.safetensors") from e

    def one_line(e: Exception) -> str:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"

    try:
        config = hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
    except Exception as e:  # unknown repo, no network and nothing cached, offline mode, HTTP errors: all one story
        raise CheckpointError(
            f"--init_checkpoint {repo_id!r} is not a local file or directory, and the Hugging Face Hub could not "
            f"provide {repo_id}/{CONFIG_NAME}{f' at revision {revision}' if revision else ''} ({one_line(e)}); "
            "without network it must already be in the cache ($HF_HOME, HF_HUB_OFFLINE=1), or pass a local "
            "directory") from e
    snapshot = os.path.dirname(config)
    # The cache keeps each revision in snapshots/<commit sha>/: that sha pins exactly the weights used.
    commit = os.path.basename(snapshot)
    commit = commit if _COMMIT.match(commit) and os.path.basename(os.path.dirname(snapshot)) == "snapshots" \
        else revision
    errors = []
    for name in (SAFETENSORS_NAME, BIN_NAME):  # safetensors first: it holds no code
        try:
            weights = hf_hub_download(repo_id, name, revision=commit or revision)
            return os.path.dirname(weights), commit
        except Exception as e:
            errors.append(f"{name}: {one_line(e)}")
    raise CheckpointError(f"{repo_id} on the Hugging Face Hub has {CONFIG_NAME} but neither weights file could be "
                          f"fetched ({'; '.join(errors)}); sharded checkpoints are not supported")


def resolve_init_checkpoint(spec: str, revision: Optional[str] = None) -> ResolvedCheckpoint:
    """Find the files of an ``--init_checkpoint`` value.

    Args:
        spec: a ``model.safetensors`` / ``pytorch_model.bin`` or a directory holding one (and ideally its
            ``config.json``), else a Hub repo id such as ``gpt2-medium`` or ``org/name``.
        revision: for a Hub name, a branch, tag or commit sha (default: ``main``).

    Returns:
        A :class:`ResolvedCheckpoint`; for a Hub name, the snapshot directory in the cache and its commit sha.

    Raises:
        CheckpointError: neither a path nor a repo id, huggingface_hub missing, or the files not on the Hub (or,
            offline, in the cache).
    """
    if os.path.exists(spec):
        resolve_checkpoint_path(spec)  # a directory must hold the weights: say so now, not after a build
        return ResolvedCheckpoint(spec, spec)
    if not _REPO_ID.match(spec) or spec.endswith((".safetensors", ".bin", ".pt", ".pth")):
        resolve_checkpoint_path(spec)  # raises "does not exist"
    path, commit = _hub_download(spec, revision)
    return ResolvedCheckpoint(spec, path, commit, from_hub=True)


def resolve_checkpoint_path(path: str) -> str:
    """A file path, or a directory holding ``model.safetensors`` (preferred) or ``pytorch_model.bin``."""
    if os.path.isdir(path):
        for name in (SAFETENSORS_NAME, BIN_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"--init_checkpoint {path!r} is a directory without {SAFETENSORS_NAME} or {BIN_NAME} "
                              "(sharded checkpoints are not supported)")
    if not os.path.isfile(path):
        raise CheckpointError(f"--init_checkpoint {path!r} does not exist; pass a Hugging Face GPT-2 "
                              f"{SAFETENSORS_NAME} / {BIN_NAME}, the directory holding it, or a Hub name such as "
                              f"{', '.join(HUB_GPT2)}")
    return path


def read_hf_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's ``{key: tensor}``, keys as ``transformer.*`` / ``lm_head.weight`` (pickles ``weights_only``).

    Raises:
        CheckpointError: unreadable file, or not a dict of tensors.
    """
    path = resolve_checkpoint_path(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              " (corrupted, truncated, or not a plain tensor checkpoint)") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    # GPT2Model checkpoints have no "transformer." prefix; GPT2LMHeadModel ones do.
    return {k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k: v
            for k, v in sd.items() if not _BUFFERS.search(k)}


def config_from_json(cfg_json: str) -> dict:
    """GPTConfig fields from a Hugging Face GPT-2 ``config.json``.

    Raises:
        CheckpointError: unreadable JSON, a missing size, or a GPT-2 variant this model does not implement.
    """
    try:
        with open(cfg_json, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_json}: {e}") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_json} is not a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{cfg_json}: model_type {hf.get('model_type')!r} is not gpt2; only GPT-2 "
                              "checkpoints can be the base")
    unsupported = [f"{k}={hf[k]!r}" for k, ok in _PLAIN_GPT2.items() if k in hf and hf[k] not in ok]
    if unsupported:
        raise CheckpointError(f"{cfg_json}: {', '.join(unsupported)} is a GPT-2 variant this model does not "
                              "implement (it computes plain GPT-2)")
    try:
        cfg = dict(vocab_size=int(hf["vocab_size"]), hidden_dim=int(hf["n_embd"]),
                   max_positions=int(hf.get("n_positions", hf.get("n_ctx"))), num_layers=int(hf["n_layer"]),
                   num_heads=int(hf["n_head"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_json} lacks a GPT-2 size ({type(e).__name__}: {e}); it needs vocab_size, "
                              "n_embd, n_positions, n_layer and n_head") from e
    if "layer_norm_epsilon" in hf:
        cfg["layer_norm_eps"] = float(hf["layer_norm_epsilon"])
    return cfg


def infer_config(path: str) -> dict:
    """GPTConfig fields of a checkpoint (a weights file or its directory): from the ``config.json`` beside it, else
    from the tensors' shapes (then without ``num_heads`` and ``layer_norm_eps``).

    Raises:
        CheckpointError: as :func:`config_from_json`, or weights that are not a GPT-2's.
    """
    cfg_json = os.path.join(os.path.dirname(resolve_checkpoint_path(path)), CONFIG_NAME)
    if os.path.isfile(cfg_json):
        return config_from_json(cfg_json)  # load_hf_gpt2_weights checks every shape against these sizes
    sd = read_hf_state_dict(path)
    if "transformer.wte.weight" not in sd or "transformer.wpe.weight" not in sd:
        raise CheckpointError(f"{path} has no transformer.wte.weight / transformer.wpe.weight: not a GPT-2 checkpoint")
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"transformer\.h\.(\d+)\.", k)] if m}
    return dict(vocab_size=sd["transformer.wte.weight"].shape[0], hidden_dim=sd["transformer.wte.weight"].shape[1],
                max_positions=sd["transformer.wpe.weight"].shape[0], num_layers=len(layers))


@torch.no_grad()
def load_hf_gpt2_weights(model, path: str) -> None:
    """Copy a Hugging Face GPT-2 checkpoint (file or directory) into the base weights of ``model``, a
    ``SimpleGPT2WithLoRA`` of its sizes (:func:`infer_config`). Without ``lm_head.weight`` the head gets a copy of
    ``wte``, a separate tensor, so merging the head's LoRA never changes the input embedding.

    Raises:
        CheckpointError: missing or extra keys, or a shape mismatch (each named with both shapes).
    """
    src = read_hf_state_dict(path)
    own = base_state_dict(model)
    if "lm_head.weight" not in src and "transformer.wte.weight" in src:
        src["lm_head.weight"] = src["transformer.wte.weight"]
    missing = sorted(set(own) - set(src))
    unexpected = sorted(set(src) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model (num_layers={model.config.num_layers}, hidden_dim="
            f"{model.config.hidden_dim}): missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}. Build the model with the checkpoint's "
            "sizes (run_training.py reads them from the checkpoint)")
    new = {}
    bad = []
    for k, target in own.items():
        v = src[k]
        if _CONV1D.match(k):
            v = v.t()
        if tuple(v.shape) != tuple(target.shape):
            bad.append(f"{k}: checkpoint {tuple(src[k].shape)}{' (transposed from Conv1D)' if _CONV1D.match(k) else ''}"
                       f" vs model {tuple(target.shape)}")
        new[k] = v.to(target.dtype).contiguous().clone()
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:6]))
    result = model.load_state_dict(new, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
