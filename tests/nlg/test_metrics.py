"""The five E2E metrics on tiny cases whose scores are computed by hand, and a human reference scored against the
other references of its MR (real data only) lands near the figures measured with the official script."""
import pytest

from e2e_nlg import metrics

SENT = "the cat sat on the mat"


def test_bleu_hand_cases():
    assert metrics.bleu([SENT], [[SENT]]) == pytest.approx(1.0)
    assert metrics.bleu(["a b c d"], [["w x y z"]]) == 0.0
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): their geometric mean.
    assert metrics.bleu([SENT], [["the cat sat on a mat"]]) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # Case and the 13a tokenizer: "Mat." is "mat ." as in the reference; a second reference is used too.
    assert metrics.bleu(["The cat sat on the Mat."], [["x", "the cat sat on the mat ."]]) == pytest.approx(1.0)


def test_rouge_l_hand_cases():
    assert metrics.rouge_l([SENT], [[SENT]]) == pytest.approx(1.0)
    assert metrics.rouge_l(["a b c d"], [["w x y z"]]) == 0.0
    # LCS "a c d": P = 3/4, R = 3/5, F_beta with beta = 1.2.
    p, r, b2 = 3 / 4, 3 / 5, 1.2 ** 2
    assert metrics.rouge_l(["a b c d"], [["a c d e f"]]) == pytest.approx((1 + b2) * p * r / (r + b2 * p))


def test_cider_hand_cases():
    # Two MRs with disjoint texts: every n-gram has idf log(2), hypotheses equal their reference: cos = 1 for
    # n = 1..4, no length penalty, times CIDEr-D's 10.
    assert metrics.cider(["w x y z q", "k l m n o"], [["w x y z q"], ["k l m n o"]]) == pytest.approx(10.0)
    assert metrics.cider(["a b c d e", "f g h i j"], [["w x y z q"], ["k l m n o"]]) == 0.0


def test_nist_and_meteor_nltk():
    """NIST's own hand cases and the official figures are in test_nist.py."""
    assert metrics.nist(["a b c d"], [["w x y z"]]) == 0.0
    assert metrics.nist([SENT], [[SENT]]) > metrics.nist([SENT], [["the cat sat on a mat"]]) > 0
    # nltk with METEOR 1.5's parameters: one chunk of 6 matches, P = R = 1: 1 - gamma * (1/6) ** beta.
    assert metrics.meteor_nltk(["one two three four five six"], [["one two three four five six"]]) == \
        pytest.approx(1 - 0.6 * (1 / 6) ** 0.2)
    assert metrics.meteor_nltk(["a b c"], [["x y z"]]) == 0.0


def test_coco_tokens_and_errors():
    assert metrics.coco_tokens("The Eagle, by the river-side, costs £20.") == "the eagle by the river-side costs # 20"
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        metrics.bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        metrics.rouge_l(["a"], [[]])
    with pytest.raises(ValueError, match="unknown METEOR"):
        metrics.meteor(["a"], [["a"]], impl="x")


@pytest.mark.skipif(metrics.meteor_jar_path() is None, reason="no java / meteor-1.5.jar")
def test_meteor_jar_hand_cases():
    """One JVM for all cases (starting it costs seconds): identical scores 1, disjoint 0; the same JVM scores
    another corpus through score_all (as run_inference.py's --eval does with each adapter), then is closed."""
    hyps, refs = ["one two three four five six", "a b c"], [["one two three four five six"], ["x y z"]]
    with metrics.MeteorJar() as jar:
        corpus, seg = jar.score(hyps, refs)
        assert seg == [pytest.approx(1.0), 0.0]
        assert 0 < corpus < 1
        half = metrics.score_all(hyps[:1] * 2, refs[:1] + [["one two three"]], meteor_jar=jar)
        assert half["METEOR"] == pytest.approx(jar.score(hyps[:1] * 2, refs[:1] + [["one two three"]])[0])
        assert 0 < half["METEOR"] < 1 and half["METEOR"] != corpus and "jar" in half["implementations"]["METEOR"]
    with pytest.raises(metrics.MetricError, match="closed"):
        jar.score(hyps, refs)


def test_human_reference_near_official_figures(real_e2e_dir):
    """First 50 test MRs with >= 2 references: the first reference against the others (notes' figures: BLEU
    0.601, NIST 7.48 / 7.73, METEOR 0.456, ROUGE-L 0.658, CIDEr 2.32)."""
    from e2e_nlg.data import load_references

    groups = [(mr, r) for mr, r in load_references("test", real_e2e_dir) if len(r) >= 2][:50]
    hyps, refs = [r[0] for _, r in groups], [r[1:] for _, r in groups]
    assert metrics.bleu(hyps, refs) == pytest.approx(0.601, abs=0.002)  # identical implementation
    assert metrics.rouge_l(hyps, refs) == pytest.approx(0.658, abs=0.01)
    assert metrics.cider(hyps, refs) == pytest.approx(2.32, rel=0.05)
    assert metrics.nist(hyps, refs, "perl") == pytest.approx(7.4752, abs=1e-4)  # the official script's 4 decimals
    assert metrics.nist(hyps, refs, "python") == pytest.approx(7.7273, abs=1e-4)
    assert metrics.meteor_nltk(hyps, refs) == pytest.approx(0.456, rel=0.1)
