"""Profile one training step of this loralib and of PEFT on the same GPT-2, in one process, with torch.profiler.

    python benchmarks/profile_step.py                     # GPT-2 small, 8 x 64, dropout 0.1, 2 threads
    python benchmarks/profile_step.py --steps 5 --top 25

Both models are built from the same seed (``bench_peers.build_base``) and adapted as ``bench_peers`` adapts them.
Their steps alternate (ours, peft, ours, ...) after a warm-up, so both see the same stretch of machine load; the
script prints each method's median step time, the ratio, and the top operators by self CPU time of each method,
then the operators whose total time differs most between the two. A diagnostic, not a benchmark: the figures of
record come from ``bench_peers.py``, one fresh process per figure. For steadier timings start it with the
allocator settings ``bench_peers.py`` gives its workers (``--allocator reuse``, see its docstring)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=0 \
        python benchmarks/profile_step.py
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402  (also puts the repo and examples/NLG on sys.path)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ours,peft", help="comma-separated, from " + ",".join(bench_peers.METHODS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    bench_peers.add_model_args(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed, alternating steps per method")
    p.add_argument("--profile_steps", type=int, default=2, help="profiled steps per method (after the timed ones)")
    p.add_argument("--top", type=int, default=15, help="rows per operator table")
    p.add_argument("--ms_wheel", default=str(bench_peers.REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl"))
    return p


def build_steps(args) -> dict:
    """One training step (forward, backward, AdamW) per method, each on its own model, all on the same batch."""
    import torch

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    runs = {}
    for method in args.methods.split(","):
        a = argparse.Namespace(**vars(args), method=method)
        model = bench_peers.build_base(a)
        model.train()
        model = bench_peers.apply_method(model, a)["model"]
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)

        def step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        runs[method] = step
    return runs


def time_steps(runs: dict, args) -> None:
    """Warm up, then time the methods' steps alternately (the order rotates) and print medians and ratios."""
    for _ in range(args.warmup):
        for step in runs.values():
            step()
    times = {k: [] for k in runs}
    for i in range(args.steps):
        for k in list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]:
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    print(f"GPT-2 {args.layers} layers x {args.width}, batch {args.batch} x {args.seq}, lora_dropout {args.dropout}, "
          f"{args.threads} threads; {args.steps} alternating timed steps per method after {args.warmup} warm-up")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {bench_peers.LABELS[k]:32s} median {med[k] * 1e3:8.1f} ms   (min {min(v) * 1e3:.1f}, max {max(v) * 1e3:.1f})")
    names = list(runs)
    for k in names[1:]:
        print(f"  ratio {names[0]} / {k}: {med[names[0]] / med[k]:.3f}")


def profile_steps(runs: dict, args) -> None:
    """Profile each method's steps; print its top operators, then the largest differences between the first two."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    for k, step in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                step()
        ev = prof.key_averages()
        print(f"\n== {bench_peers.LABELS[k]}: top {args.top} operators by self CPU time over {args.profile_steps} steps ==")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=args.top))
        totals[k] = {e.key: (e.self_cpu_time_total / args.profile_steps, e.count // args.profile_steps) for e in ev}
    names = list(runs)
    if len(names) >= 2:
        a, b = names[0], names[1]
        keys = set(totals[a]) | set(totals[b])
        diff = sorted(keys, key=lambda n: -abs(totals[a].get(n, (0, 0))[0] - totals[b].get(n, (0, 0))[0]))
        print(f"\n== self CPU ms per step, {a} vs {b}: the {args.top} largest differences ==")
        print(f"{'operator':48s} {a + ' ms':>10s} {'calls':>6s} {b + ' ms':>10s} {'calls':>6s}")
        for n in diff[:args.top]:
            ta, ca = totals[a].get(n, (0, 0))
            tb, cb = totals[b].get(n, (0, 0))
            print(f"{n[:48]:48s} {ta / 1e3:10.2f} {ca:6d} {tb / 1e3:10.2f} {cb:6d}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs = build_steps(args)
    time_steps(runs, args)
    profile_steps(runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
