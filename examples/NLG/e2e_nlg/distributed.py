"""Data-parallel plumbing: the process group from torchrun's environment, each process's device, a cooperative stop
on Ctrl-C / SIGTERM, and a DDP hook that measures what is synced. A plain ``python script.py`` gets a one-process
:class:`Context` with no process group.
"""
import inspect
import os
import signal
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .train_utils import DeviceError, check_device_name, select_device

BACKENDS = ("auto", "gloo", "nccl")


class DistributedError(RuntimeError):
    """A bad multi-process launch or configuration; the message says what to change."""


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"${name}={value!r} is not an integer; launch with torchrun, which sets it") from None


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: no process group (plain single-process run)
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def device_for_rank(name: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its node: ``cuda:LOCAL_RANK`` for ``auto`` / ``cuda`` when
    CUDA is there, else CPU.

    Raises:
        DeviceError: CUDA asked for without a GPU, fewer GPUs than processes on this node, or ``cuda:N`` (every
            process would pick the same GPU).
    """
    if name.startswith("cuda:"):
        raise DeviceError(f"--device {name} pins every process to one GPU; under torchrun use --device cuda "
                          "(process LOCAL_RANK gets cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs")
    check_device_name(name)
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise DeviceError(f"process LOCAL_RANK {local_rank} needs GPU {local_rank} but only {n} GPU(s) are visible; "
                          f"use torchrun --nproc_per_node {n} (or fewer), or --device cpu")
    return torch.device("cuda", local_rank)


def choose_backend(requested: str, device: torch.device) -> str:
    """``auto``: nccl for CUDA devices, gloo for CPU."""
    if requested not in BACKENDS:
        raise DistributedError(f"unknown --dist_backend {requested!r}; use one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise DistributedError("--dist_backend nccl needs CUDA GPUs but this run is on the CPU; "
                               "use --dist_backend gloo (or auto) for CPU processes")
    return requested


def init(device_name: str = "auto", backend: str = "auto") -> Context:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ...), or return a one-process context
    without a group when the script was not started by torchrun.

    Raises:
        DistributedError: a bad torchrun environment or backend; DeviceError: see :func:`device_for_rank`.
    """
    if not launched_by_torchrun():
        return Context(device=select_device(device_name))
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if not 0 <= rank < world_size:
        raise DistributedError(f"$RANK={rank} is outside [0, $WORLD_SIZE={world_size}); launch with torchrun")
    device = device_for_rank(device_name, local_rank)
    backend = choose_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kw)
    return Context(rank, world_size, local_rank, backend, device)


def cleanup(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``model`` in DistributedDataParallel, syncing the LoRA gradients only (buffers such as the causal mask never
    change): ``forward_sync_buffers=False`` in torch 2.13, ``broadcast_buffers=False`` before."""
    ddp = torch.nn.parallel.DistributedDataParallel
    ids = [device] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(model, device_ids=ids, forward_sync_buffers=False)
    return ddp(model, device_ids=ids, broadcast_buffers=False)


def _all_reduce(ctx: Context, values, op) -> list:
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(ctx: Context, values) -> list:
    """Element-wise sum over processes (float64, so token counts stay exact)."""
    return _all_reduce(ctx, values, dist.ReduceOp.SUM)


def all_reduce_max(ctx: Context, values) -> list:
    """Element-wise maximum over processes."""
    return _all_reduce(ctx, values, dist.ReduceOp.MAX)


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the training loop checks at step boundaries.

    Under torchrun every worker gets the signal at a different point of a step: a ``KeyboardInterrupt`` there would
    leave some ranks inside a collective the others have left. With a flag the ranks stop together at the next step
    boundary and rank 0 saves a consistent checkpoint. Repeated signals are not escalated (each worker normally gets
    two for one Ctrl-C); torchrun kills workers that do not exit within its shutdown timeout (30 s).
    """

    def __init__(self):
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


class AllReduceCounter:
    """A DDP communication hook that all-reduces each gradient bucket as DDP's default does, and counts the bytes
    of the buckets it was handed: what DDP really syncs."""

    def __init__(self):
        self.bytes = 0
        self.buckets = 0

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        buf = bucket.buffer()
        self.bytes += buf.numel() * buf.element_size()
        self.buckets += 1
        return allreduce_hook(state, bucket)

    def register(self, ddp_model) -> "AllReduceCounter":
        ddp_model.register_comm_hook(None, self.hook)
        return self
