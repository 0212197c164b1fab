"""Writing converted checkpoints safely: never over an existing folder silently, never half-written."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless `overwrite`; called before any heavy work."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True (--overwrite)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f"cannot create {out}: {parent} is a file")
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces `out_dir` in one
    rename, on failure it is removed and `out_dir` is left as it was."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(backup)
    tmp.rename(out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
