"""Data of the `ma_pydoc_cloze` and `ma_pydoc_ppl` lm-eval tasks: short prose passages from CPython's
own documentation (`pydoc_data.topics`, which every Python installation has).

Each passage is one paragraph of 20 to 60 words that ends a sentence with a plain word; the task is
to predict that last word (without its full stop) from the rest, as LAMBADA does. Passages are taken
round-robin over the topics in sorted order (the first suitable paragraph of every topic, then the
second, ...), so the selection is deterministic for a given `pydoc_data` text.

The data lives in ``ma_pydoc_cloze.jsonl`` beside this file, generated once and committed (the pydoc
text differs a little between Python releases, so the file, not the running Python, defines the
task). ``ma_pydoc_cloze.source.json`` records the Python version and the digest of the text it came
from. Regenerate both with::

    python ma_convert/eval/lm_eval_tasks/pydoc_cloze.py

This file needs only the standard library (and `datasets` for `load`, which lm-eval already
requires), so the task folder works on its own, wherever it is copied and from any working directory:
lm-eval resolves a YAML's ``data_files`` against the current directory, so the YAMLs load the data
through ``custom_dataset: !function pydoc_cloze.load`` instead, which finds the file next to itself.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "ma_pydoc_cloze.jsonl"
SOURCE_FILE = HERE / "ma_pydoc_cloze.source.json"

N_DOCS = 100
MIN_WORDS, MAX_WORDS = 20, 60
GENERATOR_VERSION = 1

_WORD = re.compile(r"[A-Za-z][A-Za-z-]*[A-Za-z]")  # a plain word of two letters or more
_MARKUP = ("::", ">>>", "***", "===", "---")  # grammar rules, examples, headings


def pydoc_topics() -> dict:
    from pydoc_data.topics import topics

    return topics


def topics_digest(topics: dict) -> str:
    """sha256 of the whole pydoc text: the generator's output is a function of it alone."""
    return hashlib.sha256(json.dumps(topics, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def passages(text: str):
    """(context, target) for every suitable paragraph of one topic, in order."""
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if not lines[0] or any(not line or line[0].isspace() for line in lines):
            continue  # empty, indented (code, notes, lists) or ragged
        if any(mark in block for mark in _MARKUP):
            continue
        words = " ".join(lines).split()
        if not MIN_WORDS <= len(words) <= MAX_WORDS:
            continue
        last = words[-1]
        if not (last.endswith(".") and _WORD.fullmatch(last[:-1])):
            continue
        yield " ".join(words[:-1]), last[:-1]


def build_docs(topics: dict | None = None, n: int = N_DOCS) -> list[dict]:
    """The task's documents: {"id", "topic", "context", "target"}, round-robin over sorted topics."""
    topics = pydoc_topics() if topics is None else topics
    per_topic = [(key, list(passages(topics[key]))) for key in sorted(topics)]
    rounds = max((len(found) for _, found in per_topic), default=0)
    docs = [{"id": f"{key}/{depth}", "topic": key, "context": found[depth][0], "target": found[depth][1]}
            for depth in range(rounds) for key, found in per_topic if depth < len(found)]
    return docs[:n]


def render_jsonl(docs: list[dict]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


def write() -> list[dict]:
    """(Re)generate the data file and its provenance record."""
    topics = pydoc_topics()
    docs = build_docs(topics)
    DATA_FILE.write_text(render_jsonl(docs), encoding="utf-8")
    source = {"generator": "pydoc_cloze.py", "generator_version": GENERATOR_VERSION,
              "python": platform.python_version(), "topics_sha256": topics_digest(topics), "docs": len(docs)}
    SOURCE_FILE.write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return docs


def read_docs(path: Path = DATA_FILE) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load(**_ignored):
    """lm-eval's ``custom_dataset``: the committed documents as a DatasetDict with one "test" split.
    (lm-eval passes the task's metadata and dataset_kwargs; nothing here depends on them.)"""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_docs())})


if __name__ == "__main__":
    written = write()
    print(f"wrote {len(written)} documents to {DATA_FILE} ({DATA_FILE.stat().st_size} bytes)")
