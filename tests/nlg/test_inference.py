"""run_inference.py end to end on a tiny trained adapter: sample MRs, --input, merged == unmerged, adapter swapping,
--eval files and scores, and every user error as one line on stderr with exit status 2."""
import json
import os
import pickle
import shutil

import pytest
import torch

import run_inference
import run_training
from conftest import tiny_args
from e2e_nlg.inference import MRError, check_mr


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two tiny adapters on the same random base (seed 3), trained differently."""
    from conftest import write_e2e

    root = tmp_path_factory.mktemp("inf")
    data = write_e2e(root / "e2e")
    old = os.environ.get("LORALIB_NLG_CACHE")
    os.environ["LORALIB_NLG_CACHE"] = str(root / "cache")  # module scope: monkeypatch is per test
    try:
        a, b = root / "a", root / "b"
        assert run_training.main(tiny_args(data, a, "--seed", "3", "--num_epochs", "2")) == 0
        assert run_training.main(tiny_args(data, b, "--seed", "3", "--lr", "3e-2")) == 0
    finally:
        if old is None:
            os.environ.pop("LORALIB_NLG_CACHE")
        else:
            os.environ["LORALIB_NLG_CACHE"] = old
    return data, str(a), str(b)


def _run(argv):
    return run_inference.run(run_inference.get_parser().parse_args(argv + ["--device", "cpu",
                                                                          "--max_new_tokens", "12"]))


def test_samples_and_inputs(adapters, capsys):
    _, a, _ = adapters
    out = _run(["--adapter_dir", a])
    assert out["mrs"] == run_inference.SAMPLE_MRS
    r = out["results"][0]
    assert len(r["texts"]) == len(run_inference.SAMPLE_MRS) and r["merged_equals_unmerged"] is True
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "unmerged" in printed and printed.count("text:") == 5
    mr = "name : The Eagle | Type : pub | area : riverside"
    out = _run(["--adapter_dir", a, "--input", mr, "--beam_size", "3", "--no_repeat_ngram_size", "2"])
    assert out["mrs"] == [mr] and out["results"][0]["merged_equals_unmerged"] is True


def test_adapter_swap_back_is_identical(adapters, capsys):
    _, a, b = adapters
    out = _run(["--adapter_dir", a, "--adapter_dir", b, "--adapter_dir", a, "--no_unmerged"])
    ta, tb, ta2 = (r["texts"] for r in out["results"])
    assert ta == ta2 and ta != tb
    # All three also generated together in mixed batches, each row by its own adapter: the same texts.
    assert [r["mixed_texts"] for r in out["results"]] == [ta, tb, ta2]
    assert all(r["mixed_equals_alone"] for r in out["results"])
    printed = capsys.readouterr().out
    assert "mixed batches (each row its own adapter, unmerged): 3 adapters x 5 MRs" in printed
    assert printed.count("texts in the mixed batches: identical to this adapter's alone") == 3

    from e2e_nlg.inference import load_adapters, ready

    model, loaded = load_adapters([a, b])
    assert [x.name for x in loaded] == ["default", "adapter1"] and [x.path for x in loaded] == [a, b]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        first = ready(model, "default")(ids).logits.clone()
        other = ready(model, "adapter1")(ids).logits
        again = ready(model, "default")(ids).logits
    assert not torch.allclose(other, first)  # the switch took effect
    # The library's unmerge takes out exactly the update merge put in: the weight comes back within rounding.
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def test_eval_writes_predictions_references_scores(adapters, tmp_path, capsys):
    data, a, _ = adapters
    out = _run(["--adapter_dir", a, "--eval", "--split", "test", "--data_dir", data, "--output_dir",
                str(tmp_path), "--meteor", "nltk", "--nist", "python"])
    assert len(out["mrs"]) == 4  # 8 test lines, 4 unique MRs
    preds = (tmp_path / "predictions.txt").read_text().splitlines()
    assert len(preds) == 4
    refs = (tmp_path / "references.txt").read_text().split("\n\n")
    assert len([g for g in refs if g.strip()]) == 4
    s = json.loads((tmp_path / "scores.json").read_text())
    for k in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"):
        assert isinstance(s[k], float) and s[k] >= 0
    assert "nltk" in s["implementations"]["METEOR"] and s["num_mrs"] == 4
    assert s["nist_variant"] == "python" and run_inference.get_parser().parse_args([]).nist == "perl"
    printed = capsys.readouterr().out
    assert "| BLEU | NIST | METEOR | ROUGE-L | CIDEr |" in printed and "NIST: python variant" in printed
    assert "test: all 4 unique MRs" in printed and "SUBSET" not in printed and s["subset"] is None
    # --eval decodes once: the merged-vs-unmerged check doubles the time, and runs when asked for
    assert out["results"][0]["merged_equals_unmerged"] is None and "--unmerged_check runs it" in printed
    checked = _run(["--adapter_dir", a, "--eval", "--split", "test", "--data_dir", data, "--output_dir",
                    str(tmp_path), "--meteor", "nltk", "--unmerged_check"])
    assert checked["results"][0]["merged_equals_unmerged"] is True
    assert checked["results"][0]["texts"] == out["results"][0]["texts"]


def test_eval_on_fewer_mrs_says_subset_everywhere(adapters, tmp_path, capsys):
    data, a, _ = adapters
    out = _run(["--adapter_dir", a, "--eval", "--split", "test", "--data_dir", data, "--output_dir",
                str(tmp_path), "--meteor", "nltk", "--max_examples", "3", "--no_unmerged"])
    assert len(out["mrs"]) == 3 and len((tmp_path / "predictions.txt").read_text().splitlines()) == 3
    label = "SUBSET: the first 3 of the 4 unique test MRs"
    assert json.loads((tmp_path / "scores.json").read_text())["subset"] == label
    printed = capsys.readouterr().out
    assert f"test: {label} (not comparable with whole-set scores)" in printed
    assert f"{label}:\n| BLEU |" in printed and f"scores.json to {tmp_path}/ ({label})" in printed
    _run(["--adapter_dir", a, "--eval", "--split", "test", "--data_dir", data, "--output_dir", str(tmp_path),
          "--meteor", "nltk", "--max_examples", "4", "--no_unmerged"])  # N = all of them: no subset
    assert json.loads((tmp_path / "scores.json").read_text())["subset"] is None


def test_check_mr():
    assert check_mr("  name : X | food : Y ") == "name : X | food : Y"
    for bad in ["", "   ", "name The Eagle", "name : X | food", "name : X || Y", "name : | food : Y"]:
        with pytest.raises(MRError):
            check_mr(bad)


def _expect_error(argv, capsys, match):
    assert run_inference.main(argv + ["--device", "cpu", "--max_new_tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_meteor_jar_unavailable_is_a_clean_error(adapters, tmp_path, capsys, monkeypatch):
    data, a, _ = adapters
    monkeypatch.setattr(run_inference.metrics, "meteor_jar_path", lambda: None)  # no Java here, say
    _expect_error(["--adapter_dir", a, "--eval", "--split", "test", "--data_dir", data, "--output_dir",
                   str(tmp_path), "--meteor", "jar"], capsys, "METEOR jar needs java")


def test_internal_errors_keep_their_traceback(adapters, monkeypatch):
    """Only the user's mistakes become one-line errors: a RuntimeError from a bug propagates."""
    _, a, _ = adapters

    def broken(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(run_inference, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_inference.main(["--adapter_dir", a])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_user_errors(adapters, tmp_path, capsys):
    _, a, _ = adapters
    _expect_error(["--adapter_dir", str(tmp_path / "nope")], capsys, "does not exist")
    d = tmp_path / "copy"
    shutil.copytree(a, d)
    _expect_error(["--adapter_dir", a, "--input", ""], capsys, "empty meaning representation")
    _expect_error(["--adapter_dir", a, "--input", "name The Eagle"], capsys, "malformed field")
    f = tmp_path / "mrs.txt"
    f.write_text("name : A | food : B\nbroken line\n")
    _expect_error(["--adapter_dir", a, "--input_file", str(f)], capsys, "mrs.txt:2")

    w = d / "pytorch_model.bin"
    good = w.read_bytes()
    w.write_bytes(good[:len(good) // 2])  # truncated
    _expect_error(["--adapter_dir", str(d)], capsys, "cannot load")
    w.write_bytes(b"\x00garbage" * 10)  # corrupted
    _expect_error(["--adapter_dir", str(d)], capsys, "cannot load")
    w.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))  # would run code when unpickled
    _expect_error(["--adapter_dir", str(d)], capsys, "cannot load")
    w.write_bytes(good)
    sd = torch.load(str(w), weights_only=True)
    key = sorted(sd)[0]
    sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    torch.save(sd, str(w))
    _expect_error(["--adapter_dir", str(d)], capsys, "SHA-256 differs")  # the config names other weights
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["weights_sha256"]  # as in directories written before the config recorded it
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_error(["--adapter_dir", str(d)], capsys, key)  # the shape mismatch names the key
    os.remove(w)
    _expect_error(["--adapter_dir", str(d)], capsys, "pytorch_model.bin is missing")


def test_second_adapter_with_other_config_is_named(adapters, tmp_path, capsys):
    data, a, _ = adapters
    other = tmp_path / "r2"
    argv = tiny_args(data, other, "--seed", "3")
    argv[argv.index("--lora_dim") + 1] = "2"
    assert run_training.main(argv) == 0
    capsys.readouterr()
    _expect_error(["--adapter_dir", a, "--adapter_dir", str(other)], capsys, "lora_dim is 2 there but 4 here")


def test_adapter_in_the_previous_release_format_still_loads(adapters, tmp_path):
    """The same adapter with its config as the previous release wrote it (format loralib-nlg-adapter), and as the
    release before it did (without precision, placeholders, weights SHA-256, Hub revision, LoRA targets), loads and
    generates exactly what the loralib-format directory does; for an adapter trained with literal names the old and
    new prompts are the same."""
    data, _, _ = adapters
    new = tmp_path / "new"
    assert run_training.main(tiny_args(data, new, "--seed", "3", "--delex", "none")) == 0
    prev, older = tmp_path / "prev", tmp_path / "older"
    _as_previous_release(new, prev)
    _as_previous_release(new, older, drop=("precision", "weights_sha256", "data.delexicalize", "base.init_revision",
                                           "model_config.lora_targets"))
    texts = {d: _run(["--adapter_dir", str(d), "--input", "name : The Eagle | Type : pub", "--no_unmerged"])[
        "results"][0]["texts"] for d in (new, prev, older)}
    assert texts[older] == texts[prev] == texts[new] and texts[new][0]


def test_precision_flag(adapters, capsys, monkeypatch):
    """--precision bf16: the base is stored in bfloat16, the adapter stays float32, texts come out and scores.json
    would record it; fp32 (the default) prints no precision line; auto follows the CPU check."""
    from e2e_nlg import train_utils

    built = []
    real = run_inference.load_adapters

    def spy(*args, **kwargs):
        model, loaded = real(*args, **kwargs)
        built.append({("lora_" in n, p.dtype) for n, p in model.named_parameters()})
        return model, loaded

    monkeypatch.setattr(run_inference, "load_adapters", spy)
    _, a, _ = adapters
    out = _run(["--adapter_dir", a, "--precision", "bf16"])
    assert built[-1] == {(True, torch.float32), (False, torch.bfloat16)}
    assert all(isinstance(t, str) for t in out["results"][0]["texts"])
    assert "precision: bf16 (asked for with --precision)" in capsys.readouterr().out
    _run(["--adapter_dir", a])
    assert built[-1] == {(True, torch.float32), (False, torch.float32)} and "precision:" not in capsys.readouterr().out
    monkeypatch.setattr(train_utils, "cpu_has_bf16", lambda: False)
    _run(["--adapter_dir", a, "--precision", "auto"])
    assert built[-1] == {(True, torch.float32), (False, torch.float32)}


def test_adapter_from_run_training_loads_with_lora_load_adapter(adapters, tmp_path):
    """What run_training.py writes is a loralib adapter directory: lora.load_adapter puts it into a fresh
    SimpleGPT2WithLoRA built from the config's extra alone, which generates exactly the texts run_inference.py
    prints; and the PEFT export accepts the loaded model."""
    import loralib as lora
    from e2e_nlg.generate import DecodeConfig
    from e2e_nlg.inference import adapter_delex, describe
    from e2e_nlg.model import GPTConfig, build_model

    _, a, _ = adapters
    extra = lora.serialization.read_adapter_config(a)["extra"]
    model = build_model(GPTConfig.from_dict(extra["model_config"]), base_seed=extra["base"]["base_seed"])
    config = lora.load_adapter(model, a)
    assert config["weights_file"] == "pytorch_model.bin" and config["extra"] == extra
    want = torch.load(os.path.join(a, "pytorch_model.bin"), weights_only=True)
    got = lora.lora_state_dict(model)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)

    mrs = run_inference.SAMPLE_MRS[:3]
    decode = DecodeConfig(max_new_tokens=12, beam_size=5, no_repeat_ngram_size=4)  # run_inference's defaults
    texts, _ = describe(model.eval(), mrs, decode, delex=adapter_delex(extra))
    printed = _run(["--adapter_dir", a, "--no_unmerged", *[x for mr in mrs for x in ("--input", mr)]])
    assert texts == printed["results"][0]["texts"] and all(texts)

    peft_dir = tmp_path / "peft"
    peft_config = lora.save_adapter(model, str(peft_dir), format="peft")
    assert peft_config["peft_type"] == "LORA" and sorted(peft_config["target_modules"]) == sorted(config["layers"])
    assert os.path.isfile(peft_dir / "adapter_model.safetensors")


def _as_previous_release(new_dir, old_dir, drop=()):
    """Rewrite ``new_dir``'s config as the previous release wrote it (the example's fields at the top level, format
    loralib-nlg-adapter), without the keys in ``drop`` (``"base.init_revision"``: a nested one)."""
    shutil.copytree(new_dir, old_dir)
    raw = json.loads((old_dir / "adapter_config.json").read_text())
    cfg = {"format": "loralib-nlg-adapter", "format_version": 1, "loralib_version": raw["library_version"],
           **raw["extra"], "weights_file": raw["weights_file"], "weights_sha256": raw["weights_sha256"]}
    for key in drop:
        outer, _, inner = key.partition(".")
        del (cfg[outer] if inner else cfg)[inner or outer]
    (old_dir / "adapter_config.json").write_text(json.dumps(cfg))
