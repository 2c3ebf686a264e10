"""One linear layer on the CPU, ``F.linear`` (MKL's sgemm for float32) against the oneDNN path with the weight
packed once that ``examples/NLG/e2e_nlg/generate.packed_linears`` uses while generating.

    python benchmarks/bench_packed_linear.py            # GPT-2 small's and SmolLM2-135M's layer shapes

For each (rows, in -> out): the median of ``--repeats`` timed calls after 5 warm-up calls, in one process with
``--threads`` torch threads, the ratio, and the largest difference of the two results relative to the largest
output value. Random weights and inputs (seed 0); float32.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"GPT-2 small": [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)],
          "SmolLM2-135M": [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]}


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,32,160", help="input rows per call (batch x beams), comma-separated")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        raise SystemExit("this torch build has no oneDNN linear: nothing to compare")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; median of {args.repeats} calls, float32\n")
    print("| model | rows | in -> out | F.linear ms | packed ms | F.linear / packed | max diff / max |")
    print("|---|---|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for n_in, n_out in shapes:
            w, b = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5, torch.randn(n_out, generator=g)
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, n_in, generator=g)
                plain_ms = timed(lambda: F.linear(x, w, b), args.repeats)
                packed_ms = timed(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
                                  args.repeats)
                y = F.linear(x, w, b)
                diff = (torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "") - y).abs().max()
                print(f"| {model} | {rows} | {n_in} -> {n_out} | {plain_ms:.3f} | {packed_ms:.3f} | "
                      f"{plain_ms / packed_ms:.2f} | {diff / y.abs().max():.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
