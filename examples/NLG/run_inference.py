"""Generate E2E descriptions with a LoRA adapter (merged into its base) and score them as the E2E challenge does.

    python examples/NLG/run_inference.py                                  # sample MRs, adapter in lora_model/
    python examples/NLG/run_inference.py --input "name : The Eagle | Type : pub | area : riverside"
    python examples/NLG/run_inference.py --eval --split test                   # every test MR, scored
    python examples/NLG/run_inference.py --eval --split valid --max_examples 50  # a quick check on a subset
    python examples/NLG/run_inference.py --recipe paper          # Microsoft's E2E decoding: beam 10, penalty 0.8, ...

The model is rebuilt from adapter_config.json alone (base: the recorded --init_checkpoint, or the random base drawn
from the recorded seed). An adapter trained with --recipe paper is decoded with that recipe's settings unless
flags given here say otherwise. README.md, "Generate and score", says what is printed and how it is computed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # loralib from the repo

from e2e_nlg import data, metrics, slots, train_utils  # noqa: E402
from e2e_nlg.adapter_io import AdapterError, atomic_json, atomic_write, read_adapter_config  # noqa: E402
from e2e_nlg.generate import DEFAULT_BATCH_SIZE, DEFAULT_DECODING, DecodeConfig  # noqa: E402
from e2e_nlg.hf_checkpoint import CheckpointError  # noqa: E402
from e2e_nlg.family import tokenizer_for  # noqa: E402
from e2e_nlg.inference import MRError, adapter_delex, check_mr, describe, describe_mixed, load_adapters, ready, \
    read_mr_file  # noqa: E402
from e2e_nlg.measure import param_counts  # noqa: E402
from e2e_nlg.recipes import RECIPES, apply_recipe, explicit_dests  # noqa: E402
from e2e_nlg.train_config import HelpFormatter  # noqa: E402

SAMPLE_MRS = [
    "name : The Eagle | Type : coffee shop | food : French | price : moderate | customer rating : 3 out of 5 | "
    "area : riverside | family friendly : yes | near : Burger King",
    "name : The Vaults | Type : pub | food : Italian | price : less than £ 20 | area : city centre",
    "name : Blue Spice | Type : restaurant | food : Chinese | area : riverside | family friendly : no",
    "name : Zizzi | Type : coffee shop | customer rating : 5 out of 5 | near : The Sorrento",
    "name : Alimentum | food : English | price : high | area : city centre | near : Yippee Noodle Bar",
]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--adapter_dir", action="append", default=None,
                   help="adapter directory written by run_training.py (default: lora_model). Repeat it to load "
                        "the base once with every adapter: all generate together in mixed batches (each row its "
                        "own adapter), then each alone, and the texts are compared")
    g.add_argument("--init_checkpoint", default=None,
                   help="base checkpoint (smollm2, a .gguf file, a local GPT-2 path or Hugging Face Hub name) to use "
                        "instead of the one recorded in adapter_config.json; it must be the same weights (checked "
                        "by fingerprint, and a GGUF file by its sha256)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cuda or cpu")
    g.add_argument("--precision", default="fp32", choices=train_utils.PRECISIONS,
                   help="dtype of the frozen base while generating, as run_training.py's flag (auto: bf16 where "
                        "the CPU or GPU has native bfloat16); fp32 by default, where merged and unmerged texts "
                        "are identical; the adapter stays float32")
    g = p.add_argument_group("input")
    g.add_argument("--input", action="append", default=None,
                   help="a meaning representation 'key : value | key : value ...' (repeatable); default: "
                        f"{len(SAMPLE_MRS)} built-in samples")
    g.add_argument("--input_file", default=None, help="a file with one meaning representation per line")
    _add_decoding_flags(p.add_argument_group("decoding"))
    _add_evaluation_flags(p.add_argument_group("evaluation"))
    return p


def _add_decoding_flags(g) -> None:
    g.add_argument("--recipe", default="auto", choices=["auto", "none", *sorted(RECIPES)],
                   help="decoding settings by name: auto = the recipe the (first) adapter was trained with, if any; "
                        "paper = beam 10, length penalty 0.8, no-repeat 4-grams, at most 64 new tokens, stop at "
                        "628 ('\\n\\n') too; the flags below, when given, override it")
    g.add_argument("--beam_size", type=int, default=DEFAULT_DECODING.beam_size,
                   help="beams per input; 1 is greedy (E2E recipe: 10)")
    g.add_argument("--length_penalty", type=float, default=DEFAULT_DECODING.length_penalty,
                   help="beam score = sum of log-probs / length ** length_penalty (recipe paper: 0.8, from "
                        "Microsoft's README; the paper's Table 11 says 0.9)")
    g.add_argument("--no_repeat_ngram_size", type=int, default=DEFAULT_DECODING.no_repeat_ngram_size,
                   help="never repeat an n-gram of this size within the generated text; 0: off (E2E recipe: 4)")
    g.add_argument("--max_new_tokens", type=int, default=DEFAULT_DECODING.max_new_tokens,
                   help="stop after this many tokens without end-of-text")
    g.add_argument("--stop_token_ids", type=int, nargs="*", default=[],
                   help="token ids that end a text besides <|endoftext|> (recipe paper: 628, '\\n\\n')")
    g.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="inputs decoded together (x beam_size rows), taken in order of prompt length")
    g.add_argument("--no_unmerged", action="store_true",
                   help="skip the unmerged run (it shows the tokens equal the merged model's and times it); "
                        "--eval skips it unless --unmerged_check is given")
    g.add_argument("--unmerged_check", action="store_true",
                   help="with --eval, also decode every MR with the unmerged model (twice the time)")


def _add_evaluation_flags(g) -> None:
    g.add_argument("--eval", action="store_true",
                   help="generate for each unique MR of --split and score BLEU, NIST, METEOR, ROUGE-L, CIDEr")
    g.add_argument("--split", default="test", choices=["test", "valid"], help="split to evaluate")
    g.add_argument("--max_examples", type=int, default=0,
                   help="a quick check: score the first N unique MRs only, labelled a subset wherever printed or "
                        "saved (0: all of them, what the E2E challenge and the paper report)")
    g.add_argument("--data_dir", default=None,
                   help=f"directory with test.txt/valid.txt (else ${data.ENV_VAR}, else data/e2e/)")
    g.add_argument("--no_download", action="store_true",
                   help="never fetch the E2E data: without it, --eval downloads it into data/e2e/ when found in "
                        "none of those places")
    g.add_argument("--meteor", default="auto", choices=["auto", "jar", "nltk"],
                   help="METEOR implementation: the official 1.5 jar (needs Java), nltk, or auto (jar if Java)")
    g.add_argument("--nist", default="perl", choices=sorted(metrics.NIST_VARIANTS),
                   help="NIST as the official script computes it: perl (mteval-v13a-sig.pl, its default) or python "
                        "(its -p port, which averages reference lengths per MR)")
    g.add_argument("--output_dir", default=None,
                   help="where predictions.txt, references.txt, scores.json go (default: the first adapter dir; "
                        "with several adapters, one subdirectory per adapter)")


def check_args(args) -> None:
    for name in ("beam_size", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.no_repeat_ngram_size < 0 or args.max_examples < 0:
        raise ValueError("--no_repeat_ngram_size and --max_examples must be >= 0")
    if args.eval and (args.input or args.input_file):
        raise ValueError("--eval scores a data split; it cannot be combined with --input / --input_file")


def write_lines(path: str, lines) -> None:
    atomic_write(path, "".join(x + "\n" for x in lines).encode("utf-8"))


def read_inputs(args):
    """The MRs to describe and, with ``--eval``, their references (else None); sets ``args.subset``, the label of
    scores of a subset (``--max_examples``)."""
    args.subset = None
    if args.eval:
        data.ensure_data(args.data_dir, (args.split,), download=not args.no_download)
        groups = data.load_references(args.split, args.data_dir)
        n_lines, n_mrs = sum(len(r) for _, r in groups), len(groups)
        if args.max_examples and args.max_examples < n_mrs:
            groups = groups[:args.max_examples]
            args.subset = f"SUBSET: the first {len(groups)} of the {n_mrs} unique {args.split} MRs"
        mrs, refs = [mr for mr, _ in groups], [r for _, r in groups]
        print(f"{args.split}: " + (f"{args.subset} (not comparable with whole-set scores)" if args.subset else
                                   f"all {n_mrs} unique MRs") +
              f", {sum(map(len, refs))} references ({n_lines} lines in the file)")
        return mrs, refs
    mrs = [check_mr(x) for x in args.input or []]
    if args.input_file:
        mrs += read_mr_file(args.input_file)
    return mrs or SAMPLE_MRS, None


def decoding(args, first_dir: str):
    """``(DecodeConfig, recipe name)``: the flags over the recipe's values (``--recipe auto``: the adapter's)."""
    recipe = args.recipe
    if recipe == "auto":
        recipe = (read_adapter_config(first_dir).get("recipe") or {}).get("name")
    explicit = getattr(args, "explicit", None)
    if explicit is None:  # not from parse_args: values other than the defaults count as given
        defaults = vars(get_parser().parse_args([]))
        explicit = {k for k, v in vars(args).items() if defaults.get(k, v) != v}
    apply_recipe(args, recipe, "decode", explicit)
    check_args(args)
    return DecodeConfig(max_new_tokens=args.max_new_tokens, beam_size=args.beam_size,
                        length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                        stop_ids=tuple(args.stop_token_ids)), recipe


def print_header(args, model, adapters, device, decode: DecodeConfig, recipe) -> None:
    """One line: the base, the device and the decoding."""
    base = adapters[0].config.get("base", {})
    name = args.init_checkpoint or base.get("init_checkpoint")
    if name and not args.init_checkpoint and base.get("init_revision"):
        name += f" (commit {base['init_revision']})"
    print(f"base: {name or 'random GPT-2 drawn from seed %s' % base.get('base_seed')} "
          f"({param_counts(model)['total']:,} parameters), device {device}; decoding: "
          + ("greedy" if decode.beam_size == 1 else
             f"beam {decode.beam_size}, length penalty {decode.length_penalty}")
          + (f", no-repeat {decode.no_repeat_ngram_size}-grams" if decode.no_repeat_ngram_size else "")
          + f", at most {decode.max_new_tokens} new tokens"
          + (f", stop also at {list(decode.stop_ids)}" if decode.stop_ids else "")
          + (f" (recipe {recipe})" if recipe and recipe != "none" else ""))


def skip_unmerged(args) -> bool:
    """Whether to skip the unmerged run (a second decoding of every MR): off for the samples, on under --eval."""
    return args.no_unmerged or (args.eval and not args.unmerged_check)


def generate_with(args, model, adapter, mrs, decode: DecodeConfig, device, precision: str) -> dict:
    """``adapter``'s texts, merged and maybe unmerged; prints them with their slot checks (without ``--eval``) and
    the speed line. Returns the result without scores."""
    n_lora = adapter.config.get("lora_params")
    print(f"\n== adapter {adapter.path}" + (f" ({n_lora:,} LoRA parameters)" if isinstance(n_lora, int) else ""))
    runs = {}
    for merged in ([True] if skip_unmerged(args) else [False, True]):
        model = ready(model, adapter.name, merged=merged)
        with train_utils.autocast(device, precision):
            texts, stats = describe(model, mrs, decode, batch_size=args.batch_size,
                                    delex=adapter_delex(adapter.config), tokenizer=tokenizer_for(adapter.config))
        runs["merged" if merged else "unmerged"] = (texts, stats)
    texts, stats = runs["merged"]
    speed = {k: round(s["tokens_per_second"], 1) for k, (_, s) in runs.items()}
    same = None if skip_unmerged(args) else runs["unmerged"][0] == texts
    line = f"generated {stats['tokens']} tokens for {len(mrs)} MRs: merged {speed['merged']} tokens/s"
    if not skip_unmerged(args):
        line += (f", unmerged {speed['unmerged']} tokens/s; merged and unmerged texts "
                 + ("identical" if same else "DIFFER"))
    elif args.eval and not args.no_unmerged:
        line += " (the unmerged check is off under --eval: --unmerged_check runs it)"
    if not args.eval:
        for mr, text in zip(mrs, texts):
            problems = slots.check(mr, text).problems()
            print(f"\nMR:   {mr}\ntext: {text}\nslots: " + (", ".join(problems) if problems else "all realised"))
        print()
    print(line)
    return {"adapter_dir": adapter.path, "texts": texts, "tokens_per_second": speed,
            "merged_equals_unmerged": same, "generated_tokens": stats["tokens"], "decoding": stats["decoding"]}


def score(args, result: dict, out_dir: str, mrs, refs, recipe, precision: str, jar=None) -> dict:
    """``--eval``: write predictions.txt, references.txt and scores.json to ``out_dir``, print the table and return
    the scores (``jar``: a started ``MeteorJar``)."""
    texts = result["texts"]
    os.makedirs(out_dir, exist_ok=True)
    write_lines(os.path.join(out_dir, "predictions.txt"), texts)
    # The official script's format: each MR's references, then a blank line.
    write_lines(os.path.join(out_dir, "references.txt"), [x for rs in refs for x in [*rs, ""]])
    scores = metrics.score_all(texts, refs, meteor_impl=args.meteor, nist_variant=args.nist, meteor_jar=jar)
    scores["slots"] = slots.slot_scores(mrs, texts)
    scores.update({"split": args.split, "subset": args.subset, "decoding": result["decoding"], "recipe": recipe,
                   "precision": precision, "adapter_dir": result["adapter_dir"],
                   "tokens_per_second": result["tokens_per_second"]})
    atomic_json(os.path.join(out_dir, "scores.json"), scores)
    if args.subset:
        print(f"{args.subset}:")
    print(metrics.format_report(scores))
    print(slots.format_slot_line(scores["slots"]))
    print(f"Wrote predictions.txt, references.txt, scores.json to {out_dir}/" +
          (f" ({args.subset})" if args.subset else ""))
    return scores


def start_meteor(args):
    """``--eval`` with the METEOR jar: its JVM started now, to load while the model generates; None where the jar
    will not be used or cannot start."""
    if not args.eval or args.meteor == "nltk" or metrics.meteor_jar_path() is None:
        return None
    try:
        return metrics.MeteorJar()
    except metrics.MetricError:
        return None


def run(args) -> dict:
    """Everything run_inference.py does; returns what it printed, as numbers and texts."""
    check_args(args)
    dirs = args.adapter_dir or ["lora_model"]
    device = train_utils.select_device(args.device)
    mrs, refs = read_inputs(args)
    decode, recipe = decoding(args, dirs[0])
    jar = start_meteor(args)
    try:
        return run_adapters(args, dirs, device, mrs, refs, decode, recipe, jar)
    finally:
        if jar is not None:
            jar.close()


def run_adapters(args, dirs, device, mrs, refs, decode: DecodeConfig, recipe, jar) -> dict:
    """Load the base once, then generate (and with ``--eval`` score) with each adapter in turn."""
    precision, why = train_utils.resolve_precision(args.precision, device)
    model, adapters = load_adapters(dirs, device=device, init_checkpoint=args.init_checkpoint, precision=precision)
    if precision != "fp32":
        print(f"precision: {precision} ({why}); LoRA weights in float32")
    print_header(args, model, adapters, device, decode, recipe)
    mixed = None
    if len(adapters) > 1:  # every adapter in the same batches, each row generated by its own
        with train_utils.autocast(device, precision):
            mixed, stats = describe_mixed(model, adapters, mrs, decode, batch_size=args.batch_size,
                                          tokenizer=tokenizer_for(adapters[0].config))
        print(f"\nmixed batches (each row its own adapter, unmerged): {len(adapters)} adapters x {len(mrs)} "
              f"MRs, {stats['tokens']} tokens at {stats['tokens_per_second']:.1f} tokens/s")
    results = []
    for i, adapter in enumerate(adapters):
        result = generate_with(args, model, adapter, mrs, decode, device, precision)
        if mixed is not None:
            result.update(mixed_texts=mixed[i], mixed_equals_alone=mixed[i] == result["texts"])
            print("texts in the mixed batches: " + ("identical to this adapter's alone"
                                                     if result["mixed_equals_alone"] else "DIFFER from its own"))
        if args.eval:
            out_dir = args.output_dir or dirs[0]
            if len(dirs) > 1:
                out_dir = os.path.join(out_dir, f"adapter{i}_{os.path.basename(os.path.normpath(adapter.path))}")
            result.update(scores=score(args, result, out_dir, mrs, refs, recipe, precision, jar),
                          output_dir=out_dir)
        results.append(result)
    return {"mrs": mrs, "results": results}


def parse_args(argv=None):
    """The command line; ``args.explicit``: the flags typed, which a recipe never overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    args.explicit = explicit_dests(get_parser, argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except (AdapterError, CheckpointError, MRError, data.DataError, train_utils.DeviceError, metrics.MetricError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
