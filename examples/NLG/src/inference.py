"""Inference pieces run_inference.py is made of: checking meaning representations, loading one base with several
adapters, swapping adapters bit-exactly, and timing generation.
"""
import dataclasses
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import loralib as lora

from .adapter_io import AdapterError, load_adapter_weights, read_adapter_config, \
    read_adapter_weights, weights_path
from .family import load_model_from_adapter_dir
from .data import delexicalize, format_prompt, relexicalize
from .generate import DecodeConfig, generate
from .tokenizer import Tokenizer, gpt2_tokenizer
from .train_utils import cast_frozen


class MRError(ValueError):
    """A meaning representation that is empty or not ``key : value | key : value ...``."""


def check_mr(mr: str, source: str = "--input") -> str:
    """Validate one meaning representation in the E2E prompt format and return it stripped.

    Well formed means: one or more fields separated by ``|``, each ``key : value`` with a non-empty key and value,
    no ``||`` (the prompt's separator) and no line break.

    Args:
        mr: e.g. ``"name : The Eagle | Type : pub | area : riverside"``.
        source: where it came from, for the message (``--input``, ``FILE:LINE``).

    Raises:
        MRError: empty or malformed; the message shows the offending field.
    """
    text = mr.strip()
    if not text:
        raise MRError(f"{source}: empty meaning representation")
    if "\n" in text or "\r" in text:
        raise MRError(f"{source}: a meaning representation is one line")
    if "||" in text:
        raise MRError(f"{source}: '||' separates the MR from its text in the prompt; it cannot be in the MR: {text!r}")
    for field in text.split("|"):
        key, sep, value = field.partition(":")
        if not sep or not key.strip() or not value.strip():
            raise MRError(f"{source}: malformed field {field.strip()!r} in {text!r}; expected "
                          "'key : value' fields separated by '|', e.g. 'name : The Eagle | Type : pub'")
    return text


def read_mr_file(path: str) -> List[str]:
    """One MR per non-blank line of ``path`` (an E2E data line's ``MR||text`` is accepted: its MR is used).

    Raises:
        MRError: a missing/unreadable file, no MR in it, or a malformed line (named ``path:line``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MRError(f"--input_file {path!r}: cannot read it ({e})") from e
    mrs = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            mrs.append(check_mr(line.split("||")[0], f"{path}:{i}"))
    if not mrs:
        raise MRError(f"--input_file {path!r} holds no meaning representation")
    return mrs


@dataclass
class Adapter:
    """One adapter directory, read and checked against the shared base."""
    path: str
    config: dict
    state: Dict[str, torch.Tensor]


def _lora_layers(model) -> List[lora.LoRALayer]:
    return [m for m in model.modules() if isinstance(m, lora.LoRALayer) and getattr(m, "r", 0) > 0]


class MultiAdapterModel:
    """One base model, several adapters: only the LoRA weights change when switching.

    Merging folds ``B A`` into the frozen weight, and unmerging subtracts it back, which is not exact in floating
    point; so the unmerged base weights are kept once and restored before each merge, and an adapter used again
    gives bit-identical outputs.
    """

    def __init__(self, model, adapters: Sequence[Adapter]):
        self.model = model
        self.adapters = list(adapters)
        model.train()  # unmerged: the weights are the base's
        self._layers = _lora_layers(model)
        self._base = [m.weight.detach().clone() for m in self._layers]

    def use(self, index: int, merged: bool = True):
        """Put adapter ``index`` in the model, in eval mode, merged (``model.eval()``) or not.

        Returns:
            the model, ready for generation.
        """
        a = self.adapters[index]
        self.model.train()
        with torch.no_grad():
            for m, w in zip(self._layers, self._base):
                m.weight.copy_(w)
        load_adapter_weights(self.model, a.state, source=weights_path(a.path))
        for m in self._layers:
            m.merge_weights = merged
        return self.model.eval()


def _same_base(first: dict, other: dict, path: str, first_path: str) -> None:
    a, b = first.get("model_config", {}), other.get("model_config", {})
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            raise AdapterError(f"{path} does not fit the base of {first_path}: model_config {k} is {b.get(k)!r} "
                               f"there but {a.get(k)!r} here")
    fa, fb = first.get("base", {}).get("fingerprint"), other.get("base", {}).get("fingerprint")
    if fa and fb and fa != fb:
        raise AdapterError(f"{path} was trained on another base (fingerprint {fb}) than {first_path} ({fa})")


def load_adapters(adapter_dirs: Sequence[str], device="cpu", init_checkpoint: Optional[str] = None,
                  precision: str = "fp32") -> MultiAdapterModel:
    """Build the base once (from the first adapter's config) and read every adapter, checking it fits.

    Args:
        adapter_dirs: adapter directories written by run_training.py; the first decides the model.
        device: where the model goes.
        init_checkpoint: overrides the base checkpoint recorded in the configs.
        precision: the dtype the frozen base is stored in (``"fp32"``, ``"bf16"``, ``"fp16"``); the LoRA weights
            stay float32. Checked against the recorded fingerprint before the cast.

    Raises:
        AdapterError: a missing, corrupted or unsafe file, or an adapter that does not fit the base (named).
    """
    if not adapter_dirs:
        raise AdapterError("no --adapter_dir given")
    model, config = load_model_from_adapter_dir(adapter_dirs[0], device="cpu", init_checkpoint=init_checkpoint)
    adapters = [Adapter(adapter_dirs[0], config, read_adapter_weights(adapter_dirs[0]))]
    for d in adapter_dirs[1:]:
        cfg = read_adapter_config(d)
        _same_base(config, cfg, d, adapter_dirs[0])
        adapters.append(Adapter(d, cfg, read_adapter_weights(d)))
    lora.mark_only_lora_as_trainable(model)
    cast_frozen(model, precision)
    multi = MultiAdapterModel(model.to(device), adapters)
    for i in range(1, len(adapters)):  # every shape and key checked now, before any generation
        multi.use(i)
    return multi


def prompts_for(mrs: Sequence[str], delex: Sequence[str] = (), tokenizer: Optional[Tokenizer] = None
                ) -> List[List[int]]:
    """Token ids of ``format_prompt(mr, delex)`` for each MR: what training conditioned on (``tokenizer``: the
    model family's, default GPT-2's)."""
    enc = (tokenizer or gpt2_tokenizer()).enc
    return [enc.encode_ordinary(format_prompt(mr, delex)) for mr in mrs]


def adapter_delex(config: dict) -> List[str]:
    """The attributes an adapter was trained with delexicalised (none for adapters from before that option)."""
    return list(config.get("data", {}).get("delexicalize", []))


def describe(model, mrs: Sequence[str], cfg: DecodeConfig, batch_size: int = 16,
             delex: Sequence[str] = (), tokenizer: Optional[Tokenizer] = None) -> Tuple[List[str], dict]:
    """Generate one description per MR and time it. With ``delex`` (what the adapter was trained with), the
    prompts carry placeholders and the MR's values are put back into the generated texts. ``tokenizer``: the
    model family's (``family.tokenizer_for``; default GPT-2's), whose end and padding ids decoding uses.

    Returns:
        (texts, stats) with stats ``{"tokens": generated tokens (end-of-text included when produced),
        "seconds": wall time, "tokens_per_second": ...}``, measured in this call.
    """
    tok = tokenizer or gpt2_tokenizer()
    enc = tok.enc
    if tokenizer is not None:
        cfg = dataclasses.replace(cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
    prompts = prompts_for(mrs, delex, tok)
    t0 = time.perf_counter()
    out = generate(model, prompts, cfg, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    n = sum(len(o) + (len(o) < cfg.max_new_tokens) for o in out)  # + the end-of-text each finished one produced
    texts = [relexicalize(enc.decode(o).strip(), delexicalize(mr, None, delex)[2]) for mr, o in zip(mrs, out)]
    return texts, {"tokens": n, "seconds": seconds, "tokens_per_second": n / max(seconds, 1e-9)}
