"""The README's Python examples run as written, and its two commands are the ones CI and users run."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme"})
    for line in re.findall(r"print\(stats\)\s+# (RoutingStats\(.*\))", BLOCKS[index]):
        assert line in buffer.getvalue(), (line, buffer.getvalue())


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    main_cmd, test_cmd = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert main_cmd.endswith("ma-convert demo")
    test_part = test_cmd.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_part in ci
    assert "torch==2.13.0" in ci
