"""The one training loop (:func:`run_steps`) of run_training.py, compare_lora_vs_full.py and bench_peers.py's NLG
part; what each measures or records comes in through :class:`Hooks`."""
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

import torch

from . import distributed
from .data import target_count
from .train_utils import autocast, sigint_deferred


def model_loss(model: torch.nn.Module, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """The model's own loss, computed at the label positions only."""
    return model(batch["input_ids"], labels=batch["labels"], label_smoothing=label_smoothing).loss


@dataclass
class Trainer:
    """What a step needs: the model, its optimizer and the run's numerics."""
    model: torch.nn.Module  # what trains: the model, or DDP around it under torchrun
    opt: Optional[torch.optim.Optimizer]  # None: a measuring pass, gradients computed and dropped, weights unchanged
    device: torch.device
    precision: str = "fp32"  # train_utils.PRECISIONS: autocast's dtype; fp16 turns the gradient scaler on
    sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None  # stepped after each optimizer step
    max_grad_norm: float = 0.0  # 0: no clipping
    label_smoothing: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    ctx: Optional[distributed.Context] = None  # under torchrun: token counts, losses and stop requests are shared
    stop: Optional[distributed.StopRequest] = None
    loss_fn: Optional[Callable[[torch.nn.Module, dict], torch.Tensor]] = None  # default: model_loss
    scaler: torch.amp.GradScaler = field(init=False)  # float16 gradients can underflow; bfloat16's cannot

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def is_distributed(self) -> bool:
        return self.ctx is not None and self.ctx.enabled


@dataclass
class StepResult:
    """What one optimizer step computed (all ranks together under torchrun)."""
    loss_sum: float  # the token-weighted sum of the micro-batches' losses
    n_tok: int  # the tokens predicted
    tokens: int  # the tokens read (input_ids, padding included)
    losses: List[float]  # each micro-batch's mean loss, this rank's

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n_tok


class Hooks:
    """Callbacks of :func:`run_steps`, each a no-op here: a caller overrides what it measures or records."""

    def begin(self, step: int) -> None:
        """Before anything of step ``step`` (0-based) happens."""

    def forward_context(self, step: int):
        """A context around each micro-batch's forward."""
        return contextlib.nullcontext()

    def after_backward(self, step: int) -> None:
        """Every gradient of the step is there, before clipping and the optimizer step."""

    def after_update(self, step: int, result: StepResult) -> None:
        """After the optimizer step and ``zero_grad``, inside the block a Ctrl-C waits for."""

    def end(self, step: int, result: StepResult) -> None:
        """After the step."""


def run_steps(tr: Trainer, batches: Iterable[dict], start: int, stop: int, hooks: Optional[Hooks] = None) -> int:
    """Optimizer steps ``start`` .. ``stop - 1`` of ``tr.grad_accum`` micro-batches each, until ``batches`` runs out.
    Returns the step it stopped at.

    Raises:
        KeyboardInterrupt: a rank was asked to stop (torchrun); ValueError: no token to learn in a step.
    """
    hooks = hooks or Hooks()
    batches = iter(batches)
    for step in range(start, stop):
        micro = list(itertools.islice(batches, tr.grad_accum))
        if len(micro) < tr.grad_accum:
            return step  # end of the data
        hooks.begin(step)
        result = optimizer_step(tr, micro, step, hooks)
        hooks.end(step, result)
    return stop


def optimizer_step(tr: Trainer, micro: list, step: int, hooks: Hooks) -> StepResult:
    """One optimizer step over the micro-batches ``micro``."""
    counts = [target_count(b["labels"]) for b in micro]
    n_tok = sum(counts)
    tokens = sum(int(b["input_ids"].numel()) for b in micro)
    if tr.is_distributed:
        # One small all-reduce per step: the global token count (for the loss weights) and whether any rank got a
        # stop signal, so all ranks stop at this same boundary.
        n_tok, stop_any = distributed.all_reduce_sum(tr.ctx, [n_tok, tr.stop.requested])
        n_tok = int(n_tok)
        if stop_any:
            raise KeyboardInterrupt
    if n_tok == 0:
        raise ValueError(f"step {step + 1} has no completion tokens to learn: --seq_len cuts every example of the "
                         f"batch inside its prompt; raise --seq_len")
    losses = accumulate_gradients(tr, micro, counts, n_tok, hooks, step)
    loss_sum = sum(loss * n for loss, n in zip(losses, counts))
    if tr.is_distributed:
        loss_sum, tokens = distributed.all_reduce_sum(tr.ctx, [loss_sum, tokens])
        tokens = int(tokens)
    hooks.after_backward(step)
    result = StepResult(loss_sum, n_tok, tokens, losses)
    if tr.opt is None:
        tr.model.zero_grad(set_to_none=True)
        return result
    tr.scaler.unscale_(tr.opt)
    if tr.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([q for q in tr.model.parameters() if q.requires_grad], tr.max_grad_norm)
    # Ctrl-C waits for the end of this block: weights, optimizer, schedule and step counter move together.
    with sigint_deferred():
        tr.scaler.step(tr.opt)
        tr.scaler.update()
        if tr.sched is not None:
            tr.sched.step()
        tr.opt.zero_grad(set_to_none=True)
        hooks.after_update(step, result)
    return result


def accumulate_gradients(tr: Trainer, micro: list, counts: List[int], n_tok: int, hooks: Hooks,
                         step: int) -> List[float]:
    """Forward and backward of each micro-batch; returns their mean losses (this rank's)."""
    world_size = tr.ctx.world_size if tr.is_distributed else 1
    loss_fn = tr.loss_fn or (lambda model, b: model_loss(model, b, tr.label_smoothing))
    losses = []
    for i, (b, n) in enumerate(zip(micro, counts)):
        last = i == len(micro) - 1  # DDP syncs gradients once, on the last micro-batch
        with (tr.model.no_sync() if tr.is_distributed and not last else contextlib.nullcontext()):
            b = {k: v.to(tr.device) for k, v in b.items()}
            with hooks.forward_context(step), autocast(tr.device, tr.precision):
                loss = loss_fn(tr.model, b)
            # Weight micro-batches by their predicted tokens, as one big batch would. DDP averages over the N
            # processes, so the factor N makes that average the token-weighted mean over the global batch (n_tok
            # counts the tokens of all ranks).
            tr.scaler.scale(loss * (n * world_size / n_tok)).backward()
        losses.append(loss.item())
    return losses
