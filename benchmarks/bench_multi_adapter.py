"""Several adapters in one batch (``lora.batch_adapters``): a mixed-adapter request stream, and PEFT's equivalent.

    python benchmarks/bench_multi_adapter.py                 # GPT-2 small's shape, 4 adapters x 32 MRs, batch 16
    python benchmarks/bench_multi_adapter.py --layers 2 --requests 8 --max_new_tokens 4    # a quick look

Part 1, generation. The NLG example's model (``SimpleGPT2WithLoRA``, random base from a fixed seed, LoRA where the
example puts it: q, v, both MLP projections, the output layer) holds four adapters of different ranks: its own
(``default``) and three added with ``lora.add_adapter``, all random. ``--requests`` MRs per adapter (synthetic E2E
meaning representations, so no data is needed) arrive in one shuffled stream, and a server takes them
``--batch_size`` at a time, in arrival order, unmerged, greedy, ``--max_new_tokens`` each:

- *mixed*: each batch in one ``generate(..., adapter_names=...)`` call: every row with its own adapter;
- *one adapter at a time*: the same batches, each split by adapter and decoded one adapter after the other
  (``lora.set_adapter``), which is all a server can do when a batch holds one adapter.

Both run in this process, interleaved, in both orders (mixed first, then the other first), ``--rounds`` times; tokens/s
is generated tokens (end-of-text included when produced) over wall time, and every request's tokens are compared.

Part 2, forward against PEFT. ``transformers``' GPT-2 with loralib injected (``c_attn``, ``c_proj``, ``c_fc``;
``merge_weights=False``) holds the same four ranks; each adapter is exported with
``lora.save_adapter(format="peft")`` and loaded into PEFT on a copy of the same base. One forward of ``--shapes``
(rows x tokens, no cache; rows in the stream's adapter order) runs through ``lora.batch_adapters`` and through
PEFT's ``model(input_ids, adapter_names=...)``, alternating and swapping which goes first each repetition; the
median time of each and the largest logit difference are reported.
"""
import argparse
import copy
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "examples" / "NLG"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SLOTS = {  # E2E's attributes and values, for synthetic meaning representations
    "name": ["The Eagle", "Blue Spice", "Alimentum", "The Vaults", "Zizzi", "The Mill", "Aromi", "Cotto"],
    "Type": ["coffee shop", "pub", "restaurant"],
    "food": ["French", "Italian", "Chinese", "English", "Japanese", "Indian", "Fast food"],
    "price": ["cheap", "moderate", "high", "less than £ 20", "more than £ 30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["riverside", "city centre"],
    "family friendly": ["yes", "no"],
    "near": ["Burger King", "The Sorrento", "Café Brazil", "Yippee Noodle Bar", "Raja Indian Cuisine"],
}


def synthetic_mrs(n: int, seed: int):
    """``n`` meaning representations: a name plus 2 to 6 other attributes, drawn with ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        keys = ["name"] + rng.sample([k for k in SLOTS if k != "name"], rng.randint(2, 6))
        out.append(" | ".join(f"{k} : {rng.choice(SLOTS[k])}" for k in SLOTS if k in keys))
    return out


def add_random_adapters(model, ranks, seed: int):
    """Adapters ``default`` (the layers' own) and ``task1``... with ``ranks[1:]``; every factor random."""
    import torch

    import loralib as lora

    names = ["default"] + [f"task{i}" for i in range(1, len(ranks))]
    for name, r in zip(names[1:], ranks[1:]):
        lora.add_adapter(model, name, r=r, lora_alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.split(".")[-1] in ("lora_A", "lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if n.endswith("lora_B") else 0.02))
    for _, layer in lora.layers.lora_layers(model):
        layer.merge_weights = False
    return names


# --- part 1: a request stream, mixed batches against one adapter at a time -----------------------------------------

def build_stream(args):
    """(model, requests): requests are (prompt tokens, adapter name) in arrival order."""
    import loralib as lora
    from e2e_nlg.data import format_prompt
    from e2e_nlg.model import GPTConfig, build_model
    from e2e_nlg.tokenizer import get_tokenizer

    cfg = GPTConfig(num_layers=args.layers, hidden_dim=args.width, num_heads=args.heads, lora_dim=args.ranks[0],
                    lora_alpha=2 * args.ranks[0])
    model = build_model(cfg, base_seed=0)
    names = add_random_adapters(model, args.ranks, seed=1)
    lora.mark_only_lora_as_trainable(model)
    enc = get_tokenizer()
    mrs = synthetic_mrs(args.requests * len(names), seed=2)
    cut = args.prompt_tokens or None  # the prompt's first tokens only: a run where decoding dominates
    requests = [(enc.encode_ordinary(format_prompt(mr))[:cut], names[i % len(names)]) for i, mr in enumerate(mrs)]
    random.Random(3).shuffle(requests)
    return model.eval(), requests


def serve_mixed(model, requests, cfg, batch_size):
    from e2e_nlg.generate import generate

    out = []
    for start in range(0, len(requests), batch_size):  # the batches as they arrive (generate alone would sort)
        batch = requests[start:start + batch_size]
        out.extend(generate(model, [p for p, _ in batch], cfg, batch_size=batch_size,
                            adapter_names=[n for _, n in batch]))
    return out


def serve_one_adapter_at_a_time(model, requests, cfg, batch_size):
    import loralib as lora
    from e2e_nlg.generate import generate

    out = [None] * len(requests)
    for start in range(0, len(requests), batch_size):
        batch = range(start, min(start + batch_size, len(requests)))
        for name in dict.fromkeys(requests[i][1] for i in batch):  # the batch's adapters, one after the other
            rows = [i for i in batch if requests[i][1] == name]
            lora.set_adapter(model, name)
            for i, o in zip(rows, generate(model, [requests[i][0] for i in rows], cfg, batch_size=batch_size)):
                out[i] = o
    lora.set_adapter(model, "default")
    return out


SERVERS = {"mixed": serve_mixed, "one adapter at a time": serve_one_adapter_at_a_time}


def run_stream(args):
    """Both servers interleaved, both orders, ``args.rounds`` times: per run (server, seconds, tokens), and
    whether every request got the same tokens from both."""
    import torch

    from e2e_nlg.generate import DecodeConfig

    model, requests = build_stream(args)
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens)
    runs, outputs = [], {}
    orders = [list(SERVERS), list(SERVERS)[::-1]]
    with torch.no_grad():
        for r in range(args.rounds):
            for name in orders[r % 2]:
                t0 = time.perf_counter()
                out = SERVERS[name](model, requests, cfg, args.batch_size)
                seconds = time.perf_counter() - t0
                tokens = sum(len(o) + (len(o) < cfg.max_new_tokens) for o in out)
                runs.append({"round": r, "server": name, "seconds": seconds, "tokens": tokens})
                outputs.setdefault(name, out)
                print(f"  round {r + 1} {name}: {tokens} tokens in {seconds:.1f} s", flush=True)
    same = outputs["mixed"] == outputs["one adapter at a time"]
    per_adapter = {n: sum(1 for _, a in requests if a == n) for n in dict.fromkeys(a for _, a in requests)}
    return {"runs": runs, "identical": same, "requests": len(requests), "per_adapter": per_adapter,
            "batches": -(-len(requests) // args.batch_size)}


def render_stream(res, args):
    lines = [f"Part 1: {res['requests']} requests ({', '.join(f'{n} {k}' for n, k in res['per_adapter'].items())}; "
             f"ranks {args.ranks}) in one shuffled stream, batches of {args.batch_size} in arrival order "
             f"({res['batches']} batches), greedy, {args.max_new_tokens} new tokens at most, unmerged, "
             + (f"prompts cut to their first {args.prompt_tokens} tokens, " if args.prompt_tokens else "")
             + f"GPT-2 shape {args.layers} layers x {args.width}",
             "", "| server | round | tokens | seconds | tokens/s |", "|---|---|---|---|---|"]
    for run in res["runs"]:
        lines.append(f"| {run['server']} | {run['round'] + 1} | {run['tokens']} | {run['seconds']:.2f} | "
                     f"{run['tokens'] / run['seconds']:.2f} |")
    total = {s: [sum(r[k] for r in res["runs"] if r["server"] == s) for k in ("tokens", "seconds")] for s in SERVERS}
    tps = {s: t / sec for s, (t, sec) in total.items()}
    per_round = [_tps(res, r, "mixed") / _tps(res, r, "one adapter at a time") for r in range(args.rounds)]
    lines += ["", f"tokens/s over all rounds: mixed {tps['mixed']:.2f}, one adapter at a time "
                  f"{tps['one adapter at a time']:.2f}: mixed / one at a time = "
                  f"{tps['mixed'] / tps['one adapter at a time']:.2f}x (per round: "
                  + ", ".join(f"{x:.2f}x" for x in per_round) + ")",
              "every request's tokens identical in both servers: " + ("yes" if res["identical"] else "NO")]
    return lines


def _tps(res, rnd, server):
    run = next(r for r in res["runs"] if r["round"] == rnd and r["server"] == server)
    return run["tokens"] / run["seconds"]


# --- part 2: one forward against PEFT's adapter_names -------------------------------------------------------------

def build_pair(args, directory):
    """(ours, peft model, adapter names): the same GPT-2 base and the same adapters, exported through PEFT's
    format."""
    import peft
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import loralib as lora

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads)).eval()
    ours = copy.deepcopy(base)
    lora.inject(ours, ["c_attn", "c_proj", "c_fc"], r=args.ranks[0], lora_alpha=2 * args.ranks[0],
                merge_weights=False)
    names = add_random_adapters(ours, args.ranks, seed=4)
    for name in names:
        lora.save_adapter(ours, os.path.join(directory, name), adapter=name, format="peft")
    theirs = peft.PeftModel.from_pretrained(base, os.path.join(directory, names[0]), adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(os.path.join(directory, name), adapter_name=name)
    return ours.eval(), theirs.eval(), names


def time_forward(args, ours, theirs, names, rows: int, tokens: int):
    """Median seconds of one forward of each, alternating and swapping the order each repetition; the largest
    |logit difference| between the two, and between ours and the base (the adapters' effect, which must not be
    nil for the comparison to mean anything)."""
    import torch

    import loralib as lora

    rng = random.Random(5)
    row_names = [names[i % len(names)] for i in range(rows)]
    rng.shuffle(row_names)
    x = torch.randint(0, 50257, (rows, tokens), generator=torch.Generator().manual_seed(6))

    def run_ours():
        with lora.batch_adapters(ours, row_names):
            return ours(x).logits

    def run_theirs():
        return theirs(input_ids=x, adapter_names=row_names).logits

    fns, times = {"ours": run_ours, "peft": run_theirs}, {"ours": [], "peft": []}
    with torch.no_grad():
        logits = run_ours()  # also the warm-up
        diff = (logits - run_theirs()).abs().max().item()
        with lora.disable_adapters(ours):
            effect = (logits - ours(x).logits).abs().max().item()
        for rep in range(args.reps):
            for name in (["ours", "peft"] if rep % 2 == 0 else ["peft", "ours"]):
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, diff, effect


def run_peft(args):
    with tempfile.TemporaryDirectory() as d:
        ours, theirs, names = build_pair(args, d)
        out = []
        for shape in args.shapes:
            rows, tokens = (int(v) for v in shape.split("x"))
            med, diff, effect = time_forward(args, ours, theirs, names, rows, tokens)
            out.append({"shape": shape, "ours": med["ours"], "peft": med["peft"], "max_abs_diff": diff,
                        "adapter_effect": effect})
            print(f"  {shape}: ours {med['ours'] * 1e3:.1f} ms, peft {med['peft'] * 1e3:.1f} ms", flush=True)
    return out


def render_peft(res, args):
    lines = [f"Part 2: transformers' GPT-2 ({args.layers} layers x {args.width}), LoRA on c_attn, c_proj, c_fc, ranks "
             f"{args.ranks}, one forward (no cache), rows spread evenly over the adapters in shuffled order; "
             f"median of {args.reps} repetitions each, alternating", "",
             "| rows x tokens | this loralib (batch_adapters) ms | PEFT (adapter_names) ms | ours / PEFT | "
             "max abs logit difference | max abs logit change by the adapters |", "|---|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['shape']} | {r['ours'] * 1e3:.1f} | {r['peft'] * 1e3:.1f} | {r['ours'] / r['peft']:.3f} "
                     f"| {r['max_abs_diff']:.2e} | {r['adapter_effect']:.2e} |")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "n/a"
    return f"{cpu}, {os.cpu_count()} logical CPUs; load average at the start {' '.join(load)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    p.add_argument("--width", type=int, default=768, help="hidden size (GPT-2 small: 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (GPT-2 small: 12)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 8, 4, 32], help="one rank per adapter")
    p.add_argument("--requests", type=int, default=32, help="MRs per adapter in the stream")
    p.add_argument("--batch_size", type=int, default=16, help="the server's batch size (the example's default)")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="rounds of part 1; the order alternates")
    p.add_argument("--prompt_tokens", type=int, default=0,
                   help="part 1: keep only each prompt's first N tokens (0: whole prompts), so decoding dominates")
    p.add_argument("--shapes", nargs="+", default=["16x1", "8x32"], help="part 2's rows x tokens")
    p.add_argument("--reps", type=int, default=10, help="part 2's repetitions per method and shape")
    p.add_argument("--parts", default="stream,peft", help="which parts to run")
    args = p.parse_args(argv)
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = []
    if "stream" in args.parts:
        lines += render_stream(run_stream(args), args) + [""]
    if "peft" in args.parts:
        import peft

        print(f"peft {peft.__version__}")
        lines += render_peft(run_peft(args), args)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
