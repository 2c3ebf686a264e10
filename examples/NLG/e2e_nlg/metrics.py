"""The five E2E NLG Challenge metrics, scored as the official script (tuetschek/e2e-metrics) does: one hypothesis
per unique MR against all its references, BLEU, METEOR and ROUGE-L in 0..1, NIST and CIDEr raw.

BLEU is sacrebleu's, ROUGE-L and CIDEr pycocoevalcap's (all identical to the official script); NIST is MTEval v13a
written here (identical to 4 decimals, tests/nlg/test_nist.py); METEOR is the official 1.5 jar when Java runs it,
else an nltk approximation. README.md, "Inference and scores", has the details.
"""
import functools
import math
import os
import shutil
import string
import subprocess
import types
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
SCALES = "BLEU, METEOR, ROUGE_L in 0..1; NIST and CIDEr raw (as the official script)"
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


@functools.lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    return Tokenizer13a()


def tokens_13a(text: str, variant: Optional[str] = None) -> List[str]:
    """MTEval v13a tokens of one text (sacrebleu's tokenizer), lowercased as its reader does.

    Args:
        variant: None (stripped and lowercased first: :func:`coco_tokens`), ``"perl"`` (ASCII-only lowercasing;
            an empty text has no tokens) or ``"python"`` (Unicode lowercasing; an empty text is one empty token).
    """
    if variant is None:
        return _tokenizer_13a()(text.strip().lower()).split()
    if variant == "perl":
        return _tokenizer_13a()(text.translate(_ASCII_LOWER)).split()
    return _tokenizer_13a()(text).lower().split() or [""]


def coco_tokens(text: str) -> str:
    """COCO-style tokens (lowercased, ``£`` -> ``#``, punctuation dropped), what the official script feeds ROUGE-L,
    METEOR and CIDEr; 13a stands in for the PTB tokenizer (same on 5,303 of the 5,323 E2E test texts), no Java."""
    return " ".join(t for t in tokens_13a(text.replace("£", "#")) if t not in _PUNCT)


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in 0..1 against all references of each hypothesis (sacrebleu, 13a, lowercase).

    Raises:
        ValueError: lengths differ, no hypotheses, or an empty reference group.
    """
    import sacrebleu
    _check(hyps, refs)
    n = max(len(r) for r in refs)
    # One stream per reference slot; None pads MRs with fewer references.
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(n)]
    # force: E2E texts are tokenized on purpose (so are the references); no "forgot to detokenize" warning.
    return sacrebleu.corpus_bleu(list(hyps), streams, tokenize="13a", lowercase=True, force=True).score / 100.0


NIST_VARIANTS = {
    "perl": "MTEval v13a NIST-5 as mteval-v13a-sig.pl computes it (the official script's default)",
    "python": "MTEval v13a NIST-5 as the official script's -p Python port computes it",
}
NIST_MAX_N = 5
# Doddington (2002): the length penalty is 0.5 (exp(-beta * log(1.5) ** 2)) at 2/3 of the reference length.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
# mteval's Perl lowercases with tr/A-Z/a-z/ (ASCII only); the Python port uses str.lower().
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def nist_length_penalty(ratio: float) -> float:
    """NIST brevity penalty ``exp(-beta * log(min(ratio, 1)) ** 2)`` of hypothesis words / average reference
    words; 0 for ``ratio <= 0``."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def _nist_weights(ref_toks: List[List[List[str]]], perl: bool) -> Tuple[Callable[[tuple], float], int]:
    """The information weight of an n-gram over all references, and the number of reference words."""
    counts: Counter = Counter()
    ref_words = 0
    for rs in ref_toks:
        for r in rs:
            ref_words += len(r)
            for n in range(1, NIST_MAX_N + 1):
                counts.update(_ngram_counts(r, n))
    if ref_words == 0:
        raise ValueError("the references have no words: NIST has no information weights; check the reference file")

    def info(ngram: tuple) -> float:
        prefix = ngram[:-1]
        if not prefix or (perl and prefix == ("0",)):
            return math.log2(ref_words / counts[ngram])
        return math.log2(counts[prefix] / counts[ngram])

    return info, ref_words


def _nist_matches(hyp_toks: List[List[str]], ref_toks: List[List[List[str]]], info: Callable[[tuple], float],
                  perl: bool) -> Tuple[List[float], List[int]]:
    """Per order n: the information of the hypothesis n-grams matched (clipped) in their MR's references, and the
    number of hypothesis n-grams as the variant counts them."""
    matched_info = [0.0] * (NIST_MAX_N + 1)
    hyp_ngrams = [0] * (NIST_MAX_N + 1)
    for h, rs in zip(hyp_toks, ref_toks):
        for n in range(1, NIST_MAX_N + 1):
            hyp_ngrams[n] += max(0, len(h) - n + 1) if perl else len(h) - n + 1
            best: Counter = Counter()
            for r in rs:
                for g, c in _ngram_counts(r, n).items():
                    best[g] = max(best[g], c)
            for g, c in _ngram_counts(h, n).items():
                if g in best:
                    matched_info[n] += info(g) * min(c, best[g])
    return matched_info, hyp_ngrams


def nist(hyps: Sequence[str], refs: Sequence[Sequence[str]], variant: str = "perl") -> float:
    """Corpus NIST-5 (MTEval v13a) as the official E2E script computes it.

    An n-gram w1..wn weighs ``log2(count(w1..wn-1) / count(w1..wn))`` over all references (unigrams: total reference
    words); the score sums, over n = 1..5, the weights of the hypothesis n-grams matched in their MR's references
    (clipped) / hypothesis n-grams, times :func:`nist_length_penalty`. The variants differ as the script's two do:

    - ``perl`` (``mteval-v13a-sig.pl``, the default): average reference length = reference words / mean non-empty
      references per MR; n-gram counts ``max(0, len - n + 1)`` per text, each sum at least 1; ASCII lowercasing;
      a bigram starting with ``0`` is weighed against the total word count (Perl's ``"0"`` is false).
    - ``python`` (its ``-p`` port): average reference length = sum over MRs of their mean reference length (up to
      77% apart from ``perl``); ``len - n + 1`` n-grams per text even when negative; an empty text is one empty
      token; an order whose count sums to 0 adds 0 (the port would divide by zero).

    Returns:
        The raw NIST score (``hyps``: one per MR; ``refs``: per MR, all its references); 0 when nothing matches or
        every hypothesis is empty.

    Raises:
        ValueError: unknown variant; as :func:`bleu`; references without any word.
    """
    if variant not in NIST_VARIANTS:
        raise ValueError(f"unknown NIST variant {variant!r}; use perl or python")
    _check(hyps, refs)
    perl = variant == "perl"
    hyp_toks = [tokens_13a(h, variant) for h in hyps]
    ref_toks = [[tokens_13a(r, variant) for r in rs] for rs in refs]
    info, ref_words = _nist_weights(ref_toks, perl)
    matched_info, hyp_ngrams = _nist_matches(hyp_toks, ref_toks, info, perl)
    if perl:
        score = sum(matched_info[n] / max(hyp_ngrams[n], 1) for n in range(1, NIST_MAX_N + 1))
        refs_per_mr = sum(len([r for r in rs if r]) for rs in ref_toks) / len(ref_toks)
        avg_ref_len = ref_words / refs_per_mr
    else:
        score = sum(matched_info[n] / hyp_ngrams[n] for n in range(1, NIST_MAX_N + 1) if hyp_ngrams[n])
        avg_ref_len = sum(sum(len(r) for r in rs) / len(rs) for rs in ref_toks)
    return float(score * nist_length_penalty(hyp_ngrams[1] / avg_ref_len))


def _coco_score(scorer, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    _check(hyps, refs)
    gts = {i: [coco_tokens(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [coco_tokens(h)] for i, h in enumerate(hyps)}
    return float(scorer.compute_score(gts, res)[0])


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """COCO ROUGE-L (``pycocoevalcap``, LCS F with beta=1.2, best reference per MR) in 0..1, averaged over MRs."""
    from pycocoevalcap.rouge.rouge import Rouge
    return _coco_score(Rouge(), hyps, refs)


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (``pycocoevalcap``); document frequencies come from the scored references (one MR scores 0)."""
    from pycocoevalcap.cider.cider import Cider
    return _coco_score(Cider(), hyps, refs)


def meteor_jar_path() -> Optional[str]:
    """pycocoevalcap's ``meteor-1.5.jar`` when both it and a ``java`` executable exist, else None."""
    try:
        import pycocoevalcap.meteor.meteor as coco_meteor
    except ImportError:
        return None
    jar = os.path.join(os.path.dirname(coco_meteor.__file__), "meteor-1.5.jar")
    return jar if os.path.isfile(jar) and shutil.which("java") else None


class MeteorJar:
    """One running METEOR 1.5 JVM (``-l en -norm -stdio``) that scores any number of corpora.

    It takes seconds to start: start it early (it loads while the caller generates), then :meth:`score` each
    corpus and :meth:`close` it (or use ``with``).

    Raises:
        MetricError: no Java or jar, or the JVM did not start.
    """

    def __init__(self):
        jar = meteor_jar_path()
        if jar is None:
            raise MetricError("METEOR jar needs java and pycocoevalcap's meteor-1.5.jar")
        cmd = ["java", "-Xmx2G", "-jar", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self._p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True, cwd=os.path.dirname(jar))
        except OSError as e:
            raise MetricError(f"METEOR jar did not start: {e}") from e

    def score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> Tuple[float, List[float]]:
        """``(corpus score, per-MR scores)`` of one corpus, statistics summed over it, in 0..1.

        Raises:
            ValueError: as :func:`bleu`. MetricError: the jar stopped answering or was closed.
        """
        _check(hyps, refs)
        if self._p is None:
            raise MetricError("METEOR jar already closed")

        def clean(s: str) -> str:
            return " ".join(coco_tokens(s).replace("|||", "").split())

        try:
            # The EVAL line quotes the statistics the jar answers each SCORE line with: one line at a time.
            stats = [self._ask(" ||| ".join(["SCORE", *[clean(r) for r in rs], clean(h)])) for h, rs in zip(hyps, refs)]
            self._p.stdin.write("EVAL ||| " + " ||| ".join(stats) + "\n")
            self._p.stdin.flush()
        except OSError as e:  # a broken pipe: the JVM died
            raise MetricError(f"METEOR jar stopped answering (exit status {self._p.poll()})") from e
        out = [self._read() for _ in range(len(hyps) + 1)]
        return float(out[-1]), [float(x) for x in out[:-1]]  # the corpus score follows the segments'

    def _read(self) -> str:
        line = self._p.stdout.readline()
        if not line:
            raise MetricError(f"METEOR jar stopped answering (exit status {self._p.poll()})")
        return line.strip()

    def _ask(self, line: str) -> str:
        self._p.stdin.write(line + "\n")
        self._p.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Stop the JVM (idempotent)."""
        if self._p is not None:
            self._p.kill()
            self._p.wait()
            self._p = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def meteor_nltk(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """nltk's METEOR with METEOR 1.5's alpha/beta/gamma on COCO-style tokens, mean over MRs, in 0..1. Approximate:
    no function-word weighting, paraphrases or (without WordNet data) synonyms; averaged, not summed statistics."""
    from nltk.translate.meteor_score import meteor_score

    _check(hyps, refs)
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")
        wn = wordnet
    except LookupError:  # no WordNet data (not installable offline): no synonyms, only exact words and stems
        wn = types.SimpleNamespace(synsets=lambda *args, **kwargs: [])
    total = 0.0
    for h, rs in zip(hyps, refs):
        total += meteor_score([coco_tokens(r).split() for r in rs], coco_tokens(h).split(), wordnet=wn,
                              **METEOR15_PARAMS)
    return total / len(hyps)


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]], impl: str = "auto",
           jar: Optional[MeteorJar] = None) -> Dict[str, object]:
    """METEOR with the best implementation available.

    Args:
        impl: ``"jar"`` (fail without Java), ``"nltk"``, or ``"auto"`` (the jar when Java runs it, else nltk).
        jar: a :class:`MeteorJar` already started (it stays open), else one is started and stopped here.

    Returns:
        ``{"score": float, "implementation": str}``.

    Raises:
        ValueError: unknown ``impl``. MetricError: ``impl="jar"`` and the jar cannot run.
    """
    if impl not in ("auto", "jar", "nltk"):
        raise ValueError(f"unknown METEOR implementation {impl!r}; use auto, jar or nltk")
    if impl in ("auto", "jar") and (impl == "jar" or meteor_jar_path()):
        try:
            if jar is None:
                with MeteorJar() as own:
                    score = own.score(hyps, refs)[0]
            else:
                score = jar.score(hyps, refs)[0]
            return {"score": score, "implementation": "meteor-1.5.jar (official, Java)"}
        except MetricError:
            if impl == "jar":
                raise
    return {"score": meteor_nltk(hyps, refs),
            "implementation": "nltk meteor_score, METEOR 1.5 alpha/beta/gamma (approximate, no Java)"}


IMPLEMENTATIONS = {
    "BLEU": "sacrebleu corpus_bleu, 13a, lowercase (identical to the official script)",
    "ROUGE_L": "pycocoevalcap Rouge on COCO-style tokens (identical)",
    "CIDEr": "pycocoevalcap Cider (CIDEr-D) on COCO-style tokens (identical)",
}


def score_all(hyps: Sequence[str], refs: Sequence[Sequence[str]], meteor_impl: str = "auto",
              nist_variant: str = "perl", meteor_jar: Optional[MeteorJar] = None) -> Dict[str, object]:
    """All five metrics, on the official script's scales, and which implementation produced each.

    Args:
        hyps: one generated text per unique MR.
        refs: per MR, all its references.
        meteor_impl, meteor_jar: :func:`meteor`'s ``impl`` and ``jar``.
        nist_variant: see :func:`nist`.

    Returns:
        ``{"BLEU": .., "NIST": .., "METEOR": .., "ROUGE_L": .., "CIDEr": .., "implementations": {metric: str},
        "nist_variant": str, "scales": str, "num_mrs": int, "num_references": int}``.

    Raises:
        ValueError: unknown ``nist_variant``, lengths differ, nothing to score, or an empty reference group.
        MetricError: ``meteor_impl="jar"`` and the jar cannot run.
    """
    nist_score = nist(hyps, refs, nist_variant)  # first: checks the variant and inputs before METEOR's long run
    m = meteor(hyps, refs, meteor_impl, jar=meteor_jar)
    return {"BLEU": bleu(hyps, refs), "NIST": nist_score, "METEOR": m["score"],
            "ROUGE_L": rouge_l(hyps, refs), "CIDEr": cider(hyps, refs),
            "implementations": {**IMPLEMENTATIONS, "METEOR": m["implementation"],
                                "NIST": f"{nist_variant} variant: {NIST_VARIANTS[nist_variant]}"},
            "nist_variant": nist_variant, "scales": SCALES, "num_mrs": len(hyps),
            "num_references": sum(len(r) for r in refs)}


def format_table(scores: Dict[str, object]) -> str:
    """The scores as the paper's table row (BLEU, NIST, METEOR, ROUGE-L, CIDEr), official scales."""
    head = "| BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
    row = "| {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} |".format(*(scores[k] for k in METRICS))
    return "\n".join([head, "|---|---|---|---|---|", row])


def format_report(scores: Dict[str, object]) -> str:
    """:func:`format_table` of a :func:`score_all` result, then lines naming the NIST variant and METEOR."""
    impl = scores["implementations"]
    return "\n".join([format_table(scores), f"NIST: {impl['NIST']}", f"METEOR: {impl['METEOR']}"])
