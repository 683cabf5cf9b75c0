"""Models under torch.compile: no graph break, same results as eager."""

import pytest
import torch

import resnet_fast


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_compiled_resnet20_matches_eager(backend):
    resnet_fast.set_backend(backend)
    model = resnet_fast.resnet20()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 32, 32)
    ref = resnet_fast.resnet20()
    ref.load_state_dict(model.state_dict())
    out, out_ref = compiled(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(model.conv1.weight.grad, ref.conv1.weight.grad, rtol=1e-3, atol=1e-4)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
