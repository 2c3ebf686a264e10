"""Score any system's E2E output against references, with the same metrics, table and JSON as run_inference --eval.

    python examples/NLG/score_e2e.py references.txt predictions.txt
    python examples/NLG/score_e2e.py references.txt predictions.txt --json scores.json --nist python

REFS is the official scorer's format: each MR's references one per line, MRs separated by one blank line (without
any blank line, one reference per MR). PREDS has one output per line, in the same MR order. Prints BLEU, NIST,
METEOR, ROUGE-L and CIDEr on the official script's scales (README.md, "Inference and scores", says how).
"""
import argparse
import json
import os
import sys
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_nlg import metrics  # noqa: E402


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def read_references(path: str) -> List[List[str]]:
    """Per MR, its (stripped) references from a UTF-8 file in the official format (see the module docstring).

    Raises:
        ValueError: unreadable file, no references, or a blank line that ends no block (two in a row, or first).
    """
    lines = [x.strip() for x in _read_text(path).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path} has no references")
    groups: List[List[str]] = [[]]
    for i, line in enumerate(lines, 1):
        if line:
            groups[-1].append(line)
        elif not groups[-1]:
            raise ValueError(f"{path}, line {i}: a blank line that ends no MR's references (two in a row, or at "
                             "the start); separate MRs by exactly one blank line")
        else:
            groups.append([])
    if len(groups) == 1:
        groups = [[x] for x in groups[0]]
    return groups


def read_predictions(path: str) -> List[str]:
    """One system output per line, stripped (an empty line is an empty output).

    Raises:
        ValueError: unreadable or empty file.
    """
    preds = [x.strip() for x in _read_text(path).splitlines()]
    if not preds:
        raise ValueError(f"{path} has no predictions")
    return preds


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("refs", metavar="REFS", help="references: one per line, MRs separated by a blank line")
    p.add_argument("preds", metavar="PREDS", help="system outputs: one per line, same MR order as REFS")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the scores (and how each was computed) "
                                                               "to this JSON file")
    p.add_argument("--nist", default="perl", choices=sorted(metrics.NIST_VARIANTS),
                   help="NIST as the official script computes it: perl (mteval-v13a-sig.pl, its default) or python "
                        "(its -p port, which averages reference lengths per MR) (default: perl)")
    p.add_argument("--meteor", default="auto", choices=["auto", "jar", "nltk"],
                   help="METEOR implementation: the official 1.5 jar (needs Java), nltk, or auto (jar if Java) "
                        "(default: auto)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        refs = read_references(args.refs)
        preds = read_predictions(args.preds)
        if len(preds) != len(refs):
            raise ValueError(f"{args.preds} has {len(preds)} predictions (lines) but {args.refs} has {len(refs)} "
                             "MRs (blocks separated by blank lines); give one prediction per MR, in the same order")
        scores = metrics.score_all(preds, refs, meteor_impl=args.meteor, nist_variant=args.nist)
        scores.update(references_file=args.refs, predictions_file=args.preds)
        print(f"{len(refs)} MRs, {scores['num_references']} references")
        print(metrics.format_report(scores))
        if args.json:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(scores, f, indent=2, sort_keys=True)
            except OSError as e:
                raise ValueError(f"cannot write {args.json}: {e.strerror}") from None
            print(f"Wrote {args.json}")
    except KeyboardInterrupt:
        return 130
    except (ValueError, metrics.MetricError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
