"""The import rules of the package: core is plain torch, kernels sit below core."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ma_convert"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against the package layout."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


@pytest.mark.parametrize("layer,forbidden", [
    ("core", ("transformers", "ma_convert.modeling", "ma_convert.adapters", "ma_convert.training")),
    ("kernels", ("transformers", "ma_convert.core", "ma_convert.modeling", "ma_convert.adapters")),
])
def test_layer_imports_nothing_above_it(layer, forbidden):
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in (PACKAGE / layer).rglob("*.py")
        for module in imported_modules(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    )
    assert not offenders, offenders
