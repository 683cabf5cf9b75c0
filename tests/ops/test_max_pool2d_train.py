"""max_pool2d_train (training's max pooling, CPU: the maxima and one-byte window positions, all
that its backward keeps) against its formula, reference.max_pool2d_train, and PyTorch's pooling:
the same maxima, the same argmax, the same gradients, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast import _routing
from resnet_fast.nn import MaxPool2d
from resnet_fast.ops import max_pool2d, reference
from tests.conftest import kept_storages, make_input, op_names, requires_extension

pytestmark = requires_extension

# (N, C, H, W, kernel, stride, padding): the stem's pooling, and awkward ones.
SHAPES = [
    (2, 64, 16, 16, (3, 3), (2, 2), (1, 1)),  # ResNet's stem
    (1, 3, 7, 5, (3, 3), (2, 2), (1, 1)),  # batch 1, odd sizes and channels
    (3, 17, 9, 9, (2, 2), (2, 2), (0, 0)),  # 2x2 without padding, a row and column left over
    (2, 20, 6, 6, (3, 3), (1, 1), (1, 1)),  # overlapping windows, stride 1: gradients add up
    (2, 5, 8, 7, (3, 2), (2, 1), (1, 0)),  # different kernel, stride and padding per axis
    (4, 9, 1, 1, (1, 1), (1, 1), (0, 0)),  # 1x1 map
    (1, 2, 17, 16, (16, 16), (1, 1), (8, 8)),  # 256 values a window: the byte's last position
]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def _special_values(x: torch.Tensor) -> torch.Tensor:
    """Ties (a constant patch), a NaN, infinities and a -inf channel in x (in place)."""
    n, c, h, w = x.shape
    x[0, 0, : min(h, 4), : min(w, 4)] = 0.5  # ties: the first in the window's order wins
    x[-1, -1, h // 2, w // 2] = float("nan")
    if c > 2:
        x[0, 1, 0, 0] = float("inf")
        x[-1, 2] = float("-inf")  # a whole channel of -inf
    return x


def _run(x, k, s, p, grad):
    xg = x.detach().requires_grad_(True)
    y, index = torch.ops.resnet_fast.max_pool2d_train(xg, k, s, p)
    y.backward(grad)
    return y, index, xg.grad


def _run_pytorch(x, k, s, p, grad):
    xg = x.detach().requires_grad_(True)
    y = F.max_pool2d(xg, k, s, p)
    y.backward(grad)
    return y, xg.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("special", [False, True], ids=["random", "ties-nan-inf"])
def test_matches_pytorch_bit_for_bit(shape, dtype, layout, special):
    n, c, h, w, k, s, p = shape
    x = make_input((n, c, h, w), dtype, layout)
    if special:
        with torch.no_grad():
            _special_values(x)
    expected_y, expected_index = reference.max_pool2d_train(x, k, s, p)
    grad = make_input(tuple(expected_y.shape), dtype, layout)
    y, index, grad_x = _run(x, k, s, p, grad)
    ref_y, ref_grad_x = _run_pytorch(x, k, s, p, grad)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0, equal_nan=True)  # a maximum is one of the inputs
    assert torch.equal(index, expected_index)  # PyTorch's argmax
    assert index.dtype == torch.uint8 and index.shape == y.shape
    assert y.stride() == ref_y.stride()  # the layout PyTorch's pooling gives
    assert torch.equal(grad_x, ref_grad_x)  # the same inputs get the same sums, in the same order
    assert grad_x.stride() == ref_grad_x.stride() or not x.is_contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_keeps_only_the_window_positions(layout):
    """What autograd keeps: one byte per output (ResNet-50's stem at batch 16: 3.2 MB), not the
    input and int64 indices that PyTorch's pooling keeps (25.7 + 51 MB)."""
    x = make_input((2, 16, 12, 12), torch.float32, layout, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = max_pool2d(x, 3, 2, 1)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.uint8, y.shape)]
    with kept_storages() as kept:
        F.max_pool2d(x, 3, 2, 1)
    assert len(kept) == 2  # PyTorch's: the input and the int64 indices


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_and_double_backward(layout):
    """gradcheck in float64; under create_graph the gradient is PyTorch's pooling backward on the
    same argmax (differentiable in the incoming gradient): gradgradcheck, and a gradient penalty
    equal to PyTorch's."""
    x = make_input((2, 3, 7, 5), torch.float64, layout, requires_grad=True)
    f = lambda t: torch.ops.resnet_fast.max_pool2d_train(t, [3, 3], [2, 2], [1, 1])[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    grads = []
    for pool in (f, lambda t: F.max_pool2d(t, 3, 2, 1)):
        y = pool(x)
        (g,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
        grads.append((g.detach(), gg))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((2, 4, 7, 6), torch.float32, layout, requires_grad=True)
    torch.library.opcheck(torch.ops.resnet_fast.max_pool2d_train, (x, [3, 3], [2, 2], [1, 1]))
    y, index = torch.ops.resnet_fast.max_pool2d_train(x.detach(), [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(
        torch.ops.resnet_fast.max_pool2d_train_backward, (torch.randn_like(y), index, [7, 6], [3, 3], [2, 2], [1, 1])
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 6, 6), [3, 3], [2, 2], [1, 1]), "expected a 4-D"),
        ((torch.randn(1, 4, 6, 6).half(), [3, 3], [2, 2], [1, 1]), "expected a float32 or float64 input"),
        ((torch.randn(1, 4, 6, 6), [3, 3], [2, 2], [2, 2]), "at most half of kernel_size"),
        ((torch.randn(1, 4, 6, 6), [3, 3], [0, 2], [1, 1]), "expected a positive stride"),
        ((torch.randn(1, 4, 2, 2), [5, 5], [1, 1], [0, 0]), "smaller than the 5x5 window"),
        ((torch.randn(1, 4, 20, 20), [17, 16], [1, 1], [0, 0]), "at most 256 values a window"),
    ],
)
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast.max_pool2d_train(*args)


def test_bad_backward_input_is_refused_clearly():
    y, index = torch.ops.resnet_fast.max_pool2d_train(torch.randn(1, 4, 8, 8), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match=r"expected grad_y and a uint8 window_index of shape \(1, 4, 4, 4\)"):
        torch.ops.resnet_fast.max_pool2d_train_backward(torch.randn(1, 4, 5, 5), index, [8, 8], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="uint8 window_index"):
        torch.ops.resnet_fast.max_pool2d_train_backward(y, index.long(), [8, 8], [3, 3], [2, 2], [1, 1])


def test_routing(monkeypatch):
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    xg = x.detach().requires_grad_(True)
    assert _routing.max_pool2d_impl(xg) == "cpu_train"
    assert _routing.max_pool2d_impl(xg.contiguous()) == "cpu_train"  # either layout
    assert _routing.max_pool2d_impl(xg.double()) == "cpu_train"
    assert _routing.max_pool2d_impl(xg.bfloat16()) == "eager"  # PyTorch's, which accumulates in float
    assert _routing.max_pool2d_impl(xg, ceil_mode=True) == "eager"
    assert _routing.max_pool2d_impl(xg, return_indices=True) == "eager"
    assert _routing.max_pool2d_impl(xg, kernel_size=(17, 16)) == "eager"  # a position past one byte
    with torch.no_grad():
        assert _routing.max_pool2d_impl(xg) == "cpu"  # nothing to differentiate: the maxima alone
    with resnet_fast.use_backend("eager"):
        assert _routing.max_pool2d_impl(xg) == "eager"
        assert "resnet_fast::max_pool2d_train" not in op_names(lambda: max_pool2d(xg, 3, 2, 1))


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2)])
def test_module_trains_like_nn_maxpool2d(kwargs):
    ours, theirs = MaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)
    x = torch.randn(2, 8, 11, 11).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    names = op_names(lambda: ours(a))
    assert "resnet_fast::max_pool2d_train" in names
    ya, yb = ours(a), theirs(b)
    assert torch.equal(ya, yb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_compiles_without_graph_break():
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: max_pool2d(t, 3, 2, 1).sin().sum(), fullgraph=True, backend="aot_eager")
    fn(a).backward()
    F.max_pool2d(b, 3, 2, 1).sin().sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("arch, size", [("resnet18", 64), ("resnet50", 64)])
def test_models_train_the_same_keeping_less(monkeypatch, arch, size):
    """A whole training step with the stem's pooling by max_pool2d_train against the same step
    with PyTorch's pooling: the same gradients and state, bit for bit; the stem's activation and
    the int64 indices are no longer kept, one byte per pooled value is."""
    original = _routing.max_pool2d_impl
    results = []
    for ours in (False, True):
        if not ours:
            monkeypatch.setattr(_routing, "max_pool2d_impl", lambda x, *a, **k: "eager" if x.requires_grad else original(x, *a, **k))
        else:
            monkeypatch.setattr(_routing, "max_pool2d_impl", original)
        torch.manual_seed(0)
        model = resnet_fast.get_model(arch)
        x = torch.randn(2, 3, size, size)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()
        results.append((sum(saved.values()), [p.grad for p in model.parameters()], list(model.state_dict().values())))
    (bytes_pytorch, grads_pytorch, state_pytorch), (bytes_ours, grads_ours, state_ours) = results
    stem = 2 * 64 * (size // 2) ** 2 * 4  # the stem's activation, float32
    pooled = 2 * 64 * (size // 4) ** 2
    assert bytes_pytorch - bytes_ours == stem + 8 * pooled - pooled
    assert all(torch.equal(a, b) for a, b in zip(grads_pytorch, grads_ours))
    assert all(torch.equal(a, b) for a, b in zip(state_pytorch, state_ours))
