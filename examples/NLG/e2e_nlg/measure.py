"""Measuring what a training run costs: parameters, tensor bytes, checkpoint bytes, peak memory, time (none of it
estimated). Used by the scripts (:func:`param_counts` is the example's one parameter counter) and the benchmarks.
"""
import contextlib
import gc
import os
import statistics
import tempfile
import threading
import time
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def param_counts(model: nn.Module) -> Dict[str, float]:
    """The model's parameters by ``requires_grad``, a shared tensor counted once.

    Returns:
        ``{"total", "trainable", "frozen": element counts, "trainable_share": trainable / total (0.0 when empty)}``.
    """
    params = list(model.parameters())  # a tensor shared by two modules comes once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "trainable_share": trainable / total if total else 0.0}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def param_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    return tensor_bytes(p for p in model.parameters() if p.requires_grad or not trainable_only)


def grad_bytes(model: nn.Module) -> int:
    """Bytes held by ``.grad`` tensors right now (call it after ``backward()``, before ``zero_grad``)."""
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def saved_file_bytes(state_dict: Dict[str, torch.Tensor], directory: Optional[str] = None,
                     name: str = "checkpoint.pt") -> int:
    """The size of ``state_dict`` (moved to CPU) written with ``torch.save`` as ``directory/name``.

    Args:
        directory: where to write it; None: a temporary directory, removed afterwards.
    """
    cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
    with tempfile.TemporaryDirectory() if directory is None else contextlib.nullcontext(directory) as d:
        path = os.path.join(d, name)
        torch.save(cpu, path)
        return os.path.getsize(path)


class SavedTensorBytes:
    """Context manager counting the bytes autograd saves for backward while active: each storage once, those of
    ``exclude`` (typically ``model.parameters()``, which exist anyway) left out, so the activation memory a step
    adds. Nothing is copied or kept alive longer.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen = set()
        self.bytes = 0
        self.count = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
            self.count += 1
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _storage_key(t: torch.Tensor):
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def current_rss() -> int:
    """This process's resident set size in bytes."""
    import psutil
    return psutil.Process().memory_info().rss


def _read_vm_hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def _release_free_heap() -> None:
    # glibc keeps freed heap pages resident; returning them first makes the baseline the memory really in use,
    # so later allocations that reuse those pages still show up in the peak.
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to release


class PeakRSS:
    """Peak resident memory of this process while active (``peak``), minus the RSS at entry (``delta``).

    Exact on Linux (``VmHWM``, reset through ``/proc/self/clear_refs``); elsewhere sampled every ``interval_s``
    (``method`` says which), which can miss a shorter spike.
    """

    interval_s = 0.001

    def __init__(self):
        self.baseline = self.peak = 0
        self.method = None
        self._stop = threading.Event()
        self._thread = None

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)

    def __enter__(self):
        _release_free_heap()
        self.baseline = current_rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            hwm = _read_vm_hwm()
            if hwm is None or hwm > self.baseline + (64 << 20):
                raise OSError("the peak did not reset")
            self.method = "linux VmHWM (reset via /proc/self/clear_refs)"
        except OSError:
            self.method = f"psutil RSS sampled every {self.interval_s * 1e3:g} ms"
            self.peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())
        else:
            self.peak = max(_read_vm_hwm() or 0, current_rss())
        return False


class CudaPeak:
    """Peak CUDA memory allocated while active (``peak``), minus the memory allocated at entry (``delta``)."""

    method = "torch.cuda.max_memory_allocated (reset after building the model and loading the data)"

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self.peak = self.delta = None

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)
        self.delta = self.peak - self.baseline
        return False


class NoPeak:
    """Stands in where no peak can be measured; ``method`` says why, the figures are None."""

    baseline = peak = delta = None

    def __init__(self, why: str):
        self.method = why

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def peak_memory(device: torch.device):
    """:class:`CudaPeak` on CUDA, :class:`PeakRSS` on CPU, :class:`NoPeak` elsewhere."""
    if device.type == "cuda":
        return CudaPeak(device)
    if device.type == "cpu":
        return PeakRSS()
    return NoPeak(f"n/a: no peak-memory measurement for {device.type} devices")


def timed(fn: Callable[[], object], device: torch.device):
    """``(fn(), seconds)``, the clock read after the device has finished the work."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def median(xs: Iterable[Optional[float]]) -> Optional[float]:
    """The median of the figures that are not None; None when there is none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
