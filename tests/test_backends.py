"""Backend names and checks, and FlexAttention on routed queries."""

import math
import warnings

import pytest
import torch

from ma_convert.cli import main
from ma_convert.kernels import backends, flex
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
    assert BACKEND_NAMES == ("auto", "torch", "sdpa", "triton", "flex")


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
        ("flex", "torch.nn.attention.flex_attention", ["FlexAttention"]),
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
    fake_modules(monkeypatch, missing={"torch.nn.attention.flex_attention"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = backend_status()
    assert tuple(status) == BACKEND_NAMES
    assert status["auto"] == status["torch"] == status["sdpa"] == "available"
    assert status["triton"] == "needs a CUDA GPU"
    assert "pip install" in status["flex"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_status()["triton"] == "available"


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


# ----------------------------------------------------------------------------------- dense


def reference_attention(q, k, v, q_pos, scale, *, window=None, sinks=0):
    """Plain math: query i sits at key q_pos[b, i] and sees keys j <= it (and within the window)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    keys = torch.arange(k.shape[2], device=k.device)
    p = q_pos[:, None, :, None]
    ok = keys <= p
    if window is not None:
        ok = ok & ((p - keys < window) | (keys < sinks))
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    weights = scores.masked_fill(~ok, -math.inf).softmax(-1)
    return weights @ v


def qkv(b=2, hq=4, hkv=2, n=37, tk=37, d=16, dtype=torch.float32, device="cpu"):
    def make(heads, length):
        return torch.randn(b, heads, length, d, dtype=dtype, device=device)

    return make(hq, n), make(hkv, tk), make(hkv, tk)


# ----------------------------------------------------------------------------------- flex


def routed_tokens(n_tokens, counts, *, clustered=False):
    """(B, max(counts)) sorted random token subsets, -1 in trailing padding slots."""
    rows = []
    for count in counts:
        if clustered:  # two runs far apart, so one query block spans a long gap
            half = count // 2
            picked = torch.cat([torch.arange(half), torch.arange(n_tokens - (count - half), n_tokens)])
        else:
            picked = torch.randperm(n_tokens)[:count].sort().values
        rows.append(torch.cat([picked, picked.new_full((max(counts) - count,), -1)]))
    return torch.stack(rows)


def flex_runs_on_cpu():
    # Asks torch itself (not our wrapper, whose bugs must fail the tests, not skip them).
    try:
        q = torch.zeros(1, 1, 4, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex.flex_attention(q, q, q)
    except Exception:  # noqa: BLE001 - any failure: this torch has no eager FlexAttention on the CPU
        return False
    return True


cpu_flex = pytest.mark.skipif(not flex_runs_on_cpu(), reason="this torch cannot run FlexAttention on the CPU")
eager_warning = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def check_routed(out, q, k, v, tokens, offset, scale, window, sinks, rtol):
    real = tokens >= 0
    ref = reference_attention(q, k, v, (tokens + offset).clamp_min(0), scale, window=window, sinks=sinks)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()  # padding slots included
    mask = real[:, None, :, None]
    err = ((out.double() - ref) * mask).norm() / (ref * mask).norm()
    assert err <= rtol, f"relative error {err:.2e}"


CASES = [  # (window, sinks, clustered)
    (None, 0, False),
    (None, 0, True),
    (40, 0, False),
    (40, 3, True),
    (200, 130, False),  # sinks spanning more than one key block
]


@cpu_flex
@eager_warning
@pytest.mark.parametrize("window, sinks, clustered", CASES)
def test_flex_routed_matches_math_on_cpu(window, sinks, clustered):
    offset, tk = 30, 330  # 30 cached keys before the 300 tokens of this call
    tokens = routed_tokens(300, [170, 60], clustered=clustered)
    q, k, v = qkv(n=tokens.shape[1], tk=tk)
    out = flex.flex_routed_softmax(q, k, v, tokens, offset, window=window, sinks=sinks, scale=0.25)
    check_routed(out, q, k, v, tokens, offset, 0.25, window, sinks, rtol=1e-5)


def test_padding_slots_take_their_blocks_lowest_position():
    tokens = torch.tensor([[3, 5, 9, -1], [-1, -1, -1, -1]])
    pos = flex.query_positions(tokens, 10, 128)
    assert pos.shape == (2, 128)
    assert pos[0, :3].tolist() == [13, 15, 19] and (pos[0, 3:] == 13).all()
    assert (pos[1] == 0).all()  # a block of padding only sits at key 0


def dense_blocks(num, idx, n_k):
    """Expand a BlockMask table (B, 1, Q) / (B, 1, Q, K) into (B, Q, n_k) bool."""
    listed = torch.arange(idx.shape[-1]) < num[..., None]
    out = torch.zeros(*num.shape, n_k, dtype=torch.bool)
    out.scatter_(-1, idx.long(), listed)
    return out[:, 0]


def assert_block_mask_exact(tokens, n_keys, window, sinks):
    """The analytic BlockMask lists exactly the key blocks with an allowed (query slot, key) pair,
    and marks full exactly those whose pairs are all allowed (a ragged last key block stays partial)."""
    block = flex.BLOCK
    n_pad = -(-tokens.shape[1] // block) * block
    pos = flex.query_positions(tokens, 0, n_pad)
    mask = flex.routed_block_mask(pos, n_keys, window=window, sinks=sinks)
    n_q, n_k = n_pad // block, -(-n_keys // block)
    partial = dense_blocks(mask.kv_num_blocks, mask.kv_indices, n_k)
    full = dense_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, n_k)
    keys = torch.arange(n_k * block)
    p = pos[:, :, None]
    ok = (keys <= p) & (keys < n_keys)
    if window is not None:
        ok = ok & ((p - keys < window) | (keys < sinks))
    ok = ok.view(tokens.shape[0], n_q, block, n_k, block)
    in_range = (keys < n_keys).view(n_k, block)
    any_ok = ok.any(dim=(2, 4))
    all_ok = (ok | ~in_range).all(dim=(2, 4)) & in_range.all(-1)
    assert not (partial & full).any()
    assert torch.equal(partial | full, any_ok)  # nothing missed, no wasted block
    assert torch.equal(full, all_ok)  # the mask_mod is skipped exactly where nothing is masked
    return full


@pytest.mark.parametrize("window, sinks, clustered", CASES + [(1, 0, False), (128, 0, True)])
def test_block_mask_lists_exactly_the_blocks_queries_see(window, sinks, clustered):
    full = assert_block_mask_exact(routed_tokens(1000, [600, 300], clustered=clustered), 1000, window, sinks)
    assert full.any() or window is not None and window < 2 * flex.BLOCK


def test_block_mask_edge_blocks():
    # Key block 1 (128..255) straddles the 130 sinks; queries 280..329 see all of it (329 - 199 = 130).
    full = assert_block_mask_exact(torch.arange(280, 330)[None], 400, 200, 130)
    assert full[0, 0, 1]
    # A lone query on the last key, whose key block is ragged (896..999).
    full = assert_block_mask_exact(torch.tensor([[999]]), 1000, None, 0)
    assert not full[0, 0, 7] and full[0, 0, :7].all()


def routed_case(device, dtype, window, sinks):
    offset, n_tok = 64, 1000
    tokens = routed_tokens(n_tok, [700, 333], clustered=window is not None).to(device)
    q, k, v = qkv(b=2, hq=8, hkv=2, n=tokens.shape[1], tk=offset + n_tok, d=64, dtype=dtype, device=device)
    return q, k, v, tokens, offset


@cuda_only
@pytest.mark.parametrize("window, sinks", [(None, 0), (96, 4)])
def test_flex_routed_on_cuda_bf16(window, sinks):
    q, k, v, tokens, offset = routed_case("cuda", torch.bfloat16, window, sinks)
    out = flex.flex_routed_softmax(q, k, v, tokens, offset, window=window, sinks=sinks, scale=0.125)
    check_routed(
        out.float().cpu(),
        q.float().cpu(),
        k.float().cpu(),
        v.float().cpu(),
        tokens.cpu(),
        offset,
        0.125,
        window,
        sinks,
        rtol=1e-2,
    )


@cuda_only
def test_flex_routed_gradients_on_cuda():
    q, k, v, tokens, offset = routed_case("cuda", torch.bfloat16, 96, 4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flex.flex_routed_softmax(q, k, v, tokens, offset, window=96, sinks=4, scale=0.125)
    real = (tokens >= 0)[:, None, :, None]
    grads = torch.autograd.grad((out.float() * real).square().sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q32, k32, v32, (tokens + offset).clamp_min(0), 0.125, window=96, sinks=4)
    ref_grads = torch.autograd.grad((ref * real).square().sum(), (q32, k32, v32))
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert (got.double() - want).norm() / want.norm() <= 2e-2

