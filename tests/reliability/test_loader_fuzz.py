"""Hostile and corrupted adapter files: every one is refused with an error naming it, or loads correctly.

Mutations (a seeded RNG, so every run fuzzes the same files): truncation at every byte of a safetensors file,
flipped header and data bytes, header lengths past the file (up to a declared 10 GiB), overlapping, out-of-range
and gapped offsets, wrong dtypes, shapes whose product overflows 64 bits, duplicate names, non-UTF-8 / non-object /
deeply nested JSON, corrupted configs (ranks of 10^12, NaN, wrong types, a weights file that is absolute or escapes
the directory), links to ``/etc/passwd`` and to a valid adapter outside the directory, NaN / Inf weights, pickles
that are truncated or would run code. The loaders are loralib's safetensors reader, ``lora.load_adapter`` and the
NLG example's ``load_model_from_adapter_dir`` (what ``run_inference.py`` calls).

For each load: only ``ValueError`` (``AdapterError`` / ``SafetensorsError`` are ValueErrors) naming the file or
directory, or a load whose tensors equal what the reference ``safetensors`` package / ``torch.load`` decode; a
watchdog kills the process if one load hangs; an audit hook sees every file opened, and none outside the
adapter's directory may be; the peak resident memory over the whole fuzz is measured (a declared 10 GiB must not
be allocated).
"""
import copy
import faulthandler
import json
import os
import pickle
import random
import shutil
import signal
import struct
import sys

import pytest
import torch
import torch.nn as nn

import loralib as lora
from loralib import safetensors_format as sf

NLG = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "NLG"))
if NLG not in sys.path:
    sys.path.insert(0, NLG)

from e2e_nlg import adapter_io  # noqa: E402
from e2e_nlg.measure import PeakRSS  # noqa: E402
from e2e_nlg.model import GPTConfig, build_model  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")

SEED = 20240614
HANG_S = 20  # a load taking longer than this is a hang: the watchdog kills the process (the test fails)
PEAK_LIMIT = 1 << 30  # far below the 10 GiB a header declares; these files are KiB-sized

# --- every file opened while a load runs ----------------------------------------------------------------------
_OPENED = {"on": False, "paths": []}


def _audit(event, args):
    if event == "open" and _OPENED["on"] and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED["paths"].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed; it records only while a fuzzed load runs
_CODE = (".py", ".pyc", ".so", ".pth")  # lazy imports inside torch / json are not adapter files


class _Hang(BaseException):
    """Raised by the watchdog; a BaseException, so no loader's ``except Exception`` can swallow it."""


def guarded_load(fn, allowed_dir, name):
    """Run ``fn()``; return ("ok", result) or ("refused", message). Any exception but ValueError, a hang, or a
    file opened outside ``allowed_dir`` fails the test."""
    root = os.path.realpath(allowed_dir)
    _OPENED["paths"].clear()
    _OPENED["on"] = True

    def hang(signum, frame):
        raise _Hang(f"{name}: the load did not finish within {HANG_S} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(HANG_S)  # a hang in Python code: an exception, the test fails naming the case
    faulthandler.dump_traceback_later(3 * HANG_S, exit=True)  # a hang in C code: the process dies
    try:
        return "ok", fn()
    except ValueError as e:
        return "refused", str(e)
    except Exception as e:  # noqa: BLE001 - the point: nothing but ValueError may come out
        pytest.fail(f"{name}: {type(e).__name__} escaped the loader: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
        _OPENED["on"] = False
        outside = [p for p in _OPENED["paths"] if not p.endswith(_CODE)
                   and os.path.commonpath([root, os.path.realpath(p)]) != root]
        assert not outside, f"{name}: read files outside the adapter directory: {outside}"


# --- mutations of a safetensors file -----------------------------------------------------------------------------

def _raw(header_obj_or_text, data=b"", n=None):
    text = header_obj_or_text if isinstance(header_obj_or_text, (bytes, str)) else json.dumps(header_obj_or_text)
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def safetensors_mutations(good: bytes, rng: random.Random):
    """(label, bytes) pairs: every truncation, random flips, and hand-made hostile headers."""
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    data = good[8 + n:]
    name0 = sorted(k for k in header if k != "__metadata__")[0]
    ent = header[name0]
    out = [(f"truncated at {i}", good[:i]) for i in range(len(good))]
    for i in range(150):
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(0, 8 + n)] = rng.randrange(256)
        out.append((f"header flip {i}", bytes(b)))
    for i in range(60):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8 + n, len(good))] = rng.randrange(256)
        out.append((f"data flip {i}", bytes(b)))

    def edit(**changes):
        h = copy.deepcopy(header)
        h[name0] = {**ent, **changes}
        return h

    b, e = ent["data_offsets"]
    hostile = {
        "header length past the file": struct.pack("<Q", len(good)) + good[8:],
        "header length 10 GiB": struct.pack("<Q", 10 << 30) + good[8:],
        "header length 2^64-1": struct.pack("<Q", 2**64 - 1) + good[8:],
        "header length 0": struct.pack("<Q", 0) + good[8:],
        "offsets out of range": _raw(edit(data_offsets=[b, len(data) + 4]), data),
        "offsets reversed": _raw(edit(data_offsets=[e, b]), data),
        "offsets negative": _raw(edit(data_offsets=[-4, e - b - 4]), data),
        "offsets overlap the next entry": _raw(edit(data_offsets=[b + 4, e + 4]), data),
        "offsets not integers": _raw(edit(data_offsets=[float(b), float(e)]), data),
        "offsets 1e400": _raw(json.dumps(edit()).replace(f"[{b}, {e}]", "[0, 1e400]"), data),
        "offsets three numbers": _raw(edit(data_offsets=[b, e, e]), data),
        "dtype F16 for F32 bytes": _raw(edit(dtype="F16"), data),
        "dtype unknown": _raw(edit(dtype="F8_E9M9"), data),
        "dtype a number": _raw(edit(dtype=5), data),
        "dtype missing": _raw({**header, name0: {k: v for k, v in ent.items() if k != "dtype"}}, data),
        "shape product overflows": _raw(edit(shape=[2**40, 2**40]), data),
        "shape 2^64": _raw(edit(shape=[2**64]), data),
        "shape negative": _raw(edit(shape=[-1, 4]), data),
        "shape strings": _raw(edit(shape=["2", "5"]), data),
        "shape booleans": _raw(edit(shape=[True, True]), data),
        "shape nested": _raw(edit(shape=[[2], [5]]), data),
        "empty shape with huge dims": _raw(edit(shape=[0, 2**62, 2**62]), data),
        "entry not an object": _raw({**header, name0: [1, 2, 3]}, data),
        "duplicate tensor name": _raw(json.dumps(header)[:-1] + ", " + json.dumps(name0) + ": "
                                      + json.dumps(ent) + "}", data),
        "non-UTF-8 header": _raw(json.dumps(header).encode().replace(b'"F32"', b'"F\xff2"'), data),
        "header a list": _raw("[1, 2]", data),
        "header NaN": _raw(json.dumps(edit()).replace(f"[{b}, {e}]", "[NaN, 8]"), data),
        "header deeply nested": _raw("[" * 200_000 + "]" * 200_000, data),
        "header with a 5000-digit integer": _raw(json.dumps(edit()).replace(f"[{b}, {e}]", "[" + "9" * 5000
                                                                                + ", 8]"), data),
        "metadata not an object": _raw({**header, "__metadata__": [1]}, data),
        "metadata values not strings": _raw({**header, "__metadata__": {"format": 1}}, data),
        "trailing bytes": good + b"\0" * 8,
        "gap between tensors": _raw({k: (v if k == "__metadata__" else {**v, "data_offsets": [
            v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]}) for k, v in header.items()}, b"\0" * 8 + data),
        "empty file": b"",
    }
    out.extend(hostile.items())
    return out


def reference_decode(buf: bytes):
    """What the safetensors package makes of ``buf``, or None if it refuses it."""
    try:
        return safetensors_torch.load(buf)
    except Exception:  # noqa: BLE001 - any refusal by the reference counts as a refusal
        return None


def same_tensors(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# --- the models --------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.emb(x))


def tiny_base():
    torch.manual_seed(0)
    return Tiny()


def adapted():
    model = tiny_base()
    lora.inject(model, ["emb", "fc"], r=2, lora_alpha=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


X = torch.tensor([[1, 2, 3], [9, 0, 4]])


@pytest.fixture(scope="module")
def peak():
    """The peak resident memory over every fuzzed load of this module, measured, reported and bounded."""
    with PeakRSS() as p:
        yield p


def test_safetensors_reader_fuzz(tmp_path, tally, peak):
    model = adapted()
    good = sf.save_bytes({k: v.detach() for k, v in lora.lora_state_dict(model).items()}, {"format": "pt"})
    rng = random.Random(SEED)
    refused = loaded = 0
    for i, (label, buf) in enumerate(safetensors_mutations(good, rng)):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(buf)
        status, result = guarded_load(lambda: sf.load_file(str(path)), tmp_path, label)
        if status == "refused":
            assert str(path) in result, f"{label}: the error does not name the file: {result}"
            refused += 1
        else:
            ref = reference_decode(buf)
            assert ref is not None, f"{label}: we loaded a file the reference safetensors refuses"
            assert same_tensors(result, ref), f"{label}: loaded tensors differ from the reference decoding"
            loaded += 1
    assert refused > 0 and loaded > 0
    tally.add("files fuzzed: safetensors reader", refused + loaded)


def _write_dir(src, dst, weights=None, config=None, sha=True):
    shutil.copytree(src, dst)
    if weights is not None:
        with open(os.path.join(dst, "adapter_model.safetensors"), "wb") as f:
            f.write(weights)
    cfg_path = os.path.join(dst, "adapter_config.json")
    if config is None:
        with open(cfg_path) as f:
            config = json.load(f)
        if weights is not None:
            import hashlib
            config["weights_sha256"] = hashlib.sha256(weights).hexdigest() if sha else "0" * 64
    if isinstance(config, bytes):
        with open(cfg_path, "wb") as f:
            f.write(config)
    else:
        with open(cfg_path, "w") as f:
            json.dump(config, f)
    return str(dst)


def _config_mutations(config: dict, rng: random.Random):
    layer = sorted(config["layers"])[0]

    def spec(**changes):
        c = copy.deepcopy(config)
        c["layers"][layer].update(changes)
        return c

    def top(**changes):
        c = copy.deepcopy(config)
        c.update(changes)
        return c

    text = json.dumps(config).encode()
    out = {
        "rank 10^12": spec(r=10**12), "rank 0": spec(r=0), "rank a string": spec(r="2"), "rank true": spec(r=True),
        "rank 3 (file holds 2)": spec(r=3), "alpha negative": spec(lora_alpha=-1), "alpha a list": spec(lora_alpha=[1]),
        "scaling zero": spec(scaling=0), "dropout 2": spec(lora_dropout=2), "type Foo": spec(type="Foo"),
        "enable_lora not a list": spec(enable_lora="yes"), "use_rslora a string": spec(use_rslora="no"),
        "layer spec a number": top(layers={layer: 5}), "layers empty": top(layers={}), "layers a list": top(layers=[]),
        "format_version 99": top(format_version=99), "format_version a string": top(format_version="1"),
        "fingerprint shapes wrong": top(base_fingerprint={"sha256": "x", "shapes": {"emb.weight": "10x6"}}),
        "fingerprint missing": {k: v for k, v in config.items() if k != "base_fingerprint"},
        "sha a number": top(weights_sha256=5), "peft IA3": {"peft_type": "IA3"},
        "peft bad alpha_pattern": {"peft_type": "LORA", "alpha_pattern": {"(": 2}},
        "peft alpha NaN": json.dumps({"peft_type": "LORA", "lora_alpha": float("nan")}).encode(),
        "config a list": [1, 2], "config non-UTF-8": text.replace(b'"format"', b'"f\xffrmat"'),
        "config deeply nested": b"[" * 200_000, "config empty": b"",
        "alpha NaN": json.dumps(spec(lora_alpha=float("nan"))).encode(),
        "alpha 1e400": json.dumps(spec(lora_alpha=1.0)).replace('"lora_alpha": 1.0', '"lora_alpha": 1e400').encode(),
    }
    for i in range(60):
        b = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out[f"config flip {i}"] = bytes(b)
    return out


def test_load_adapter_fuzz(tmp_path, tally, peak):
    model = adapted()
    good_dir = str(tmp_path / "good")
    lora.save_adapter(model, good_dir)
    with open(os.path.join(good_dir, "adapter_model.safetensors"), "rb") as f:
        good = f.read()
    with open(os.path.join(good_dir, "adapter_config.json")) as f:
        config = json.load(f)
    base_out = tiny_base()(X)
    with torch.no_grad():
        want_out = model(X)
    rng = random.Random(SEED + 1)
    cases = []  # (label, directory)
    muts = safetensors_mutations(good, rng)
    for i, (label, buf) in enumerate(muts[::3] + muts[len(good):]):  # every third truncation, every other one
        cases.append((f"weights {label}", _write_dir(good_dir, tmp_path / f"w{i}", weights=buf)))
    for i, (label, buf) in enumerate(muts[:len(good):40]):  # the config's SHA-256 left as it was
        cases.append((f"weights {label}, old sha", _write_dir(good_dir, tmp_path / f"s{i}", weights=buf,
                                                              sha=False)))
    for i, (label, cfg) in enumerate(_config_mutations(config, rng).items()):
        cases.append((label, _write_dir(good_dir, tmp_path / f"c{i}", config=cfg)))
    for label, value in (("NaN weight", float("nan")), ("Inf weight", float("inf"))):
        sd = sf.load_file(os.path.join(good_dir, "adapter_model.safetensors"))
        next(iter(sd.values())).view(-1)[0] = value
        cases.append((label, _write_dir(good_dir, tmp_path / label.replace(" ", "_"), weights=sf.save_bytes(sd))))
    # Links out of the directory: to /etc/passwd, and to a valid adapter file elsewhere (which must not be read).
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(os.path.join(good_dir, "adapter_model.safetensors"), outside)
    shutil.copy(os.path.join(good_dir, "adapter_config.json"), outside)
    for label, fname, target in (("weights -> /etc/passwd", "adapter_model.safetensors", "/etc/passwd"),
                                 ("config -> /etc/passwd", "adapter_config.json", "/etc/passwd"),
                                 ("weights -> a valid file outside", "adapter_model.safetensors",
                                  str(outside / "adapter_model.safetensors")),
                                 ("config -> a valid file outside", "adapter_config.json",
                                  str(outside / "adapter_config.json"))):
        d = _write_dir(good_dir, tmp_path / label.replace(" ", "_").replace("/", "_").replace(">", ""))
        os.remove(os.path.join(d, fname))
        os.symlink(target, os.path.join(d, fname))
        cases.append((label, d))
    # Pickled weights: truncated, code-running, not tensors.
    sd = sf.load_file(os.path.join(good_dir, "adapter_model.safetensors"))
    import io
    bio = io.BytesIO()
    torch.save(sd, bio)
    pkl = bio.getvalue()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for label, payload in [(f"pickle truncated at {i}", pkl[:i]) for i in range(0, len(pkl), max(1, len(pkl) // 25))] \
            + [("pickle runs code", pickle.dumps({"x": Evil()})), ("pickle of a list", pickle.dumps([1, 2]))]:
        d = _write_dir(good_dir, tmp_path / f"p{len(cases)}")
        os.remove(os.path.join(d, "adapter_model.safetensors"))
        cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        cfg["weights_sha256"] = cfg["weights_file"] = None  # as configs written before they named the file
        json.dump(cfg, open(os.path.join(d, "adapter_config.json"), "w"))
        with open(os.path.join(d, "adapter_model.bin"), "wb") as f:
            f.write(payload)
        cases.append((label, d))

    refused = loaded = 0
    for label, d in cases:
        target = tiny_base()
        status, result = guarded_load(lambda: lora.load_adapter(target, d), d, label)
        if status == "refused":
            assert d in result, f"{label}: the error does not name the directory: {result}"
            assert not any(isinstance(m, lora.LoRALayer) for m in target.modules()), f"{label}: model changed"
            with torch.no_grad():
                assert torch.equal(target(X), base_out), f"{label}: the model changed although the load failed"
            refused += 1
        else:  # a correct load: the factors are the file's (as the reference decodes them)
            wfile = os.path.join(d, "adapter_model.safetensors")
            ref = reference_decode(open(wfile, "rb").read()) if os.path.exists(wfile) else \
                torch.load(os.path.join(d, "adapter_model.bin"), weights_only=True)
            got = {k: v.detach() for k, v in lora.lora_state_dict(target).items()}
            assert ref is not None and same_tensors(got, ref), f"{label}: loaded factors are not the file's"
            if same_tensors(ref, {k: v.detach() for k, v in lora.lora_state_dict(model).items()}):
                with torch.no_grad():
                    torch.testing.assert_close(target(X), want_out)
            loaded += 1
    assert refused > 0 and loaded > 0
    tally.add("files fuzzed: lora.load_adapter", refused + loaded)


# --- the NLG example's loader ------------------------------------------------------------------------------------

TINY_CFG = GPTConfig(vocab_size=64, max_positions=16, hidden_dim=16, num_layers=1, num_heads=2, lora_dim=2,
                     lora_alpha=4)


def test_example_loader_fuzz(tmp_path, tally, peak):
    model = build_model(TINY_CFG, base_seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    dirs = {}
    for fmt in ("bin", "safetensors"):
        dirs[fmt] = str(tmp_path / f"good_{fmt}")
        adapter_io.save_adapter_dir(model, dirs[fmt], base_seed=3, weights_format=fmt)
    want = {k: v.detach() for k, v in lora.lora_state_dict(model).items()}
    rng = random.Random(SEED + 2)
    cases = []

    def variant(fmt, label, weights=None, config=None, link=None):
        d = str(tmp_path / f"e{len(cases)}")
        shutil.copytree(dirs[fmt], d)
        wname = adapter_io.WEIGHTS_FILES[fmt]
        if weights is not None:
            open(os.path.join(d, wname), "wb").write(weights)
        if config is not None:
            c = config if isinstance(config, bytes) else json.dumps(config).encode()
            open(os.path.join(d, adapter_io.CONFIG_NAME), "wb").write(c)
        if link is not None:
            fname, target = link
            os.remove(os.path.join(d, fname))
            os.symlink(target, os.path.join(d, fname))
        cases.append((f"{fmt}: {label}", d))

    good_bin = open(os.path.join(dirs["bin"], adapter_io.WEIGHTS_NAME), "rb").read()
    for i in range(0, len(good_bin), max(1, len(good_bin) // 40)):
        variant("bin", f"truncated at {i}", weights=good_bin[:i])
    for i in range(30):
        b = bytearray(good_bin)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        variant("bin", f"flip {i}", weights=bytes(b))
    good_st = open(os.path.join(dirs["safetensors"], adapter_io.SAFETENSORS_NAME), "rb").read()
    muts = safetensors_mutations(good_st, rng)
    for label, buf in muts[::25] + muts[len(good_st):][::4]:
        variant("safetensors", label, weights=buf)
    cfg = json.load(open(os.path.join(dirs["bin"], adapter_io.CONFIG_NAME)))

    def with_(**changes):
        """The config with ``changes``: loralib's own keys at its top level, the example's in its extra."""
        c = copy.deepcopy(cfg)
        for k, v in changes.items():
            where = c if k in ("weights_file", "format") else c["extra"]
            if "." in k:
                a, b = k.split(".")
                where[a] = {**where[a], b: v}
            else:
                where[k] = v
        return c

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(dirs["bin"], adapter_io.WEIGHTS_NAME), outside)
    shutil.copy(os.path.join(dirs["bin"], adapter_io.CONFIG_NAME), outside)
    for label, c in {
        "weights_file absolute": with_(weights_file=str(outside / adapter_io.WEIGHTS_NAME)),
        "weights_file escapes": with_(weights_file="../outside/pytorch_model.bin"),
        "weights_file /etc/passwd": with_(weights_file="/etc/passwd"),
        "weights_file a number": with_(weights_file=5),
        "hidden_dim 2^20": with_(**{"model_config.hidden_dim": 2**20, "model_config.num_heads": 1}),
        "vocab 10^9": with_(**{"model_config.vocab_size": 10**9}),
        "max_positions 10^12": with_(**{"model_config.max_positions": 10**12}),
        "num_layers 10^6": with_(**{"model_config.num_layers": 10**6}),
        "hidden_dim a string": with_(**{"model_config.hidden_dim": "16"}),
        "hidden_dim a float": with_(**{"model_config.hidden_dim": 16.0}),
        "num_heads true": with_(**{"model_config.num_heads": True}),
        "dropout NaN": json.dumps(with_(**{"model_config.dropout": float("nan")})).encode(),
        "model_config a list": with_(model_config=[16]),
        "base a string": with_(base="seed 3"),
        "base_seed a string": with_(**{"base.base_seed": "3"}),
        "fingerprint of another base": with_(**{"base.fingerprint": "0" * 16}),
        "format wrong": with_(format="something"),
        "config non-UTF-8": json.dumps(cfg).encode().replace(b'"format"', b'"f\xffrmat"'),
        "config deeply nested": b"[" * 200_000,
    }.items():
        variant("bin", label, config=c)
    # Files that must load: untouched, and configs that differ only in form or in keys the loader ignores.
    variant("bin", "unchanged")
    variant("safetensors", "unchanged")
    variant("bin", "config re-indented", config=json.dumps(cfg, indent=4).encode())
    variant("bin", "config with a key the loader ignores", config=with_(note="trained on a Tuesday"))
    for i in range(25):
        b = bytearray(json.dumps(cfg).encode())
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        variant("bin", f"config flip {i}", config=bytes(b))
    for fname, target in ((adapter_io.WEIGHTS_NAME, "/etc/passwd"), (adapter_io.CONFIG_NAME, "/etc/passwd"),
                          (adapter_io.WEIGHTS_NAME, str(outside / adapter_io.WEIGHTS_NAME)),
                          (adapter_io.CONFIG_NAME, str(outside / adapter_io.CONFIG_NAME))):
        variant("bin", f"{fname} -> {target}", link=(fname, target))
    for label, value in (("NaN weight", float("nan")), ("Inf weight", float("-inf"))):
        sd = {k: v.clone() for k, v in want.items()}
        next(iter(sd.values())).view(-1)[-1] = value
        import io
        bio = io.BytesIO()
        torch.save(sd, bio)
        variant("bin", label, weights=bio.getvalue())

    refused = loaded = 0
    for label, d in cases:
        status, result = guarded_load(lambda: adapter_io.load_model_from_adapter_dir(d), d, label)
        if status == "refused":
            assert d in result, f"{label}: the error does not name the directory: {result}"
            refused += 1
        else:
            got = {k: v.detach() for k, v in lora.lora_state_dict(result[0]).items()}
            wfile = adapter_io.weights_path(d)
            ref = reference_decode(open(wfile, "rb").read()) if wfile.endswith(".safetensors") else \
                torch.load(wfile, weights_only=True)
            assert same_tensors(got, ref), f"{label}: loaded weights are not the file's"
            loaded += 1
    assert refused > 0 and loaded > 0
    tally.add("files fuzzed: NLG example loader", refused + loaded)


def test_fuzz_peak_memory(peak, tally):
    """Runs after the three fuzz tests of this module (same module fixture): the whole fuzz's peak memory."""
    # The PeakRSS context is still open here; read the current high-water mark without closing it.
    from e2e_nlg.measure import _read_vm_hwm, current_rss
    hwm = _read_vm_hwm() if peak.method and peak.method.startswith("linux") else max(peak.peak, current_rss())
    delta = max(0, (hwm or 0) - peak.baseline)
    tally.note(f"peak memory over the loader fuzz (10 GiB header declared): +{delta / 2**20:.1f} MiB above the "
               f"start ({peak.method})")
    assert delta < PEAK_LIMIT, f"the loader fuzz peaked {delta / 2**20:.0f} MiB above its start"
