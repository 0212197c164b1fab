"""The import rules of the package, read from the source (imports inside functions count too): kernels
below core, core plain torch, modeling below the adapters, the library below training."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ma_convert"


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module a file imports, relative imports resolved against the package layout."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
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


FORBIDDEN = {
    "core": ("transformers", "accelerate", "peft", "datasets", "ma_convert.modeling", "ma_convert.adapters",
             "ma_convert.training", "ma_convert.eval", "ma_convert.integrations", "ma_convert.convert"),
    "kernels": ("transformers", "ma_convert.core", "ma_convert.modeling", "ma_convert.adapters", "ma_convert.training"),
    "modeling": ("ma_convert.adapters", "ma_convert.training", "ma_convert.eval"),
    "adapters": ("ma_convert.training", "ma_convert.eval"),
}


def offenders(layer: str, root: Path = PACKAGE) -> list[str]:
    return sorted(
        f"{path.relative_to(root.parent)} imports {module}"
        for path in (root / layer).rglob("*.py")
        for module in imported_modules(path, root)
        if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer])
    )


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    assert not offenders(layer)


def test_the_check_finds_a_forbidden_lazy_import(tmp_path):
    fake = tmp_path / "ma_convert"
    (fake / "core").mkdir(parents=True)
    code = "def f():\n    from transformers import AutoConfig\n    from ..adapters import x\n"
    (fake / "core" / "bad.py").write_text(code)
    assert offenders("core", fake) == ["ma_convert/core/bad.py imports ma_convert.adapters",
                                       "ma_convert/core/bad.py imports transformers"]


def long_functions(root: Path = PACKAGE, limit: int = 80) -> list[str]:
    """Functions longer than `limit` lines, Triton kernels (`@triton.jit`) aside."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            kernel = any("jit" in ast.unparse(decorator) for decorator in node.decorator_list)
            if not kernel and node.end_lineno - node.lineno + 1 > limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions() == []


def test_the_length_check_finds_a_long_function(tmp_path):
    package = tmp_path / "ma_convert"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (package / "long.py").write_text(f"def long():\n{body}\n\n\n@triton.jit\ndef kernel():\n{body}\n")
    assert long_functions(package) == ["ma_convert/long.py:1 long"]
