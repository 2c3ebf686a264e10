"""Where ``run_inference.py --eval``'s generation time goes: ``generate`` on E2E MRs under ``torch.profiler`` and
``cProfile``.

    python benchmarks/profile_generate.py --adapter_dir lora_model                 # the first 128 test MRs
    python benchmarks/profile_generate.py --adapter_dir lora_model --max_examples 0 --split valid

The adapter is loaded and merged as ``run_inference.py`` does (fp32), its decoding defaults are used (beam 5,
no-repeat 4-grams, 64 new tokens), and one ``generate`` call over the MRs is profiled. Printed: the wall time and
tokens, the torch operators by self CPU time (matrix products, attention, the KV cache's copies and gathers,
log-softmax, top-k) and the Python functions by own time (beam bookkeeping and n-gram checks written in Python
show here). The profilers slow the run down; the shares are what to read.
"""
import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "NLG"))
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter_dir", default="lora_model")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--max_examples", type=int, default=128, help="the first N unique MRs (0: all)")
    p.add_argument("--batch_size", type=int, default=None, help="default: generate's own default")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--rows", type=int, default=14, help="operators and functions listed")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from e2e_nlg import data
    from e2e_nlg.generate import DecodeConfig, generate
    from e2e_nlg.inference import adapter_delex, load_adapters, prompts_for, ready

    model, adapters = load_adapters([args.adapter_dir])
    model = ready(model)
    mrs = [mr for mr, _ in data.load_references(args.split, args.data_dir)]
    mrs = mrs[:args.max_examples] if args.max_examples else mrs
    prompts = prompts_for(mrs, adapter_delex(adapters[0].config))
    cfg = DecodeConfig(max_new_tokens=64, beam_size=5, no_repeat_ngram_size=4)
    kw = {} if args.batch_size is None else {"batch_size": args.batch_size}
    generate(model, prompts[:2], cfg, **kw)  # warm-up
    py = cProfile.Profile()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        py.enable()
        out = generate(model, prompts, cfg, **kw)
        py.disable()
    wall = time.perf_counter() - t0
    tokens = sum(len(o) + (len(o) < cfg.max_new_tokens) for o in out)
    print(f"{len(mrs)} {args.split} MRs, batch size {kw.get('batch_size', 'default')}, {torch.get_num_threads()} "
          f"threads: {wall:.1f} s under the profilers, {tokens} tokens generated")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    s = io.StringIO()
    pstats.Stats(py, stream=s).sort_stats("tottime").print_stats(args.rows)
    print(s.getvalue()[s.getvalue().find("   ncalls"):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
