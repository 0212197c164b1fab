"""The package's import rules, read from the source (lazy imports inside functions count too):
kernels below core, core free of transformers, modeling below adapters, the library below training."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ma_convert"

# area -> imports it must not make (top-level packages, or ma_convert sub-packages)
FORBIDDEN = {
    "core": ["transformers", "accelerate", "peft", "datasets", "ma_convert.modeling", "ma_convert.adapters",
             "ma_convert.training", "ma_convert.eval", "ma_convert.integrations", "ma_convert.convert"],
    "kernels": ["transformers", "ma_convert.core", "ma_convert.modeling", "ma_convert.adapters",
                "ma_convert.training"],
    "modeling": ["ma_convert.adapters", "ma_convert.training", "ma_convert.eval"],
    "adapters": ["ma_convert.training", "ma_convert.eval"],
}


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute names of every module `path` imports, with the line."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(package[: len(package) - node.level + 1])
                found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            else:
                found.append((node.module, node.lineno))
    return found


def violations(area: str) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / area).rglob("*.py")):
        for name, line in imported_modules(path):
            for rule in FORBIDDEN[area]:
                if name == rule or name.startswith(rule + "."):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("area", sorted(FORBIDDEN))
def test_import_rules(area):
    assert violations(area) == []


def test_the_rule_check_finds_a_forbidden_import(tmp_path, monkeypatch):
    """The check itself: a core module importing transformers, lazily inside a function, is caught."""
    fake = tmp_path / "ma_convert"
    (fake / "core").mkdir(parents=True)
    code = "def f():\n    from transformers import AutoConfig\n    from ..adapters import x\n"
    (fake / "core" / "bad.py").write_text(code)
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert violations("core") == ["ma_convert/core/bad.py:2 imports transformers",
                                  "ma_convert/core/bad.py:3 imports ma_convert.adapters"]
