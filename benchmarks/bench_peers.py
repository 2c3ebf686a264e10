"""This loralib against its peers (PEFT, Microsoft's loralib 0.1.2, full fine-tuning) on the same GPT-2, one run.

    python benchmarks/bench_peers.py --quick        # < 5 minutes on 2 cores: 8 x 64, fewer rounds and steps
    python benchmarks/bench_peers.py                # the full run (see benchmarks/RESULTS.md)

Every figure comes from a fresh worker process (``--worker``) so no method inherits another's allocator state or
warm caches; the parent runs the methods interleaved (A B C D, B C D A, ...) for several rounds and reports the
median over processes with the min-max spread, so noise shows. Ratios compare figures of the same run.

The model is ``transformers.GPT2LMHeadModel`` (random init from a fixed seed: every method gets the same base).
LoRA goes on each block's fused q|k|v projection ``attn.c_attn``: loralib (ours and 0.1.2) replaces it by a
``MergedLinear(..., enable_lora=[True, False, True], fan_in_fan_out=True)`` adopting the Conv1D's own weight and
bias (q and v adapted); PEFT wraps ``c_attn`` with ``target_modules=["c_attn"]`` (one rank-r update of all of q|k|v).

Memory allocator. On this kind of machine (a small VM) most of a CPU step's run-to-run noise is page faults: glibc
hands tensors above its mmap threshold back to the kernel when they are freed, and every step faults the same
memory in again, at a cost that varies from process to process. ``--allocator reuse`` (the default) starts every
worker with glibc's ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` set
(``MALLOC_ENV``) so freed memory stays in the process and is reused; ``--allocator system`` runs the workers with
glibc's defaults (those variables removed), which is what a user gets unless they set them. Every method of a run
gets the same setting; the report says which.

Microsoft's loralib is PyPI ``loralib==0.1.2`` imported as ``loralib_ms`` from ``.cache/`` (never committed; see
``benchmarks/reference_wheel.py``).
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "examples" / "NLG", REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

METHODS = ("full", "floor", "ours", "ms", "peft")
LORA_METHODS = ("ours", "ms", "peft")
# glibc malloc tunables for --allocator reuse: never mmap a block (so never unmap one), never trim the heap.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_TOP_PAD_": "0"}
LABELS = {"full": "full fine-tuning", "floor": "no-adapter floor (biases only)", "ours": "this loralib",
          "ms": "loralib 0.1.2 (PyPI)", "peft": "peft"}


# --- the worker: one method, one configuration, one fresh process ------------------------------------------------

def build_base(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab,
                     n_positions=max(1024, args.seq))
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def _replace_c_attn(model, lib, args):
    """Each block's Conv1D ``attn.c_attn`` becomes ``lib.MergedLinear`` on the same weight and bias Parameters.
    Returns ``[(parent, name, lora_layer, original_conv1d)]``."""
    import torch
    import torch.nn as nn

    swaps = []
    for block in model.transformer.h:
        conv = block.attn.c_attn
        n_in, n_out = conv.weight.shape  # Conv1D stores (in, out): fan_in_fan_out
        torch.manual_seed(1)  # the same A for both libraries
        layer = lib.MergedLinear(n_in, n_out, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                 enable_lora=[True, False, True], fan_in_fan_out=True)
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer.weight.requires_grad = False
        layer.train(model.training)
        assert isinstance(layer.lora_A, nn.Parameter)
        block.attn.c_attn = layer
        swaps.append((block.attn, "c_attn", layer, conv))
    return swaps


def _toggle_merged_loralib(swaps, on: bool):
    # Both libraries merge in train(False) and unmerge in train(True) when merge_weights is set (0.1.2 has no
    # merge()); merge_weights stays False otherwise, so model.eval() itself never merges.
    for _, _, layer, _ in swaps:
        layer.merge_weights = True
        layer.train(not on)
        layer.merge_weights = False
        layer.train(False)


def apply_method(model, args):
    """Make ``model`` ready to train with ``args.method``. Returns a dict: ``adapter_state`` (what a checkpoint of
    the method holds), ``swaps`` (LoRA layer / base layer pairs) and ``set_merged`` (or None)."""
    method = args.method
    if method == "full":
        return dict(model=model, adapter_state=lambda: model.state_dict(), swaps=[], set_merged=None)
    if method == "floor":
        for n, p in model.named_parameters():
            p.requires_grad = n.endswith(".bias")
        return dict(model=model, swaps=[], set_merged=None,
                    adapter_state=lambda: {n: p for n, p in model.named_parameters() if p.requires_grad})
    if method in ("ours", "ms"):
        if method == "ours":
            import loralib as lib
        else:
            from reference_wheel import fetch_wheel, import_renamed
            lib = import_renamed(fetch_wheel(Path(args.ms_wheel)), Path(tempfile.mkdtemp(prefix="loralib_ms-")))
        swaps = _replace_c_attn(model, lib, args)
        lib.mark_only_lora_as_trainable(model)
        for _, _, layer, _ in swaps:
            layer.merge_weights = False  # merging is driven explicitly below
        return dict(model=model, swaps=swaps, adapter_state=lambda: lib.lora_state_dict(model),
                    set_merged=lambda on: _toggle_merged_loralib(swaps, on), lib_file=lib.__file__)
    if method == "peft":
        import peft

        torch_seed(1)
        cfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=["c_attn"], lora_dropout=args.dropout,
                              fan_in_fan_out=True, bias="none")
        pm = peft.get_peft_model(model, cfg)
        swaps = []
        for block in pm.base_model.model.transformer.h:
            layer = block.attn.c_attn
            swaps.append((block.attn, "c_attn", layer, layer.get_base_layer()))

        def set_merged(on):
            (pm.merge_adapter if on else pm.unmerge_adapter)()

        return dict(model=pm, swaps=swaps, set_merged=set_merged,
                    adapter_state=lambda: peft.get_peft_model_state_dict(pm))
    raise ValueError(f"unknown method {method!r}")


def torch_seed(s):
    import torch
    torch.manual_seed(s)


def _swap(swaps, use_lora: bool):
    for parent, name, layer, base in swaps:
        setattr(parent, name, layer if use_lora else base)


def half_precision(model, precision: str, method: str):
    """As the NLG example's ``--precision``: the frozen weights stored in bfloat16, trainable ones (adapters, all of
    full fine-tuning's) kept float32, and the step run under ``torch.autocast``. The floor's trainable biases are
    bfloat16 too: a LayerNorm needs its bias in its weight's dtype (autocast does not cast it on CPU). Returns the
    autocast context to run the model under (a no-op for fp32)."""
    import torch
    from e2e_nlg import train_utils

    if precision == "fp32":
        return contextlib.nullcontext
    if method == "floor":
        model.to(train_utils.precision_dtype(precision))
    train_utils.cast_frozen(model, precision)
    return lambda: train_utils.autocast(torch.device("cpu"), precision)


def worker_train(args):
    import torch
    from e2e_nlg import measure

    torch.set_num_threads(args.threads)
    model = build_base(args)
    model.train()
    m = apply_method(model, args)
    model, swaps = m["model"], m["swaps"]
    amp = half_precision(model, args.precision, args.method)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    assert args.method == "floor" or all(p.dtype == torch.float32 for p in trainable)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    out = dict(method=args.method, dropout=args.dropout, batch=args.batch, seq=args.seq, threads=args.threads,
               precision=args.precision, params=measure.param_counts(model), lib_file=m.get("lib_file"),
               frozen_dtypes=sorted({str(p.dtype) for p in params if not p.requires_grad}),
               malloc_env={k: os.environ.get(k) for k in MALLOC_ENV})

    opt = torch.optim.AdamW(trainable, lr=args.lr)

    def step():
        with amp():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    with measure.PeakRSS() as peak:  # baseline: the built model, before any training
        with measure.SavedTensorBytes(exclude=params) as saved, amp():
            loss = model(input_ids=ids, labels=ids).loss  # one forward: what autograd keeps for backward
        loss.backward()
        del loss
        opt.zero_grad(set_to_none=True)
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    out.update(saved_bytes=saved.bytes, saved_count=saved.count, step_s=times,
               step_median_s=statistics.median(times) if times else None,
               rss_baseline=peak.baseline, rss_peak=peak.peak, rss_delta=peak.delta, rss_method=peak.method)
    out["adapter_bytes"] = measure.saved_file_bytes(m["adapter_state"]())

    if args.eval_reps > 0:
        out.update(eval_latency(model, swaps, m["set_merged"], ids, args.eval_reps))
    return out


def eval_latency(model, swaps, set_merged, ids, reps):
    """Forward latency (logits at every position) of the base model, the unmerged adapter and the merged adapter,
    interleaved in this process (the base is the model with its original c_attn layers swapped back in)."""
    import torch

    model.eval()
    modes = ["base", "unmerged", "merged"] if set_merged is not None else ["base"]

    def run(mode):
        _swap(swaps, use_lora=mode != "base")
        if set_merged is not None:
            set_merged(mode == "merged")
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        return logits, time.perf_counter() - t0

    lat = {k: [] for k in modes}
    outs = {}
    with torch.no_grad():
        for k in modes:  # warm-up, and the outputs compared below
            outs[k] = run(k)[0]
        for i in range(reps):
            for k in modes[i % len(modes):] + modes[:i % len(modes)]:  # rotate the order
                lat[k].append(run(k)[1])
    _swap(swaps, use_lora=True)
    if set_merged is not None:
        set_merged(False)
    res = {"eval_s": lat, "eval_median_s": {k: statistics.median(v) for k, v in lat.items()}}
    if "merged" in outs:
        res["merged_vs_unmerged_maxdiff"] = float((outs["merged"] - outs["unmerged"]).abs().max())
        res["unmerged_vs_base_maxdiff"] = float((outs["unmerged"] - outs["base"]).abs().max())
    return res


def _nlg_batches(args):
    """``args.steps + args.warmup`` batches of 4 from the E2E training set as the example builds them (from 1,000
    examples drawn with seed 42), or, without the data, synthetic ones (30 prompt + 20 completion tokens)."""
    import torch

    n = args.warmup + args.steps
    try:
        from e2e_nlg.data import iterate_batches, load_tokenized, select_indices

        split = load_tokenized("train", args.data_dir)
        idx = select_indices(len(split), 1000, 42)
        it = iterate_batches(split, idx, args.batch, args.seq, shuffle=True, seed=42)
        batches = [next(it) for _ in range(n)]
        return batches, "E2E train (1,000 examples drawn with seed 42, the example's batching)"
    except Exception as exc:  # noqa: BLE001 - no data here: the synthetic stand-in, and say so
        g = torch.Generator().manual_seed(3)
        batches = []
        for _ in range(n):
            ids = torch.randint(0, args.vocab, (args.batch, 50), generator=g)
            labels = ids.clone()
            labels[:, :30] = -100
            batches.append({"input_ids": ids, "labels": labels})
        return batches, f"synthetic (E2E unavailable: {type(exc).__name__})"


def worker_nlg(args):
    """The NLG example's model and training step (its training loop), with the output layer (and the last block's
    attention output and MLP) at label positions only (``fast``: what the example does) or at every position
    (``all``: benchmark-only, the usual way)."""
    import torch
    import torch.nn.functional as F

    import loralib as lora
    from e2e_nlg.model import GPTConfig, build_model
    from e2e_nlg.train_loop import Trainer, run_steps

    torch.set_num_threads(args.threads)
    cfg = GPTConfig() if not args.tiny_nlg else GPTConfig(
        vocab_size=args.vocab, hidden_dim=args.width, num_layers=args.layers, num_heads=args.heads, lora_dim=args.r,
        lora_alpha=args.alpha)
    model = build_model(cfg, base_seed=42)
    lora.mark_only_lora_as_trainable(model)
    model.train()
    half_precision(model, args.precision, "ours")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batches, source = _nlg_batches(args)

    def every_position_loss(model, b):
        logits = model(b["input_ids"]).logits  # (B, T, V) at every position
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)

    trainer = Trainer(model, opt, torch.device("cpu"), args.precision,
                      loss_fn=None if args.method == "fast" else every_position_loss)
    hooks = nlg_step_times(args.warmup, head_at_labels=args.method == "fast")
    run_steps(trainer, batches, 0, len(batches), hooks)
    return dict(method=args.method, precision=args.precision, source=source, config=cfg.to_dict(),
                tokens=hooks.tokens, seconds=hooks.seconds,
                tokens_per_s=hooks.tokens / hooks.seconds if hooks.seconds else None, head_rows=hooks.head_rows,
                losses=hooks.losses)


def nlg_step_times(warmup: int, head_at_labels: bool):
    """The hooks that measure the NLG worker's steps (torch is imported in the workers only)."""
    from e2e_nlg.train_loop import Hooks

    class NLGStepTimes(Hooks):
        """The NLG worker's figures from the training loop: the time of each step after ``warmup`` untimed ones,
        the tokens it read and the rows the output layer computed; every step's loss."""

        def __init__(self, warmup: int, head_at_labels: bool):
            self.warmup, self.head_at_labels = warmup, head_at_labels
            self.seconds, self.tokens, self.head_rows, self.losses, self.t0 = 0.0, 0, 0, [], 0.0

        def begin(self, step: int) -> None:
            self.t0 = time.perf_counter()

        def end(self, step: int, result) -> None:
            dt = time.perf_counter() - self.t0
            self.losses.append(result.losses[0])
            if step >= self.warmup:
                self.seconds += dt
                self.tokens += result.tokens
                # rows the 50,257-way output layer computes: the positions with a label (fast) or every position
                self.head_rows += result.n_tok if self.head_at_labels else result.tokens

    return NLGStepTimes(warmup, head_at_labels)


# --- the parent: interleave fresh processes, aggregate, report ---------------------------------------------------

def _loadavg():
    try:
        return open("/proc/loadavg").read().split()[:3]
    except OSError:
        return None


def worker_env(allocator: str) -> dict:
    """The environment of a worker process: ``MALLOC_ENV`` set (``reuse``) or removed (``system``)."""
    if allocator not in ("reuse", "system"):
        raise ValueError(f"allocator must be 'reuse' or 'system', got {allocator!r}")
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if allocator == "reuse":
        env.update(MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_worker(kind, method, common, allocator="reuse", **kw):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--method", method] + common
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = worker_env(allocator)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {method} {kw} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - t0
    return res


def _med(xs):
    from e2e_nlg.measure import median  # the example's one median helper (None left out); imported when reporting
    return median(xs)


def _spread(xs, scale=1.0, fmt="{:,.0f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    m = fmt.format(statistics.median(xs) * scale)
    return m if len(xs) == 1 else f"{m} ({fmt.format(min(xs) * scale)}–{fmt.format(max(xs) * scale)})"


def add_model_args(p):
    """The model and LoRA flags every benchmark script shares (defaults: GPT-2 small, r=4, alpha=32, 2 threads)."""
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 5 min on 2 cores: 8x64 only, 1 round of 5 steps")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (fresh process each); default 3")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per process; default 10")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 2")
    p.add_argument("--eval_reps", type=int, default=None, help="timed eval forwards per mode; default 5")
    p.add_argument("--shapes", default=None, help="batch x seq list, default 8x64,4x128 (quick: 8x64)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--dropouts", default="0.1,0.0", help="lora_dropout values; the first is the timed one in quick")
    p.add_argument("--nlg_rounds", type=int, default=None, help="rounds of the NLG tokens/s comparison (0: skip)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: every method with its frozen weights in bfloat16 and float32 trainable weights, under "
                        "torch.autocast (as the NLG example's --precision bf16), plus this loralib and the "
                        "no-adapter floor in float32 as the references of the bf16 ratios; the NLG part compares the "
                        "example's tokens/s in fp32 and bf16. Meant for a CPU with native bf16 instructions "
                        "(avx512_bf16 / amx_bf16)")
    p.add_argument("--allocator", choices=["reuse", "system"], default="reuse",
                   help="reuse: workers keep freed memory (glibc MALLOC_* tunables, less page-fault noise); "
                        "system: glibc's defaults (see the module docstring)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "last_run"), help="writes OUT.json and OUT.md")
    p.add_argument("--ms_wheel", default=str(REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl"))
    # worker / model settings (the defaults are GPT-2 small; the tests use a tiny model)
    p.add_argument("--worker", choices=["train", "nlg"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--dropout", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=64, help=argparse.SUPPRESS)
    add_model_args(p)
    p.add_argument("--tiny_nlg", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data_dir", default=None, help="E2E data for the NLG comparison (else $E2E_DATA_DIR, data/e2e)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.worker:
        fn = worker_train if args.worker == "train" else worker_nlg
        print(json.dumps(fn(args)))
        return 0

    q = args.quick
    plan = dict(rounds=args.rounds if args.rounds is not None else (1 if q else 3),
                steps=args.steps if args.steps is not None else (5 if q else 10),
                warmup=args.warmup if args.warmup is not None else (1 if q else 2),
                eval_reps=args.eval_reps if args.eval_reps is not None else (2 if q else 5),
                shapes=[tuple(int(v) for v in s.split("x"))
                        for s in (args.shapes or ("8x64" if q else "8x64,4x128")).split(",")])
    nlg_rounds = args.nlg_rounds if args.nlg_rounds is not None else (2 if q else 3)
    common = ["--layers", str(args.layers), "--width", str(args.width), "--heads", str(args.heads),
              "--vocab", str(args.vocab), "--r", str(args.r), "--alpha", str(args.alpha), "--lr", str(args.lr),
              "--threads", str(args.threads), "--ms_wheel", args.ms_wheel]
    if args.data_dir:
        common += ["--data_dir", args.data_dir]

    t_start = time.time()
    load_before = _loadavg()
    print(f"load average before: {load_before}", flush=True)
    results = run_train_rounds(args, plan, common, t_start)
    nlg = run_nlg_rounds(args, nlg_rounds, plan["steps"], common, t_start)
    load_after = _loadavg()
    meta = dict(command=" ".join([Path(sys.executable).name, "benchmarks/bench_peers.py"] + (argv or sys.argv[1:])),
                date_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall_s=time.time() - t_start,
                loadavg_before=load_before, loadavg_after=load_after, **plan, allocator=args.allocator,
                precision=args.precision, machine=_machine(), versions=_versions(),
                model=dict(layers=args.layers, width=args.width, heads=args.heads, vocab=args.vocab, r=args.r,
                           alpha=args.alpha, lr=args.lr, threads=args.threads))
    report = dict(meta=meta, train=results, nlg=nlg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    md = render(report)
    Path(args.out + ".md").write_text(md)
    print(md)
    return 0


def run_train_rounds(args, plan: dict, common: list, t_start: float) -> list:
    """The training workers of every shape and round, each method in a fresh process, the order rotated."""
    q, results = args.quick, []
    jobs = plan_jobs([m for m in args.methods.split(",") if m], [float(d) for d in args.dropouts.split(",")], q,
                     args.precision)
    for B, T in plan["shapes"]:
        for rnd in range(plan["rounds"]):
            order = jobs[rnd % len(jobs):] + jobs[:rnd % len(jobs)]  # rotate: no method always first
            for m, d, prec, is_timed in order:
                if (not is_timed or (q and m == "full")) and rnd > 0:
                    continue  # quick: the untimed figures and full fine-tuning (context) once
                kw = dict(batch=B, seq=T, dropout=d, warmup=plan["warmup"] if is_timed else 0,
                          steps=plan["steps"] if is_timed else 0, precision=prec,
                          eval_reps=plan["eval_reps"] if is_timed and prec == "fp32" else 0)
                res = run_worker("train", m, common, args.allocator, **kw)
                res["round"] = rnd
                results.append(res)
                print(f"[{time.time() - t_start:6.0f}s] {B}x{T} round {rnd} {m:5s} {prec} p={d}: step "
                      f"{(res['step_median_s'] or 0) * 1e3:7.0f} ms  saved {res['saved_bytes'] / 1e6:7.1f} MB  "
                      f"rss +{res['rss_delta'] / 1e6:7.0f} MB", flush=True)
    return results


def run_nlg_rounds(args, nlg_rounds: int, steps: int, common: list, t_start: float) -> list:
    """The NLG workers: fp32, the example's label-positions head against every position; bf16, the example in fp32
    and in bf16; the order alternating by round."""
    nlg = []
    nlg_jobs = [("fast", "fp32"), ("all", "fp32")] if args.precision == "fp32" else [("fast", "fp32"),
                                                                                     ("fast", "bf16")]
    for rnd in range(nlg_rounds):
        for m, prec in (nlg_jobs if rnd % 2 == 0 else nlg_jobs[::-1]):
            res = run_worker("nlg", m, common, args.allocator, batch=4, seq=128, warmup=2, steps=steps * 2,
                             tiny_nlg=0 if args.layers == 12 else 1, precision=prec)
            res["round"] = rnd
            nlg.append(res)
            print(f"[{time.time() - t_start:6.0f}s] nlg round {rnd} {m} {prec}: {res['tokens_per_s']:,.0f} tokens/s "
                  f"({res['source']})", flush=True)
    return nlg


def plan_jobs(methods, dropouts, quick: bool, precision: str):
    """The worker jobs of one round: ``(method, dropout, precision, timed)``.

    Every method is timed at the first dropout (full / floor have none); the LoRA methods at the other dropouts too
    in the full run (in quick those get only the cheap saved-bytes measurement). With ``precision="bf16"`` every
    job runs in bf16 and this loralib also runs in fp32 at the first dropout: the reference of the bf16 ratios; so
    does the no-adapter floor when it runs (its own bf16 / fp32 ratios bound what any adapter can reach)."""
    jobs = []
    for d_i, d in enumerate(dropouts):
        for m in methods:
            if m in LORA_METHODS or d_i == 0:
                jobs.append((m, d if m in LORA_METHODS else 0.0, precision, d_i == 0 or not quick))
    if precision != "fp32":
        jobs += [(m, dropouts[0] if m in LORA_METHODS else 0.0, "fp32", True)
                 for m in ("ours", "floor") if m in methods]
    return jobs


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _versions():
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "n/a"
    import loralib
    out["loralib (this)"] = loralib.__version__
    out["loralib_ms"] = "0.1.2 (PyPI wheel, sha256-checked)"
    return out


# --- report ------------------------------------------------------------------------------------------------------

def summarize(report):
    """Per (shape, method, dropout): the lists over processes of each figure, and the ratios of each round."""
    groups = {}
    for r in report["train"]:
        key = (r["batch"], r["seq"], r["method"], r["dropout"], r.get("precision", "fp32"))
        groups.setdefault(key, []).append(r)
    return groups


def _ratio_per_round(groups, a, b, field, transform=lambda r, f: r[f]):
    """Ratios a/b of ``field`` pairing the processes of the same round (the same stretch of machine load)."""
    ra = {r["round"]: transform(r, field) for r in groups.get(a, []) if transform(r, field) is not None}
    rb = {r["round"]: transform(r, field) for r in groups.get(b, []) if transform(r, field) is not None}
    return [ra[k] / rb[k] for k in sorted(ra) if k in rb and rb[k]]


def render(report):
    meta, groups = report["meta"], summarize(report)
    L = []
    L.append(f"Run {meta['date_utc']}, `{meta['command']}`, {meta['wall_s']:.0f} s; machine: {meta['machine']}.")
    L.append(f"Load average (1, 5, 15 min) before: {' '.join(meta['loadavg_before'] or ['n/a'])}, "
             f"after: {' '.join(meta['loadavg_after'] or ['n/a'])}.")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    mm = meta["model"]
    L.append(f"Model: GPT2LMHeadModel {mm['layers']} layers, width {mm['width']}, {mm['heads']} heads, vocab "
             f"{mm['vocab']}, random init; LoRA r={mm['r']}, alpha={mm['alpha']}; AdamW lr {mm['lr']}; "
             f"{mm['threads']} threads. {meta['rounds']} interleaved rounds, each figure from a fresh process; "
             f"{meta['warmup']} warm-up + {meta['steps']} timed steps per process; {meta['eval_reps']} timed eval "
             "forwards per mode. Cells: median over processes (min–max).")
    alloc = meta.get("allocator", "system")
    L.append("Allocator: " + (
        "`reuse` (workers started with " + ", ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) +
        ": freed memory is kept and reused instead of being faulted in again each step)" if alloc == "reuse" else
        "`system` (glibc's defaults)") + ".")
    if meta.get("precision", "fp32") != "fp32":
        L.append(f"Precision: {meta['precision']} rows store the frozen weights in {meta['precision']} and keep every "
                 "trainable weight float32, the step under torch.autocast (as the NLG example's --precision); "
                 "fp32 rows are the float32 reference. Eval latency is measured in fp32 only.")
    L.append("")
    shapes = sorted({(k[0], k[1]) for k in groups}, key=lambda s: (-s[0], s[1]))
    for B, T in shapes:
        L.append(f"### batch {B} × sequence {T}")
        L.append("")
        L.extend(_method_table(groups, B, T))
        L.append("")
        L.extend(_targets(groups, B, T, meta))
        L.append("")
    if report["nlg"]:
        precisions = {r.get("precision", "fp32") for r in report["nlg"]}
        L.extend(_nlg_section(report["nlg"]) if precisions == {"fp32"} else _nlg_precision_section(report["nlg"]))
    return "\n".join(L) + "\n"


def _method_table(groups, B, T):
    """The table of every method's figures at batch B x sequence T."""
    L = []
    L.append("| method | lora_dropout | step ms (median per process) | saved activations MB | peak RSS over "
             "base MB | trainable params | adapter file bytes | eval base ms | unmerged ms | merged ms | "
             "unmerged / base | merged / base | max abs(merged − unmerged) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (b, t, m, d, prec), rs in sorted(groups.items(),
                                         key=lambda kv: (kv[0][4] == "fp32", METHODS.index(kv[0][2]), -kv[0][3])):
        if (b, t) != (B, T):
            continue
        timed = [r for r in rs if r["step_s"]]
        ev = [r for r in timed if "eval_median_s" in r]

        def evf(mode):
            return [r["eval_median_s"].get(mode) for r in ev]

        def evr(mode):
            return [r["eval_median_s"][mode] / r["eval_median_s"]["base"] for r in ev
                    if mode in r["eval_median_s"]]

        diffs = [r.get("merged_vs_unmerged_maxdiff") for r in ev if r.get("merged_vs_unmerged_maxdiff") is not None]
        L.append("| " + " | ".join([
            LABELS[m] + ("" if prec == "fp32" else f" ({prec})"), f"{d:g}" if m in LORA_METHODS else "–",
            _spread([r["step_median_s"] for r in timed], 1e3) if timed else "(not timed)",
            _spread([r["saved_bytes"] for r in rs], 1e-6, "{:,.1f}"),
            _spread([r["rss_delta"] for r in timed], 1e-6) if timed else "–",
            f"{rs[0]['params']['trainable']:,}", f"{rs[0]['adapter_bytes']:,}",
            _spread(evf("base"), 1e3) if ev else "–",
            _spread(evf("unmerged"), 1e3) if ev and m in LORA_METHODS else "–",
            _spread(evf("merged"), 1e3) if ev and m in LORA_METHODS else "–",
            _spread(evr("unmerged"), 1, "{:.3f}") if ev and m in LORA_METHODS else "–",
            _spread(evr("merged"), 1, "{:.3f}") if ev and m in LORA_METHODS else "–",
            f"{max(diffs):.1e}" if diffs else "–"]) + " |")
    return L


def _step_of(r, field):
    return r["step_median_s"]


def _rss_of(r, field):
    return r["rss_delta"]


def _targets(groups, B, T, meta):
    def k(m, d, prec="fp32"):
        return (B, T, m, d if m in LORA_METHODS else 0.0, prec)

    med = _med
    L = [f"Targets at {B} × {T} (ratios per round, same stretch of load; median (min–max) over rounds):", ""]
    L.append("| target | measured | met |")
    L.append("|---|---|---|")

    def row(name, xs, ok, fmt="{:.3f}"):
        xs = [x for x in xs if x is not None]
        if not xs:
            return
        verdict = "(context, no target)" if ok is None else ("yes" if ok(statistics.median(xs)) else "**no**")
        L.append(f"| {name} | {_spread(xs, 1, fmt)} | {verdict} |")

    p = 0.1
    row("step, this / peft ≤ 1.03 (dropout 0.1)", _ratio_per_round(groups, k("ours", p), k("peft", p), "", _step_of),
        lambda v: v <= 1.03)
    row("step, this / loralib 0.1.2 ≤ 0.88 (dropout 0.1)",
        _ratio_per_round(groups, k("ours", p), k("ms", p), "", _step_of), lambda v: v <= 0.88)
    row("step, floor / peft (context: ≈ 1.0)", _ratio_per_round(groups, k("floor", p), k("peft", p), "", _step_of),
        None)
    s_prec = lambda m, d, prec: med([r["saved_bytes"] for r in groups.get(k(m, d, prec), [])])  # noqa: E731
    s = lambda m, d: s_prec(m, d, "fp32")  # noqa: E731
    if s("ours", 0.1) is not None and s("ours", 0.0) is not None:
        diff = s("ours", 0.1) - s("ours", 0.0)
        mask = meta["model"]["layers"] * B * T * meta["model"]["width"]  # one bool per adapted input element
        L.append(f"| saved bytes, this: dropout 0.1 − dropout 0.0 = its bool mask ({mask / 1e6:.2f} MB) | "
                 f"{diff / 1e6:+.2f} MB | {'yes' if diff == mask else '**no**'} |")
    if s("ours", 0.1) is not None and s("peft", 0.1) is not None:
        diff = (s("peft", 0.1) - s("ours", 0.1)) / 1e6
        L.append(f"| saved bytes (dropout 0.1), peft − this ≥ 10 MB | {diff:.2f} MB | "
                 f"{'yes' if diff >= 10 else '**no**'} |")
    row("peak RSS over base, this / peft ≤ 1 (dropout 0.1)",
        _ratio_per_round(groups, k("ours", p), k("peft", p), "", _rss_of), lambda v: v <= 1.0)
    ev = [r for r in groups.get(k("ours", p), []) if "eval_median_s" in r]
    row("eval, this unmerged / base ≤ 1.05",
        [r["eval_median_s"]["unmerged"] / r["eval_median_s"]["base"] for r in ev], lambda v: v <= 1.05)
    row("eval, this merged / base = 1 (within noise, ≤ 1.03)",
        [r["eval_median_s"]["merged"] / r["eval_median_s"]["base"] for r in ev], lambda v: v <= 1.03)
    row("eval, this: max abs(merged − unmerged logits) ≤ 1e-4", [r["merged_vs_unmerged_maxdiff"] for r in ev],
        lambda v: v <= 1e-4, "{:.1e}")
    h = meta.get("precision", "fp32")
    if h != "fp32":
        _half_precision_targets(L, row, k, s_prec, groups, h)
    return L


def _half_precision_targets(L, row, k, s_prec, groups, h):
    """The target rows of a half-precision (``h``) run, appended to ``L`` (directly or through :func:`_targets`'
    ``row``; ``k`` and ``s_prec`` are its keys and saved-bytes medians)."""
    p = 0.1
    row(f"step {h}, this / peft ≤ 1.03 (dropout 0.1)",
        _ratio_per_round(groups, k("ours", p, h), k("peft", p, h), "", _step_of), lambda v: v <= 1.03)
    row(f"step, this {h} / this fp32 ≤ 0.6", _ratio_per_round(groups, k("ours", p, h), k("ours", p), "", _step_of),
        lambda v: v <= 0.6)
    row(f"peak RSS over base, this {h} / this fp32 ≤ 0.6",
        _ratio_per_round(groups, k("ours", p, h), k("ours", p), "", _rss_of), lambda v: v <= 0.6)
    # The same ratios for the no-adapter floor: the frozen network and its loss alone, which no adapter can
    # make smaller than they are.
    row(f"peak RSS over base, floor {h} / floor fp32 (context: the bound for any adapter)",
        _ratio_per_round(groups, k("floor", p, h), k("floor", p), "", _rss_of), None)
    row(f"saved activations, floor {h} / floor fp32 (context)",
        _ratio_per_round(groups, k("floor", p, h), k("floor", p), "", lambda r, f: r["saved_bytes"]),
        None)
    added = lambda prec: s_prec("ours", p, prec) - s_prec("floor", p, prec)  # noqa: E731
    if all(s_prec(m, p, q) is not None for m in ("ours", "floor") for q in (h, "fp32")):
        L.append(f"| saved activations the adapter adds over the floor, {h} / fp32 (context) | "
                 f"{added(h) / 1e6:.1f} / {added('fp32') / 1e6:.1f} MB = {added(h) / added('fp32'):.3f} | "
                 "(context, no target) |")
    row(f"step {h}, floor / peft (context)",
        _ratio_per_round(groups, k("floor", p, h), k("peft", p, h), "", _step_of), None)


def _nlg_section(nlg):
    L = ["### The NLG example's training: output layer at label positions only vs at every position", ""]
    by = {}
    for r in nlg:
        by.setdefault(r["method"], []).append(r)
    src = nlg[0]["source"]
    cfg = nlg[0]["config"]
    L.append(f"`SimpleGPT2WithLoRA` default config ({cfg['num_layers']} layers, width {cfg['hidden_dim']}, r = "
             f"{cfg['lora_dim']}, LoRA on q|v, MLP and the head), batch 4, data: {src}; forward, loss, backward, "
             "AdamW step. Tokens = padded input tokens processed.")
    L.append("")
    L.append("| output layer | tokens/s, median (min–max) over processes |")
    L.append("|---|---|")
    for m, name in (("fast", "at label positions (the example)"), ("all", "at every position (benchmark only)")):
        if m in by:
            L.append(f"| {name} | {_spread([r['tokens_per_s'] for r in by[m]])} |")
    fa = {r["round"]: r["tokens_per_s"] for r in by.get("fast", [])}
    al = {r["round"]: r["tokens_per_s"] for r in by.get("all", [])}
    ratios = [fa[k] / al[k] for k in sorted(fa) if k in al]
    rows = {m: by[m][0].get("head_rows") for m in ("fast", "all") if m in by}
    if rows.get("fast") and rows.get("all"):
        L.append("")
        L.append(f"Output-layer rows over the timed steps: {rows['fast']:,} (label positions) vs {rows['all']:,} "
                 f"(every position), {rows['all'] / rows['fast']:.2f}× fewer (the example's last block also computes "
                 "only those rows); the earlier blocks, the loss and the optimizer do the same work in both, which "
                 "bounds the ratio below that.")
    if ratios:
        L.append("")
        L.append(f"Ratio fast / every position per round: {_spread(ratios, 1, '{:.2f}')} (target ≥ 1.8: "
                 f"{'met' if statistics.median(ratios) >= 1.8 else '**not met**'}).")
    return L + [""]


def _nlg_precision_section(nlg):
    """The NLG example's training step (label-positions head) in fp32 and in a half precision, per round."""
    by = {}
    for r in nlg:
        by.setdefault(r.get("precision", "fp32"), []).append(r)
    half = next(p for p in by if p != "fp32")
    cfg = nlg[0]["config"]
    L = [f"### The NLG example's training: fp32 vs {half}", "",
         f"`SimpleGPT2WithLoRA` default config ({cfg['num_layers']} layers, width {cfg['hidden_dim']}, r = "
         f"{cfg['lora_dim']}), batch 4, data: {nlg[0]['source']}; forward, loss, backward, AdamW step, as "
         f"`run_training.py --precision fp32` / `--precision {half}` run it (frozen base in {half}, LoRA float32, "
         "autocast). Tokens = padded input tokens processed.", "",
         "| precision | tokens/s, median (min–max) over processes | first-step loss |", "|---|---|---|"]
    for prec in ("fp32", half):
        rs = by.get(prec, [])
        L.append(f"| {prec} | {_spread([r['tokens_per_s'] for r in rs])} | {rs[0]['losses'][0]:.4f} |")
    a = {r["round"]: r["tokens_per_s"] for r in by.get(half, [])}
    b = {r["round"]: r["tokens_per_s"] for r in by.get("fp32", [])}
    ratios = [a[k] / b[k] for k in sorted(a) if k in b]
    if ratios:
        per_process = sum(r["tokens"] for r in nlg) // len(nlg)
        L += ["", f"Ratio {half} / fp32 per round: {_spread(ratios, 1, '{:.2f}')} ({per_process:,} timed "
                  "tokens per process: a short stretch, for context; the tokens/s target is the whole default "
                  "training run's, measured by run_training.py itself)."]
    return L + [""]


if __name__ == "__main__":
    sys.exit(main())
