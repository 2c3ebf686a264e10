"""The five E2E NLG Challenge metrics, computed with established implementations, on the official script's scales.

The official scorer (tuetschek/e2e-metrics ``measure_scores.py``) scores one hypothesis per unique meaning
representation against all of that MR's references. What each function here uses and how close it is (measured,
see README.md, "Inference and scores"):

========  ===========================================================  ======================================
metric    implementation                                               vs. the official script
========  ===========================================================  ======================================
BLEU      ``sacrebleu.corpus_bleu``, 13a tokens, lowercased             identical
NIST      ``nltk.translate.nist_score.corpus_nist`` (n=5), 13a tokens   approximate (~10-16% off)
METEOR    pycocoevalcap's ``meteor-1.5.jar`` (Java, ``-l en -norm``)    the official jar: same implementation
          else nltk ``meteor_score`` with METEOR 1.5's alpha/beta/gamma  approximate (no WordNet/paraphrases)
ROUGE-L   ``pycocoevalcap.rouge.Rouge`` (LCS, beta=1.2) on COCO tokens  identical
CIDEr     ``pycocoevalcap.cider.Cider`` (CIDEr-D) on COCO tokens        identical
========  ===========================================================  ======================================

Scales, as the official script prints them: BLEU, METEOR and ROUGE-L in 0..1; NIST and CIDEr raw.
"""
import os
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
# METEOR 1.5's English parameters (alpha, beta, gamma); delta (content vs function words) has no nltk equivalent.
METEOR15_PARAMS = dict(alpha=0.85, beta=0.20, gamma=0.60)
# COCO's punctuation list (pycocoevalcap PTBTokenizer) plus the brackets PTB would have renamed; "#" (from "£")
# stays, as in the official pipeline.
_PUNCT = {"''", "'", "``", "`", "(", ")", "{", "}", "[", "]", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}


class MetricError(RuntimeError):
    """A metric could not be computed (the METEOR jar is missing, did not start or stopped answering)."""


def _check(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference groups")
    if not hyps:
        raise ValueError("nothing to score: no hypotheses")
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"reference group {i} is empty")


def tokens_13a(text: str) -> List[str]:
    """Lowercased MTEval v13a tokens (sacrebleu's tokenizer): what BLEU and NIST see."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.strip().lower()).split()


def coco_tokens(text: str) -> str:
    """COCO-style tokens, as the official script feeds ROUGE-L, METEOR and CIDEr after the Stanford PTB tokenizer:
    lowercased, ``£`` -> ``#``, punctuation split off and dropped. sacrebleu's 13a tokenizer stands in for PTB
    (identical on 5,303 of the 5,323 E2E test texts), so no Java is needed here."""
    return " ".join(t for t in tokens_13a(text.replace("£", "#")) if t not in _PUNCT)


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in 0..1 against all references of each hypothesis (sacrebleu, 13a, lowercase).

    Raises:
        ValueError: lengths differ, no hypotheses, or an empty reference group.
    """
    import sacrebleu

    _check(hyps, refs)
    n = max(len(r) for r in refs)
    # sacrebleu takes one stream per reference slot; None pads MRs with fewer references.
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(n)]
    return sacrebleu.corpus_bleu(list(hyps), streams, tokenize="13a", lowercase=True).score / 100.0


def nist(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus NIST-5 (nltk ``corpus_nist``) on lowercased 13a tokens. Approximate: the official Perl/Python NIST
    differs in its length penalty; expect ~10-16% from the official figure.

    Raises:
        ValueError: as :func:`bleu`; also when every hypothesis is empty (NIST is undefined then).
    """
    from nltk.translate.nist_score import corpus_nist

    _check(hyps, refs)
    h = [tokens_13a(x) for x in hyps]
    if not any(h):
        return 0.0
    try:
        return float(corpus_nist([[tokens_13a(r) for r in rs] for rs in refs], h, n=5))
    except ZeroDivisionError:
        return 0.0  # no n-gram of any hypothesis occurs in the references


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """COCO ROUGE-L in 0..1: per MR, max LCS precision and max LCS recall over its references, F with beta=1.2,
    averaged over MRs (``pycocoevalcap.rouge.Rouge`` on COCO-style tokens)."""
    from pycocoevalcap.rouge.rouge import Rouge

    _check(hyps, refs)
    gts = {i: [coco_tokens(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [coco_tokens(h)] for i, h in enumerate(hyps)}
    return float(Rouge().compute_score(gts, res)[0])


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (``pycocoevalcap.cider.Cider``) on COCO-style tokens; document frequencies come from the scored
    references, so the score depends on the whole set (a single MR always scores 0)."""
    from pycocoevalcap.cider.cider import Cider

    _check(hyps, refs)
    gts = {i: [coco_tokens(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [coco_tokens(h)] for i, h in enumerate(hyps)}
    return float(Cider().compute_score(gts, res)[0])


def meteor_jar_path() -> Optional[str]:
    """pycocoevalcap's ``meteor-1.5.jar`` when both it and a ``java`` executable exist, else None."""
    try:
        import pycocoevalcap.meteor.meteor as m
    except ImportError:
        return None
    jar = os.path.join(os.path.dirname(m.__file__), "meteor-1.5.jar")
    return jar if os.path.isfile(jar) and shutil.which("java") else None


def meteor_jar(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> Tuple[float, List[float]]:
    """METEOR 1.5 (the official jar, ``-l en -norm``), statistics summed over the corpus, in 0..1.

    Returns:
        ``(corpus score, per-MR scores)``.

    Talks to the jar's ``-stdio`` protocol itself (one ``SCORE`` line per MR, then one ``EVAL`` line) and stops
    the JVM before returning.

    Raises:
        MetricError: no Java or jar, or the jar failed.
    """
    _check(hyps, refs)
    jar = meteor_jar_path()
    if jar is None:
        raise MetricError("METEOR jar needs java and pycocoevalcap's meteor-1.5.jar")

    def clean(s: str) -> str:
        return " ".join(coco_tokens(s).replace("|||", "").split())

    score_lines = [" ||| ".join(["SCORE", *[clean(r) for r in rs], clean(h)]) for h, rs in zip(hyps, refs)]
    cmd = ["java", "-Xmx2G", "-jar", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, cwd=os.path.dirname(jar))
    except OSError as e:
        raise MetricError(f"METEOR jar did not start: {e}") from e
    try:
        # The jar answers each SCORE line with a statistics line, which the EVAL line must quote: the dialogue
        # goes line by line, in one JVM (starting it and loading its paraphrase table takes seconds).
        stats = [_ask(p, line) for line in score_lines]
        p.stdin.write("EVAL ||| " + " ||| ".join(stats) + "\n")
        p.stdin.flush()
        out = [_read(p) for _ in range(len(hyps) + 1)]
    finally:
        p.kill()
        p.wait()
    return float(out[-1]), [float(x) for x in out[:-1]]  # the corpus score follows the per-segment ones


def _read(p) -> str:
    line = p.stdout.readline()
    if not line:
        raise MetricError(f"METEOR jar stopped answering (exit status {p.poll()})")
    return line.strip()


def _ask(p, line: str) -> str:
    p.stdin.write(line + "\n")
    p.stdin.flush()
    return _read(p)


class _NoWordNet:
    """Stands in for WordNet (not installable offline): no synonyms, so nltk matches exact words and stems only."""

    @staticmethod
    def synsets(*_args, **_kwargs):
        return []


def meteor_nltk(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """nltk's METEOR with METEOR 1.5's alpha/beta/gamma on COCO-style tokens, mean of the per-MR scores (max over
    references), in 0..1. Approximate: no function-word weighting, no paraphrases, no WordNet synonyms (when
    WordNet data is not installed), and averaged per MR instead of summing statistics."""
    from nltk.translate.meteor_score import meteor_score

    _check(hyps, refs)
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")
        wn = wordnet
    except LookupError:
        wn = _NoWordNet()
    total = 0.0
    for h, rs in zip(hyps, refs):
        total += meteor_score([coco_tokens(r).split() for r in rs], coco_tokens(h).split(), wordnet=wn,
                              **METEOR15_PARAMS)
    return total / len(hyps)


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]], impl: str = "auto") -> Dict[str, object]:
    """METEOR with the best implementation available.

    Args:
        impl: ``"jar"`` (fail without Java), ``"nltk"``, or ``"auto"`` (the jar when Java runs it, else nltk).

    Returns:
        ``{"score": float, "implementation": str}``.

    Raises:
        ValueError: unknown ``impl``. MetricError: ``impl="jar"`` and the jar cannot run.
    """
    if impl not in ("auto", "jar", "nltk"):
        raise ValueError(f"unknown METEOR implementation {impl!r}; use auto, jar or nltk")
    if impl in ("auto", "jar") and (impl == "jar" or meteor_jar_path()):
        try:
            return {"score": meteor_jar(hyps, refs)[0], "implementation": "meteor-1.5.jar (official, Java)"}
        except MetricError:
            if impl == "jar":
                raise
    return {"score": meteor_nltk(hyps, refs),
            "implementation": "nltk meteor_score, METEOR 1.5 alpha/beta/gamma (approximate, no Java)"}


IMPLEMENTATIONS = {
    "BLEU": "sacrebleu corpus_bleu, 13a, lowercase (identical to the official script)",
    "NIST": "nltk corpus_nist n=5 on 13a tokens (approximate: ~10-16% off the official)",
    "ROUGE_L": "pycocoevalcap Rouge on COCO-style tokens (identical)",
    "CIDEr": "pycocoevalcap Cider (CIDEr-D) on COCO-style tokens (identical)",
}


def score_all(hyps: Sequence[str], refs: Sequence[Sequence[str]], meteor_impl: str = "auto") -> Dict[str, object]:
    """All five metrics, on the official script's scales, and which implementation produced each.

    Args:
        hyps: one generated text per unique MR.
        refs: per MR, all its references.
        meteor_impl: see :func:`meteor`.

    Returns:
        ``{"BLEU": .., "NIST": .., "METEOR": .., "ROUGE_L": .., "CIDEr": .., "implementations": {...},
        "num_mrs": int, "num_references": int}``.

    Raises:
        ValueError: lengths differ, nothing to score, or an empty reference group.
    """
    _check(hyps, refs)
    m = meteor(hyps, refs, meteor_impl)
    return {"BLEU": bleu(hyps, refs), "NIST": nist(hyps, refs), "METEOR": m["score"],
            "ROUGE_L": rouge_l(hyps, refs), "CIDEr": cider(hyps, refs),
            "implementations": {**IMPLEMENTATIONS, "METEOR": m["implementation"]},
            "num_mrs": len(hyps), "num_references": sum(len(r) for r in refs)}


def format_table(scores: Dict[str, object]) -> str:
    """The scores as the paper's table row (BLEU, NIST, METEOR, ROUGE-L, CIDEr), official scales."""
    head = "| BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
    row = "| {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} |".format(*(scores[k] for k in METRICS))
    return "\n".join([head, "|---|---|---|---|---|", row])
