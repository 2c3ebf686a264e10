"""Fixtures for the NLG example's tests: tiny E2E files written by the tests, and a tiny-model argument list."""
import os
import sys

import pytest

NLG = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "NLG"))
if NLG not in sys.path:
    sys.path.insert(0, NLG)

MRS = [
    "name : The Eagle | Type : coffee shop | food : French | area : riverside",
    "name : Blue Spice | Type : pub | price : cheap | near : Café Brazil",
    "name : Alimentum | area : city centre | family friendly : no",
    "name : The Vaults | food : Italian | customer rating : 5 out of 5",
]
REFS = [
    ["The Eagle is a French coffee shop by the riverside .", "By the riverside , The Eagle serves French food ."],
    ["Blue Spice is a cheap pub near Café Brazil .", "Near Café Brazil there is a cheap pub , Blue Spice ."],
    ["Alimentum is in the city centre and is not family - friendly ."],
    ["The Vaults serves Italian food and is rated 5 out of 5 .", "Rated 5 out of 5 , The Vaults is Italian ."],
]


def write_e2e(d, n_train=48, n_valid=12, n_test=8):
    """Write train/valid/test.txt in the E2E format (MR||reference, one space before the newline)."""
    os.makedirs(d, exist_ok=True)
    pairs = [(mr, ref) for mr, refs in zip(MRS, REFS) for ref in refs]
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        with open(os.path.join(d, f"{split}.txt"), "w", encoding="utf-8") as f:
            for i in range(n):
                mr, ref = pairs[i % len(pairs)]
                f.write(f"{mr}||{ref} \n")
    return str(d)


@pytest.fixture
def e2e_dir(tmp_path, monkeypatch):
    """A tiny E2E directory; the token cache goes to a temporary directory too."""
    monkeypatch.setenv("LORALIB_NLG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("E2E_DATA_DIR", raising=False)
    return write_e2e(tmp_path / "e2e")


@pytest.fixture
def real_e2e_dir():
    d = os.environ.get("E2E_DATA_DIR")
    if not d or not os.path.isfile(os.path.join(d, "train.txt")):
        pytest.skip("E2E_DATA_DIR not set or without train.txt: real-data tests skipped")
    return d


TINY_MODEL = ["--hidden_dim", "32", "--num_layers", "1", "--num_heads", "2", "--lora_dim", "4", "--lora_alpha", "8"]


def tiny_args(data_dir, out_dir, *extra):
    # fp32 pinned: "auto" would pick bf16 on some CPUs only, and these tests must behave the same on every CPU.
    return ["--data_dir", data_dir, "--output_dir", str(out_dir), *TINY_MODEL, "--batch_size", "4",
            "--max_train_examples", "16", "--val_examples", "8", "--num_epochs", "1", "--lr", "1e-2",
            "--warmup_steps", "1", "--no_progress", "--device", "cpu", "--precision", "fp32", *extra]
