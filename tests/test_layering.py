"""loralib's modules import one way: each from the modules below it, public names only, never from the package;
and no module touches another's private attributes (``layer._x``): they talk through public names, such as the
layer protocol of ``LoRALayer`` (``frozen_weight()``, ``delta_weight()``, ``merged_delta()``, ``merged_is_stale``).

The order, bottom to top. A module may import only modules listed before it; ``__init__`` (the package) re-exports
the public API and is imported by none of them. A new module must be placed here.
"""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

PKG = Path(__file__).resolve().parent.parent / "loralib"
ORDER = [
    "version", "errors", "patterns", "safetensors_format",  # leaves: import nothing of loralib
    "layers",  # the layer classes
    "adapters",  # named adapters on those layers
    "utils",  # mark_only_lora_as_trainable, lora_state_dict
    "injection",  # inject / merge_and_unload
    "peft_format",  # PEFT's directories
    "serialization",  # save_adapter / load_adapter
]


def package_imports(source: str, submodules):
    """``(line, module, names)`` for every import of this package in ``source``: ``module`` is the submodule
    imported from (None: the package itself), ``names`` the names taken from it (a whole submodule counts as an
    import of that submodule, with no name)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                parts = node.module.split(".") if node.module else []
            elif node.level == 0 and (node.module or "").split(".")[0] == "loralib":
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.append((node.lineno, parts[0], [a.name for a in node.names]))
            else:  # from . import x / from loralib import x: a submodule, or a name of the package's __init__
                for a in node.names:
                    if a.name in submodules:
                        found.append((node.lineno, a.name, []))
                    else:
                        found.append((node.lineno, None, [a.name]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "loralib":
                    found.append((node.lineno, parts[1] if len(parts) > 1 else None, []))
    return found


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# Private names of torch's classes (nn.Module._parameters, nn.Conv2d._conv_forward): torch's API, not a module's.
TORCH_NAMES = set(vars(nn.Module())).union(*(dir(c) for c in (nn.Module, nn.Linear, nn.Embedding, nn.Conv1d,
                                                               nn.Conv2d, nn.Conv3d, torch.Tensor)))
ATTR_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr", "__setattr__", "__getattribute__", "__delattr__"}


def private_attributes(source: str):
    """``(line, name, defined)`` for every private name ``source`` uses as an attribute: ``x._name`` (read, written
    or deleted, ``self`` too), ``getattr(x, "_name")`` and its kin (``object.__setattr__(x, "_name", v)``), and the
    names a class body defines; ``defined`` is True for those and for module-level private functions, classes
    and variables, which make the module the name's home."""
    tree = ast.parse(source)
    found = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else [
            t.id for t in targets if isinstance(t, ast.Name)]
        found += [(node.lineno, n, True) for n in names if private(n)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
                names = [item.name] if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) else [
                    t.id for t in targets if isinstance(t, ast.Name)]
                found += [(item.lineno, n, True) for n in names if private(n)]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            found.append((node.lineno, node.attr, False))
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            name = node.args[1].value
            if func in ATTR_FUNCTIONS and isinstance(name, str) and private(name):
                found.append((node.lineno, name, False))
    return found


def attribute_problems(modules, order):
    """Each use of a private attribute name outside its home module: the modules defining it (a class member, a
    module-level name), else the lowest module in ``order`` that uses it. torch's own private names are exempt."""
    uses = {}  # name -> [(module, line, defined)]
    for mod, source in modules.items():
        for line, name, defined in private_attributes(source):
            if name not in TORCH_NAMES:
                uses.setdefault(name, []).append((mod, line, defined))
    rank = {m: (order.index(m) if m in order else len(order), m) for m in modules}
    out = []
    for name, where in sorted(uses.items()):
        home = {m for m, _, defined in where if defined} or {min((m for m, _, _ in where), key=rank.get)}
        for mod, line, _ in sorted(where, key=lambda u: (rank[u[0]], u[1])):
            if mod not in home:
                out.append(f"{mod}.py:{line} uses {name!r}, a private name of {'/'.join(sorted(home))}.py: use a "
                           "public name (the layer protocol) or make it public there")
    return out


def problems(pkg: Path, order):
    """Every way the modules of ``pkg`` break the rules, one line each."""
    modules = {p.stem: p.read_text(encoding="utf-8") for p in sorted(pkg.glob("*.py"))}
    out = [f"{m}.py is not in ORDER: place it in tests/test_layering.py" for m in modules
           if m != "__init__" and m not in order]
    out += [f"ORDER names {m}, which loralib does not have" for m in order if m not in modules]
    for mod, source in modules.items():
        for line, target, names in package_imports(source, set(modules) - {"__init__"}):
            where = f"{mod}.py:{line}"
            if target is None or target == "__init__":
                out.append(f"{where} imports from the package's __init__ ({names or 'loralib'}); import the "
                           "module that defines it")
                continue
            out += [f"{where} imports the private name {n!r} from {target}" for n in names if private(n)]
            out += [f"{where} imports * from {target}" for n in names if n == "*" and mod != "__init__"]
            if mod != "__init__" and mod in order and target in order and order.index(target) >= order.index(mod):
                out.append(f"{where} imports {target}, which is not below {mod} in the layer order")
    return out + attribute_problems(modules, order)


def test_modules_import_public_names_from_modules_below_only():
    assert problems(PKG, ORDER) == []


def write(tmp_path, **modules):
    pkg = tmp_path / "loralib"
    pkg.mkdir()
    for name, text in modules.items():
        (pkg / f"{name}.py").write_text(text)
    return pkg


@pytest.mark.parametrize("source, complaint", [
    ("from .low import _hidden\n", "private name '_hidden' from low"),
    ("from loralib.low import _hidden\n", "private name '_hidden' from low"),
    ("from . import __version__\n", "from the package's __init__"),
    ("from loralib import thing\n", "from the package's __init__"),
    ("import loralib\n", "from the package's __init__"),
    ("from .top import thing\n", "top, which is not below mid"),
    ("import loralib.top\n", "top, which is not below mid"),
    ("from . import top\n", "top, which is not below mid"),
    ("def f():\n    from .low import _late\n", "private name '_late'"),
])
def test_each_kind_of_violation_is_caught(tmp_path, source, complaint):
    pkg = write(tmp_path, __init__="", low="", top="", mid=source)
    found = problems(pkg, ["low", "mid", "top"])
    assert len(found) == 1 and complaint in found[0], found


def test_allowed_imports_pass_and_the_order_list_is_checked(tmp_path):
    ok = ("from .low import visible, __version__\nfrom . import low\nimport loralib.low\nfrom loralib.low import x\n"
          "import os\nfrom os import path as _p\n")
    pkg = write(tmp_path, __init__="from .mid import *\nfrom .low import visible\n", low="", mid=ok, extra="")
    assert problems(pkg, ["low", "mid", "gone"]) == [
        "extra.py is not in ORDER: place it in tests/test_layering.py", "ORDER names gone, which loralib does not have"]


LOW = ("class Layer:\n    _cache = None\n\n    def _hidden(self):\n        return self._cache\n\n\n"
       "def _helper():\n    pass\n")


@pytest.mark.parametrize("source, complaint", [
    ("def f(x):\n    return x._hidden()\n", "mid.py:2 uses '_hidden', a private name of low.py"),
    ("def f(x):\n    x._cache = 1\n", "mid.py:2 uses '_cache', a private name of low.py"),
    ("def f(x):\n    return getattr(x, '_cache', None)\n", "mid.py:2 uses '_cache'"),
    ("def f(x):\n    object.__setattr__(x, '_cache', 1)\n", "mid.py:2 uses '_cache'"),
    ("def f(x):\n    del x._cache\n", "mid.py:2 uses '_cache'"),
    ("def f(m):\n    return m._helper()\n", "mid.py:2 uses '_helper', a private name of low.py"),
    # a name no class defines (an attribute stashed on another module's object): its home is the lowest user
    ("def f(x):\n    return x._tag\n", "mid.py:2 uses '_tag', a private name of low.py"),
])
def test_each_private_attribute_reach_in_is_caught(tmp_path, source, complaint):
    pkg = write(tmp_path, __init__="", low=LOW + "\n\ndef tag(x):\n    x._tag = 1\n", mid=source)
    found = problems(pkg, ["low", "mid"])
    assert len(found) == 1 and complaint in found[0], found


def test_own_private_names_and_torch_ones_pass(tmp_path):
    mid = ("class Other:\n    def _hidden(self):\n        return self._mine\n\n\ndef _helper():\n    pass\n\n\n"
           "def f(m, conv):\n    return m._parameters, conv._conv_forward, getattr(m, '_buffers')\n")
    pkg = write(tmp_path, __init__="", low=LOW + "\n\ndef g(m):\n    return m._parameters\n", mid=mid)
    # mid defines its own _hidden and _helper (same names as low's: each module's own); torch's names are free
    assert problems(pkg, ["low", "mid"]) == []
