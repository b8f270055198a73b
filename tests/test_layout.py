"""The layout stays as the README describes it: imports point one way (library <- strategies <-
programs), modules and functions stay a readable size. Read from the source (every import,
lazy ones inside functions included), so nothing needs to be imported to check it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scaleot_fed", "strategies", "recipes", "simulations")
# What each package may import of the others. recipes.cli is the one program on top of both
# program packages (it dispatches `scaleot-fed simulate` to simulations).
ALLOWED = {
    "scaleot_fed": set(),
    "strategies": {"scaleot_fed"},
    "recipes": {"scaleot_fed", "strategies"},
    "simulations": {"scaleot_fed", "strategies", "recipes"},
}
TOP = {"recipes.cli": {"scaleot_fed", "strategies", "recipes", "simulations"},
       "recipes.commands": {"scaleot_fed", "strategies", "recipes", "simulations"}}
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield package, name, path


def _imported_packages(path: Path, package: str) -> set[str]:
    """First-party packages ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found - {package}


@pytest.mark.parametrize("package,name,path", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_one_way(package, name, path):
    allowed = TOP.get(name, ALLOWED[package])
    assert _imported_packages(path, package) <= allowed, f"{name} imports {_imported_packages(path, package) - allowed}"


def test_the_checker_sees_lazy_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from simulations.runner import simulate\n    return simulate\n")
    assert _imported_packages(bad, "scaleot_fed") == {"simulations"}


def test_modules_and_functions_fit_on_a_screen():
    too_long = []
    for _, name, path in _modules():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert not too_long, "; ".join(too_long)
