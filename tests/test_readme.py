"""The Python examples of the README and of docs/ run as written, their relative links resolve, and the
README's two commands are the ones CI and users run."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page.relative_to(ROOT), index, block) for page in PAGES
          for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


def test_readme_and_docs_have_examples():
    assert len(BLOCKS) >= 5 and any(str(page) == "README.md" for page, _, _ in BLOCKS)


@pytest.mark.parametrize("page,index,block", BLOCKS, ids=[f"{page}[{index}]" for page, index, _ in BLOCKS])
def test_example_runs(page, index, block):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(block, f"{page}[python block {index}]", "exec"), {"__name__": "readme"})
    for line in re.findall(r"print\(stats\)\s+# (RoutingStats\(.*\))", block):
        assert line in buffer.getvalue(), (line, buffer.getvalue())


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    """Every relative link names a file that exists, and every #anchor a heading of its page."""
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{page.name}: {target}"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    main_cmd, test_cmd = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert main_cmd.endswith("ma-convert demo")
    test_part = test_cmd.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_part in ci
    assert "torch==2.13.0" in ci
