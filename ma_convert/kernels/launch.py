"""Launching compiled Triton kernels without the JIT launcher's per-call work.

`kernel[grid](...)` binds the arguments, computes their specialisation, builds a cache key with a
string of the options, checks the kernel's globals and asks for launch metadata, on every call. A
routed layer makes several small launches per step, and on a model of SmolLM2's size that host work
is what the step waits on. `launch(kernel, grid, ...)` takes the same arguments and keeps each
compiled kernel under a cheaper key of its own and calls its `run` directly.

The key holds everything Triton specialises a kernel on for pointers, integers and constexprs (the
dtype and 16-byte alignment of each tensor; whether an integer is 1, a multiple of 16, or past
32 bits; every constexpr and launch option), and more, so one key never stands for two different
compiled kernels. The first call of each key goes through Triton's own launcher, which compiles;
so does every call in Triton's interpreter, or while a launch hook is set (a profiler).
"""

from __future__ import annotations

import os

import torch
from triton import knobs

# MA_CONVERT_DIRECT_LAUNCH=0 sends every launch through Triton's own launcher (to compare).
ENABLED = os.environ.get("MA_CONVERT_DIRECT_LAUNCH", "1") != "0"


def _hooks_set() -> bool:
    """A launch hook is set (Triton 3.6 keeps empty hook chains, not None)."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _arg_keys(values, constexpr) -> tuple:
    """Per argument: a constexpr by value; a tensor by dtype and 16-byte alignment; an integer by
    whether it is 1, a multiple of 16, and within 32 and 64 bits; a float as such; anything else
    (None, bools) by value. One comprehension: this runs on every launch."""
    return tuple([
        v if c
        else (v.dtype, not v.data_ptr() & 15) if isinstance(v, torch.Tensor)
        else (v == 1, not v & 15, -2147483648 <= v < 2147483648, 0 <= v < 2**63) if type(v) is int
        else float if type(v) is float
        else v
        for v, c in zip(values, constexpr)
    ])


class DirectLauncher:
    """`launch(grid, *args, **kwargs)` for one `triton.jit` kernel (see the module docstring)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict = {}
        self.direct = ENABLED and hasattr(kernel, "device_caches")  # not under TRITON_INTERPRET
        if self.direct:
            self.names = list(kernel.arg_names)
            self.defaults = {p.name: p.default for p in kernel.params if p.has_default}
            self.constexpr = [p.is_constexpr for p in kernel.params]

    def __call__(self, grid, *args, **kwargs) -> None:
        if not self.direct or _hooks_set():
            self.kernel[grid](*args, **kwargs)
            return
        values = list(args)
        for name in self.names[len(args):]:
            values.append(kwargs.pop(name) if name in kwargs else self.defaults[name])
        device = torch.cuda.current_device()
        key = (device, tuple(kwargs.items()), _arg_keys(values, self.constexpr))
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*values, **kwargs)
            return
        g0, g1, g2 = (*grid, 1, 1)[:3]
        stream = torch._C._cuda_getCurrentRawStream(device)
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *values)


_launchers: dict[int, DirectLauncher] = {}


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, through the kernel's `DirectLauncher`."""
    runner = _launchers.get(id(kernel))
    if runner is None:
        runner = _launchers[id(kernel)] = DirectLauncher(kernel)
    runner(grid, *args, **kwargs)
