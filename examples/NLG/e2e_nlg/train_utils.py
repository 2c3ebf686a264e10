"""Pieces of the training loop that other scripts share: device choice, LR schedule, evaluation, saving state."""
import contextlib
import math
import os
import random
import signal
import threading
from typing import Dict, Iterable, Optional

import torch

from .adapter_io import atomic_json, atomic_write
from .data import target_count

STATE_NAME = "training_state.pt"
HISTORY_NAME = "loss_history.json"
PLOT_NAME = "loss.png"


class DeviceError(RuntimeError):
    """The requested device is not available."""


def check_device_name(name: str) -> None:
    """Raises DeviceError: ``name`` is not auto, cpu or cuda[:N], or asks for CUDA where there is none."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise DeviceError(f"unknown --device {name!r}; use auto, cuda or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was asked for but no CUDA GPU is available to this torch "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                          "use --device cpu or --device auto")


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU.

    Raises:
        DeviceError: CUDA asked for but not available; or an unknown device name.
    """
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX); without them bfloat16
    matmuls are emulated and slower than float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str, device: torch.device, cpu_bf16: Optional[bool] = None) -> tuple:
    """The precision a run uses, and why. ``auto``: bf16 where the CPU or GPU has it natively, else fp32 on CPU and
    fp16 (with a gradient scaler) on a GPU.

    Args:
        name: one of :data:`PRECISIONS`.
        cpu_bf16: overrides the CPU capability check (tests).

    Returns:
        (``"fp32"`` / ``"bf16"`` / ``"fp16"``, a sentence saying why).

    Raises:
        ValueError: an unknown name, or fp16 on CPU (torch's CPU fp16 matmuls are slow and unscaled).
    """
    if name not in PRECISIONS:
        raise ValueError(f"unknown --precision {name!r}; use one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and name == "fp16":
        raise ValueError("--precision fp16 is for CUDA GPUs; on a CPU use bf16 (with native bf16 instructions) "
                         "or fp32")
    if name != "auto":
        return name, "asked for with --precision"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU supports bfloat16"
        return "fp16", "auto: this GPU has no bfloat16, so float16 with a gradient scaler"
    if cpu_has_bf16() if cpu_bf16 is None else cpu_bf16:
        return "bf16", "auto: this CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)"
    return "fp32", "auto: this CPU has no native bfloat16 matrix instructions, where bfloat16 would be slower"


def precision_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


# oneDNN (torch's bfloat16 matmuls on CPU) keeps a kernel per matrix shape in two caches of 1,024 entries; E2E's
# hundreds of batch shapes grew a default bf16 run to 3.8 GB of RSS. 256 entries each bound it (2.05 GB) for a few
# percent of the speed (benchmarks/RESULTS.md, 2026-12-03 second round). Read when oneDNN builds its first kernel.
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "256"}


def cap_onednn_caches() -> Dict[str, str]:
    """Set the variables of :data:`ONEDNN_CACHE_ENV` the user has not set; returns the values in effect."""
    for k, v in ONEDNN_CACHE_ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in ONEDNN_CACHE_ENV}


def cast_frozen(model: torch.nn.Module, precision: str) -> None:
    """Store the frozen (non-trainable) weights in ``precision``'s dtype (capping oneDNN's caches first in a half
    precision); trainable ones (LoRA) stay float32."""
    if precision != "fp32":
        cap_onednn_caches()
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(precision_dtype(precision))


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for half precisions, a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision_dtype(precision))


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR multiplier for step s: linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Dict[str, torch.Tensor]], device,
             precision: str = "fp32") -> float:
    """Mean next-token loss per predicted token over ``batches``, in eval mode *without* merging LoRA (a merge and
    unmerge is not bit-exact, so evaluating during training would nudge the frozen base).

    Raises:
        ValueError: no token to predict.
    """
    import loralib as lora

    layers = [m for m in model.modules() if isinstance(m, lora.LoRALayer)]
    flags = [m.merge_weights for m in layers]
    was_training = model.training
    total, count = 0.0, 0
    try:
        for m in layers:
            m.merge_weights = False
        model.eval()
        for b in batches:
            n = target_count(b["labels"])
            if n == 0:
                continue
            with autocast(torch.device(device), precision):
                out = model(b["input_ids"].to(device), labels=b["labels"].to(device))
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
        for m, f in zip(layers, flags):
            m.merge_weights = f
    if count == 0:
        raise ValueError("evaluation set has no tokens to predict")
    return total / count


def rng_state() -> dict:
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@contextlib.contextmanager
def sigint_deferred():
    """Hold a Ctrl-C arriving inside the block (lines that must run together) until it ends, then raise
    KeyboardInterrupt. Does nothing outside the main thread or under another SIGINT handler (torchrun's)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def save_training_state(out_dir: str, state: dict) -> None:
    """Write ``training_state.pt`` atomically."""
    atomic_write(os.path.join(out_dir, STATE_NAME), lambda f: torch.save(state, f))


def load_training_state(out_dir: str) -> Optional[dict]:
    """``training_state.pt`` from ``out_dir`` (loaded with ``weights_only=True``), or None when there is none.

    Raises:
        ValueError: the file does not load.
    """
    path = os.path.join(out_dir, STATE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load {path} ({type(e).__name__}: {e}); delete it to start over") from e


def save_history(out_dir: str, history: dict, title: str = "") -> None:
    """Raw loss numbers (``loss_history.json``) and their plot (``loss.png``), both written atomically."""
    atomic_json(os.path.join(out_dir, HISTORY_NAME), history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if history.get("train"):
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, lw=1, alpha=0.8, label="train (per step)")
    if history.get("val"):
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out_dir, PLOT_NAME), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def is_finite(x: float) -> bool:
    return math.isfinite(x)
