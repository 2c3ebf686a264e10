"""NIST as the official E2E script computes it (both variants), on cases worked out by hand and on three fixed
outputs scored by the official script; the four other metrics pinned to the same official figures; score_e2e.py.

The fixed outputs live beside the repository in ``shared/data/e2e-official-scores/`` (test data, never committed):
missing, they skip these tests locally and fail them under CI (the ``CI`` environment variable set).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import score_e2e
from e2e_nlg import metrics

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_DIR = REPO.parent / "shared" / "data" / "e2e-official-scores"
# The official script's figures (tuetschek/e2e-metrics measure_scores.py; OFFICIAL_DIR/README.md): per case,
# BLEU, METEOR, ROUGE_L, CIDEr (the same in both variants) and NIST per variant.
OFFICIAL = {
    "weak": {"BLEU": 0.0918, "METEOR": 0.1187, "ROUGE_L": 0.2995, "CIDEr": 0.1070,
             "NIST": {"perl": 0.8145, "python": 1.4387}},
    "strong": {"BLEU": 0.4960, "METEOR": 0.3111, "ROUGE_L": 0.5736, "CIDEr": 1.4683,
               "NIST": {"perl": 4.8278, "python": 5.9180}},
    "human": {"BLEU": 0.6009, "METEOR": 0.4559, "ROUGE_L": 0.6575, "CIDEr": 2.3182,
              "NIST": {"perl": 7.4752, "python": 7.7273}},
}
FOUR_DECIMALS = 0.5e-4 + 1e-9  # the official script prints 4 decimals: equal once rounded


def penalty(ratio):
    """The NIST length penalty written out: 0.5 at ratio 2/3, i.e. beta = ln 2 / ln(1.5)^2."""
    return math.exp(-math.log(2) / math.log(1.5) ** 2 * math.log(ratio) ** 2)


# --- cases worked out by hand -------------------------------------------------------------------------------------

def test_length_penalty():
    assert metrics.nist_length_penalty(2 / 3) == pytest.approx(0.5)
    assert metrics.nist_length_penalty(1.0) == metrics.nist_length_penalty(1.7) == 1.0
    assert metrics.nist_length_penalty(0.0) == 0.0
    assert metrics.nist_length_penalty(0.25) == pytest.approx(penalty(0.25))


@pytest.mark.parametrize("variant", ["perl", "python"])
def test_hypothesis_shorter_than_its_reference(variant):
    # Reference words: 4. info(a) = info(b) = log2(4/1) = 2; info(a b) = log2(count(a)/count(a b)) = 0.
    # Unigrams: (2 + 2) / 2 hypothesis words; bigrams add 0; length ratio 2/4.
    assert metrics.nist(["a b"], [["a b c d"]], variant) == pytest.approx(2 * penalty(0.5))
    # The same length as the reference: no penalty; "A B." is "a b ." once tokenized and lowercased.
    # Three words of weight log2(3) each over 3 unigrams; every longer n-gram weighs log2(1/1) = 0.
    assert metrics.nist(["A B."], [["a b ."]], variant) == pytest.approx(math.log2(3))


def test_mrs_with_different_numbers_of_references():
    """MR 1: hypothesis "a b", references "a b" and "a c"; MR 2: hypothesis "d", reference "d e f g".

    Reference words 8: info(a) = log2(8/2) = 2, info(b) = info(d) = 3, info(a b) = log2(2/1) = 1. Matched: unigrams
    a, b, d (8 bits over 3 hypothesis unigrams), bigram a b (1 bit over 1 hypothesis bigram): 8/3 + 1 = 11/3.
    The variants differ in the average reference length the 3 hypothesis words are compared with:
    perl: 8 words / (3 references / 2 MRs) = 16/3; python: mean per MR, summed: (2 + 2) / 2 + 4 = 6.
    """
    hyps, refs = ["a b", "d"], [["a b", "a c"], ["d e f g"]]
    assert metrics.nist(hyps, refs, "perl") == pytest.approx(11 / 3 * penalty(3 / (16 / 3)))
    assert metrics.nist(hyps, refs, "python") == pytest.approx(11 / 3 * penalty(3 / 6))
    # The default is the official script's default.
    assert metrics.nist(hyps, refs) == metrics.nist(hyps, refs, "perl")


def test_empty_hypothesis():
    """MR 1 "a b" against "a b", MR 2 empty against "c d". info(a) = info(b) = 2, info(a b) = 0.

    perl: the empty text has no words: 4 bits / 2 unigrams, ratio 2 / 4.
    python: the port's split leaves one empty token: 4 bits / 3 unigrams, ratio 3 / 4.
    """
    hyps, refs = ["a b", ""], [["a b"], ["c d"]]
    assert metrics.nist(hyps, refs, "perl") == pytest.approx(2 * penalty(0.5))
    assert metrics.nist(hyps, refs, "python") == pytest.approx(4 / 3 * penalty(0.75))
    for variant in ("perl", "python"):
        assert metrics.nist([""], [["a b"]], variant) == 0.0  # nothing matches (python: the port would divide by 0)
        assert metrics.nist(["", ""], [["a"], ["b"]], variant) == 0.0


def test_variant_specific_details():
    # Perl's "0" is false, so mteval weighs a bigram starting with the word 0 against all reference words:
    # reference "0 x 0 y" (4 words): info(0) = 1, info(x) = 2; info(0 x) is log2(4/1) = 2 in perl,
    # log2(count(0)/count(0 x)) = log2(2/1) = 1 in python. Ratio 2/4 for both.
    assert metrics.nist(["0 x"], [["0 x 0 y"]], "perl") == pytest.approx((3 / 2 + 2) * penalty(0.5))
    assert metrics.nist(["0 x"], [["0 x 0 y"]], "python") == pytest.approx((3 / 2 + 1) * penalty(0.5))
    # Perl lowercases ASCII only (tr/A-Z/a-z/): "É" stays upper case; the Python port lowercases it. Reference
    # "école x": info 1 for each word; perl matches only "x" (1 bit / 2 unigrams), python both (2 / 2).
    assert metrics.nist(["ÉCOLE x"], [["école x"]], "perl") == pytest.approx(0.5)
    assert metrics.nist(["ÉCOLE x"], [["école x"]], "python") == pytest.approx(1.0)
    assert metrics.tokens_13a("ÉCOLE, Café.", "perl") == ["École", ",", "café", "."]
    assert metrics.tokens_13a("ÉCOLE, Café.", "python") == ["école", ",", "café", "."]
    assert metrics.tokens_13a("  ", "perl") == [] and metrics.tokens_13a("  ", "python") == [""]


def test_nist_errors():
    with pytest.raises(ValueError, match="unknown NIST variant 'nltk'"):
        metrics.nist(["a"], [["a"]], "nltk")
    with pytest.raises(ValueError, match="unknown NIST variant"):
        metrics.score_all(["a"], [["a"]], meteor_impl="nltk", nist_variant="x")
    with pytest.raises(ValueError, match="references have no words"):
        metrics.nist(["a"], [[" ", ""]], "perl")
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        metrics.nist(["a", "b"], [["a"]], "python")
    with pytest.raises(ValueError, match="empty"):
        metrics.nist(["a"], [[]])


# --- the official figures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    """The three fixed outputs, read with score_e2e's readers: {case: (predictions, references)}."""
    if not (OFFICIAL_DIR / "README.md").is_file():
        msg = ("the official E2E scores (shared/data/e2e-official-scores/ beside the repository) are missing: "
               "nothing to check the metrics against")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return {case: (score_e2e.read_predictions(str(OFFICIAL_DIR / f"{case}_predictions.txt")),
                   score_e2e.read_references(str(OFFICIAL_DIR / f"{case}_refs.txt"))) for case in OFFICIAL}


@pytest.mark.parametrize("variant", ["perl", "python"])
@pytest.mark.parametrize("case", list(OFFICIAL))
def test_nist_equals_the_official_figure(official, case, variant):
    hyps, refs = official[case]
    figure = OFFICIAL[case]["NIST"][variant]
    got = metrics.nist(hyps, refs, variant)
    assert got == pytest.approx(figure, abs=FOUR_DECIMALS)  # so also within the 0.5% asked for
    assert abs(got - figure) / figure < 0.005


def test_the_variants_differ_where_the_official_ones_do(official):
    hyps, refs = official["weak"]
    assert metrics.nist(hyps, refs, "python") / metrics.nist(hyps, refs, "perl") == pytest.approx(1.4387 / 0.8145, rel=1e-3)


@pytest.mark.parametrize("case", list(OFFICIAL))
def test_bleu_rouge_cider_equal_the_official_figures(official, case):
    hyps, refs = official[case]
    assert len(hyps) == len(refs) == {"weak": 50, "strong": 100, "human": 50}[case]
    for name, fn in (("BLEU", metrics.bleu), ("ROUGE_L", metrics.rouge_l), ("CIDEr", metrics.cider)):
        assert fn(hyps, refs) == pytest.approx(OFFICIAL[case][name], abs=FOUR_DECIMALS), name


def test_meteor_jar_equals_the_official_figures(official):
    """The official figure needs the official jar (Java). .ci/run installs Java where it is missing, so under CI
    a missing jar fails; locally it skips (see the next test for what the nltk fallback gives)."""
    if metrics.meteor_jar_path() is None:
        msg = "no java / meteor-1.5.jar: METEOR is exact only with the official jar (Debian: default-jre-headless)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with metrics.MeteorJar() as jar:  # one JVM: it takes seconds to start
        results = [jar.score(*official[case]) for case in OFFICIAL]
    for case, (corpus, _) in zip(OFFICIAL, results):
        assert corpus == pytest.approx(OFFICIAL[case]["METEOR"], abs=FOUR_DECIMALS), case


def test_meteor_nltk_fallback_is_only_approximate(official):
    """Without Java, METEOR falls back to nltk, labelled approximate: measured here 19% above the official figure
    on the weak output, 3% and 7% below on the strong and human ones. Pinned so the label stays honest."""
    errors = {case: metrics.meteor_nltk(*official[case]) / OFFICIAL[case]["METEOR"] - 1 for case in OFFICIAL}
    assert errors["weak"] == pytest.approx(0.188, abs=0.01)
    assert errors["strong"] == pytest.approx(-0.030, abs=0.01)
    assert errors["human"] == pytest.approx(-0.072, abs=0.01)


# --- score_e2e.py --------------------------------------------------------------------------------------------------

def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_score_e2e_scores_like_score_all(tmp_path, capsys):
    refs = _write(tmp_path, "refs.txt", "a b\na c\n\nd e f g\n")
    preds = _write(tmp_path, "preds.txt", "a b\nd\n")
    out = tmp_path / "out" / "scores.json"
    assert score_e2e.main([refs, preds, "--json", str(out), "--meteor", "nltk", "--nist", "python"]) == 0
    printed = capsys.readouterr().out
    s = json.loads(out.read_text())
    expected = metrics.score_all(["a b", "d"], [["a b", "a c"], ["d e f g"]], meteor_impl="nltk", nist_variant="python")
    for k in metrics.METRICS:
        assert s[k] == pytest.approx(expected[k])
    assert s["NIST"] == pytest.approx(11 / 3 * penalty(0.5))  # the hand case above, python variant
    assert s["nist_variant"] == "python" and s["implementations"]["NIST"].startswith("python variant")
    assert "nltk" in s["implementations"]["METEOR"] and set(metrics.METRICS) <= set(s["implementations"])
    assert s["num_mrs"] == 2 and s["num_references"] == 3
    assert metrics.format_table(s) in printed and "NIST: python variant" in printed and "METEOR: nltk" in printed


def test_score_e2e_reads_the_official_formats(tmp_path):
    # Windows line ends, trailing blank lines and surrounding spaces do not matter.
    refs = _write(tmp_path, "r.txt", " a b \r\na c\r\n\r\nd e\r\n\r\n\r\n")
    assert score_e2e.read_references(refs) == [["a b", "a c"], ["d e"]]
    # No blank line at all: one reference per MR, as the official script reads such a file.
    assert score_e2e.read_references(_write(tmp_path, "s.txt", "x\ny\nz\n")) == [["x"], ["y"], ["z"]]
    # An empty prediction line is an empty output, kept in its place.
    assert score_e2e.read_predictions(_write(tmp_path, "p.txt", "a\n\nb\n")) == ["a", "", "b"]


@pytest.mark.parametrize("refs_text, preds_text, message", [
    ("a\nb\n\nc\n", "x\n", "has 1 predictions (lines) but"),
    ("a\n\nb\n", "x\ny\nz\n", "has 3 predictions (lines) but"),
    ("a\n\n\nb\n", "x\ny\n", "line 3: a blank line that ends no MR's references"),
    ("\na\n\nb\n", "x\ny\n", "line 1: a blank line"),
    ("\n\n", "x\n", "has no references"),
    ("a\n", "", "has no predictions"),
])
def test_score_e2e_bad_input_is_one_line(tmp_path, capsys, refs_text, preds_text, message):
    refs, preds = _write(tmp_path, "r.txt", refs_text), _write(tmp_path, "p.txt", preds_text)
    assert score_e2e.main([refs, preds, "--meteor", "nltk"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_score_e2e_unreadable_files(tmp_path, capsys):
    preds = _write(tmp_path, "p.txt", "x\n")
    assert score_e2e.main([str(tmp_path / "missing.txt"), preds]) == 2
    assert "error: cannot read" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    assert score_e2e.main([str(bad), preds]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8" in err and err.count("\n") == 1
    refs = _write(tmp_path, "r.txt", "x\n")
    assert score_e2e.main([refs, preds, "--meteor", "nltk", "--json", str(tmp_path)]) == 2  # a directory
    assert "error: cannot write" in capsys.readouterr().err


def test_score_e2e_command_line(tmp_path):
    """The script as a user runs it, in its own process: table on stdout, exit status 0."""
    refs = _write(tmp_path, "refs.txt", "the cat sat on the mat\n\na dog\nthe dog\n")
    preds = _write(tmp_path, "preds.txt", "the cat sat on a mat\na dog\n")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "NLG" / "score_e2e.py"), refs, preds,
                           "--meteor", "nltk"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| BLEU | NIST | METEOR | ROUGE-L | CIDEr |" in proc.stdout
    assert "NIST: perl variant" in proc.stdout and "2 MRs, 3 references" in proc.stdout
