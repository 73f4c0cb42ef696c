"""The layering rules of the package tree, read from the source with ``ast`` (nothing is imported).

Import direction (every import counts, also one inside a function or a string handed to
``importlib.import_module``): ``dirl_min.core`` imports nothing from ``dirl_min`` outside
itself; ``dirl_min.data`` only core and model; ``dirl_min.model`` nothing from data / engine /
loops / evaluation; ``dirl_min.engine``
nothing from loops / evaluation; ``dirl_min.loops`` nothing from evaluation or the faces
(train, eval, bench, check, compare). Size: in the layered packages no file is over 400 lines and no
function over 80. Only the packages that exist are checked, so the rules hold at every step
of the move into this tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "dirl_min"

_FACES = ("dirl_min.train", "dirl_min.eval", "dirl_min.bench", "dirl_min.check", "dirl_min.compare")
#: package -> module prefixes it must not import; None means "anything of dirl_min outside it"
#: except the packages :data:`ALLOWED` names for it.
FORBIDDEN: dict[str, tuple[str, ...] | None] = {
    "dirl_min.core": None,
    "dirl_min.data": None,
    "dirl_min.model": ("dirl_min.data", "dirl_min.engine", "dirl_min.loops", "dirl_min.evaluation"),
    "dirl_min.engine": ("dirl_min.loops", "dirl_min.evaluation"),
    "dirl_min.loops": ("dirl_min.evaluation", *_FACES),
    "dirl_min.evaluation": ("dirl_min.loops", *_FACES),
    "dirl_min.benchmarking": _FACES,
}
#: package (with a None rule) -> the other dirl_min packages it may import.
ALLOWED: dict[str, tuple[str, ...]] = {"dirl_min.data": ("dirl_min.core", "dirl_min.model")}
SIZED = ("core", "engine", "model", "loops", "evaluation", "data", "benchmarking")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()


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


def violations(package: str, source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` (in ``package``) that break :data:`FORBIDDEN`."""
    rule = FORBIDDEN[package]
    bad = []
    for line, name in imported_modules(source, module, is_package):
        if rule is None:
            wrong = (_inside(name, "dirl_min") and not _inside(name, package)
                     and not any(_inside(name, p) for p in ALLOWED.get(package, ())))
        else:
            wrong = any(_inside(name, p) for p in rule)
        if wrong:
            bad.append(f"{module}:{line} imports {name}")
    return bad


def _files(package_dir: Path) -> list[Path]:
    return sorted(package_dir.rglob("*.py"))


@pytest.mark.parametrize("package", [p for p in FORBIDDEN if _is_package(p)])
def test_import_direction(package):
    bad = []
    for path in _files(ROOT.parent / package.replace(".", "/")):
        bad += violations(package, path.read_text(), _module_name(path), path.name == "__init__.py")
    assert not bad, "imports against the layer direction:\n" + "\n".join(bad)


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
    bad = violations("dirl_min.core", source, "dirl_min.core.x")
    assert sorted(b.split(":", 1)[1] for b in bad) == [
        "4 imports dirl_min.engine", "4 imports dirl_min.engine.verifier",
        "5 imports dirl_min.model", "6 imports dirl_min", "6 imports dirl_min.loops",
        "7 imports dirl_min.tasks", "8 imports dirl_min", "8 imports dirl_min.rewards",
    ]
    engine_src = "from dirl_min.core.rewards import x\nfrom ..loops.dipo import step\n"
    bad = violations("dirl_min.engine", engine_src, "dirl_min.engine.decode")
    assert bad == ["dirl_min.engine.decode:2 imports dirl_min.loops.dipo",
                   "dirl_min.engine.decode:2 imports dirl_min.loops.dipo.step"]
    assert violations("dirl_min.loops", "import dirl_min.evaluation.run\n", "dirl_min.loops.sft")
    assert violations("dirl_min.loops", "from dirl_min import train\n", "dirl_min.loops.sft")
    assert not violations("dirl_min.loops", "from dirl_min import training\n", "dirl_min.loops.sft")
    data_src = ("from dirl_min.model import chat_prompt_ids\nfrom dirl_min.core.masks import x\n"
                "from .tasks import Problem\nfrom dirl_min.engine import decode\nimport dirl_min.tasks\n")
    bad = violations("dirl_min.data", data_src, "dirl_min.data.records")
    assert [b.split(":", 1)[1] for b in bad] == [
        "4 imports dirl_min.engine", "4 imports dirl_min.engine.decode", "5 imports dirl_min.tasks"]
    assert violations("dirl_min.model", "from dirl_min.data import Problem\n", "dirl_min.model.tiny")


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append((node.name, node.lineno, length))
    return out


@pytest.mark.parametrize("name", [n for n in SIZED if _is_package(f"dirl_min.{n}")])
def test_sizes(name):
    bad = []
    for path in _files(ROOT / name):
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
