"""Backend names and checks."""


import pytest
import torch

from ma_convert.cli import main
from ma_convert.kernels import backends
from ma_convert.kernels.backends import (
    BACKEND_NAMES,
    GPU_ONLY,
    BackendUnavailableError,
    backend_status,
    check_backend,
    resolve_backend,
)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _fresh_resolve_cache():
    # resolve_backend caches per (name, device type); tests that fake packages must not leak.
    backends._resolve.cache_clear()
    yield
    backends._resolve.cache_clear()


def fake_modules(monkeypatch, missing=(), present_all=True):
    """Make find_spec report `missing` absent and (with present_all) every other module present."""
    real = backends.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in missing:
            return None
        return object() if present_all else real(name, *args, **kwargs)

    monkeypatch.setattr(backends.importlib.util, "find_spec", find_spec)


# ----------------------------------------------------------------------------------- names


def test_backend_names_keep_their_order():
    assert BACKEND_NAMES == ("auto", "torch", "sdpa", "triton")


def test_unknown_backend_error_lists_the_valid_names():
    for call in (lambda: check_backend("cuda"), lambda: resolve_backend("cuda", torch.device("cpu"))):
        with pytest.raises(ValueError) as err:
            call()
        assert "'cuda'" in str(err.value)
        assert all(name in str(err.value) for name in BACKEND_NAMES)


def test_check_backend_needs_packages_not_a_gpu(monkeypatch):
    fake_modules(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in BACKEND_NAMES:
        check_backend(name)  # no GPU here, and no error


@pytest.mark.parametrize(
    "name, module, words",
    [
        ("triton", "triton", ["triton"]),
    ],
)
def test_missing_package_names_the_package_and_the_extra(monkeypatch, name, module, words):
    fake_modules(monkeypatch, missing={module})
    with pytest.raises(BackendUnavailableError) as err:
        check_backend(name)
    assert all(word in str(err.value) for word in words), str(err.value)
    assert all(word in backend_status()[name] for word in words)
    with pytest.raises(BackendUnavailableError):  # also when the tensors are on CUDA
        resolve_backend(name, torch.device("cuda"))
    check_backend("torch")  # the others are unaffected


def test_backend_status_covers_every_name(monkeypatch):
    fake_modules(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = backend_status()
    assert tuple(status) == BACKEND_NAMES
    assert status["auto"] == status["torch"] == status["sdpa"] == "available"
    assert status["triton"] == "needs a CUDA GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_status()["triton"] == "available"
    fake_modules(monkeypatch, missing={"triton"})
    assert "pip install" in backend_status()["triton"]


def test_resolve_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    for name in GPU_ONLY:
        with pytest.raises(BackendUnavailableError) as err:
            resolve_backend(name, cpu)
        message = str(err.value)
        assert name in message and "CUDA" in message and "cpu" in message and "backend='auto'" in message


def test_resolve_on_cuda_device_type(monkeypatch):
    # Only the device type matters, so this runs without a GPU.
    fake_modules(monkeypatch)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "_triton_imports", lambda: True)
    assert resolve_backend("auto", cuda) == "triton"
    assert [resolve_backend(name, cuda) for name in GPU_ONLY] == list(GPU_ONLY)
    backends._resolve.cache_clear()
    monkeypatch.setattr(backends, "_triton_imports", lambda: False)
    assert resolve_backend("auto", cuda) == "torch"


def test_env_prints_every_backend(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name, status in backend_status().items():
        assert f"  {name:<12} {status}" in out

