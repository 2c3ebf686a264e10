"""The settings of a training run, checked once: what ``run_training.py`` runs and ``compare_lora_vs_full.py`` shares.

Every field is a command-line flag of ``run_training.py`` (``--name``) with the same default; errors name the flag.
"""
import argparse
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Sequence, Set

from .adapter_io import WEIGHTS_FILES
from .data import DELEX_SLOTS
from .family import LORA_TARGET_CHOICES, RANDOM_BASE, recipe_for
from .model import GPTConfig
from .recipes import apply_recipe
from .tokenizer import EOT_ID
from .train_utils import PRECISIONS

TRAIN_REFS = ("faithful", "all")


@dataclass
class TrainConfig:
    """One training run's settings, validated on construction.

    Raises:
        ValueError: a setting out of range, in one line naming the flag and what to give instead.
    """
    # --- training ---
    # A named set of defaults (src/recipes.py); flags set explicitly override it. auto: the model family's
    # (none for GPT-2, smollm2 for Llama bases).
    recipe: str = "auto"
    num_epochs: int = 1  # passes over the (possibly limited) training set
    batch_size: int = 4  # examples per micro-batch, padded to their longest
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate of AdamW
    warmup_steps: int = 30  # linear warmup steps, then linear decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    label_smoothing: float = 0.0  # of the training loss (validation loss is never smoothed)
    max_grad_norm: float = 1.0  # gradient clipping norm; 0 disables clipping
    max_steps: int = 1200  # stop after this many optimizer steps; 0: run num_epochs epochs
    max_train_examples: int = 0  # a fixed random subset of this many training examples; 0: all
    seq_len: int = 128  # examples are cut to this many tokens (the longest E2E example has 115)
    seed: int = 42  # data order, LoRA init, and the random base when there is no init_checkpoint
    log_interval: int = 10  # a log line every N optimizer steps
    val_examples: int = 100  # a fixed subset of valid.txt; 0: all of it
    val_batch_size: int = 50
    device: str = "auto"  # auto (CUDA when available, else CPU), cuda, cuda:N or cpu
    precision: str = "auto"  # the frozen base's dtype and autocast's (train_utils.resolve_precision)
    train_refs: str = "faithful"  # faithful: the references that realise their MR exactly; all: every one
    delex: str = ",".join(DELEX_SLOTS)  # attributes replaced by placeholders, comma-separated; "none" for none
    dist_backend: str = "auto"  # torch.distributed backend under torchrun: auto = nccl on CUDA, gloo on CPU
    # --- model (without init_checkpoint; a checkpoint's config.json sets the four sizes) ---
    vocab_size: int = GPTConfig.vocab_size
    hidden_dim: int = GPTConfig.hidden_dim
    num_layers: int = GPTConfig.num_layers
    num_heads: int = GPTConfig.num_heads
    lora_dim: int = GPTConfig.lora_dim  # LoRA rank r
    lora_alpha: int = GPTConfig.lora_alpha  # LoRA scaling = lora_alpha / lora_dim
    lora_dropout: float = GPTConfig.lora_dropout
    lora_targets: Optional[List[str]] = None  # modules that get LoRA (model.LORA_TARGETS); None: the default ones
    # The frozen base: smollm2, a .gguf, a GPT-2 Hub name or local file/directory; None or "random": a random GPT-2.
    init_checkpoint: Optional[str] = None
    init_revision: Optional[str] = None  # with a Hub name: branch, tag or commit
    # --- input / output ---
    data_dir: Optional[str] = None  # train.txt/valid.txt; None: $E2E_DATA_DIR, then data/e2e/
    no_download: bool = False  # never fetch missing E2E data
    output_dir: str = "lora_model"
    adapter_format: str = "bin"  # bin (pytorch_model.bin, Microsoft's format) or safetensors
    resume: bool = False  # continue from training_state.pt in output_dir
    no_progress: bool = False  # no progress bar
    # What the recipe set (recipes.apply_recipe); None: apply ``recipe`` here, keeping fields that differ from
    # the defaults. Recorded in adapter_config.json.
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
        for name in ("label_smoothing", "lora_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"--{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.lora_dim >= 1, f"--lora_dim must be >= 1 (the LoRA rank; 0 would leave nothing to train), "
                                     f"got {self.lora_dim}")
        _require(self.lora_alpha > 0, f"--lora_alpha must be > 0 (scaling = alpha / rank), got {self.lora_alpha}")

    def _check_choices(self) -> None:
        for name, allowed in (("precision", PRECISIONS), ("train_refs", TRAIN_REFS),
                              ("adapter_format", sorted(WEIGHTS_FILES))):
            _require(getattr(self, name) in allowed, f"--{name} must be one of {', '.join(allowed)}, got "
                                                     f"{getattr(self, name)!r}")
        _ = self.delex_slots  # raises on a bad --delex
        targets = self.lora_targets
        # Which of them the base has is checked when it is built (family.Base.build).
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
        """The model these settings describe; ``lora_dim=0`` gives the plain model, ``sizes`` override the
        size flags (from a checkpoint's config.json)."""
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
        """The config of parsed flags: the namespace's attributes that are fields, then ``overrides``."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in vars(ns).items() if k in names}, **overrides})


def changed_fields(obj, names: Optional[Sequence[str]] = None) -> Set[str]:
    """The fields of ``obj`` (a TrainConfig or a namespace of its flags) whose value differs from the default:
    the ones a recipe must not override when nobody said which flags were typed."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    names = [n for n in (names or defaults) if n in defaults and n != "recipe_info"]
    return {n for n in names if hasattr(obj, n) and getattr(obj, n) != defaults[n]}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
