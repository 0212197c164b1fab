"""Attention backends: which implementation runs the experts, and whether it can run here.

``RoutingPolicy.backend`` takes one of :data:`BACKEND_NAMES`:

- ``torch``: the plain torch reference path (blocked SDPA calls). Works on every device.
- ``sdpa``: the same path; every softmax call goes through PyTorch SDPA.
- ``triton``: ma_convert's own Triton kernels for the gathered routed queries (CUDA).
- ``auto``: ``triton`` for CUDA tensors when triton imports, else ``torch``.

:func:`check_backend` validates a name and its packages (no GPU needed, so configs can be checked
on a CPU box); :func:`resolve_backend` turns a name into the backend that runs for tensors on a
given device.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BACKEND_NAMES = ("auto", "torch", "sdpa", "triton")

# Backends that only run on CUDA tensors.
GPU_ONLY = ("triton",)

# The one backend that needs a package (auto, torch and sdpa need none), and how to get it.
_HOW_TO_GET_TRITON = "the `triton` package (it comes with CUDA builds of torch; else pip install triton)"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run: a package is missing, or the tensors are not on CUDA."""


def _module_found(module: str) -> bool:
    # find_spec locates a module without importing it (triton takes seconds to import).
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a broken one
        return False


def _missing_package(name: str) -> str | None:
    """Why `name` cannot be imported here, or None when its package is present."""
    return f"needs {_HOW_TO_GET_TRITON}" if name == "triton" and not _module_found("triton") else None


def backend_status() -> dict[str, str]:
    """Every backend name -> "available", or the reason it cannot run on this machine."""
    cuda = torch.cuda.is_available()
    status = {}
    for name in BACKEND_NAMES:
        reason = _missing_package(name)
        if reason is None and name in GPU_ONLY and not cuda:
            reason = "needs a CUDA GPU"
        status[name] = reason or "available"
    return status


def check_backend(name: str) -> None:
    """Raise if `name` is unknown (ValueError) or its packages are missing (BackendUnavailableError).

    A GPU is not required: a config can be validated on a CPU machine ahead of time.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    reason = _missing_package(name)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend {name!r} {reason}")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that runs for tensors on `device` when the config asks for `name`.

    ``auto`` becomes ``triton`` on CUDA (when triton imports) and ``torch`` elsewhere; a GPU-only
    backend on a non-CUDA device raises :class:`BackendUnavailableError`. Cached per
    (name, device type): this runs on every forward call.
    """
    return _resolve(name, torch.device(device).type)


@functools.cache
def _resolve(name: str, device_type: str) -> str:
    if name == "auto":
        return "triton" if device_type == "cuda" and _triton_imports() else "torch"
    if name in GPU_ONLY and device_type != "cuda":
        raise BackendUnavailableError(
            f"attention backend {name!r} runs on CUDA tensors and the input is on {device_type}; "
            "use backend='auto' or backend='torch' there"
        )
    check_backend(name)  # an unknown name fails here too
    return name


def _triton_imports() -> bool:
    # A real import: triton can be present but broken (no driver, wrong version); auto then stays
    # on the torch path instead of failing at the first kernel launch.
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - whatever breaks the import, the torch path still runs
        return False
    return True
