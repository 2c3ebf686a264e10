"""What run_inference.py is made of: checking MRs, one base with several named adapters, generating with one
adapter or all of them in mixed batches, timed."""
import dataclasses
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

import loralib as lora

from .adapter_io import AdapterError, load_adapter, read_adapter_config
from .family import load_model_from_adapter_dir
from .data import delexicalize, format_prompt, mr_fields, relexicalize
from .generate import DecodeConfig, generate
from .tokenizer import Tokenizer, gpt2_tokenizer
from .train_utils import cast_frozen


class MRError(ValueError):
    """A meaning representation that is empty or not ``key : value | key : value ...``."""


def check_mr(mr: str, source: str = "--input") -> str:
    """``mr`` stripped, checked to be one line of ``key : value`` fields separated by ``|``, without ``||``.

    Args:
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
    for field, key, value in mr_fields(text):
        if not key or not value:
            raise MRError(f"{source}: malformed field {field!r} in {text!r}; expected "
                          "'key : value' fields separated by '|', e.g. 'name : The Eagle | Type : pub'")
    return text


def read_mr_file(path: str) -> List[str]:
    """One MR per non-blank line of ``path`` (of an E2E data line ``MR||text``, its MR).

    Raises:
        MRError: a missing/unreadable file, no MR in it, or a malformed line (named ``path:line``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MRError(f"--input_file {path!r}: cannot read it ({e})") from e
    mrs = [check_mr(line.split("||")[0], f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]
    if not mrs:
        raise MRError(f"--input_file {path!r} holds no meaning representation")
    return mrs


@dataclass
class Adapter:
    """One adapter directory, read and checked against the shared base, held in the model as adapter ``name``."""
    path: str
    config: dict
    name: str = "default"


def ready(model, adapter: str = "default", merged: bool = True):
    """``model`` in eval mode with ``adapter`` active, merged into the weights or not (what mixed batches need)."""
    model.train()  # unmerges whatever is merged
    lora.set_adapter(model, adapter)
    for _, layer in lora.layers.lora_layers(model):
        layer.merge_weights = merged
    return model.eval()


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
                  precision: str = "fp32") -> Tuple[torch.nn.Module, List[Adapter]]:
    """Build the base once (from the first adapter's config) and load every adapter into it, checked: the first as
    ``"default"``, the others as ``adapter1``, ``adapter2``, ...

    Args:
        init_checkpoint: overrides the base checkpoint recorded in the configs.
        precision: the frozen base's dtype (cast after the fingerprint check); LoRA weights stay float32.

    Returns:
        (the model, in train mode with ``"default"`` active; the adapters in the order given).

    Raises:
        AdapterError: a missing, corrupted or unsafe file, or an adapter that does not fit the base (named).
    """
    if not adapter_dirs:
        raise AdapterError("no --adapter_dir given")
    model, config = load_model_from_adapter_dir(adapter_dirs[0], device="cpu", init_checkpoint=init_checkpoint)
    adapters = [Adapter(adapter_dirs[0], config)]
    for i, d in enumerate(adapter_dirs[1:], 1):
        cfg = read_adapter_config(d)
        _same_base(config, cfg, d, adapter_dirs[0])
        load_adapter(model, d, adapter=f"adapter{i}")
        adapters.append(Adapter(d, cfg, f"adapter{i}"))
    lora.mark_only_lora_as_trainable(model)
    cast_frozen(model, precision)
    return model.to(device), adapters


def prompts_for(mrs: Sequence[str], delex: Sequence[str] = (), tokenizer: Optional[Tokenizer] = None
                ) -> List[List[int]]:
    """Token ids of ``format_prompt(mr, delex)`` for each MR (``tokenizer``: default GPT-2's)."""
    enc = (tokenizer or gpt2_tokenizer()).enc
    return [enc.encode_ordinary(format_prompt(mr, delex)) for mr in mrs]


def adapter_delex(config: dict) -> List[str]:
    """The attributes an adapter was trained with delexicalised."""
    return list(config.get("data", {}).get("delexicalize", []))


def _decoding(cfg: DecodeConfig, tokenizer: Optional[Tokenizer]) -> Tuple[Tokenizer, DecodeConfig]:
    """The tokenizer (default GPT-2's) and ``cfg`` with its end and padding ids."""
    if tokenizer is None:
        return gpt2_tokenizer(), cfg
    return tokenizer, dataclasses.replace(cfg, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def _timed_texts(model, mrs: Sequence[str], delexes, cfg: DecodeConfig, batch_size: int,
                 tokenizer: Optional[Tokenizer], adapter_names=None) -> Tuple[List[str], dict]:
    """The texts of one timed generation (placeholders filled back in from each MR), and its speed."""
    tok, cfg = _decoding(cfg, tokenizer)
    prompts = [prompts_for([mr], d, tok)[0] for mr, d in zip(mrs, delexes)]
    t0 = time.perf_counter()
    out = generate(model, prompts, cfg, batch_size=batch_size, adapter_names=adapter_names)
    seconds = time.perf_counter() - t0
    n = sum(len(o) + (len(o) < cfg.max_new_tokens) for o in out)  # + the end-of-text each finished one produced
    texts = [relexicalize(tok.enc.decode(o).strip(), delexicalize(mr, None, d)[2])
             for mr, d, o in zip(mrs, delexes, out)]
    return texts, {"tokens": n, "seconds": seconds, "tokens_per_second": n / max(seconds, 1e-9),
                   "decoding": dataclasses.asdict(cfg)}


def describe(model, mrs: Sequence[str], cfg: DecodeConfig, batch_size: int = 16,
             delex: Sequence[str] = (), tokenizer: Optional[Tokenizer] = None) -> Tuple[List[str], dict]:
    """Generate one description per MR, timed; ``delex``: the adapter's placeholders (values put back into the
    texts); ``tokenizer``: the model family's (default GPT-2's).

    Returns:
        (texts, ``{"tokens": generated, end-of-text included; "seconds"; "tokens_per_second"; "decoding": the
        settings used, with the tokenizer's end and padding ids}``).
    """
    return _timed_texts(model, mrs, [delex] * len(mrs), cfg, batch_size, tokenizer)


def describe_mixed(model, adapters: Sequence[Adapter], mrs: Sequence[str], cfg: DecodeConfig, batch_size: int = 16,
                   tokenizer: Optional[Tokenizer] = None) -> Tuple[List[List[str]], dict]:
    """Every adapter's description of every MR, in mixed batches (each row its own adapter); the model is left
    unmerged.

    Returns:
        (texts per adapter, each a list per MR; stats of the whole run, as :func:`describe`'s).
    """
    requests = [(mr, a) for mr in mrs for a in adapters]
    model = ready(model, merged=False)
    texts, stats = _timed_texts(model, [mr for mr, _ in requests], [adapter_delex(a.config) for _, a in requests],
                                cfg, batch_size, tokenizer, [a.name for _, a in requests])
    return [texts[i::len(adapters)] for i in range(len(adapters))], stats
