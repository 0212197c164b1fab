"""Pushing a converted folder to the Hugging Face Hub exactly as it is on disk.

The folder is uploaded with ``HfApi.upload_folder`` rather than ``model.push_to_hub``: the latter
re-serialises the model and writes its own README.md over the card from ``ma_convert.card``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import HfApi

from .hub import MARKER
from .version import __version__


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    say=lambda *args, **kwargs: None,
) -> str:
    """Upload every file of ``folder`` to the model repo ``repo_id``; return the commit URL (the PR URL
    with ``create_pr``).

    The repo is created if needed (``private`` applies only then) and so is the branch ``revision``
    when it is not ``main``. Any failure raises ``RuntimeError`` naming the step (create repo / create
    branch / upload) and the server's message. The local folder is only read, never modified.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; nothing to push")
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if missing:  # not a finished conversion
        hint = " (write it with ma_convert.card.render_model_card)" if "README.md" in missing else ""
        raise FileNotFoundError(f"refusing to push {folder}: missing {', '.join(missing)}{hint}")
    if create_pr and revision not in (None, "main"):
        # huggingface_hub opens pull requests against main only; failing here, before any request,
        # beats creating a branch and then failing the upload.
        raise ValueError(f"create_pr=True opens a pull request against main; it cannot target revision={revision!r}")
    # An existing PR ref (refs/pr/N) is pushed to as is; any other named revision is a branch.
    branch = revision if revision not in (None, "main") and not revision.startswith("refs/pr/") else None

    api = HfApi(endpoint=endpoint, token=token, library_name="ma-convert", library_version=__version__)
    with _step("create repo", repo_id, folder):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if branch is not None:
        with _step("create branch", repo_id, folder):
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
    say(f"uploading {folder} to {repo_id} (a failing connection is retried with back-off for several minutes "
        "before it gives up; Ctrl-C stops it, and the Hub keeps nothing half-uploaded)")
    with _step("upload", repo_id, folder):
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=[MARKER],  # ma-convert's local bookkeeping, not part of the model
            commit_message=commit_message or f"Upload Meta-Attention model (ma-convert {__version__})",
        )
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


@contextlib.contextmanager
def _step(name: str, repo_id: str, folder: Path) -> Iterator[None]:
    """Turn whatever a Hub call raises into a RuntimeError that says which step failed and why."""
    try:
        yield
    except Exception as error:
        message = str(error).strip() or type(error).__name__
        server = getattr(error, "server_message", None)
        if server and server not in message:
            message = f"{message} (server: {server})"
        raise RuntimeError(
            f"push to {repo_id!r} failed at step '{name}': {' '.join(message.split())} (the local folder {folder} is unchanged)"
        ) from error
