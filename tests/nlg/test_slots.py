"""The slot matcher (e2e_nlg/slots.py), delexicalisation (e2e_nlg/data.py) and the guarantee that no test MR is trained on."""
import os

import pytest

from e2e_nlg import data
from e2e_nlg import slots

MR = ("name : The Eagle | Type : coffee shop | food : French | price : moderate | customer rating : 3 out of 5 | "
      "area : riverside | family friendly : yes | near : Burger King")


def test_a_faithful_text_realises_every_slot():
    text = ("The Eagle is a family friendly coffee shop near Burger King by the river . It serves French food at "
            "moderate prices and has a customer rating of 3 out of 5 .")
    r = slots.check(MR, text)
    assert r.status == {a: "ok" for a in slots.ATTRIBUTES} and r.added == [] and r.errors == 0


@pytest.mark.parametrize("text, problems", [
    # the example: another venue named, the MR's near left out
    ("The Golden Curry is a family friendly restaurant near The Eagle is located in the riverside .",
     None),
    ("The Eagle is a coffee shop .", ["missing food", "missing price", "missing customer rating", "missing area",
                                      "missing family friendly", "missing near"]),
    ("The Eagle is a cheap , 5 star French coffee shop in the city centre near Burger King . Not for kids .",
     ["wrong price", "wrong customer rating", "wrong area", "wrong family friendly"]),
    ("The Eagle is a pub serving Italian food near The Rice Boat .",
     ["wrong Type", "wrong food", "missing price", "missing customer rating", "missing area",
      "missing family friendly", "wrong near"]),
])
def test_missing_and_wrong_slots(text, problems):
    r = slots.check(MR, text)
    if problems is None:  # name and near: a venue is named, but not the MR's
        assert r.status["name"] == "ok" and r.status["near"] == "wrong" and r.status["Type"] == "wrong"
    else:
        assert sorted(r.problems()) == sorted(problems)


def test_names_inside_other_names_and_added_slots():
    mr = "name : The Vaults | food : Chinese | near : Raja Indian Cuisine"
    # "Indian" inside the near venue's name is not a cuisine; a rating and a price not in the MR are added.
    r = slots.check(mr, "The Vaults serves Chinese food near Raja Indian Cuisine . It is cheap and rated 5 out of 5 .")
    assert r.status == {"name": "ok", "food": "ok", "near": "ok"}
    assert sorted(r.added) == ["customer rating", "price"]
    # a venue not in the MR at all is a hallucinated near
    r = slots.check("name : The Vaults | food : Chinese", "The Vaults serves Chinese food near Avalon .")
    assert r.added == ["near"] and r.status["name"] == "ok"
    # a placeholder a delexicalised model left for an MR without a near value is a hallucinated near too
    r = slots.check("name : The Vaults | food : Chinese", "The Vaults serves Chinese food near [near] .")
    assert r.added == ["near"]
    # "restaurant" alone is what people call any venue: not an added Type
    assert slots.check("name : The Vaults | food : Chinese", "The Vaults is a Chinese restaurant .").errors == 0


@pytest.mark.parametrize("phrase, value", [
    ("is family - friendly", "yes"), ("welcomes children", "yes"), ("is kid friendly", "yes"),
    ("is not family - friendly", "no"), ("is n't kid friendly", "no"), ("is adults only", "no"),
    ("does not allow children", "no"), ("is non family-friendly", "no"), ("is family unfriendly", "no"),
])
def test_family_friendly_wordings(phrase, value):
    found = slots.realised(f"The Vaults {phrase} .")["family friendly"]
    assert found == {value}


@pytest.mark.parametrize("mr_value, text", [
    ("less than £ 20", "it is cheap"), ("cheap", "prices are less than £ 20"),
    ("£ 20 - 25", "it is moderately priced"),
    ("more than £ 30", "it is expensive"), ("high", "it has a high price range"),
])
def test_price_wordings_count_by_class(mr_value, text):
    assert slots.check(f"name : Zizzi | price : {mr_value}", f"Zizzi , {text} .").status["price"] == "ok"


def test_rating_and_price_high_are_told_apart():
    mr = "name : Zizzi | price : high | customer rating : low"
    r = slots.check(mr, "Zizzi has high prices and a low customer rating .")
    assert r.status == {"name": "ok", "price": "ok", "customer rating": "ok"}
    r = slots.check(mr, "Zizzi has a high customer rating and low prices .")
    assert r.status["price"] == "wrong" and r.status["customer rating"] == "wrong"


def test_slot_scores_counts():
    mrs = ["name : Zizzi | near : Avalon", "name : Cotto | food : French"]
    s = slots.slot_scores(mrs, ["Zizzi is near Avalon .", "Zizzi serves French food ."])
    assert (s["name_rate"], s["near_rate"], s["slots"], s["missing"], s["wrong"], s["added"]) == \
        (0.5, 1.0, 4, 0, 1, 1)  # "Zizzi" for Cotto: wrong name, and a venue the second MR has no near for
    assert s["slot_error_rate"] == pytest.approx(2 / 4)
    assert slots.slot_scores(["name : Zizzi"], ["Zizzi ."])["near_rate"] is None
    with pytest.raises(ValueError, match="2 MRs but 1 texts"):
        slots.slot_scores(mrs, ["x"])
    assert "name in 50% of texts" in slots.format_slot_line(s)


def test_delexicalize_round_trip():
    mr = "name : The Eagle | Type : pub | near : Café Rouge"
    dmr, dtext, values = data.delexicalize(mr, "the eagle is a pub near Cafe Rouge .")
    assert dmr == "name : [name] | Type : pub | near : [near]"
    assert dtext == "[name] is a pub near [near] ."
    assert data.relexicalize("[name] is a pub near [near] .", values) == "The Eagle is a pub near Café Rouge ."
    assert data.format_prompt(mr, data.DELEX_SLOTS) == "name : [name] | Type : pub | near : [near] ||"
    assert data.format_prompt(mr) == mr + " ||"  # no delexicalisation asked: the MR as it is
    # a placeholder the MR has no value for stays visible (never silently filled)
    assert data.relexicalize("[name] is near [near] .", {"name": "Zizzi"}) == "Zizzi is near [near] ."


def test_human_references_have_a_low_slot_error_rate(real_e2e_dir):
    """The matcher on the test set's human references: every name found, and a slot error rate of about 10%
    (people leave attributes out; README.md gives the breakdown). A matcher that missed common wordings would
    score far higher."""
    pairs = data.read_e2e(data.split_path("test", real_e2e_dir))
    s = slots.slot_scores([m for m, _ in pairs], [t for _, t in pairs])
    assert s["name_rate"] == 1.0 and s["near_rate"] > 0.99
    assert s["slot_error_rate"] < 0.11 and s["wrong"] + s["added"] < 0.02 * s["slots"]


def test_no_test_mr_is_ever_trained_on(real_e2e_dir, tmp_path, monkeypatch):
    """run_training reads train.txt and valid.txt only, and no MR of test.txt occurs in train.txt."""
    import run_training
    from conftest import TINY_MODEL

    read = []
    real_read = data.read_e2e
    monkeypatch.setattr(data, "read_e2e", lambda path: read.append(path) or real_read(path))
    monkeypatch.setenv("LORALIB_NLG_CACHE", str(tmp_path / "cache"))
    argv = ["--data_dir", real_e2e_dir, "--output_dir", str(tmp_path / "out"), *TINY_MODEL, "--max_steps", "1",
            "--max_train_examples", "8", "--val_examples", "4", "--no_progress", "--precision", "fp32"]
    assert run_training.main(argv) == 0
    assert sorted(os.path.basename(p) for p in read) == ["train.txt", "valid.txt"]
    train_mrs = {mr for mr, _ in real_read(data.split_path("train", real_e2e_dir))}
    test_mrs = {mr for mr, _ in real_read(data.split_path("test", real_e2e_dir))}
    assert len(test_mrs) == 630 and not train_mrs & test_mrs
