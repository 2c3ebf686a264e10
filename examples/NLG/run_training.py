"""Fine-tune GPT-2 with LoRA on E2E NLG: only the LoRA weights train; the adapter is saved as a ~4.6 MB file.

    python examples/NLG/run_training.py
    torchrun --nproc_per_node 2 examples/NLG/run_training.py   # data parallel

Without --init_checkpoint the frozen base is a *random* GPT-2 (seeded by --seed): no pretrained weights ship with
this repo. See README.md, "Examples: GPT-2 on E2E NLG", for the measured default run.
"""
import argparse
import contextlib
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # loralib from the repo

import loralib as lora  # noqa: E402
from src import data as D  # noqa: E402
from src import distributed as Dist  # noqa: E402
from src import train_utils as U  # noqa: E402
from src.adapter_io import (AdapterError, WEIGHTS_FILES, load_adapter_weights, read_adapter_weights,  # noqa: E402
                            save_adapter_dir, weights_path)
from src.hf_checkpoint import (CheckpointError, infer_config, load_hf_gpt2_weights,  # noqa: E402
                               resolve_init_checkpoint)
from src.model import LORA_TARGETS, GPTConfig, base_fingerprint, build_model  # noqa: E402
from src.recipes import RECIPES, apply_recipe, explicit_dests  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default="none", choices=["none", *sorted(RECIPES)],
                   help="paper: Microsoft's examples/NLG settings for GPT-2 M on E2E (LoRA r=4, alpha=32, dropout "
                        "0.1 on query and value; AdamW lr 2e-4, beta2 0.999, eps 1e-6, weight decay 0.01; no "
                        "clipping; 500 warmup steps then linear decay; batch 8; 5 epochs; seq_len 512; label "
                        "smoothing 0.1; seed 110; all of train.txt and valid.txt); flags given explicitly override "
                        "it; pair it with --init_checkpoint gpt2-medium")
    g = p.add_argument_group("training")
    g.add_argument("--num_epochs", type=int, default=1, help="passes over the (possibly limited) training set")
    g.add_argument("--batch_size", type=int, default=4, help="examples per micro-batch, padded to their longest")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (LoRA weights only)")
    g.add_argument("--warmup_steps", type=int, default=30, help="linear warmup steps, then linear decay to 0")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay on the LoRA weights")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--label_smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    g.add_argument("--max_steps", type=int, default=1200,
                   help="stop after this many optimizer steps (0: no limit; run --num_epochs epochs)")
    g.add_argument("--max_train_examples", type=int, default=0,
                   help="train on a fixed random subset of this many examples (0: all of them: the 25,687 "
                        "faithful references of train.txt, or its 42,061 with --train_refs all)")
    g.add_argument("--seq_len", type=int, default=128,
                   help="truncate examples to this many tokens (the longest E2E example has 115)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of the data order and of the LoRA init; also draws the random base when no "
                        "--init_checkpoint is given")
    g.add_argument("--log_interval", type=int, default=10, help="print a log line every N optimizer steps")
    g.add_argument("--val_examples", type=int, default=100,
                   help="validate on a fixed subset of this many valid.txt examples (0: all 4,672)")
    g.add_argument("--val_batch_size", type=int, default=50, help="batch size of validation")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cuda or cpu; under "
                   "torchrun process LOCAL_RANK uses cuda:LOCAL_RANK")
    g.add_argument("--precision", default="auto", choices=U.PRECISIONS,
                   help="dtype of the frozen base and of autocast: auto = bf16 on a CPU with native bfloat16 "
                        "instructions (AVX512-BF16/AMX) or a GPU that has it, fp16 on other GPUs, else fp32. LoRA "
                        "weights, optimizer state and losses stay float32")
    g.add_argument("--train_refs", default="faithful", choices=["faithful", "all"],
                   help="faithful: train on the references that realise every attribute of their MR and nothing "
                        "else (61%% of train.txt, checked by src/slots.py), so the model does not learn to leave "
                        "attributes out; all: every reference")
    g.add_argument("--delex", default=",".join(D.DELEX_SLOTS),
                   help="attributes whose values become placeholders ([name], [near]) in the prompt and the "
                        "target text, filled back in from the MR after generation; 'none' to train on the "
                        "literal names")
    g.add_argument("--dist_backend", default="auto", choices=Dist.BACKENDS,
                   help="torch.distributed backend under torchrun: auto = nccl on CUDA, gloo on CPU")
    g = p.add_argument_group("model")
    d = GPTConfig()
    g.add_argument("--vocab_size", type=int, default=d.vocab_size, help="vocabulary size (GPT-2 BPE: 50257)")
    g.add_argument("--hidden_dim", type=int, default=d.hidden_dim, help="model width (n_embd)")
    g.add_argument("--num_layers", type=int, default=d.num_layers, help="transformer blocks")
    g.add_argument("--num_heads", type=int, default=d.num_heads, help="attention heads")
    g.add_argument("--lora_dim", type=int, default=d.lora_dim, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=int, default=d.lora_alpha, help="LoRA alpha (scaling = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA path")
    g.add_argument("--lora_targets", nargs="+", choices=LORA_TARGETS, default=None,
                   help="modules that get LoRA: attn (query and value), attn_k (the key too), attn_proj (the "
                        "attention's output projection), mlp (both projections), lm_head (default: attn mlp lm_head)")
    g.add_argument("--init_checkpoint", default=None,
                   help="the frozen base: a Hugging Face Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or any "
                        "org/name in the GPT-2 layout; needs huggingface_hub, uses its cache and HF_HUB_OFFLINE) "
                        "or a local model.safetensors / pytorch_model.bin or its directory; its config.json sets "
                        "--vocab_size/--hidden_dim/--num_layers/--num_heads")
    g.add_argument("--init_revision", default=None,
                   help="with a Hub name: the branch, tag or commit to fetch (default: main); the commit sha used "
                        "is recorded in adapter_config.json")
    g = p.add_argument_group("input / output")
    g.add_argument("--data_dir", default=None,
                   help=f"directory with train.txt/valid.txt (else ${D.ENV_VAR}, else data/e2e/)")
    g.add_argument("--no_download", action="store_true",
                   help="never fetch the E2E data: without it, data found in none of those places is downloaded "
                        "into data/e2e/ (sha256-checked)")
    g.add_argument("--output_dir", default="lora_model",
                   help="where pytorch_model.bin, adapter_config.json, metrics.json, loss.png go")
    g.add_argument("--adapter_format", choices=sorted(WEIGHTS_FILES), default="bin",
                   help="bin: pytorch_model.bin, the lora_state_dict as Microsoft's loralib saves it; safetensors: "
                        "adapter_model.safetensors, the same tensors in a file that holds no code")
    g.add_argument("--resume", action="store_true",
                   help=f"continue from {U.STATE_NAME} in --output_dir (left by an interrupted or finished run)")
    g.add_argument("--no_progress", action="store_true", help="no tqdm progress bar (log lines only)")
    return p


def check_args(args) -> None:
    positive = ["num_epochs", "batch_size", "grad_accum", "seq_len", "log_interval", "val_batch_size"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ["max_steps", "max_train_examples", "val_examples", "warmup_steps", "lora_dim"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.adam_beta2 < 1.0 or args.adam_eps <= 0 or args.max_grad_norm < 0:
        raise ValueError(f"--adam_beta2 must be in [0, 1) (got {args.adam_beta2}), --adam_eps > 0 (got "
                         f"{args.adam_eps}) and --max_grad_norm >= 0 (got {args.max_grad_norm})")
    if not 0.0 <= args.label_smoothing < 1.0 or not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError("--label_smoothing and --lora_dropout must be in [0, 1)")
    if args.lora_dim == 0:
        raise ValueError("--lora_dim 0 leaves nothing to train; use a LoRA rank >= 1")
    delex_slots(args)


def delex_slots(args) -> tuple:
    """``--delex`` as a tuple of attributes (empty for 'none')."""
    if args.delex.strip().lower() in ("", "none"):
        return ()
    slots = tuple(x.strip() for x in args.delex.split(",") if x.strip())
    bad = [x for x in slots if x not in D.DELEX_SLOTS]
    if bad:
        raise ValueError(f"--delex {args.delex!r}: {', '.join(bad)} cannot be delexicalised; use a subset of "
                         f"{','.join(D.DELEX_SLOTS)} or 'none'")
    return slots


def build(args, device, source=None, precision: str = "fp32"):
    """The model (base from --init_checkpoint or the random draw of --seed), LoRA weights trainable only, the
    frozen base stored in ``precision``; and the base's fingerprint (taken before that cast, so inference can
    check it against a float32 rebuild).
    ``source``: the :class:`ResolvedCheckpoint` of --init_checkpoint when the caller has resolved it already."""
    sizes = dict(vocab_size=args.vocab_size, hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                 num_heads=args.num_heads)
    if args.init_checkpoint and source is None:
        source = resolve_init_checkpoint(args.init_checkpoint, getattr(args, "init_revision", None))
    if source is not None:
        sizes.update(infer_config(source.path))
    cfg = GPTConfig(**sizes, lora_dim=args.lora_dim, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                    lora_targets=getattr(args, "lora_targets", None))
    model = build_model(cfg, base_seed=args.seed)
    if source is not None:
        load_hf_gpt2_weights(model, source.path)
    lora.mark_only_lora_as_trainable(model)
    fingerprint = base_fingerprint(model)
    U.cast_frozen(model, precision)
    return model.to(device), fingerprint


def use_recipe(args, explicit=None) -> None:
    """Apply ``args.recipe`` to ``args`` (once), keeping the flags in ``explicit``; the outcome goes to
    ``args.recipe_info``. ``explicit=None`` (args not from :func:`parse_args`): values that differ from the
    defaults count as given."""
    if getattr(args, "recipe_info", None) is not None:
        return
    if explicit is None:
        defaults = vars(get_parser().parse_args([]))
        explicit = {k for k, v in vars(args).items() if defaults.get(k, v) != v}
    args.recipe_info = apply_recipe(args, getattr(args, "recipe", "none"), "train", explicit)


def parse_args(argv=None):
    """The command line, with ``--recipe`` applied: its values, except for the flags typed explicitly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    use_recipe(args, explicit_dests(get_parser, argv))
    return args


def train(args, step_callback=None) -> dict:
    """Run training as configured by ``args``; return the metrics (None on ranks other than 0 under torchrun).
    ``step_callback(step)`` runs after every optimizer step (tests use it to interrupt a run)."""
    use_recipe(args)
    check_args(args)
    ctx = Dist.init(args.device, args.dist_backend)
    try:
        # Under torchrun SIGINT / SIGTERM become a flag the ranks agree on at step boundaries (see StopRequest);
        # a plain run keeps Python's KeyboardInterrupt.
        with (Dist.StopRequest() if ctx.enabled else contextlib.nullcontext()) as stop:
            return _train(args, ctx, stop, step_callback)
    finally:
        Dist.cleanup(ctx)


class _ValidationAborted(Exception):
    pass


def _train(args, ctx, stop, step_callback) -> dict:
    device = ctx.device
    rank, world_size = ctx.rank, ctx.world_size
    is_main = ctx.is_main

    def log(msg):  # only rank 0 prints, so N processes print one log
        if is_main:
            tqdm.write(msg)

    torch.manual_seed(args.seed)

    # --- data ---
    t_load = time.time()
    # Rank 0 fetches missing data; the others wait for its verdict, so no rank reads a half-fetched directory.
    fetch_error = None
    if is_main:
        try:
            D.ensure_data(args.data_dir, ("train", "valid"), download=not args.no_download,
                          progress=not args.no_progress)
        except D.DataError as e:
            fetch_error = e
    if ctx.enabled and Dist.all_reduce_max(ctx, [fetch_error is not None])[0] and fetch_error is None:
        raise D.DataError("rank 0 could not get the E2E data (its error says why)")
    if fetch_error is not None:
        raise fetch_error
    # Only rank 0 writes, the token cache included.
    delex = delex_slots(args)
    train_split = D.load_tokenized("train", args.data_dir, write_cache=is_main, delex=delex)
    valid_split = D.load_tokenized("valid", args.data_dir, write_cache=is_main, delex=delex)
    among = torch.nonzero(train_split.faithful).flatten().tolist() if args.train_refs == "faithful" else None
    train_idx = D.select_indices(len(train_split), args.max_train_examples or None, args.seed, among)
    val_idx = D.select_indices(len(valid_split), args.val_examples or None, 0)
    log(f"data: {len(train_idx)} of {len(train_split)} train examples, {len(val_idx)} of {len(valid_split)} "
        f"validation examples (loaded in {time.time() - t_load:.1f}s)")

    def stoppable(batches):
        for b in batches:
            if stop is not None and stop.requested:
                raise _ValidationAborted
            yield b

    def val_loss():
        """Validation on the unwrapped model, rank 0 only (no collectives, so the other ranks cannot deadlock);
        None when a stop request cut it short."""
        try:
            return U.evaluate(model, stoppable(D.iterate_batches(valid_split, val_idx, args.val_batch_size,
                                                                 args.seq_len, shuffle=False)), device, precision)
        except _ValidationAborted:
            return None

    # --- model, optimizer, schedule ---
    precision, why = U.resolve_precision(args.precision, device)
    source = resolve_init_checkpoint(args.init_checkpoint, args.init_revision) if args.init_checkpoint else None
    if source is not None and source.from_hub:
        log(f"base: {source.spec} from the Hugging Face Hub, commit {source.revision} ({source.path})")
    if args.recipe_info:
        log(f"recipe {args.recipe}: " + ", ".join(f"{k}={getattr(args, k)}" for k in args.recipe_info["values"])
            + (f" (given explicitly: {', '.join(sorted(args.recipe_info['overridden']))})"
               if args.recipe_info["overridden"] else ""))
        if not args.init_checkpoint:
            log("note: no --init_checkpoint, so the base is a random GPT-2; the paper's recipe is meant for "
                "--init_checkpoint gpt2-medium")
    model, fingerprint = build(args, device, source, precision)
    counts = U.param_counts(model)
    log(f"model: {counts['total_params']:,} parameters, {counts['trainable_params']:,} trainable (LoRA), "
        f"device {device}")
    log(f"precision: {precision} ({why}); LoRA weights, optimizer state and losses in float32")
    # float16 gradients can underflow; bfloat16 has float32's range and needs no scaler.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay)
    global_batch = args.batch_size * world_size * args.grad_accum
    # Every rank must run the same number of steps (a rank with one batch more would wait in a collective
    # forever), so an epoch is the global batches that fit: the same count one process with the global batch has.
    steps_per_epoch = D.num_batches(len(train_idx), args.batch_size, shuffle=True) // (world_size * args.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training examples make no full step of batch_size {args.batch_size} x "
                         f"{world_size} processes x grad_accum {args.grad_accum}; lower them or raise "
                         f"--max_train_examples")
    total_steps = args.num_epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, U.warmup_linear_decay(args.warmup_steps, total_steps))

    step, history, seconds_before = 0, {"train": [], "val": []}, 0.0
    # Every rank reads rank 0's checkpoint: --output_dir must be visible to all of them (one node, or shared).
    state = U.load_training_state(args.output_dir) if args.resume else None
    if args.resume and state is None:
        log(f"--resume: no {U.STATE_NAME} in {args.output_dir}; starting from scratch")
    if state is not None:
        if state.get("global_batch", global_batch) != global_batch:
            raise ValueError(f"--resume: {args.output_dir} was trained with a global batch of "
                             f"{state['global_batch']} examples per step, this run has {global_batch} "
                             f"(batch_size x processes x grad_accum); use the same global batch to continue")
        # The LoRA weights saved inside training_state.pt (one atomic file) always belong to its optimizer state
        # and step, even when a kill landed between the adapter's save and this file's.
        lora_sd = state.get("lora")
        load_adapter_weights(model, lora_sd if lora_sd is not None else read_adapter_weights(args.output_dir),
                             source=U.STATE_NAME if lora_sd is not None else weights_path(args.output_dir))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history, seconds_before = state["step"], state["history"], state["seconds"]
        U.set_rng_state(state["rng"])
        log(f"resumed from {args.output_dir} at step {step} of {total_steps}")
    if ctx.enabled:
        hi, neg_lo = Dist.all_reduce_max(ctx, [step, -step])
        if hi != -neg_lo:
            raise Dist.DistributedError(
                f"--resume: the processes found different checkpoints in {args.output_dir} (steps {int(-neg_lo)} "
                f"to {int(hi)}); put --output_dir on a filesystem every node sees")
        # Parameters only: the LoRA gradients are what crosses processes. DDP broadcasts rank 0's weights once
        # here; buffers (the causal mask) never change, so they are not re-sent on every forward.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)
        log(f"distributed: {world_size} processes ({ctx.backend}), global batch {args.batch_size} (batch_size) x "
            f"{world_size} (processes) x {args.grad_accum} (grad_accum) = {global_batch} examples per step; "
            f"DDP all-reduces the {counts['trainable_params']:,} LoRA gradients only")
    else:
        train_model = model
    val_start = history["val"][0][1] if history["val"] else None
    if val_start is None and is_main:
        val_start = val_loss()
        if val_start is not None:
            history["val"].append((0, val_start))
            log(f"step 0: validation loss {val_start:.4f}")

    def save(final: bool):
        if not is_main:
            return None
        elapsed = seconds_before + time.time() - t_start
        extra = {"training_args": U.to_jsonable(U.dump_args(args)),
                 "data": {"train_sha256": train_split.sha256, "valid_sha256": valid_split.sha256,
                          "prompt_format": 'format_prompt(mr) = mr + " ||"; completion = " " + reference + EOT',
                          "delexicalize": list(delex),
                          "train_examples": len(train_idx), "val_examples": len(val_idx)},
                 "step": step}
        extra["precision"] = precision
        if args.recipe_info:
            # The decoding half is what run_inference.py uses for an adapter trained with this recipe.
            extra["recipe"] = {**args.recipe_info, "decode": RECIPES[args.recipe]["decode"]}
        save_adapter_dir(model, args.output_dir, base_seed=args.seed,
                         init_checkpoint=source.recorded if source else None,
                         init_revision=source.revision if source else None,
                         extra=extra, weights_format=args.adapter_format, fingerprint=fingerprint)
        U.save_training_state(args.output_dir, {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "history": history,
            "seconds": elapsed, "rng": rng_boundary, "args": U.to_jsonable(U.dump_args(args)),
            "global_batch": global_batch, "world_size": world_size,
            "lora": {k: v.detach().cpu() for k, v in lora.lora_state_dict(model).items()}})
        vals = [v for _, v in history["val"]]
        metrics = {**counts, "steps": step, "total_steps": total_steps, "finished": final,
                   "seconds": round(elapsed, 2), "val_loss_start": vals[0] if vals else None,
                   "val_loss_final": vals[-1] if vals else None,
                   "train_loss_final": history["train"][-1][1] if history["train"] else None,
                   "adapter_bytes": os.path.getsize(weights_path(args.output_dir)),
                   "train_examples": len(train_idx), "val_examples": len(val_idx),
                   "tokens_per_second": round(tokens_seen / max(1e-9, time.time() - t_start), 1),
                   "device": str(device), "torch_threads": torch.get_num_threads(),
                   "world_size": world_size, "global_batch": global_batch, "precision": precision}
        U.save_metrics(args.output_dir, metrics)
        title = f"LoRA on E2E: {step} steps" + (f", val loss {vals[-1]:.3f}" if vals else "")
        U.save_history(args.output_dir, history, title=title)
        return metrics

    def stop_agreed() -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        return bool(Dist.all_reduce_max(ctx, [stop.requested])[0]) if ctx.enabled else False

    # --- training loop ---
    model.train()
    t_start, tokens_seen = time.time(), 0
    # A Ctrl-C in the middle of a step (dropout has drawn from the RNG) saves the weights of the last completed
    # step: the RNG state saved with them must be that step's too, or --resume would draw other dropout masks.
    rng_boundary = U.rng_state()
    start_epoch, skip = divmod(step, steps_per_epoch)
    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress or not is_main, desc="train",
               dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, args.num_epochs):
            if step >= total_steps:
                break
            # The data order depends only on (seed, epoch): a resumed run skips the steps already done. Rank r
            # takes batches r, r+N, ...: at each step the N ranks together hold exactly the examples one process
            # with the global batch would (the same reshuffled order, cut into batch_size pieces).
            batches = D.iterate_batches(train_split, train_idx, args.batch_size, args.seq_len, shuffle=True,
                                        seed=args.seed * 1000 + epoch, rank=rank, world_size=world_size)
            for _ in range(skip * args.grad_accum):
                next(batches)
            skip = 0
            while step < total_steps and step - epoch * steps_per_epoch < steps_per_epoch:
                micro = [b for _, b in zip(range(args.grad_accum), batches)]
                if len(micro) < args.grad_accum:
                    break  # end of epoch
                t0 = time.time()
                n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
                step_tokens = sum(int(b["input_ids"].numel()) for b in micro)
                if ctx.enabled:
                    # One small all-reduce per step: the global token count (for the loss weights) and whether
                    # any rank got a stop signal, so all ranks stop at this same boundary.
                    n_tok, stop_any = Dist.all_reduce_sum(ctx, [n_tok, stop.requested])
                    n_tok = int(n_tok)
                    if stop_any:
                        raise KeyboardInterrupt
                    # Dropout masks: different on each rank, and a function of the step so --resume repeats them.
                    torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
                if n_tok == 0:
                    raise ValueError(f"step {step + 1} has no completion tokens to learn: --seq_len {args.seq_len} "
                                     f"cuts every example of the batch inside its prompt; raise --seq_len")
                loss_sum = 0.0
                for i, b in enumerate(micro):
                    # DDP syncs gradients once, on the last micro-batch of the step.
                    last = i == len(micro) - 1
                    with (train_model.no_sync() if ctx.enabled and not last else contextlib.nullcontext()):
                        labels = b["labels"].to(device)
                        with U.autocast(device, precision):
                            out = train_model(b["input_ids"].to(device), labels=labels,
                                              label_smoothing=args.label_smoothing)
                        # Weight micro-batches by their predicted tokens, as one big batch would. DDP averages
                        # over the N processes, so the factor N makes that average the token-weighted mean over
                        # the global batch (n_tok counts the tokens of all ranks).
                        n = int((labels[:, 1:] != -100).sum())
                        scaler.scale(out.loss * (n * world_size / n_tok)).backward()
                    loss_sum += out.loss.item() * n
                if ctx.enabled:
                    loss_sum, step_tokens = Dist.all_reduce_sum(ctx, [loss_sum, step_tokens])
                    step_tokens = int(step_tokens)
                tokens_seen += step_tokens
                scaler.unscale_(opt)
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.max_grad_norm)
                # Ctrl-C waits for the end of this block: weights, optimizer, schedule and step counter move
                # together, and the RNG state a checkpoint records is the one at this step boundary.
                with U.sigint_deferred():
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    rng_boundary = U.rng_state()
                    loss = loss_sum / n_tok
                    if not U.is_finite(loss):
                        raise FloatingPointError(f"training loss became {loss} at step {step}; lower --lr")
                    history["train"].append((step, loss))
                tok_s = step_tokens / max(1e-9, time.time() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                if step % args.log_interval == 0:
                    log(f"step {step}/{total_steps} epoch {epoch + 1} | loss {loss:.4f} | "
                        f"lr {sched.get_last_lr()[0]:.2e} | {tok_s:.0f} tok/s | "
                        f"{seconds_before + time.time() - t_start:.0f}s")
                if step_callback is not None:
                    step_callback(step)
            if is_main:
                v = val_loss()
                if v is not None:
                    history["val"].append((step, v))
                    log(f"end of epoch {epoch + 1} (step {step}): validation loss {v:.4f}")
        # e.g. resumed a run that had already finished its last epoch
        if is_main and (not history["val"] or history["val"][-1][0] != step):
            v = val_loss()
            if v is not None:
                history["val"].append((step, v))
        if stop_agreed():  # a signal during the last steps or the final validation
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        save(final=False)
        why = f" by {stop.signal_name}" if stop is not None and stop.signal_name else ""
        if is_main:
            print(f"\ninterrupted{why} at step {step}: saved to {args.output_dir}; continue with --resume")
        raise
    bar.close()
    metrics = save(final=True)
    if is_main:
        print(f"done: {step} steps in {metrics['seconds']:.1f}s, validation loss {metrics['val_loss_start']:.4f} -> "
              f"{metrics['val_loss_final']:.4f}; adapter {metrics['adapter_bytes']:,} bytes "
              f"({counts['trainable_params']:,} LoRA parameters) in {args.output_dir}/")
    return metrics


def _rank_prefix() -> str:
    """Under torchrun each process prints its own error, so say which one it was."""
    return f"[rank {os.environ['RANK']}] " if Dist.launched_by_torchrun() and os.environ.get("WORLD_SIZE") != "1" \
        else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except KeyboardInterrupt:
        return 130
    except (D.DataError, U.DeviceError, Dist.DistributedError, CheckpointError, AdapterError, ValueError,
            FloatingPointError) as e:
        print(f"error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
