"""The NLG example's adapter directory: what the previous release wrote (fixtures made by its own code, see
fixtures/make_previous_release_adapters.py) still loads, its recorded base fingerprint is still verified, and a new
save over such a directory turns it into a loralib adapter directory."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

import loralib as lora
from e2e_nlg import adapter_io
from e2e_nlg.model import SimpleGPT2WithLoRA

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
_spec = importlib.util.spec_from_file_location("make_previous_release_adapters",
                                               os.path.join(FIXTURES, "make_previous_release_adapters.py"))
_maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_maker)
BASE_SEED, previous_release_model = _maker.BASE_SEED, _maker.previous_release_model  # what the fixtures hold


def _lora(model):
    return {k: v.detach() for k, v in lora.lora_state_dict(model).items()}


def _copy(fmt, tmp_path):
    d = tmp_path / fmt
    shutil.copytree(os.path.join(FIXTURES, f"previous_release_{fmt}"), d)
    return d


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_previous_release_directory_loads(fmt, tmp_path):
    d = _copy(fmt, tmp_path)
    want = previous_release_model()
    model, config = adapter_io.load_model_from_adapter_dir(str(d))  # also checks the recorded fingerprint
    got = _lora(model)
    assert sorted(got) == sorted(_lora(want)) and all(torch.equal(got[k], v) for k, v in _lora(want).items())
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, want.eval()(x).logits, rtol=0, atol=0)
    assert config["step"] == 7 and config["base"]["base_seed"] == BASE_SEED
    assert adapter_io.read_adapter_config(str(d)) == config
    assert adapter_io.weights_path(str(d)).endswith(adapter_io.WEIGHTS_FILES[fmt])

    # The fingerprint it recorded is the previous release's hash of the base weights: another base is refused.
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base"]["base_seed"] = BASE_SEED + 1
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(adapter_io.AdapterError, match="not the ones it was trained on.*--init_checkpoint"):
        adapter_io.load_model_from_adapter_dir(str(d))
    # Without the keys older releases lacked (SHA-256, precision) it loads too; a wrong SHA-256 is caught.
    cfg["base"]["base_seed"] = BASE_SEED
    for key in ("weights_sha256", "precision"):
        del cfg[key]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_io.load_model_from_adapter_dir(str(d))[1]["step"] == 7
    cfg["weights_sha256"] = "0" * 64
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(adapter_io.AdapterError, match="SHA-256 differs"):
        adapter_io.load_model_from_adapter_dir(str(d))


@pytest.mark.parametrize("old_fmt, new_fmt", [("bin", "bin"), ("safetensors", "bin"), ("bin", "safetensors")])
def test_saving_over_a_previous_release_directory(old_fmt, new_fmt, tmp_path):
    d = _copy(old_fmt, tmp_path)
    model = previous_release_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.lora_B.add_(1.0)
    config = adapter_io.save_adapter_dir(model, str(d), base_seed=BASE_SEED, weights_format=new_fmt,
                                         extra={"step": 8})
    assert config["format"] == "loralib-adapter" and config["extra"]["step"] == 8
    # one weights file, the one the config names; no copy kept aside
    assert sorted(os.listdir(d)) == sorted(["adapter_config.json", adapter_io.WEIGHTS_FILES[new_fmt]])
    fresh = SimpleGPT2WithLoRA(previous_release_model().config)
    lora.load_adapter(fresh, str(d))
    got, want = _lora(fresh), _lora(model)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    loaded, cfg = adapter_io.load_model_from_adapter_dir(str(d))
    assert cfg["step"] == 8 and all(torch.equal(_lora(loaded)[k], v) for k, v in want.items())


def test_other_loralib_adapters_are_named(tmp_path):
    """A loralib adapter without the example's extra is refused by the example's loader with the fix."""
    lora.save_adapter(previous_release_model(), str(tmp_path / "plain"))
    with pytest.raises(adapter_io.AdapterError, match="without this example's model description.*lora.load_adapter"):
        adapter_io.load_model_from_adapter_dir(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="lora_bias='all'.*use 'none'"):
        adapter_io.save_adapter_dir(previous_release_model(), str(tmp_path / "b"), base_seed=3, lora_bias="all")


def test_adapter_weights_that_do_not_fit_are_refused_by_name(tmp_path):
    """The previous-release loading path checks a state dict against the model: missing LoRA weights, unknown keys
    and wrong shapes each raise one AdapterError naming the key; a fitting state loads exactly."""
    model = previous_release_model()
    state = _lora(model)
    key = sorted(state)[0]
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(lora.AdapterError, match=f"lacks LoRA weights the model has, e.g. \\['{key}'\\]"):
        adapter_io.load_adapter_weights(model, missing)
    with pytest.raises(lora.AdapterError, match="keys the model lacks, e.g. \\['transformer.h.99.lora_A'\\]"):
        adapter_io.load_adapter_weights(model, {**state, "transformer.h.99.lora_A": state[key]})
    with pytest.raises(lora.AdapterError, match=f"{key} has shape \\(1, 1\\)"):
        adapter_io.load_adapter_weights(model, {**state, key: torch.zeros(1, 1)})
    other = {k: torch.full_like(v, 0.5) for k, v in state.items()}
    adapter_io.load_adapter_weights(model, other)
    assert all(torch.equal(v, other[k]) for k, v in _lora(model).items())
