"""E2E data: where it is found, parse errors with file:line, GPT-2 token ids, loss masking, padding, the cache."""
import os

import pytest
import torch

from e2e_nlg import data
from e2e_nlg.tokenizer import EOT_ID, get_tokenizer


def test_missing_data_names_three_places_and_download(tmp_path, monkeypatch):
    monkeypatch.delenv("E2E_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError) as e:
        data.find_data_dir(None)
    msg = str(e.value)
    assert "--data_dir" in msg and "$E2E_DATA_DIR" in msg and "data/e2e/" in msg
    assert "download_e2e.py" in msg


def test_explicit_data_dir_without_file_is_an_error(tmp_path, e2e_dir, monkeypatch):
    monkeypatch.setenv("E2E_DATA_DIR", e2e_dir)  # must not silently fall back to it
    with pytest.raises(data.DataError, match="--data_dir .* has no train.txt"):
        data.find_data_dir(str(tmp_path / "empty"))


def test_lookup_order(tmp_path, e2e_dir, monkeypatch):
    other = tmp_path / "other"
    os.makedirs(other)
    (other / "train.txt").write_text("a : b||c \n")
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", str(other))
    assert data.find_data_dir(None) == str(other)  # only data/e2e/
    monkeypatch.setenv("E2E_DATA_DIR", e2e_dir)
    assert data.find_data_dir(None) == e2e_dir  # the environment beats data/e2e/
    assert data.find_data_dir(str(other)) == str(other)  # --data_dir beats both


@pytest.mark.parametrize("line, what", [
    ("name : X the reference without separator \n", "exactly one '||'"),
    ("name : X||one||two \n", "exactly one '||'"),
    ("name : X|| \n", "empty reference"),
    ("||A reference . \n", "empty meaning representation"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, what):
    p = tmp_path / "train.txt"
    p.write_text("name : A||A is fine . \nname : B||B is fine . \n" + line, encoding="utf-8")
    with pytest.raises(data.DataError) as e:
        data.read_e2e(str(p))
    assert f"{p}:3:" in str(e.value) and what in str(e.value)


def test_not_utf8_and_empty_file(tmp_path):
    p = tmp_path / "train.txt"
    p.write_bytes(b"name : \xff||x \n")
    with pytest.raises(data.DataError, match="not UTF-8"):
        data.read_e2e(str(p))
    p.write_text("\n")
    with pytest.raises(data.DataError, match="no examples"):
        data.read_e2e(str(p))


def test_gpt2_token_ids():
    enc = get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]


def test_tokenizer_equals_transformers_gpt2(e2e_dir, tmp_path):
    """tiktoken and transformers' GPT2Tokenizer, built from the same vocab files, give the same ids."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from e2e_nlg.tokenizer import _bpe_files

    vocab_bpe, encoder_json = _bpe_files()
    shutil.copy(encoder_json, tmp_path / "vocab.json")  # the names from_pretrained looks for
    shutil.copy(vocab_bpe, tmp_path / "merges.txt")
    hf = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == 50257
    enc = get_tokenizer()
    texts = [data.format_prompt(mr) + data.format_completion(r) for mr, r in data.read_e2e(os.path.join(e2e_dir, "train.txt"))]
    texts += ["Café £ 20-25 isn 't family - friendly .", "  two  spaces\tand a tab"]
    for t in texts:
        assert enc.encode_ordinary(t) == hf.encode(t), t


def test_loss_mask_exactly_on_prompt_and_padding(e2e_dir):
    split = data.load_tokenized("train", e2e_dir)
    enc = get_tokenizer()
    mr, ref = data.read_e2e(os.path.join(e2e_dir, "train.txt"))[0]
    tokens, plen = split.example(0)
    assert plen == len(enc.encode_ordinary(data.format_prompt(mr)))
    assert tokens[plen:] == enc.encode_ordinary(data.format_completion(ref)) + [EOT_ID]
    assert enc.decode(tokens[:plen]) == mr + " ||"

    batch = data.collate([data.make_example(*split.example(i)) for i in range(3)])
    ids, labels = batch["input_ids"], batch["labels"]
    for i in range(3):
        toks, p = split.example(i)
        n = len(toks)
        assert ids[i, :n].tolist() == toks
        assert (labels[i, :p] == -100).all()  # prompt: no loss
        assert labels[i, p:n].tolist() == toks[p:]  # reference and the closing end-of-text: loss
        assert labels[i, n - 1] == EOT_ID
        assert (labels[i, n:] == -100).all() and (ids[i, n:] == EOT_ID).all()  # padding: no loss
    assert ids.shape[1] == max(len(split.example(i)[0]) for i in range(3))  # padded to the longest only


def test_truncation_keeps_alignment():
    ids, labels = data.make_example(list(range(10)), 4, max_len=6)
    assert ids == [0, 1, 2, 3, 4, 5] and labels == [-100] * 4 + [4, 5]


def test_padding_does_not_change_the_loss(e2e_dir):
    """Right padding needs no mask: each example's loss alone equals its share of the padded batch's loss."""
    from e2e_nlg.model import GPTConfig, build_model

    split = data.load_tokenized("train", e2e_dir)
    model = build_model(GPTConfig(hidden_dim=32, num_layers=1, num_heads=2, lora_dim=4), 0).eval()
    exs = [data.make_example(*split.example(i)) for i in (0, 2)]
    with torch.no_grad():
        b = data.collate(exs)
        batched = model(b["input_ids"], labels=b["labels"]).loss
        tot, n = 0.0, 0
        for ex in exs:
            bi = data.collate([ex])
            k = data.target_count(bi["labels"])
            tot += model(bi["input_ids"], labels=bi["labels"]).loss * k
            n += k
    assert torch.allclose(batched, tot / n, atol=1e-5)


def test_cache_is_used_and_keyed_by_file_hash(e2e_dir, monkeypatch):
    first = data.load_tokenized("valid", e2e_dir)
    cached = os.listdir(data.cache_dir())
    assert any(first.sha256[:32] in f for f in cached)

    def boom(pairs, delex=(), tokenizer=None):
        raise AssertionError("re-tokenised although cached")

    monkeypatch.setattr(data, "tokenize_pairs", boom)
    again = data.load_tokenized("valid", e2e_dir)
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.offsets, first.offsets)
    with pytest.raises(AssertionError, match="re-tokenised"):  # another prompt format: its own cache entry
        data.load_tokenized("valid", e2e_dir, delex=data.DELEX_SLOTS)
    with open(os.path.join(e2e_dir, "valid.txt"), "a") as f:  # a changed file must not hit the old entry
        f.write("name : New||A new line . \n")
    with pytest.raises(AssertionError, match="re-tokenised"):
        data.load_tokenized("valid", e2e_dir)


def test_load_references_groups_by_mr_in_order(e2e_dir):
    refs = data.load_references("train", e2e_dir)
    from conftest import MRS, REFS

    assert [mr for mr, _ in refs] == MRS
    # 48 lines cycle through the 7 (MR, ref) pairs: every reference of an MR appears, repeated, in file order.
    assert refs[0][1][:2] == REFS[0]


def test_batches_shuffle_shard_and_drop_ragged(e2e_dir):
    split = data.load_tokenized("train", e2e_dir)
    idx = list(range(10))
    eval_batches = list(data.iterate_batches(split, idx, 4, None, shuffle=False))
    assert [b["input_ids"].shape[0] for b in eval_batches] == [4, 4, 2]  # evaluation keeps every example
    train_batches = list(data.iterate_batches(split, idx, 4, None, shuffle=True, seed=1))
    assert len(train_batches) == 2 == data.num_batches(10, 4, shuffle=True)
    r0 = list(data.iterate_batches(split, list(range(16)), 2, None, True, seed=3, rank=0, world_size=2))
    r1 = list(data.iterate_batches(split, list(range(16)), 2, None, True, seed=3, rank=1, world_size=2))
    full = list(data.iterate_batches(split, list(range(16)), 2, None, True, seed=3))
    assert len(r0) == len(r1) == 4
    assert all(torch.equal(a["input_ids"], full[2 * i]["input_ids"]) for i, a in enumerate(r0))


def test_real_data_counts(real_e2e_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORALIB_NLG_CACHE", str(tmp_path / "cache"))
    assert len(data.read_e2e(os.path.join(real_e2e_dir, "train.txt"))) == 42061
    assert len(data.load_references("valid", real_e2e_dir)) == 547
    test = data.load_references("test", real_e2e_dir)
    assert len(test) == 630
    assert test[0][0] == "name : Blue Spice | Type : coffee shop | area : city centre"
    assert test[0][1][0] == "A coffee shop in the city centre area called Blue Spice ."


def test_mr_fields_is_the_one_reading_of_an_mr():
    """Fields stripped, a field without ':' has no value; delexicalize, slots.parse_mr and check_mr agree with it."""
    from e2e_nlg import slots
    from e2e_nlg.inference import MRError, check_mr

    assert data.mr_fields(" name : The Eagle |Type: pub | near:  A:B ") == [
        ("name : The Eagle", "name", "The Eagle"), ("Type: pub", "Type", "pub"), ("near:  A:B", "near", "A:B")]
    assert data.mr_fields("name : X | oops") == [("name : X", "name", "X"), ("oops", "oops", None)]
    assert slots.parse_mr("name : X | food :  Thai ") == {"name": "X", "food": "Thai"}
    with pytest.raises(ValueError, match="MR field 'oops' is not 'key : value'"):
        slots.parse_mr("name : X | oops")
    with pytest.raises(MRError, match="malformed field 'food :'"):
        check_mr("name : X | food :")
    # a malformed field is kept as written by delexicalize (no value to replace)
    assert data.delexicalize("name : X | oops | near : Y")[0] == "name : [name] | oops | near : [near]"


def test_target_count_and_median():
    from e2e_nlg import measure

    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    assert data.target_count(labels) == 3  # position 0 predicts nothing; -100 is skipped
    assert measure.median([3.0, None, 1.0, 2.0]) == 2.0 and measure.median([None]) is None
