"""The package's structure: every ei2 module imports on its own, ei2 never imports diffusers (the tests' oracle) or the
developer benchmarks, the import graph has no cycle, and every file stays small enough to read in one sitting."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ei2"
MAX_LINES = 460  # "about 450": a file of the package is read in one sitting

# Modules behind an optional extra: (module, the import that the extra brings). Skipped where the extra is missing.
OPTIONAL: dict[str, str] = {"ei2.app.page": "gradio"}  # the web page: the `app` extra


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def imported_ei2_modules(path: Path) -> set[str]:
    """Every ei2 module that `path` imports, at the top or inside a function, resolved to a module name."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ei2")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ei2":
                continue
            # `from . import ddim` names a module; `from .unet import UNet` names a symbol of a module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != here}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_ei2_modules(p) for p in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first = last), or None. Depth-first search with three colours."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if state.get(n) is None and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None and (cycle := visit(m)):
            return cycle
    return None


def test_cycle_finder_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_import_graph_resolves_relative_imports():
    graph = import_graph()
    assert "ei2.attention" in graph["ei2.unet"]
    assert "ei2.unet" in graph["ei2.pipeline"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_without_diffusers_or_benchmarks(module):
    """A fresh interpreter imports `module` alone; afterwards neither diffusers nor benchmarks/ is loaded."""
    extra = OPTIONAL.get(module)
    if extra and importlib.util.find_spec(extra) is None:
        pytest.skip(f"{module} needs the optional {extra!r}, not installed")
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'benchmarks')); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_files_are_readable_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
