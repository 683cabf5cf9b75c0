import pytest
import torch

import resnet_fast


@pytest.fixture(autouse=True)
def _isolated():
    """Each test starts from the default backend and a fixed seed, and leaves them as it found them."""
    torch.manual_seed(0)
    previous = resnet_fast.get_backend()
    yield
    resnet_fast.set_backend(previous)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
requires_extension = pytest.mark.skipif(
    not resnet_fast.extension_available(), reason=f"extension not built: {resnet_fast.extension_error()}"
)
