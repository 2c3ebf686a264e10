"""loralib's modules import one way: each from the modules below it, public names only, never from the package.

The order, bottom to top. A module may import only modules listed before it; ``__init__`` (the package) re-exports
the public API and is imported by none of them. A new module must be placed here.
"""
import ast
from pathlib import Path

import pytest

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
    return out


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
