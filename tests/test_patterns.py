r"""The one name-matching rule (loralib/patterns.py), for target_modules, exclude_modules, rank / alpha patterns
and PEFT configs alike."""
import json

import pytest
import torch
import torch.nn as nn

import loralib as lora
from loralib.patterns import matches, pattern_value

NAME = "transformer.h.1.attn.c_attn"


@pytest.mark.parametrize("pattern, suffix_regex, expected", [
    (["c_attn"], False, True),  # a dotted suffix
    (["attn.c_attn"], False, True),
    ([NAME], False, True),
    (["_attn"], False, False),  # a suffix, but not at a dot
    (["h\\.1\\.attn\\.c_attn"], False, False),  # list entries are names, never expressions
    ("c_attn", False, True),
    (r".*h\.1\..*", False, True),  # an expression over the whole name
    (r"h\.1\.attn\.c_attn", False, False),  # ... not over a suffix, for target_modules
    (r"h\.1\.attn\.c_attn", True, True),  # ... but for pattern keys (PEFT's rule)
    (r"h\.[0-9]\.attn\.c_(attn|proj)", True, True),
    (r"\.c_attn", True, False),  # the suffix starts after a dot
    (r"attn\.c", True, False),  # and runs to the end
    ("(", False, False),  # not an expression: matched literally only
    ("(", True, False),
])
def test_matches(pattern, suffix_regex, expected):
    assert matches(NAME, pattern, suffix_regex=suffix_regex) is expected


def test_pattern_value_takes_the_first_matching_key():
    patterns = {"c_fc": 2, r"h\.1\..*": 8, "c_attn": 4}
    assert pattern_value(patterns, NAME, 1) == 8
    assert pattern_value(patterns, "transformer.h.0.attn.c_attn", 1) == 4
    assert pattern_value(patterns, "transformer.h.0.mlp.c_proj", 1) == 1
    assert pattern_value(None, NAME, 3) == 3


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(2))


def test_inject_and_load_adapter_read_rank_and_alpha_patterns_alike(tmp_path):
    """A PEFT-style key that matches a dotted suffix sets that layer's rank in inject and its alpha when a PEFT
    directory loads: one rule for both."""
    torch.manual_seed(0)
    m = Blocks()
    lora.inject(m, ["q", "v"], r=2, lora_alpha=4, rank_pattern={r"1\.q": 3})
    assert {n: layer.r for n, layer in lora.layers.lora_layers(m)} == {"h.0.q": 2, "h.0.v": 2, "h.1.q": 3, "h.1.v": 2}

    lora.save_adapter(m, str(tmp_path), format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["alpha_pattern"] = {r"1\.q": 6}  # as PEFT writes a pattern: a suffix expression
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    fresh = Blocks()
    lora.load_adapter(fresh, str(tmp_path))
    scalings = {n: layer.scaling for n, layer in lora.layers.lora_layers(fresh)}
    assert scalings == {"h.0.q": 4 / 2, "h.0.v": 4 / 2, "h.1.q": 6 / 3, "h.1.v": 4 / 2}
