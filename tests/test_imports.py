"""The package's import graph has no circle: each module imports only modules on a lower floor.

Two guards: a static one (every ``from . import`` / ``from .x import`` in the source, read with
`ast`, goes downward by the floors below, except the few call-time loads listed with their
reason) and a dynamic one (importing each module alone, in a fresh interpreter, never hands any
module a fastdrop module that is still being initialised).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "fastdrop"

#: The floors, bottom first: a module may import (at module level) only from floors below its own.
FLOORS = [
    {"_core", "_spec", "_checks", "_threads", "schedules"},
    {"_core_call"},
    {"_mask"},
    {"_keyed"},
    {"_device"},
    {"_torch"},
    {"_dispatch"},
    {"functional"},
    {"attention", "nn"},
    {"__init__"},
    {"bench_train"},
    {"bench_family"},
    {"bench"},
    {"__main__"},
]
FLOOR = {name: i for i, floor in enumerate(FLOORS) for name in floor}

#: Imports made inside a function, at call time, that do not go downward, each with its reason.
CALL_TIME_UPWARD = {
    # A Mask's backward on a torch tensor takes the torch side's masked product (a Mask may
    # come from a NumPy call, before anything loaded `_torch`).
    ("_mask", "_torch"),
    # `fastdrop.nn` and `fastdrop.scaled_dot_product_attention` need torch, so the package loads
    # them on first use.
    ("__init__", "nn"),
    ("__init__", "attention"),
    # attention's replace_dropout conversion and benchmark, and nn's conversion of attention
    # modules (issue 14's files; both torch-only, loaded by whichever a user calls first).
    ("attention", "nn"),
    ("attention", "functional"),
    ("nn", "attention"),
    # attention's training benchmark times its steps with the bench's `alternate_times` (bench
    # code, run only by whoever benchmarks).
    ("attention", "bench_train"),
}


def _imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(module-level, call-time) fastdrop modules that `path` imports."""
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module] if child.module else [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("fastdrop"):
                module = child.module or ""
                names = [module.split(".")[1]] if "." in module else ["__init__"]
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "fastdrop":
                        names.append("__init__")
                    elif alias.name.startswith("fastdrop."):
                        names.append(alias.name.split(".")[1])
            (lazy if inside else top).update(n.split(".")[0] for n in names)
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return top, lazy - top


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_floor():
    assert set(MODULES) | {"_core"} == set(FLOOR), "place each module on a floor in FLOORS"


@pytest.mark.parametrize("name", MODULES)
def test_a_module_imports_only_from_floors_below_it(name):
    top, lazy = _imports(PACKAGE / f"{name}.py")
    for target in sorted(top):
        assert FLOOR[target] < FLOOR[name], f"{name} imports {target}, which is not below it"
    for target in sorted(lazy):
        if FLOOR[target] >= FLOOR[name]:
            assert (name, target) in CALL_TIME_UPWARD, (
                f"{name} imports {target} at call time, which is not below it"
            )


def test_the_torch_paths_never_read_functionals_private_names():
    for name in ("_torch", "_device", "_keyed", "_mask", "_dispatch"):
        top, lazy = _imports(PACKAGE / f"{name}.py")
        assert "functional" not in top | lazy, name


#: Imports `fastdrop.<module>` alone with `__import__` wrapped: any fastdrop module handed to an
#: importer (as the module imported, or a name taken from it) while its own body is still running
#: means a circle.
_PROBE = """
import builtins, sys, types
real = builtins.__import__
bad = []

def initialising(m):
    spec = getattr(m, "__spec__", None)
    return spec is not None and getattr(spec, "_initializing", False)

def probe(name, globals=None, locals=None, fromlist=(), level=0):
    m = real(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__", "?")
    handed = [m]
    for n in fromlist or ():
        v = getattr(m, n, None)
        if isinstance(v, types.ModuleType):
            handed.append(v)
    for v in handed:
        # The package itself is initialising while its submodules load: that is not a circle.
        if v.__name__.startswith("fastdrop.") and v.__name__ != importer and initialising(v):
            bad.append(f"{importer} got {v.__name__} while it was being initialised")
    return m

builtins.__import__ = probe
import importlib
importlib.import_module(sys.argv[1])
assert not bad, bad
print("ok")
"""

_NEEDS_TORCH = {"_torch", "_device", "nn", "attention"}


@pytest.mark.parametrize("name", [m for m in MODULES if m != "__main__"])
def test_importing_a_module_alone_meets_no_half_initialised_module(name):
    if name in _NEEDS_TORCH:
        pytest.importorskip("torch")
    module = "fastdrop" if name == "__init__" else f"fastdrop.{name}"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
