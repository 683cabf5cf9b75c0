"""bias_act (the inference epilogue: bias + residual + ReLU) against its formula."""

import pytest
import torch

import resnet_fast
from resnet_fast.ops import bias_act, reference
from tests.conftest import IMPLS, device_of, ops_of

from .test_batch_norm_act import make, on, residual_for

SHAPES = [(4, 16, 8, 8), (1, 3, 5, 7), (3, 17, 1, 1), (2, 64, 4, 4)]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("residual", [None, "identity", "option_a"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_formula(impl, shape, dtype, layout, residual, relu):
    dev = device_of(impl)
    x = on(dev, make(shape, dtype, layout))
    r, stride = residual_for(residual, shape, dtype, layout)
    r = on(dev, r)
    b = torch.randn(shape[1], device=dev)
    with resnet_fast.use_backend(impl):
        y = bias_act(x, b, r, relu, stride)
    rr = None if r is None else reference.zero_pad_shortcut(r, shape[1], stride)
    exact = reference.bias_act(x.double(), b.double(), None if rr is None else rr.double(), relu)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), exact, rtol=TOL[dtype], atol=TOL[dtype] * (exact.abs().max().item() + 1))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_and_gradients(impl):
    ops, dev = ops_of(impl), device_of(impl)
    x = torch.randn(2, 4, 3, 3, device=dev, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=dev, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 2, 6, 5, device=dev, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.bias_act, (x, b, r, 2, True))
    torch.library.opcheck(ops.bias_act, (x.float(), b.float(), None, 1, False))
    assert torch.autograd.gradcheck(lambda x, b, r: ops.bias_act(x, b, r, 2, True), (x, b, r), fast_mode=True)
    # Double backward (a gradient penalty through an inference-folded block).
    assert torch.autograd.gradgradcheck(lambda x, b, r: ops.bias_act(x, b, r, 2, True), (x, b, r), fast_mode=True)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 4, 3), torch.zeros(4), None, 1, True), "expected a 4-D input"),
        ((torch.randn(2, 4, 3, 3), torch.zeros(3), None, 1, True), "expected a bias of 4 elements"),
        ((torch.randn(2, 4, 3, 3), torch.zeros(4), torch.randn(2, 4, 5, 5), 1, True), "does not fit an output"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_refused_clearly(impl, args, message):
    dev = device_of(impl)
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(RuntimeError, match=message):
        ops_of(impl).bias_act(*args)
