import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

if not torch.cuda.is_available():
    # The Triton kernels run in Triton's interpreter on CPU tensors. Set before any test module
    # imports triton (torch's FlexAttention may), since triton reads it when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
