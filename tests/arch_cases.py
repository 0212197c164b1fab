"""Tiny random-initialised models of every supported architecture, gathered from tests/cases/*.py.

Each case module defines CASES: a list of ArchCase. A case builds the original model in fp32, with
the requested attention implementation ("eager" or "sdpa").
"""

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class ArchCase:
    name: str
    make: Callable[[str], object]  # attn_implementation -> original model (eval, fp32)
    vocab: int = 128
    eager_is_reference: bool = True  # False where the original's eager path is itself wrong (Falcon ALiBi)

    def __str__(self):
        return self.name


def all_cases() -> list[ArchCase]:
    cases = []
    for path in sorted((Path(__file__).parent / "cases").glob("[!_]*.py")):
        cases.extend(importlib.import_module(f"cases.{path.stem}").CASES)
    return cases
