"""The layering rules of the whole package tree, read from the source with ``ast`` (nothing is imported).

Every file of ``dirl_min/`` belongs to a layer: a package (:data:`MAY_IMPORT` names each and the
packages it may import, lowest first) or, at the top level, a face (``python -m dirl_min.<face>``)
or a documented public shim (:data:`SHIMS`, re-exports for users). Every import counts, also one
inside a function or a string handed to ``importlib.import_module``. Checked here: the import
direction; no module imports a shim; no circle between modules; no file over 400 lines and no
function over 80; one file name per concept (no two modules share a name, except ``__init__.py``
and the shims); the top level holds only the faces, the shims and ``__init__``; no function of the
training loops (``dirl_min/loops/``) takes more than 7 parameters (their state travels in named types).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "dirl_min"

#: the commands (``python -m dirl_min.<face>``): they may import any layer, and each other
FACES = ("train", "eval", "compare", "bench", "check")
#: documented public re-exports (README, "Public API"): for users; nothing inside dirl_min imports them
SHIMS = ("masking", "decoding", "dipo", "rewards", "tasks", "trainer")
_BELOW_SETTINGS = ("core", "infra", "model", "data", "engine", "loops", "evaluation", "speed")
#: package -> the other dirl_min packages it may import (lowest layer first); a package not named
#: here fails :func:`test_every_file_has_a_layer`
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "core": (),
    "infra": (),
    "model": ("core", "infra"),
    "data": ("core", "infra", "model"),
    "engine": ("core", "infra", "model", "data"),
    "loops": ("core", "infra", "model", "data", "engine"),
    "evaluation": ("core", "infra", "model", "data", "engine"),
    "speed": ("core", "infra", "model", "data", "engine", "loops"),
    "settings": _BELOW_SETTINGS,
    "comparison": (*_BELOW_SETTINGS, "settings"),
    "tutorial": ("core", "infra", "model", "data", "engine", "loops"),  # the notebooks train a demo model
}
#: what the top-level modules may import: the shims re-export the layers below the settings
TOP_MAY_IMPORT = {"shim": ("core", "model", "data", "engine", "loops", "evaluation"),
                  "face": (*MAY_IMPORT, *FACES)}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
#: the most parameters a function in :data:`FEW_PARAMETERS` may take (self and cls not counted)
MAX_PARAMETERS = 7
FEW_PARAMETERS = ("loops",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``source`` (the text of ``module``) imports.

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule); relative
    imports are resolved against ``module``; ``importlib.import_module("x")`` and
    ``__import__("x")`` with a literal name count too.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parent = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, parent))
            found += [(node.lineno, f"{parent}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> str:
    """``"core"`` … for a package's module, ``"face"`` / ``"shim"`` / ``"top"`` for a top-level one."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"  # dirl_min/__init__.py
    if parts[1] in FACES and len(parts) == 2:
        return "face"
    if parts[1] in SHIMS and len(parts) == 2:
        return "shim"
    return parts[1]


def _allowed(layer: str) -> tuple[str, ...]:
    return MAY_IMPORT.get(layer, TOP_MAY_IMPORT.get(layer, ()))


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that break the layer direction or import a shim."""
    layer = layer_of(module)
    bad = []
    for line, name in imported_modules(source, module, is_package):
        if not _inside(name, "dirl_min") or name == "dirl_min":
            continue  # outside the package, or the root (its __init__ imports nothing of it)
        target = name.split(".")[1]
        if target in SHIMS and layer != "shim":
            bad.append(f"{module}:{line} imports the public shim {name}")
        elif target != (module.split(".")[1] if "." in module else "") and target not in SHIMS and \
                target not in _allowed(layer) and not (layer == "face" and target in FACES):
            bad.append(f"{module}:{line} imports {name}")
    return bad


def _files(package_dir: Path) -> list[Path]:
    return sorted(package_dir.rglob("*.py"))


def _modules() -> list[tuple[Path, str]]:
    return [(path, _module_name(path)) for path in _files(ROOT)]


def test_every_file_has_a_layer():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert top == sorted(("__init__", *FACES, *SHIMS)), "the top level holds only the faces and the shims"
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(MAY_IMPORT), "each package is a layer that MAY_IMPORT names"
    assert not [p for p in ROOT.rglob("*.py") if not (p.parent / "__init__.py").is_file()]


def test_import_direction():
    bad = []
    for path, module in _modules():
        bad += violations(path.read_text(), module, path.name == "__init__.py")
    assert not bad, "imports against the layer direction:\n" + "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    """module -> the dirl_min modules it imports (``from a import b`` counts ``a.b`` only where it is
    a module); a package's ``__init__`` is the package's name."""
    modules = {module for _, module in _modules()}
    graph = {}
    for path, module in _modules():
        found = {name for _, name in imported_modules(path.read_text(), module, path.name == "__init__.py")}
        graph[module] = {n for n in found if n in modules and n != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    assert not circles(import_graph()), "modules that import each other (through any path)"


def test_one_name_per_concept():
    seen: dict[str, list[str]] = {}
    for path, _ in _modules():
        shim = path.parent == ROOT and path.stem in SHIMS
        if path.name != "__init__.py" and not shim:
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT.parent)))
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_the_checker_sees_every_kind_of_import():
    """The rule above would pass vacuously if the scan missed imports; these it must catch."""
    source = (
        "from dirl_min.core import answers\n"  # inside core: fine
        "from . import masks\n"  # dirl_min.core.masks: fine
        "def f():\n"
        "    from dirl_min.engine import verifier\n"  # in a function
        "    import dirl_min.model\n"
        "    from .. import loops\n"  # relative, leaves core
        "    importlib.import_module('dirl_min.tasks')\n"
        "    from dirl_min import rewards\n"
    )
    bad = violations(source, "dirl_min.core.x")
    assert sorted(b.split(":", 1)[1] for b in bad) == [
        "4 imports dirl_min.engine", "4 imports dirl_min.engine.verifier",
        "5 imports dirl_min.model", "6 imports dirl_min.loops",
        "7 imports the public shim dirl_min.tasks", "8 imports the public shim dirl_min.rewards",
    ]
    engine_src = "from dirl_min.core.rewards import x\nfrom ..loops.rl import step\n"
    bad = violations(engine_src, "dirl_min.engine.decode")
    assert bad == ["dirl_min.engine.decode:2 imports dirl_min.loops.rl",
                   "dirl_min.engine.decode:2 imports dirl_min.loops.rl.step"]
    assert violations("import dirl_min.evaluation.run\n", "dirl_min.loops.sft")
    assert violations("from dirl_min import train\n", "dirl_min.loops.sft")
    assert not violations("from dirl_min.engine import decode\n", "dirl_min.loops.sft")
    data_src = ("from dirl_min.model import chat_prompt_ids\nfrom dirl_min.core.masks import x\n"
                "from .tasks import Problem\nfrom dirl_min.engine import decode\nimport dirl_min.tasks\n")
    bad = violations(data_src, "dirl_min.data.records")
    assert [b.split(":", 1)[1] for b in bad] == [
        "4 imports dirl_min.engine", "4 imports dirl_min.engine.decode", "5 imports the public shim dirl_min.tasks"]
    assert violations("from dirl_min.data import Problem\n", "dirl_min.model.tiny")
    assert violations("from dirl_min.settings.config import Config\n", "dirl_min.evaluation.run")
    assert violations("from dirl_min.decoding import generate\n", "dirl_min.train")  # a face, through a shim
    assert not violations("from dirl_min.engine.decode import generate\n", "dirl_min.decoding")
    assert not violations("from dirl_min import eval as E\n", "dirl_min.compare")


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append((node.name, node.lineno, length))
    return out


def test_sizes():
    bad = []
    for path, _ in _modules():
        text = path.read_text()
        rel = path.relative_to(ROOT.parent)
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            bad.append(f"{rel}: {lines} lines (at most {MAX_FILE_LINES})")
        bad += [f"{rel}:{line} {fn}() is {n} lines (at most {MAX_FUNCTION_LINES})"
                for fn, line, n in long_functions(text)]
    assert not bad, "\n".join(bad)


def test_long_function_count():
    body = "".join(f"    x = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    assert long_functions(f"def ok():\n{body}") == []
    source = f"class C:\n  def m(self):\n{body}    y = 0\n"
    assert long_functions(source) == [("m", 2, MAX_FUNCTION_LINES + 1)]


def parameter_counts(source: str) -> list[tuple[str, int, int]]:
    """(name, line, parameters) of every function or method: positional, keyword-only, and ``*args``
    and ``**kwargs`` as one each; a leading ``self`` or ``cls`` is not counted."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [p.arg for p in (*a.posonlyargs, *a.args)]
            if names and names[0] in ("self", "cls"):
                names = names[1:]
            out.append((node.name, node.lineno, len(names) + len(a.kwonlyargs) + (a.vararg is not None)
                        + (a.kwarg is not None)))
    return out


def test_loop_functions_take_at_most_seven_parameters():
    bad = []
    for package in FEW_PARAMETERS:
        for path in _files(ROOT / package):
            rel = path.relative_to(ROOT.parent)
            bad += [f"{rel}:{line} {fn}() takes {n} parameters (at most {MAX_PARAMETERS})"
                    for fn, line, n in parameter_counts(path.read_text()) if n > MAX_PARAMETERS]
    assert not bad, "\n".join(bad)


def test_parameter_count():
    source = ("def f(a, /, b, c=1, *args, d, e=2, **kw): pass\n"
              "class C:\n  def m(self, a): pass\n  @classmethod\n  def k(cls, *, a): pass\n"
              "def g(x, self): pass\n")
    assert parameter_counts(source) == [("f", 1, 7), ("g", 6, 2), ("m", 3, 1), ("k", 5, 1)]
