"""The folders are the reading order, and imports point down it: core -> build -> pipeline -> evaluation -> commands.

Read from the source with `ast`, so every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mini_retrain"

# Lower ranks are read first and may not import higher ones. The small top-level helpers sit with the core.
RANKS = {"core": 0, "errors": 0, "paths": 0, "settings": 0, "build": 1, "pipeline": 2, "evaluation": 3,
         "commands": 4, "api": 5, "cli": 5, "__init__": 6, "__main__": 6}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(("mini_retrain",) + parts)] = path
    return modules


def _imports(path: Path) -> set[str]:
    """Every module of mini_retrain or elsewhere that `path` imports (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            # `from mini_retrain.core import split` imports the module mini_retrain.core.split
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _rank(module: str) -> int:
    return RANKS[module.split(".")[1] if module != "mini_retrain" else "__init__"]


def _own(names: set[str], modules: dict[str, Path]) -> set[str]:
    return {name for name in names if name in modules}


def test_core_imports_only_numpy_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    modules = _modules()
    core = [name for name in modules if name.startswith("mini_retrain.core")]
    assert len(core) >= 5
    for name in core:
        for imported in _imports(modules[name]):
            top = imported.split(".")[0]
            if top == "mini_retrain":
                assert imported.startswith("mini_retrain.core"), f"{name} imports {imported}"
            else:
                assert top in allowed, f"{name} imports {imported}: core/ is NumPy and the standard library only"


def test_every_import_points_down_the_reading_order():
    modules = _modules()
    for name, path in modules.items():
        for imported in _own(_imports(path), modules):
            if imported == "mini_retrain":  # `from mini_retrain import __version__`
                continue
            assert _rank(imported) <= _rank(name), f"{name} imports {imported}, which comes later in the reading order"


def test_no_import_circle():
    modules = _modules()
    graph = {name: _own(_imports(path), modules) - {name, "mini_retrain"} for name, path in modules.items()}
    # A package's __init__ is imported with each of its modules; its own docstring-only body imports nothing.
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for nxt in graph[name]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The two checks above can fail: an upward import and a circle written to a scratch file are both seen."""
    scratch = tmp_path / "m.py"
    scratch.write_text("from mini_retrain.commands.retrain import retrain\nimport numpy\n")
    imported = _imports(scratch)
    assert "mini_retrain.commands.retrain" in imported
    assert _rank("mini_retrain.commands.retrain") > _rank("mini_retrain.core.train")


# Where print() may be called: the command line, the default stderr log, and the progress line that a terminal
# redraws in place (not a log line). Everything else speaks through a `log` callable its caller chooses.
# label's own output is stdout itself (label_image's lines, or JSON records as they come), like cli's.
PRINT_ALLOWED = {"mini_retrain.cli", "mini_retrain.errors", "mini_retrain.pipeline.bottlenecks",
                 "mini_retrain.commands.label"}


def _print_calls(path: Path) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]


def test_library_output_goes_through_log(tmp_path):
    calls = {name: _print_calls(path) for name, path in _modules().items() if name not in PRINT_ALLOWED}
    assert {name: lines for name, lines in calls.items() if lines} == {}
    scratch = tmp_path / "m.py"  # the check sees a call, and not a default argument `log=print`
    scratch.write_text("def f(log=print):\n    print('x')\n")
    assert _print_calls(scratch) == [2]
