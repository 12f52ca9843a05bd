import os

import pytest
import torch

# The Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
