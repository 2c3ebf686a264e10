"""One adapted layer, forward + backward: this loralib, PEFT, Microsoft's loralib 0.1.2 and the frozen base layer.

    python benchmarks/bench_layer.py                  # GPT-2 small's c_attn (768 -> 2304), 8 x 64 tokens
    python benchmarks/bench_layer.py --dropout 0 --tokens 4x128

The layer is GPT-2's fused q|k|v projection as the model benchmark adapts it (``bench_peers.py``): loralib's
``MergedLinear(768, 2304, enable_lora=[True, False, True], fan_in_fan_out=True)`` (ours and 0.1.2) and PEFT's
LoRA on a ``transformers`` ``Conv1D``, r=4, alpha=32, in train mode, the frozen weight shared by all. One step is
``y = layer(x); y.backward(g)`` with ``x`` requiring grad (as inside a network), the methods interleaved step by
step in this process (the order rotates), median over ``--reps`` after ``--warmup``. The LoRA arithmetic is small
next to the frozen matmuls, so this shows each library's overhead over the base layer far more steadily than a
whole-model step can; the model-level figures of record are ``bench_peers.py``'s.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402  (also puts the repo on sys.path)


def build_layers(args):
    """{name: callable(x) -> y} for the base layer and each method, all on one frozen weight and bias."""
    import tempfile

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import loralib
    from reference_wheel import fetch_wheel, import_renamed

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(args.d_in, args.d_out) * 0.02, requires_grad=False)  # (in, out), as Conv1D
    bias = nn.Parameter(torch.zeros(args.d_out), requires_grad=False)
    layers = {"base": lambda x: F.linear(x, weight.t(), bias)}

    def loralib_layer(lib):
        torch.manual_seed(1)
        layer = lib.MergedLinear(args.d_in, args.d_out, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                 enable_lora=[True, False, True], fan_in_fan_out=True, merge_weights=False)
        layer.weight, layer.bias = weight, bias
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)  # non-zero, as after training (the cost is the same either way)
        layer.train()  # 0.1.2's train() returns None
        return layer

    layers["ours"] = loralib_layer(loralib)
    if "ms" in args.methods:
        ms = import_renamed(fetch_wheel(Path(args.ms_wheel)), Path(tempfile.mkdtemp(prefix="loralib_ms-")))
        layers["ms"] = loralib_layer(ms)
    if "peft" in args.methods:
        import peft
        from transformers.pytorch_utils import Conv1D

        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.c_attn = Conv1D(args.d_out, args.d_in)
                self.c_attn.weight, self.c_attn.bias = weight, bias

            def forward(self, x):
                return self.c_attn(x)

        torch.manual_seed(1)
        cfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=["c_attn"],
                              lora_dropout=args.dropout, fan_in_fan_out=True, bias="none")
        pm = peft.get_peft_model(One(), cfg)
        with torch.no_grad():
            pm.base_model.model.c_attn.lora_B["default"].weight.normal_(0, 0.02)
        layers["peft"] = pm.train()
    # The base first, then this loralib (every ratio's reference), then the peers in the order asked for.
    return {k: layers[k] for k in ["base", "ours"] + [m for m in args.methods.split(",") if m != "ours"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ours,peft,ms",
                   help="compared with the frozen base layer (this loralib, ours, is always included)")
    p.add_argument("--tokens", default="8x64", help="batch x sequence")
    p.add_argument("--d_in", type=int, default=768)
    p.add_argument("--d_out", type=int, default=2304)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--ms_wheel", default=str(bench_peers.REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl"))
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - {"ours", "peft", "ms"}
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from ours, peft, ms")
    if args.d_out % 3:
        p.error(f"--d_out must be divisible by 3 (q|k|v), got {args.d_out}")

    import torch

    torch.set_num_threads(args.threads)
    B, T = (int(v) for v in args.tokens.split("x"))
    layers = build_layers(args)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, args.d_in, generator=g).requires_grad_()
    grad_y = torch.randn(B, T, args.d_out, generator=g)
    names = list(layers)
    times = {k: [] for k in names}
    for i in range(args.warmup + args.reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            layers[k](x).backward(grad_y)
            dt = time.perf_counter() - t0
            x.grad = None
            if i >= args.warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.d_in} -> {args.d_out} (q|k|v), {B} x {T} tokens, r={args.r}, lora_dropout={args.dropout}, "
          f"{args.threads} threads; forward + backward, median of {args.reps} interleaved steps after "
          f"{args.warmup} warm-up; torch {torch.__version__}")
    print()
    print("| layer | ms (median) | ms (p10–p90) | over base ms | / base | / this loralib |")
    print("|---|---|---|---|---|---|")
    labels = dict(bench_peers.LABELS, base="frozen base layer (no LoRA)")
    for k in names:
        v = sorted(times[k])
        p10, p90 = v[len(v) // 10], v[(len(v) * 9) // 10]
        over = "–" if k == "base" else f"{(med[k] - med['base']) * 1e3:+.2f}"
        print(f"| {labels[k]} | {med[k] * 1e3:.2f} | {p10 * 1e3:.2f}–{p90 * 1e3:.2f} | {over} | "
              f"{med[k] / med['base']:.3f} | {med[k] / med['ours']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
