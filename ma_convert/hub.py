"""Writing folders safely: never over something ma-convert did not write, never half-written.

Every folder ma-convert writes (a converted model, a finetune run) carries a marker file, `MARKER`,
listing what it put there. A folder may be replaced (``--overwrite``) only when the marker is there
and nothing else was added since, and never when it is, holds or lies inside a source the command
reads. Output is written into a hidden temporary sibling and renamed into place; an exception,
Ctrl-C or SIGTERM removes the sibling, and the next run removes siblings left by a killed one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .version import __version__

MARKER = ".ma-convert.json"
_TEMPORARY_KINDS = ("tmp", "old")


class OutputFolderError(FileExistsError):
    """An output folder ma-convert refuses to write (it exists, is a source, or holds other files)."""


def read_marker(folder: Path) -> Optional[dict]:
    """The marker of a folder ma-convert wrote, or None."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "ma-convert" else None


def write_marker(folder: Path, kind: str, entries: Iterable[str] = ()) -> None:
    """Mark `folder` as written by ma-convert; `entries` are the top-level names it may hold."""
    marker = {"written_by": "ma-convert", "version": __version__, "kind": kind, "pid": os.getpid(),
              "entries": sorted(set(entries) | {MARKER})}
    (Path(folder) / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def foreign_entries(folder: Path) -> list[str]:
    """What `folder` holds that its marker does not list (everything, without a marker)."""
    marker = read_marker(folder)
    known = set(marker["entries"]) if marker else set()
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in known)


def _relation(out: Path, source: Path) -> Optional[str]:
    if out == source:
        return "is"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def check_output_dir(out_dir: str | Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> Path:
    """Refuse an output folder before any heavy work: one that exists (unless `overwrite`), one that
    is, contains or lies inside a local source, and one holding files ma-convert did not write."""
    out = Path(out_dir)
    resolved = out.resolve()
    for source in sources:
        source_path = Path(source)
        if source_path.exists():
            relation = _relation(resolved, source_path.resolve())
            if relation is not None:
                raise OutputFolderError(f"the output folder {out} {relation} the source {source_path}; "
                                        "choose an output folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out} exists and is not a folder")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputFolderError(f"cannot create {out}: {parent} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputFolderError(f"{out} already exists; choose another folder or pass --overwrite")
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputFolderError(f"refusing to overwrite {out}: it holds files ma-convert did not write ({shown}); "
                                    "move them away or choose another folder")
    return out


def remove_stale_temporaries(out: Path) -> None:
    """Remove hidden siblings of `out` that an interrupted ma-convert left (their process is gone)."""
    if not out.parent.is_dir():
        return
    for kind in _TEMPORARY_KINDS:
        for candidate in out.parent.glob(f".{out.name}.{kind}-*"):
            marker = read_marker(candidate) if candidate.is_dir() else None
            if marker is not None and not _process_alive(marker.get("pid")):
                shutil.rmtree(candidate, ignore_errors=True)


def _process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt as Ctrl-C does, so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _normalise_modes(folder: Path) -> None:
    """Give every file the mode the user's umask gives new files (transformers writes weights 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = (),
                     kind: str = "model") -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces `out_dir` in one
    rename, on failure or interruption it is removed and `out_dir` is left as it was."""
    out = check_output_dir(out_dir, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    with terminate_as_interrupt():
        try:
            tmp.mkdir()
            write_marker(tmp, "tmp")
            yield tmp
            write_marker(tmp, kind, (p.name for p in tmp.iterdir()))
            _normalise_modes(tmp)
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`, setting an old `out` aside first and removing it once the new one is in place."""
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(backup)
    tmp.rename(out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ------------------------------------------------------------------------------------ report files
REPORT_TAG = "ma-convert report"  # in every report file ma-convert writes, so --overwrite knows its own


def check_report_paths(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse, before any work, report files that exist unless --overwrite and ma-convert wrote them."""
    for path in paths:
        if not path.exists():
            continue
        if not overwrite:
            raise OutputFolderError(f"{path} exists; pass --overwrite to replace a report ma-convert wrote")
        head = ""
        if path.is_file():
            with path.open(encoding="utf-8", errors="replace") as f:
                head = f.read(200)
        if REPORT_TAG not in head:
            raise OutputFolderError(f"{path} exists and is not a report ma-convert wrote: it is left as it is")


def write_files(files: dict[Path, str | bytes]) -> None:
    """Write each path's text or bytes atomically and together: every file goes to a hidden temporary
    sibling first, and only when all are written are they renamed into place."""
    temporaries = {path: path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp") for path in files}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                temporaries[path].write_bytes(data)
            else:
                temporaries[path].write_text(data, encoding="utf-8")
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
