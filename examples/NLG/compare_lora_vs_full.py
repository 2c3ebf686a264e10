"""LoRA vs full fine-tuning of the same model, measured side by side in one run.

    python examples/NLG/compare_lora_vs_full.py --json compare.json --plot compare.png
    python examples/NLG/compare_lora_vs_full.py --init_checkpoint smollm2 --score 630 --full_lr 1e-4   # scored

Both modes start from the same base weights (a random GPT-2 from ``--seed``, or ``--init_checkpoint``), see the
same batches of E2E training data in the same order and run on the same device. ``lora``: only the LoRA matrices
train (``loralib.mark_only_lora_as_trainable``). ``full``: the same configuration with ``lora_dim=0`` (plain
layers, so it pays nothing for a LoRA path it does not use), every weight trainable.

Each mode runs in its own Python process, so its peak memory is its own. Every figure printed is measured in that
run: parameters, checkpoint bytes, gradient and optimizer-state bytes, bytes autograd saves for a step, bytes DDP
all-reduces per step (a communication hook), peak memory, median step time, validation loss, the prefill latency
of the merged LoRA model against the plain one, and with ``--score N`` BLEU and the slot error rate of each mode's
texts for N test MRs. ``--precision`` is run_training.py's (default fp32 here; ``--help`` says why).
"""
import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the e2e_nlg package next to this script
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # loralib from the repo

import loralib as lora  # noqa: E402
from e2e_nlg import distributed, measure, metrics, slots  # noqa: E402
from e2e_nlg.adapter_io import atomic_json, atomic_write  # noqa: E402
from e2e_nlg.data import (DataError, ensure_data, iterate_batches, load_references, load_tokenized,  # noqa: E402
                          select_indices, target_count)
from e2e_nlg.generate import DEFAULT_DECODING  # noqa: E402
from e2e_nlg.inference import describe  # noqa: E402
from e2e_nlg.family import DISPLAY_NAMES, family_of, resolve  # noqa: E402
from e2e_nlg.model import base_fingerprint, base_state_dict  # noqa: E402
from e2e_nlg.train_config import TrainConfig, add_flags  # noqa: E402
from e2e_nlg.train_loop import Hooks, StepResult, Trainer, run_steps  # noqa: E402
from e2e_nlg.train_utils import (DeviceError, autocast, cast_frozen, evaluate,  # noqa: E402
                             precision_dtype, resolve_precision, select_device)

MODES = ("lora", "full")
MiB = float(1 << 20)


PRECISION_HELP = (
    "dtype of LoRA's frozen base and of autocast, as run_training.py's flag: LoRA keeps its frozen base in it and "
    "its LoRA weights in float32; full fine-tuning trains float32 weights under autocast (a gradient scaler with "
    "fp16). Default fp32, not run_training's auto: in fp32 both modes hold every weight in the same dtype, so each "
    "LoRA/full ratio measures what LoRA itself changes, and the figures do not depend on the CPU the run lands on. "
    "Under bf16 (what auto picks on a CPU with native bfloat16 instructions or a GPU) LoRA's frozen base is stored "
    "in bfloat16 while full fine-tuning must keep float32 weights to train them, so the memory and time ratios also "
    "hold that storage difference, which only LoRA can use: the comparison of the two as each runs in mixed "
    "precision")


# The TrainConfig flags this script takes, in --help's order, and where its defaults or meaning differ.
SHARED_FLAGS = ("hidden_dim", "num_layers", "num_heads", "vocab_size", "lora_dim", "lora_alpha", "lora_dropout",
                "lora_targets", "init_checkpoint", "batch_size", "seq_len", "lr", "weight_decay", "train_refs",
                "delex", "val_examples", "device", "precision", "seed", "data_dir", "no_download")
# Every reference with literal names is what this script trained on before it took --train_refs and --delex.
DEFAULTS = {"lr": 2e-4, "weight_decay": 0.01, "val_examples": 16, "precision": "fp32", "seed": 0,
            "train_refs": "all", "delex": "none"}
HELPS = {
    "lr": "AdamW learning rate of LoRA, and of full fine-tuning unless --full_lr is given (constant: no warmup, no "
          "decay, no clipping)",
    "weight_decay": "AdamW weight decay, both modes",
    "val_examples": "fixed validation subset for the loss",
    "precision": PRECISION_HELP,
    "train_refs": "all: every reference of train.txt; faithful: only those that realise every attribute of their "
                  "MR, as run_training.py trains by default",
    "delex": "attributes whose values become placeholders ([name], [near]) in prompt and target, filled back in "
             "after generation (run_training.py's default is name,near); none: literal names",
}
MODEL_GROUP, TRAIN_GROUP = "model (the same configuration for both modes)", "training and measurement"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = add_flags(p, SHARED_FLAGS, DEFAULTS, HELPS,
                       {"model": MODEL_GROUP, "training": TRAIN_GROUP, "input / output": TRAIN_GROUP})
    t = groups[TRAIN_GROUP]
    t.add_argument("--max_len", dest="seq_len", type=int, default=argparse.SUPPRESS,
                   help="the earlier name of --seq_len, still accepted")
    t.add_argument("--steps", type=int, default=8, help="training steps per mode, warm-up included")
    t.add_argument("--warmup", type=int, default=2, help="first steps left out of the step-time median")
    t.add_argument("--infer_reps", type=int, default=6,
                   help="timed prefill passes (prompt in, next-token logits out) per model for the latency")
    t.add_argument("--full_lr", type=float, default=None,
                   help="AdamW learning rate of full fine-tuning (default: --lr). Full fine-tuning moves every "
                        "weight, so it usually wants a smaller one than LoRA's")
    t.add_argument("--score", type=int, default=0, metavar="N",
                   help="after training, each mode writes a text for N test MRs spread evenly over test.txt (of "
                        "its M unique MRs, MR i * M // N for i < N, the same for both) with beam 5 and no repeated "
                        "4-grams, scored with BLEU (the official script's) and the slot error rate; 0: no scoring")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    o.add_argument("--plot", default=None, metavar="PATH", help="write a bar chart (PNG) to this file")
    p.add_argument("--_worker", nargs=2, metavar=("MODE", "RESULT_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        train_config(args)  # the settings run_training.py shares, checked as it checks them
    except ValueError as e:
        p.error(str(e))
    for name in ("steps", "val_examples", "infer_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.score < 0:
        p.error(f"--score must be >= 0 (0: no scoring), got {args.score}")
    if args.full_lr is not None and not args.full_lr > 0:
        p.error(f"--full_lr must be > 0, got {args.full_lr}")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup ({args.warmup}) must be >= 0 and less than --steps ({args.steps}), "
                "so at least one step is timed")
    return args, p


def train_config(args) -> TrainConfig:
    """The settings both modes share, as run_training.py's :class:`TrainConfig` (which validates them).

    Raises:
        ValueError: a setting out of range, naming its flag.
    """
    # This script's flags, not a model family's recipe, set the comparison.
    return TrainConfig.from_namespace(args, recipe="none")


# --- one mode, in its own process --------------------------------------------------------------------------------

def build_for_mode(args, mode: str, device: torch.device):
    """The model for ``mode``, on ``device``, in float32, with the base weights both modes share."""
    base, cfg = resolve(args.init_checkpoint), train_config(args)
    lora_model = base.build(cfg)
    if mode == "lora":
        lora.mark_only_lora_as_trainable(lora_model)
        return lora_model.to(device)
    plain = base.build(cfg, lora_dim=0)
    # A plain model's random draw differs (LoRA's A matrices take numbers from the RNG first): copy the base.
    plain.load_state_dict(base_state_dict(lora_model), strict=True)
    del lora_model
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain.to(device)


def prepare_model(args, mode: str, device: torch.device, precision: str):
    """:func:`build_for_mode`, its frozen weights then stored in ``precision`` (LoRA's base; full fine-tuning has
    none, so its weights stay float32). Returns the model and the fingerprint of its float32 base."""
    model = build_for_mode(args, mode, device)
    fingerprint = base_fingerprint(model)  # before the cast, so both modes compare their float32 base
    cast_frozen(model, precision)
    return model, fingerprint


def param_dtypes(model) -> dict:
    """The dtypes of the trainable and of the frozen parameters, as measured on the model."""
    kinds = {"trainable": set(), "frozen": set()}
    for p in model.parameters():
        kinds["trainable" if p.requires_grad else "frozen"].add(str(p.dtype).replace("torch.", ""))
    return {k: sorted(v) for k, v in kinds.items()}


def to_device(batches, device):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def load_batches(args, device) -> tuple:
    """The training batches (``--steps`` of them) and the validation batches, on ``device``."""
    cfg = train_config(args)
    kw = dict(tokenizer=resolve(args.init_checkpoint).tokenizer, delex=cfg.delex_slots)
    train = load_tokenized("train", args.data_dir, **kw)
    valid = load_tokenized("valid", args.data_dir, **kw)
    among = torch.nonzero(train.faithful).flatten().tolist() if cfg.train_refs == "faithful" else None
    train_idx = select_indices(len(train), args.steps * args.batch_size, args.seed, among)
    train_batches = to_device(iterate_batches(train, train_idx, args.batch_size, args.seq_len, shuffle=True,
                                              seed=args.seed), device)
    val_batches = to_device(iterate_batches(valid, select_indices(len(valid), args.val_examples, args.seed),
                                            args.batch_size, args.seq_len, shuffle=False), device)
    return train_batches, val_batches


class Phases:
    """Wall time of each part of a process's work, to show where a run's time goes."""

    def __init__(self):
        self.seconds, self._t = {}, time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._t
        self._t = now


def run_mode(args, mode: str) -> dict:
    """Train ``mode`` for ``args.steps`` steps and measure it. Returns the figures as a dict."""
    device = select_device(args.device)
    precision, why = resolve_precision(args.precision, device)
    log = lambda msg: print(f"[{mode}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    phases = Phases()
    torch.manual_seed(args.seed)
    model, fingerprint = prepare_model(args, mode, device, precision)
    model.train()
    counts, dtypes = measure.param_counts(model), param_dtypes(model)
    log(f"built on {device}: {counts['trainable']:,} of {counts['total']:,} parameters trainable; precision "
        f"{precision} ({why}): trainable weights {'/'.join(dtypes['trainable'])}, frozen "
        f"{'/'.join(dtypes['frozen']) or '-'}")
    train_batches, val_batches = load_batches(args, device)
    phases.done("build_and_data")
    val_before = evaluate(model, val_batches, device, precision)
    phases.done("val_before")
    out = {"mode": mode, "device": str(device), "precision": precision, "precision_why": why,
           "param_dtypes": dtypes, "base_fingerprint": fingerprint, "params": counts,
           "param_bytes": measure.param_bytes(model), "model_config": model.config.to_dict()}
    out.update(train_measured(args, model, train_batches, device, precision, mode))
    log(f"{len(out['step_times_s'])} steps, median step {out['median_step_s'] * 1e3:.1f} ms, "
        f"train loss {out['train_losses'][0]:.3f} -> {out['train_losses'][-1]:.3f}")
    phases.done("train")
    out["val_loss_after"] = evaluate(model, val_batches, device, precision)
    phases.done("val_after")
    out["allreduce"] = allreduce_bytes_per_step(model, train_batches[0], device, precision)
    log(f"DDP all-reduces {out['allreduce']['bytes']:,} bytes per step in {out['allreduce']['buckets']} bucket(s)")
    phases.done("allreduce")
    out["checkpoint"] = checkpoint_written(model, mode)
    phases.done("checkpoint")
    if args.score:
        out["score"] = score_sample(args, model, device, precision)
        sc = out["score"]
        log(f"{sc['mrs']} of {sc['of']} test MRs: BLEU {sc['bleu']:.4f}, slot error rate "
            f"{sc['slots']['slot_error_rate']:.1%}; e.g. {sc['texts'][0]!r}")
        phases.done("score")
    out.update(val_loss_before=val_before,
               val_tokens=sum(target_count(b["labels"]) for b in val_batches))
    if mode == "lora":
        out["inference"] = inference_latency(args, model, val_batches[0]["input_ids"], device, precision)
        log(f"prefill latency: merged LoRA {out['inference']['merged_lora_median_s'] * 1e3:.1f} ms, "
            f"plain {out['inference']['plain_median_s'] * 1e3:.1f} ms")
        phases.done("inference")
    out["phase_wall_s"] = phases.seconds
    return out


def train_measured(args, model, batches, device, precision: str, mode: str) -> dict:
    """AdamW steps over ``batches`` under ``precision``'s autocast (the one training loop, at ``mode``'s constant
    learning rate, without clipping): the time of each step, the losses, and, on the first step, the gradient and
    optimizer-state bytes and the bytes autograd saves; peak memory over all steps."""
    lr = args.full_lr if mode == "full" and args.full_lr else args.lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=args.weight_decay)
    hooks = StepMeasures(model, opt, device)
    gc.collect()
    with measure.peak_memory(device) as mem:
        run_steps(Trainer(model, opt, device, precision), batches, 0, len(batches), hooks)
    return {"grad_bytes": hooks.grad_bytes, "optimizer_state_bytes": hooks.optimizer_state_bytes,
            "saved_tensor_bytes": hooks.saved.bytes, "saved_tensor_count": hooks.saved.count,
            "peak_memory": {"method": mem.method, "baseline_bytes": mem.baseline, "peak_bytes": mem.peak,
                            "delta_bytes": mem.delta},
            "lr": lr, "step_times_s": hooks.step_times, "median_step_s": measure.median(hooks.step_times[args.warmup:]),
            "train_losses": hooks.losses}


class StepMeasures(Hooks):
    """What this script measures in the training loop: each step's time and loss; on step 0 (a warm-up step, so
    this bookkeeping is never timed) the bytes autograd saves, the gradients' and the optimizer state's bytes."""

    def __init__(self, model, opt, device):
        self.opt, self.device, self.model = opt, device, model
        self.saved = measure.SavedTensorBytes(exclude=model.parameters())
        self.step_times, self.losses, self.t0 = [], [], 0.0
        self.grad_bytes = self.optimizer_state_bytes = None

    def begin(self, step: int) -> None:
        measure.synchronize(self.device)
        self.t0 = time.perf_counter()

    def forward_context(self, step: int):
        return self.saved if step == 0 else contextlib.nullcontext()

    def after_backward(self, step: int) -> None:
        if step == 0:
            self.grad_bytes = measure.grad_bytes(self.model)

    def after_update(self, step: int, result: StepResult) -> None:
        if step == 0:
            self.optimizer_state_bytes = measure.optimizer_state_bytes(self.opt)

    def end(self, step: int, result: StepResult) -> None:
        measure.synchronize(self.device)
        self.step_times.append(time.perf_counter() - self.t0)
        self.losses.append(result.losses[0])  # one micro-batch per step: its mean loss


def checkpoint_written(model, mode: str) -> dict:
    """What each mode has to keep, written and measured: LoRA the adapter (the base is shared and frozen), full
    the whole model."""
    with tempfile.TemporaryDirectory() as d:
        if mode == "lora":
            name, sd = "adapter.pt", lora.lora_state_dict(model)
        else:
            name, sd = "model.pt", model.state_dict()
        return {"file": name, "keys": len(sd), "bytes": measure.saved_file_bytes(sd, d, name)}


def allreduce_bytes_per_step(model, batch, device, precision: str = "fp32") -> dict:
    """The bytes DDP all-reduces for one training step of ``model``, measured: one more forward and backward
    under ``DistributedDataParallel`` with a hook counting the gradient buckets it syncs. No optimizer step, so the
    model is unchanged. Run in a process group of one (the same buckets as with N processes: DDP syncs every
    trainable gradient once per step whatever N) unless the script already runs in one."""
    own_group = not torch.distributed.is_initialized()
    with tempfile.TemporaryDirectory() as d:
        if own_group:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                                 init_method="file://" + os.path.join(d, "store"))
        try:
            ddp = distributed.wrap_ddp(model, device)
            counter = distributed.AllReduceCounter().register(ddp)
            # the training loop without an optimizer: one forward and backward, the gradients then dropped
            run_steps(Trainer(ddp, None, device, precision), [batch], 0, 1)
            measure.synchronize(device)
            out = {"bytes": counter.bytes, "buckets": counter.buckets,
                   "backend": torch.distributed.get_backend(), "world_size": torch.distributed.get_world_size(),
                   "method": "DDP communication hook counting the gradient buckets it all-reduces, one step"}
            del ddp
        finally:
            if own_group:
                torch.distributed.destroy_process_group()
    return out


def score_sample(args, model, device, precision: str) -> dict:
    """``--score N``: the texts the trained model (in eval mode: LoRA merged) writes for N test MRs spread evenly
    over test.txt, decoded as run_inference.py does by default, and their BLEU and slot figures."""
    groups = load_references("test", args.data_dir)
    indices = [i * len(groups) // args.score for i in range(min(args.score, len(groups)))]
    mrs, refs = [groups[i][0] for i in indices], [groups[i][1] for i in indices]
    model.eval()
    with autocast(device, precision):
        texts, stats = describe(model, mrs, DEFAULT_DECODING, delex=train_config(args).delex_slots,
                                tokenizer=resolve(args.init_checkpoint).tokenizer)
    model.train()
    return {"mrs": len(mrs), "of": len(groups), "indices": indices, "decoding": stats["decoding"],
            "bleu": metrics.bleu(texts, refs), "slots": slots.slot_scores(mrs, texts), "texts": texts,
            "tokens_per_second": stats["tokens_per_second"]}


def next_token_logits(model, input_ids):
    """One prefill step of generation: read the prompts, score the next token (the last position only)."""
    h, _ = model.hidden_states(input_ids)
    return model.lm_head(h[:, -1])


@torch.inference_mode()
def inference_latency(args, lora_model, input_ids, device, precision: str = "fp32") -> dict:
    """Latency of a generation prefill (:func:`next_token_logits`) with the trained LoRA model in eval mode, where
    its update is merged into the weights, against the plain model (``lora_dim=0``) holding the same base
    weights in the same dtype, both under ``precision``'s autocast."""
    lora_model.eval()  # merges B A into the weights
    plain = resolve(args.init_checkpoint).build(train_config(args), lora_dim=0)
    # The LoRA model's state dict carries its unmerged base weights (loralib's save hook).
    plain.load_state_dict(base_state_dict(lora_model), strict=True)
    plain.to(device, precision_dtype(precision)).eval()
    t_lora, t_plain = [], []
    for r in range(args.infer_reps + 1):  # alternate the two, so a load change on the machine hits both alike
        with autocast(device, precision):
            _, a = measure.timed(lambda: next_token_logits(plain, input_ids), device)
            _, b = measure.timed(lambda: next_token_logits(lora_model, input_ids), device)
        if r > 0:  # the first pass of each is a warm-up
            t_plain.append(a)
            t_lora.append(b)
    merged = all(m.merged for m in lora_model.modules() if isinstance(m, lora.LoRALayer) and m.r > 0)
    return {"input_shape": list(input_ids.shape), "lora_is_merged": merged,
            "merged_lora_times_s": t_lora, "plain_times_s": t_plain,
            "merged_lora_median_s": measure.median(t_lora), "plain_median_s": measure.median(t_plain)}


def worker_main(args) -> int:
    mode, result_path = args._worker
    try:
        result = run_mode(args, mode)
    except torch.OutOfMemoryError as e:
        print(f"error: [{mode}] out of memory ({str(e).splitlines()[0]}); lower --batch_size, --seq_len, "
              "--hidden_dim or --num_layers", file=sys.stderr)
        return 2
    atomic_json(result_path, result)
    return 0


# --- the comparison ----------------------------------------------------------------------------------------------

def run_worker(mode: str, argv, result_path: str) -> dict:
    """Run one mode in a fresh Python process (so its peak memory is its own) and read its figures back."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_worker", mode, result_path]
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not os.path.isfile(result_path):
        raise RuntimeError(f"the {mode} run failed (exit status {proc.returncode}); its messages are above")
    with open(result_path) as f:
        return json.load(f)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarize(args, res: dict, wall_s: float) -> dict:
    lo, fu = res["lora"], res["full"]
    inf = lo.pop("inference")
    model_config = lo.pop("model_config")  # the LoRA model's; full fine-tuning's is the same with lora_dim 0
    fu.pop("model_config")
    summary = {
        "command": " ".join([os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:]),
        "loralib_version": lora.__version__,
        "torch_version": torch.__version__,
        "device": lo["device"],
        "precision": {"name": lo["precision"], "why": lo["precision_why"],
                      "autocast_dtype": None if lo["precision"] == "fp32" else
                      str(precision_dtype(lo["precision"])).replace("torch.", "")},
        "cpu_threads": torch.get_num_threads(),
        "model": DISPLAY_NAMES[family_of(args.init_checkpoint)],
        "model_config": model_config,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "same_base_weights": lo["base_fingerprint"] == fu["base_fingerprint"],
        "same_precision": lo["precision"] == fu["precision"],
        "lora": lo,
        "full": fu,
        "inference": inf,
        "ratios_lora_over_full": {
            "trainable_params": ratio(lo["params"]["trainable"], fu["params"]["trainable"]),
            "checkpoint_bytes": ratio(lo["checkpoint"]["bytes"], fu["checkpoint"]["bytes"]),
            "grad_bytes": ratio(lo["grad_bytes"], fu["grad_bytes"]),
            "allreduce_bytes": ratio(lo["allreduce"]["bytes"], fu["allreduce"]["bytes"]),
            "optimizer_state_bytes": ratio(lo["optimizer_state_bytes"], fu["optimizer_state_bytes"]),
            "saved_tensor_bytes": ratio(lo["saved_tensor_bytes"], fu["saved_tensor_bytes"]),
            "peak_memory_bytes": ratio(lo["peak_memory"]["peak_bytes"], fu["peak_memory"]["peak_bytes"]),
            "peak_memory_delta_bytes": ratio(lo["peak_memory"]["delta_bytes"], fu["peak_memory"]["delta_bytes"]),
            "median_step_s": ratio(lo["median_step_s"], fu["median_step_s"]),
        },
        "inference_ratio_merged_lora_over_plain": ratio(inf["merged_lora_median_s"], inf["plain_median_s"]),
        "wall_s": wall_s,
    }
    return summary


def fmt_int(x):
    return f"{x:,}"


def fmt_mib(x):
    return "n/a" if x is None else f"{x / MiB:,.1f} MiB"


def fmt_dtypes(d: dict) -> str:
    return " / ".join("/".join(d[k]) or "-" for k in ("trainable", "frozen"))


def fmt_ratio(x):
    if x is None:
        return "n/a"
    if x <= 0:
        return "0"
    return f"{x:.3g}x" if x >= 0.1 else f"{x:.2g}x (1/{1 / x:,.0f})"


def table(s: dict) -> str:
    lo, fu, inf, R = s["lora"], s["full"], s["inference"], s["ratios_lora_over_full"]
    mem_kind = "peak RSS" if s["device"] == "cpu" else "peak allocated"
    rows = [
        ("parameters, total", fmt_int(lo["params"]["total"]), fmt_int(fu["params"]["total"]),
         fmt_ratio(ratio(lo["params"]["total"], fu["params"]["total"]))),
        ("parameters, trainable", fmt_int(lo["params"]["trainable"]), fmt_int(fu["params"]["trainable"]),
         fmt_ratio(R["trainable_params"])),
        ("parameters, frozen", fmt_int(lo["params"]["frozen"]), fmt_int(fu["params"]["frozen"]), ""),
        ("trainable share", f"{lo['params']['trainable_share']:.2%}", f"{fu['params']['trainable_share']:.2%}", ""),
        ("weights, trainable / frozen", fmt_dtypes(lo["param_dtypes"]), fmt_dtypes(fu["param_dtypes"]), ""),
        ("checkpoint file written", fmt_mib(lo["checkpoint"]["bytes"]), fmt_mib(fu["checkpoint"]["bytes"]),
         fmt_ratio(R["checkpoint_bytes"])),
        ("gradients (.grad)", fmt_mib(lo["grad_bytes"]), fmt_mib(fu["grad_bytes"]), fmt_ratio(R["grad_bytes"])),
        ("all-reduced per step (DDP)", fmt_mib(lo["allreduce"]["bytes"]), fmt_mib(fu["allreduce"]["bytes"]),
         fmt_ratio(R["allreduce_bytes"])),
        ("AdamW state", fmt_mib(lo["optimizer_state_bytes"]), fmt_mib(fu["optimizer_state_bytes"]),
         fmt_ratio(R["optimizer_state_bytes"])),
        ("saved for backward, 1 step", fmt_mib(lo["saved_tensor_bytes"]), fmt_mib(fu["saved_tensor_bytes"]),
         fmt_ratio(R["saved_tensor_bytes"])),
        (f"{mem_kind} while training", fmt_mib(lo["peak_memory"]["peak_bytes"]),
         fmt_mib(fu["peak_memory"]["peak_bytes"]), fmt_ratio(R["peak_memory_bytes"])),
        ("  of it above model + data", fmt_mib(lo["peak_memory"]["delta_bytes"]),
         fmt_mib(fu["peak_memory"]["delta_bytes"]), fmt_ratio(R["peak_memory_delta_bytes"])),
        (f"median step (of {len(lo['step_times_s']) - s['args']['warmup']})", f"{lo['median_step_s'] * 1e3:,.1f} ms",
         f"{fu['median_step_s'] * 1e3:,.1f} ms", fmt_ratio(R["median_step_s"])),
        ("AdamW learning rate", f"{lo['lr']:g}", f"{fu['lr']:g}", ""),
        ("val loss before training", f"{lo['val_loss_before']:.4f}", f"{fu['val_loss_before']:.4f}", ""),
        (f"val loss after {len(lo['step_times_s'])} steps", f"{lo['val_loss_after']:.4f}",
         f"{fu['val_loss_after']:.4f}", ""),
    ]
    if "score" in lo:
        n = f"{lo['score']['mrs']} of {lo['score']['of']} test MRs"
        rows += [(f"BLEU, {n}", f"{lo['score']['bleu']:.4f}", f"{fu['score']['bleu']:.4f}", ""),
                 ("slot error rate, same MRs", f"{lo['score']['slots']['slot_error_rate']:.1%}",
                  f"{fu['score']['slots']['slot_error_rate']:.1%}", "")]
    w0 = max(len(r[0]) for r in rows)
    w = [max(len(r[i]) for r in rows + [("", "LoRA", "full", "LoRA/full")]) for i in (1, 2, 3)]
    lines = [f"{'':<{w0}}  {'LoRA':>{w[0]}}  {'full':>{w[1]}}  {'LoRA/full':>{w[2]}}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{a:<{w0}}  {b:>{w[0]}}  {c:>{w[1]}}  {d:>{w[2]}}" for a, b, c, d in rows]
    shape = "x".join(map(str, inf["input_shape"]))
    lines.append("-" * len(lines[0]))
    lines.append(f"prefill latency, batch {shape}: merged LoRA {inf['merged_lora_median_s'] * 1e3:,.1f} ms, "
                 f"plain model {inf['plain_median_s'] * 1e3:,.1f} ms "
                 f"(ratio {fmt_ratio(s['inference_ratio_merged_lora_over_plain'])}, "
                 f"median of {len(inf['plain_times_s'])})")
    lines.append(precision_line(s["precision"]))
    lines.append(f"memory: {lo['peak_memory']['method']}")
    return "\n".join(lines)


def precision_line(p: dict) -> str:
    if p["autocast_dtype"] is None:
        return f"precision: {p['name']} ({p['why']}): every weight float32, no autocast"
    return (f"precision: {p['name']} ({p['why']}): LoRA's frozen base in {p['autocast_dtype']}, the weights that "
            f"train (LoRA's, full fine-tuning's) in float32, under {p['autocast_dtype']} autocast")


def plot(s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    lo, fu, inf = s["lora"], s["full"], s["inference"]
    mib = lambda x: None if x is None else x / MiB  # noqa: E731
    mem = "peak RSS" if s["device"] == "cpu" else "peak allocated"
    panels = [
        ("trainable parameters (M)", lo["params"]["trainable"] / 1e6, fu["params"]["trainable"] / 1e6),
        ("checkpoint file (MiB)", lo["checkpoint"]["bytes"] / MiB, fu["checkpoint"]["bytes"] / MiB),
        ("gradients + AdamW state (MiB)", (lo["grad_bytes"] + lo["optimizer_state_bytes"]) / MiB,
         (fu["grad_bytes"] + fu["optimizer_state_bytes"]) / MiB),
        ("saved for backward (MiB)", lo["saved_tensor_bytes"] / MiB, fu["saved_tensor_bytes"] / MiB),
        (f"{mem} above model+data (MiB)", mib(lo["peak_memory"]["delta_bytes"]), mib(fu["peak_memory"]["delta_bytes"])),
        ("median step time (ms)", lo["median_step_s"] * 1e3, fu["median_step_s"] * 1e3),
        (f"val loss after {len(lo['step_times_s'])} steps", lo["val_loss_after"], fu["val_loss_after"]),
        ("prefill latency (ms)", inf["merged_lora_median_s"] * 1e3, inf["plain_median_s"] * 1e3),
    ]
    if "score" in lo:
        n = f"{lo['score']['mrs']} of {lo['score']['of']} test MRs"
        panels += [(f"BLEU, {n}", lo["score"]["bleu"], fu["score"]["bleu"]),
                   (f"slot error rate (%), {n}", 100 * lo["score"]["slots"]["slot_error_rate"],
                    100 * fu["score"]["slots"]["slot_error_rate"])]
    fig, axes = plt.subplots(2, len(panels) // 2, figsize=(3.75 * len(panels) // 2, 7))
    for ax, (title, a, b) in zip(axes.flat, panels):
        labels = ["merged LoRA", "plain"] if "latency" in title else ["LoRA", "full"]
        ax.set_title(title, fontsize=10)
        if a is None or b is None:
            ax.text(0.5, 0.5, "n/a on this device", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        bars = ax.bar(labels, [a, b], color=["tab:orange", "tab:blue"])
        for bar, v in zip(bars, (a, b)):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(0, max(a, b) * 1.18 or 1)
        if b:
            ax.set_xlabel(f"ratio {fmt_ratio(a / b)}", fontsize=9)
    cfg = s["model_config"]
    base = s["args"].get("init_checkpoint")
    fig.suptitle(f"LoRA (r={cfg['lora_dim']}) vs full fine-tuning: {s['model']}{f' ({base})' if base else ''} "
                 f"{cfg['num_layers']} layers, "
                 f"d={cfg['hidden_dim']}, batch {s['args']['batch_size']}, {len(lo['step_times_s'])} steps, "
                 f"{s['precision']['name']}, on {s['device']} (all measured)", fontsize=12)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv=None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _main(argv) -> int:
    args, parser = parse_args(argv)
    if args._worker:
        return worker_main(args)

    t_start = time.perf_counter()
    try:
        device = select_device(args.device)
        precision, why = resolve_precision(args.precision, device)
        # Parse and tokenise here, once: bad or missing data stops the run before any training starts.
        ensure_data(args.data_dir, ("train", "valid", "test") if args.score else ("train", "valid"),
                    download=not args.no_download)
        n_train = len(load_tokenized("train", args.data_dir))
        load_tokenized("valid", args.data_dir)
    except (DeviceError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps * args.batch_size > n_train:
        parser.error(f"--steps x --batch_size = {args.steps * args.batch_size} is more than the "
                     f"{n_train:,} training examples")
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path and os.path.isdir(path):
            parser.error(f"{flag} {path!r} is a directory; give a file name")
    print(f"LoRA vs full fine-tuning on {device}: {args.steps} steps each, batch {args.batch_size}, "
          f"each mode in its own process; precision {precision} ({why})", file=sys.stderr)

    results = {}
    with tempfile.TemporaryDirectory() as d:
        for mode in MODES:
            try:
                results[mode] = run_worker(mode, argv, os.path.join(d, f"{mode}.json"))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    s = summarize(args, results, time.perf_counter() - t_start)
    if not s["same_base_weights"] or not s["same_precision"]:
        print("error: the two modes did not start from the same base weights (fingerprints differ) or did not run "
              "in the same precision", file=sys.stderr)
        return 1
    print(table(s))
    print(f"total wall time {s['wall_s']:.1f} s")
    if args.json:
        atomic_json(args.json, s)
        print(f"wrote {args.json}")
    if args.plot:
        plot(s, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
