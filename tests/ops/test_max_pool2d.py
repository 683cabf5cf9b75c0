"""max_pool2d (window maxima without indices, CPU) against its formula, F.max_pool2d."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast.nn import MaxPool2d
from resnet_fast.ops import max_pool2d, reference
from tests.conftest import make_input, op_names, requires_extension

pytestmark = requires_extension

# (N, C, H, W, kernel, stride, padding): the stem's pooling, and awkward ones.
SHAPES = [
    (2, 64, 16, 16, (3, 3), (2, 2), (1, 1)),  # ResNet's stem
    (1, 3, 7, 5, (3, 3), (2, 2), (1, 1)),  # batch 1, odd sizes and channels
    (3, 17, 9, 9, (2, 2), (2, 2), (0, 0)),  # 2x2 without padding, a row and column left over
    (2, 8, 6, 6, (3, 3), (1, 1), (1, 1)),  # overlapping windows, stride 1
    (2, 5, 8, 7, (3, 2), (2, 1), (1, 0)),  # different kernel, stride and padding per axis
    (4, 9, 1, 1, (1, 1), (1, 1), (0, 0)),  # 1x1 map
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_matches_formula_exactly(shape, dtype, layout):
    n, c, h, w, k, s, p = shape
    x = make_input((n, c, h, w), dtype, layout)
    y = torch.ops.resnet_fast.max_pool2d(x, k, s, p)
    expected = reference.max_pool2d(x, k, s, p)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)  # a maximum is one of the inputs
    assert y.stride() == expected.stride()  # the layout PyTorch's pooling gives


def test_nan_and_infinities_propagate_like_pytorch():
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    x[0, 3, 2, 2] = float("nan")  # in the window of output (1, 1) (stride 2, padding 1)
    x[1, 5, 0, 0] = float("inf")
    x[1, 7] = float("-inf")  # a whole channel of -inf
    for layout in (torch.channels_last, torch.contiguous_format):
        t = x.contiguous(memory_format=layout)
        y = torch.ops.resnet_fast.max_pool2d(t, [3, 3], [2, 2], [1, 1])
        expected = F.max_pool2d(t, 3, 2, 1)
        assert torch.equal(y.isnan(), expected.isnan()) and y.isnan().sum() > 0
        torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 6, 6), [3, 3], [2, 2], [1, 1]), "expected a 4-D"),
        ((torch.randn(1, 4, 6, 6), [3, 3], [2, 2], [2, 2]), "at most half of kernel_size"),
        ((torch.randn(1, 4, 6, 6), [3, 3], [0, 2], [1, 1]), "expected a positive stride"),
        ((torch.randn(1, 4, 2, 2), [5, 5], [1, 1], [0, 0]), "smaller than the 5x5 window"),
    ],
)
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast.max_pool2d(*args)


def test_integer_input_is_refused():
    with pytest.raises(RuntimeError, match="not implemented for 'Long'"):
        torch.ops.resnet_fast.max_pool2d(torch.ones(1, 4, 4, 4, dtype=torch.int64), [3, 3], [2, 2], [1, 1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((2, 4, 7, 6), torch.float32, layout).requires_grad_(True)
    torch.library.opcheck(torch.ops.resnet_fast.max_pool2d, (x, [3, 3], [2, 2], [1, 1]))


def test_gradcheck():
    # Inference is what the op is for; a gradient still comes out right (through PyTorch's argmax).
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.resnet_fast.max_pool2d(t, [3, 3], [2, 2], [1, 1]), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.resnet_fast.max_pool2d(t, [3, 3], [2, 2], [1, 1]), (x,))


def _ran_our_kernel(fn) -> bool:
    return "resnet_fast::max_pool2d" in op_names(fn)


def test_routing():
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert _ran_our_kernel(lambda: max_pool2d(x, 3, 2, 1))
        assert not _ran_our_kernel(lambda: max_pool2d(x.contiguous(), 3, 2, 1))  # NCHW: PyTorch's is as fast
        with resnet_fast.use_backend("eager"):
            assert not _ran_our_kernel(lambda: max_pool2d(x, 3, 2, 1))
        xi = (x * 10).long().contiguous(memory_format=torch.channels_last)  # integers: PyTorch's
        assert not _ran_our_kernel(lambda: max_pool2d(xi, 3, 2, 1))
        assert torch.equal(max_pool2d(xi, 3, 2, 1), F.max_pool2d(xi, 3, 2, 1))
    # Something to differentiate: the training op, which keeps one-byte window positions
    # (tests/ops/test_max_pool2d_train.py).
    xg = x.detach().requires_grad_(True)
    names = op_names(lambda: max_pool2d(xg, 3, 2, 1))
    assert "resnet_fast::max_pool2d_train" in names and "resnet_fast::max_pool2d" not in names
    y = max_pool2d(xg, 3, 2, 1)
    y.backward(torch.ones_like(y))
    x_ref = x.detach().requires_grad_(True)
    F.max_pool2d(x_ref, 3, 2, 1).backward(torch.ones_like(y))
    torch.testing.assert_close(xg.grad, x_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=2),  # stride defaults to the kernel size
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),  # not ours: PyTorch's
        dict(kernel_size=3, stride=1, dilation=2),  # not ours: PyTorch's
    ],
)
def test_module_matches_nn_maxpool2d(kwargs):
    ours, theirs = MaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)
    assert repr(ours) == repr(theirs) and isinstance(ours, nn.MaxPool2d)
    x = torch.randn(2, 8, 11, 11).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # return_indices gives PyTorch's (values, indices)
    values, indices = MaxPool2d(3, 2, 1, return_indices=True)(x)
    expected_values, expected_indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)


def test_compiles_without_graph_break():
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    fn = torch.compile(lambda t: max_pool2d(t, 3, 2, 1).sin(), fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        torch.testing.assert_close(fn(x), F.max_pool2d(x, 3, 2, 1).sin())
