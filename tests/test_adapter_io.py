"""save_adapter / load_adapter, and loralib's own safetensors reader/writer."""
import json
import os

import pytest
import torch
import torch.nn as nn

import loralib as lora
from loralib import safetensors_format as sf
from inject_helpers import clone, conv_net, ids, randomize_lora, tiny_gpt2, tokens

safetensors_torch = pytest.importorskip("safetensors.torch")


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "f16": torch.randn(5, 1, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(7),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([[250]], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }


def test_our_safetensors_files_read_by_the_safetensors_package(tmp_path):
    t = sample_tensors()
    sf.save_file(t, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    back = safetensors_torch.load_file(str(tmp_path / "a.safetensors"))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    # byte-identical to the reference writer's output
    ref = safetensors_torch.save({k: v.contiguous() for k, v in t.items()}, metadata={"format": "pt"})
    assert sf.save_bytes(t, metadata={"format": "pt"}) == ref


def test_safetensors_package_files_read_by_us(tmp_path):
    t = {k: v.contiguous() for k, v in sample_tensors().items()}
    safetensors_torch.save_file(t, str(tmp_path / "b.safetensors"), metadata={"note": "x"})
    back = sf.load_file(str(tmp_path / "b.safetensors"))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    assert sf.load_metadata(str(tmp_path / "b.safetensors")) == {"note": "x"}


@pytest.mark.parametrize("damage, msg", [
    (lambda b: b[:5], "too short"),
    (lambda b: b[:-3], "truncated or corrupted"),
    (lambda b: b[:8] + b"X" + b[9:], "not valid JSON"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "does not fit"),
    (lambda b: b.replace(b'"F32"', b'"F99"'), "unsupported dtype"),
])
def test_damaged_safetensors_are_refused(damage, msg):
    good = sf.save_bytes({"x": torch.ones(4)})
    with pytest.raises(sf.SafetensorsError, match=msg):
        sf.load_bytes(damage(good))


def adapted_gpt2(seed=0, **kw):
    base = tiny_gpt2(seed)
    model = clone(base)
    lora.inject(model, ["c_attn", "c_fc", "wte"], r=4, lora_alpha=8, lora_dropout=0.1, **kw)
    randomize_lora(model, seed=seed + 3)
    return base, model.eval()


def test_config_describes_the_adapter(tmp_path):
    base, model = adapted_gpt2(rank_pattern={"c_fc": 2}, use_rslora=True)
    config = lora.save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == config
    assert config["format"] == "loralib-adapter" and config["library_version"] == lora.__version__
    assert config["target_modules"] == ["transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                                        "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    fc = config["layers"]["transformer.h.0.mlp.c_fc"]
    assert (fc["r"], fc["lora_alpha"], fc["lora_dropout"], fc["use_rslora"], fc["fan_in_fan_out"]) == (
        2, 8, 0.1, True, True)
    assert fc["scaling"] == pytest.approx(8 / 2 ** 0.5) and fc["base_type"] == "Conv1D"
    assert config["layers"]["transformer.wte"]["type"] == "Embedding"
    fp = config["base_fingerprint"]
    assert fp == lora.serialization.base_shapes_fingerprint(base)  # names and shapes as in the un-injected model
    assert fp["shapes"]["transformer.h.0.attn.c_attn.weight"] == [16, 48]
    # the weights file alone is a 0.1.2-style LoRA state dict
    sd = sf.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(sd) == {k for k in model.state_dict() if "lora_" in k}


@pytest.mark.parametrize("onto", ["plain", "injected", "injected-merged"])
def test_round_trip(tmp_path, onto):
    base, model = adapted_gpt2()
    x = ids()
    want = model(x).logits
    lora.save_adapter(model, str(tmp_path))
    target = clone(base)
    if onto != "plain":
        lora.inject(target, ["c_attn", "c_fc", "wte"], r=4, lora_alpha=8, lora_dropout=0.1)
        target.train(onto == "injected")
    lora.load_adapter(target, str(tmp_path))
    target.eval()
    torch.testing.assert_close(target(x).logits, want, rtol=1e-5, atol=1e-5)


def test_round_trip_conv_net_and_named_adapter(tmp_path):
    base = conv_net()
    model = clone(base)
    lora.inject(model, ["emb", "c1", "c2", "c3", "head"], r=2, lora_alpha=4)
    lora.add_adapter(model, "second", r=3, lora_alpha=3)
    randomize_lora(model)
    x = tokens()
    want_default = model(x)
    lora.set_adapter(model, "second")
    want_second = model(x)
    lora.save_adapter(model, str(tmp_path / "d"))
    lora.save_adapter(model, str(tmp_path / "s"), adapter="second")
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["base_fingerprint"]["shapes"]["c2.weight"] == [8, 6, 3, 2]  # ConvLoRA's conv.weight, un-nested
    target = clone(base)
    lora.load_adapter(target, str(tmp_path / "d"))
    lora.load_adapter(target, str(tmp_path / "s"), adapter="second")
    target.eval()
    torch.testing.assert_close(target(x), want_default, rtol=1e-5, atol=1e-6)
    lora.set_adapter(target, "second")
    torch.testing.assert_close(target(x), want_second, rtol=1e-5, atol=1e-6)
    # an existing named adapter must have the saved ranks; into a plain model, a named one is refused
    with pytest.raises(lora.AdapterError, match="'c1' has r=3 here but 2"):
        lora.load_adapter(target, str(tmp_path / "d"), adapter="second")
    with pytest.raises(lora.AdapterError, match="load the first adapter as 'default'"):
        lora.load_adapter(clone(base), str(tmp_path / "s"), adapter="second")


def test_mismatches_are_named(tmp_path):
    _, model = adapted_gpt2()
    d = str(tmp_path)
    lora.save_adapter(model, d)
    with pytest.raises(lora.AdapterError, match=r"'lm_head.weight' is \(64, 32\) here but was \(64, 16\)"):
        lora.load_adapter(tiny_gpt2(n_embd=32), d)
    with pytest.raises(lora.AdapterError, match="'transformer.h.2.attn.c_attn.bias'.*which the adapter's base did not"):
        lora.load_adapter(tiny_gpt2(n_layer=3), d)
    other_rank = tiny_gpt2()
    lora.inject(other_rank, ["c_attn", "c_fc", "wte"], r=2, lora_alpha=4, lora_dropout=0.1)
    with pytest.raises(lora.AdapterError, match="'transformer.h.0.attn.c_attn' has r=2 here but 4"):
        lora.load_adapter(other_rank, d)
    other_alpha = tiny_gpt2()
    lora.inject(other_alpha, ["c_attn", "c_fc", "wte"], r=4, lora_alpha=16, lora_dropout=0.1)
    with pytest.raises(lora.AdapterError, match="has lora_alpha=16 here but 8"):
        lora.load_adapter(other_alpha, d)
    fewer = tiny_gpt2()
    lora.inject(fewer, ["c_attn", "wte"], r=4, lora_alpha=8, lora_dropout=0.1)
    with pytest.raises(lora.AdapterError, match="adapts 'transformer.h.0.mlp.c_fc', which is not a LoRA layer"):
        lora.load_adapter(fewer, d)
    more = tiny_gpt2()
    lora.inject(more, ["c_attn", "c_fc", "c_proj", "wte"], r=4, lora_alpha=8, lora_dropout=0.1)
    with pytest.raises(lora.AdapterError, match="LoRA layer 'transformer.h.0.attn.c_proj', which the adapter"):
        lora.load_adapter(more, d)


@pytest.mark.parametrize("damage, msg", [
    (lambda d: os.remove(os.path.join(d, "adapter_config.json")), "adapter_config.json is missing"),
    (lambda d: os.remove(os.path.join(d, "adapter_model.safetensors")), "no weights"),
    (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write("{oops"), "not valid JSON"),
    (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write('{"format": "x"}'), "neither a loralib"),
    (lambda d: _edit_config(d, format_version=99), "format_version 99.*upgrade loralib"),
    (lambda d: _edit_config(d, weights_sha256="0" * 64), "SHA-256 differs"),
    (lambda d: _edit_config(d, weights_sha256=None), "truncated or corrupted"),  # then truncated weights below
])
def test_broken_directories_are_refused_and_model_unchanged(tmp_path, damage, msg):
    base, model = adapted_gpt2()
    d = str(tmp_path)
    lora.save_adapter(model, d)
    damage(d)
    if "truncated" in msg:
        path = os.path.join(d, "adapter_model.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-10])
    target = clone(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(lora.AdapterError, match=msg):
        lora.load_adapter(target, d)
    assert not any(isinstance(m, lora.LoRALayer) for m in target.modules())
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_missing_directory():
    with pytest.raises(lora.AdapterError, match="does not exist"):
        lora.load_adapter(tiny_gpt2(), "/nonexistent/adapter")


def _edit_config(d, **changes):
    path = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


def _to_pickle(d, name="adapter_model.bin"):
    """Replace the safetensors file by a torch.save pickle of the same tensors."""
    sd = sf.load_file(os.path.join(d, "adapter_model.safetensors"))
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    _edit_config(d, weights_sha256=None, weights_file=None)  # as configs written before they named the file
    torch.save(sd, os.path.join(d, name))


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_weights_load_with_weights_only(tmp_path, name):
    base, model = adapted_gpt2()
    x = ids()
    lora.save_adapter(model, str(tmp_path))
    _to_pickle(str(tmp_path), name)
    target = clone(base)
    lora.load_adapter(target, str(tmp_path))
    target.eval()
    torch.testing.assert_close(target(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


class _Evil:
    """Unpickling this calls os.system: a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    base, model = adapted_gpt2()
    d = tmp_path / "adapter"
    lora.save_adapter(model, str(d))
    _to_pickle(str(d))
    marker = tmp_path / "pwned"
    sd = torch.load(d / "adapter_model.bin", weights_only=True)
    sd["transformer.wte.lora_A"] = _Evil(marker)
    torch.save(sd, d / "adapter_model.bin")
    target = clone(base)
    with pytest.raises(lora.AdapterError, match="cannot load .*adapter_model.bin"):
        lora.load_adapter(target, str(d))
    assert not marker.exists()
    assert not any(isinstance(m, lora.LoRALayer) for m in target.modules())
    torch.load(d / "adapter_model.bin", weights_only=False)  # proof that the payload works when trusted
    assert marker.exists()


def test_non_tensor_pickle_is_refused(tmp_path):
    _, model = adapted_gpt2()
    lora.save_adapter(model, str(tmp_path))
    _to_pickle(str(tmp_path))
    torch.save([1, 2, 3], tmp_path / "adapter_model.bin")
    with pytest.raises(lora.AdapterError, match="does not hold a dict of tensors"):
        lora.load_adapter(tiny_gpt2(), str(tmp_path))


def test_writes_are_atomic(tmp_path, monkeypatch):
    _, model = adapted_gpt2()
    d = tmp_path / "a"
    lora.save_adapter(model, str(d))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    _, other = adapted_gpt2(seed=1)
    real_replace = os.replace
    calls = []

    def crash_on_config(src, dst):
        calls.append(dst)
        if str(dst).endswith("adapter_config.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(other, str(d))
    monkeypatch.undo()
    assert [os.path.basename(c) for c in calls] == [".adapter_model.safetensors.prev", "adapter_model.safetensors",
                                                     "adapter_config.json"]
    # no temporary file left behind; the old weights are kept aside until a config names the new ones
    assert sorted(p.name for p in d.iterdir()) == sorted([*before, ".adapter_model.safetensors.prev"])
    assert (d / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    assert (d / ".adapter_model.safetensors.prev").read_bytes() == before["adapter_model.safetensors"]
    # weights replaced, config not: the recorded SHA-256 catches the inconsistent pair, and the old adapter loads
    target = tiny_gpt2()
    lora.load_adapter(target, str(d))
    want = lora.lora_state_dict(model)
    assert all(torch.equal(v, want[k]) for k, v in lora.lora_state_dict(target).items())
    lora.save_adapter(other, str(d))  # the next save completes and removes the kept copy
    assert sorted(p.name for p in d.iterdir()) == sorted(before)


def test_save_errors(tmp_path):
    with pytest.raises(lora.AdapterError, match="no LoRA layer"):
        lora.save_adapter(nn.Linear(2, 2), str(tmp_path))
    _, model = adapted_gpt2()
    with pytest.raises(lora.AdapterError, match="no adapter 'x'"):
        lora.save_adapter(model, str(tmp_path), adapter="x")
    with pytest.raises(ValueError, match="format must be"):
        lora.save_adapter(model, str(tmp_path), format="onnx")
    assert not os.listdir(tmp_path)


def test_loading_into_a_model_built_otherwise_is_refused(tmp_path):
    model = nn.Sequential(lora.MergedLinear(4, 6, r=2, enable_lora=[True, False]))
    lora.save_adapter(model, str(tmp_path))
    with pytest.raises(lora.AdapterError, match="saved from a MergedLinear"):
        lora.load_adapter(nn.Sequential(nn.Linear(4, 6)), str(tmp_path))


def test_extra_information_round_trips(tmp_path):
    _, model = adapted_gpt2()
    info = {"model": "tiny-gpt2", "train": {"lr": 2e-4, "steps": 10}}
    lora.save_adapter(model, str(tmp_path), extra=info)
    assert lora.load_adapter(tiny_gpt2(), str(tmp_path))["extra"] == info
    with pytest.raises(ValueError, match="JSON-serialisable"):
        lora.save_adapter(model, str(tmp_path / "x"), extra={"t": torch.ones(1)})
    with pytest.raises(ValueError, match="only with format='loralib'"):
        lora.save_adapter(model, str(tmp_path / "y"), format="peft", extra=info)


def test_wrong_tensor_shape_is_named_and_the_injection_undone(tmp_path):
    base, model = adapted_gpt2()
    lora.save_adapter(model, str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    sd = sf.load_file(path)
    sd["transformer.h.1.mlp.c_fc.lora_B"] = torch.zeros(64, 5)
    sf.save_file(sd, path)
    _edit_config(str(tmp_path), weights_sha256=None)
    target = clone(base)
    with pytest.raises(lora.AdapterError, match=r"transformer.h.1.mlp.c_fc.lora_B in .* has shape \(64, 5\), "
                                                r"the model expects \(64, 4\)"):
        lora.load_adapter(target, str(tmp_path))
    assert not any(isinstance(m, lora.LoRALayer) for m in target.modules())
    assert type(target.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"
    x = ids()
    torch.testing.assert_close(target(x).logits, base(x).logits, rtol=0, atol=0)


def test_library_needs_only_torch(tmp_path):
    """Inject, save and load with transformers, peft, safetensors and numpy made unimportable."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys\n"
            "for m in ('transformers', 'peft', 'safetensors', 'numpy'): sys.modules[m] = None\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "import torch, torch.nn as nn, loralib as lora\n"
            "torch.manual_seed(0); m = nn.Sequential(nn.Linear(3, 4)); base = nn.Sequential(nn.Linear(3, 4))\n"
            "base.load_state_dict(m.state_dict()); lora.inject(m, ['0'], r=2)\n"
            "nn.init.normal_(m[0].lora_B); lora.save_adapter(m, sys.argv[1]); lora.load_adapter(base, sys.argv[1])\n"
            "x = torch.randn(2, 3); assert torch.allclose(base(x), m(x)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --- weights_format="bin", atomic_write, safe_load, read_adapter_config, the base fingerprints ---------------------

def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bin_weights_are_microsofts_layout_and_load_back(tmp_path):
    """weights_format="bin": pytorch_model.bin holds the same tensors as the safetensors file, loads with
    torch.load(weights_only=True) + load_state_dict(strict=False) as 0.1.2 users do, and through load_adapter;
    the config names it and its SHA-256."""
    import hashlib

    base, model = adapted_gpt2()
    st, bn = tmp_path / "st", tmp_path / "bin"
    lora.save_adapter(model, str(st))
    config = lora.save_adapter(model, str(bn), weights_format="bin")
    assert sorted(os.listdir(bn)) == ["adapter_config.json", "pytorch_model.bin"]
    data = (bn / "pytorch_model.bin").read_bytes()
    assert config["weights_file"] == "pytorch_model.bin"
    assert config["weights_sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((st / "adapter_config.json").read_text())["weights_file"] == "adapter_model.safetensors"
    sd = torch.load(bn / "pytorch_model.bin", weights_only=True)
    assert _same(sd, sf.load_file(str(st / "adapter_model.safetensors")))
    assert _same(sd, {k: v.detach() for k, v in lora.lora_state_dict(model).items()})
    plain = clone(model)
    randomize_lora(plain, seed=99)
    res = plain.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys and _same(lora.lora_state_dict(plain), sd)
    target = clone(base)
    lora.load_adapter(target, str(bn))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x).logits, model(x).logits)
    (bn / "pytorch_model.bin").write_bytes(data[:-7])  # not the file the config names
    with pytest.raises(lora.AdapterError, match="pytorch_model.bin.*SHA-256 differs"):
        lora.load_adapter(clone(base), str(bn))
    with pytest.raises(ValueError, match="weights_format must be one of"):
        lora.save_adapter(model, str(tmp_path / "x"), weights_format="pt")
    with pytest.raises(ValueError, match="only for format='loralib'"):
        lora.save_adapter(model, str(tmp_path / "x"), format="peft", weights_format="bin")


@pytest.mark.parametrize("first, second", [("safetensors", "bin"), ("bin", "safetensors"), ("bin", "bin")])
def test_switching_weights_format_leaves_one_file(tmp_path, first, second):
    base, model = adapted_gpt2()
    _, other = adapted_gpt2(seed=1)
    lora.save_adapter(model, str(tmp_path), weights_format=first)
    lora.save_adapter(other, str(tmp_path), weights_format=second)
    name = lora.serialization.WEIGHTS_FILES[second]
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter_config.json", name])
    target = clone(base)
    lora.load_adapter(target, str(tmp_path))
    assert _same(lora.lora_state_dict(target), lora.lora_state_dict(other))


def test_bin_save_killed_before_its_config_keeps_the_old_pair(tmp_path, monkeypatch):
    base, model = adapted_gpt2()
    _, other = adapted_gpt2(seed=1)
    lora.save_adapter(model, str(tmp_path), weights_format="bin")
    real_replace = os.replace

    def crash_on_config(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(other, str(tmp_path), weights_format="bin")
    monkeypatch.undo()
    assert ".pytorch_model.bin.prev" in os.listdir(tmp_path)
    target = clone(base)
    lora.load_adapter(target, str(tmp_path))  # the old config, and the old weights kept aside
    assert _same(lora.lora_state_dict(target), lora.lora_state_dict(model))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_permissions_open_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        lora.serialization.atomic_write(str(tmp_path / "a.bin"), b"abc")
        lora.serialization.atomic_write(str(tmp_path / "sub" / "b.pt"), lambda f: torch.save({"x": torch.ones(2)}, f))
        with open(tmp_path / "c", "wb"):
            pass
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "c").st_mode & 0o777
    assert want == 0o666 & ~umask
    assert os.stat(tmp_path / "a.bin").st_mode & 0o777 == want
    assert os.stat(tmp_path / "sub" / "b.pt").st_mode & 0o777 == want
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert torch.equal(torch.load(tmp_path / "sub" / "b.pt", weights_only=True)["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "c", "sub"]  # no temporary file left


def test_atomic_write_failing_writer_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def dies(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        lora.serialization.atomic_write(str(path), dies)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_safe_load(tmp_path):
    import hashlib

    t = {"a": torch.arange(6.0).reshape(2, 3)}
    torch.save(t, tmp_path / "w.bin")
    sf.save_file(t, str(tmp_path / "w.safetensors"))
    assert _same(lora.serialization.safe_load(str(tmp_path / "w.bin")), t)
    assert _same(lora.serialization.safe_load(str(tmp_path / "w.safetensors")), t)
    sha = hashlib.sha256((tmp_path / "w.bin").read_bytes()).hexdigest()
    assert _same(lora.serialization.safe_load(str(tmp_path / "w.bin"), sha), t)
    # another file under the name: refused, unless the copy kept aside is the one the SHA-256 names
    os.replace(tmp_path / "w.bin", tmp_path / ".w.bin.prev")
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.bin")
    assert _same(lora.serialization.safe_load(str(tmp_path / "w.bin"), sha), t)
    os.remove(tmp_path / ".w.bin.prev")
    with pytest.raises(lora.AdapterError, match=r"w\.bin: it is not the file .*SHA-256 differs"):
        lora.serialization.safe_load(str(tmp_path / "w.bin"), sha)
    marker = tmp_path / "pwned"
    torch.save({"a": _Evil(marker)}, tmp_path / "evil.bin")
    with pytest.raises(lora.AdapterError, match=r"cannot load .*evil\.bin: .*nothing in it was run"):
        lora.serialization.safe_load(str(tmp_path / "evil.bin"))
    assert not marker.exists()
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "w.safetensors", tmp_path / "sub" / "w.safetensors")
    with pytest.raises(lora.AdapterError, match="outside the adapter directory"):
        lora.serialization.safe_load(str(tmp_path / "sub" / "w.safetensors"))
    with pytest.raises(lora.AdapterError, match="nope.bin is missing"):
        lora.serialization.safe_load(str(tmp_path / "nope.bin"))


def test_read_adapter_config(tmp_path):
    _, model = adapted_gpt2()
    saved = lora.save_adapter(model, str(tmp_path / "a"), extra={"run": 1})
    assert lora.serialization.read_adapter_config(str(tmp_path / "a")) == json.loads(json.dumps(saved))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"format": "someone-elses", "x": 1}))
    assert lora.serialization.read_adapter_config(str(tmp_path / "b"), validate=False) == {"format": "someone-elses",
                                                                                          "x": 1}
    with pytest.raises(lora.AdapterError, match="neither a loralib adapter config"):
        lora.serialization.read_adapter_config(str(tmp_path / "b"))
    _edit_config(str(tmp_path / "a"), weights_file="../b/adapter_config.json")
    with pytest.raises(lora.AdapterError, match="names weights_file '../b/adapter_config.json'"):
        lora.serialization.read_adapter_config(str(tmp_path / "a"))


def test_base_values_sha256_and_shapes_fingerprint():
    """The values hash tells two bases of the same shapes apart, the shapes fingerprint does not; neither sees
    injected LoRA layers or weights."""
    base0, base1 = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    shapes0, shapes1 = (lora.serialization.base_shapes_fingerprint(b) for b in (base0, base1))
    v0, v1 = (lora.serialization.base_values_sha256(b) for b in (base0, base1))
    assert shapes0 == shapes1 and set(shapes0) == {"sha256", "num_tensors", "shapes"}
    assert v0 != v1 and len(v0) == 64 and int(v0, 16) >= 0
    model = clone(base0).train()
    lora.inject(model, ["c_attn", "c_fc", "wte"], r=4, lora_alpha=8)
    randomize_lora(model, seed=5)
    assert lora.serialization.base_shapes_fingerprint(model) == shapes0
    assert lora.serialization.base_values_sha256(model) == v0
    with torch.no_grad():
        base0.lm_head.weight[0, 0] += 1e-3
    assert lora.serialization.base_values_sha256(base0) != v0
    assert lora.serialization.base_shapes_fingerprint(base0) == shapes0


def test_base_fingerprint_is_a_deprecated_alias():
    """The name earlier versions exported still gives what it gave (shapes, plus the values hash with
    values=True), and warns where it is called."""
    base = tiny_gpt2(seed=0)
    with pytest.warns(DeprecationWarning, match="base_shapes_fingerprint.*base_values_sha256") as rec:
        old = lora.serialization.base_fingerprint(base, values=True)
    assert rec[0].filename == __file__
    assert old == {**lora.serialization.base_shapes_fingerprint(base),
                   "values_sha256": lora.serialization.base_values_sha256(base)}
    with pytest.warns(DeprecationWarning):
        assert lora.serialization.base_fingerprint(base) == lora.serialization.base_shapes_fingerprint(base)
