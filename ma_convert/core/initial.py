"""One initialisation path. A module lists the values its own parameters and buffers start from
(`initial_values`); `reset_parameters` copies them in (the constructor calls it), and the Hugging Face
integration copies those that a checkpoint did not load (`modeling.base.init_meta_weights`)."""

from __future__ import annotations

import torch


def tensor_named(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by dotted name."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


class InitialValues:
    """Mixin for `nn.Module`s whose tensors start from `initial_values()`."""

    def initial_values(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, value in self.initial_values().items():
                tensor_named(self, name).copy_(value)
