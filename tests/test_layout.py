"""The layers point one way: the library (``scaleot_fed``) <- aggregation (``strategies``) <- the
programs (``simulations``, then ``recipes``, whose study runs federations) <- the command line
(``scaleot_fed_cli``). Read from the source (every import, lazy ones inside functions included), so
nothing needs to be imported to check it. Module and function size is not capped here: ruff's
complexity rules (pyproject.toml) flag a function that does too much, whatever its length."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("scaleot_fed", "strategies", "simulations", "recipes", "scaleot_fed_cli")
"""Bottom to top: a package imports only packages below it."""


def _modules():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, ".".join(path.relative_to(ROOT).with_suffix("").parts), path


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
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in LAYERS}
    return found - {package}


@pytest.mark.parametrize("package,name,path", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down(package, name, path):
    above = set(LAYERS[LAYERS.index(package) + 1:])
    assert not _imported_packages(path, package) & above, f"{name} imports {_imported_packages(path, package) & above}"


def test_the_checker_sees_lazy_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from simulations.runner import simulate\n    return simulate\n")
    assert _imported_packages(bad, "scaleot_fed") == {"simulations"}
