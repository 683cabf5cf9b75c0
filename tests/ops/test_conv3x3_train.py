"""conv3x3_train (the residual nets' 3x3 convolution for training: Winograd's forward and input
gradient, our CPU weight gradient) against its formulas, reference.conv3x3_train and
reference.conv3x3_weight_grad, computed in float64; and its routing (resnet_fast._routing)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import resnet_fast
from resnet_fast import _routing
from resnet_fast.ops import conv3x3_train, reference
from tests.conftest import kept_storages, make_input, op_names, requires_extension

pytestmark = requires_extension

# (N, C, H, W, K, stride). Our kernel takes float32, C % 8 == 0, K % 4 == 0 (the routing also stops
# it at C <= 128); the rest is ATen's weight gradient, which the op must return just the same.
SHAPES = [
    (4, 16, 32, 32, 16, 1),  # ResNet-20's first stage
    (4, 16, 32, 32, 32, 2),  # its first downsampling
    (3, 64, 8, 8, 64, 1),  # its last stage, odd batch over two threads
    (1, 32, 9, 7, 8, 1),  # batch 1 (the output channels split over threads), odd sizes
    (2, 24, 7, 5, 12, 2),  # 3*C = 72 columns: three tiles of 24; odd sizes, stride 2
    (2, 8, 1, 1, 4, 1),  # 1x1 map: a row's first pixel is also its last
    (2, 8, 2, 3, 4, 2),  # 1x2 output after stride 2
    (2, 128, 5, 5, 8, 1),  # the widest input the routing gives ours
    (2, 136, 5, 5, 8, 1),  # wider (the kernel takes it; the routing does not)
    (2, 12, 6, 6, 8, 1),  # C % 8 != 0: ATen's
    (2, 16, 6, 6, 6, 2),  # K % 4 != 0: ATen's
]


def exact_weight_grad(grad_out, x, stride):
    return reference.conv3x3_weight_grad(grad_out.double(), x.double(), stride)


def assert_weight_grad_close(got, grad_out, x, stride, dtype=torch.float32):
    expected = exact_weight_grad(grad_out, x, stride)
    assert got.shape == expected.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    # Sums of N*OH*OW products: float32's rounding grows with their count and the terms' size.
    terms = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
    scale = (grad_out.double().abs().amax() * x.double().abs().amax()).item() if terms else 1.0
    tol = (1e-6 if dtype == torch.float32 else 1e-12) * max(terms, 1) ** 0.5 * scale
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)


def kernel_takes(c, k):
    return c % 8 == 0 and k % 4 == 0


# Our kernel takes C % 8 == 0 and K % 4 == 0 only (test_bad_input_is_refused_clearly); ATen's every shape.
WEIGHT_GRAD_CASES = [(s, True) for s in SHAPES if kernel_takes(s[1], s[4])] + [(s, False) for s in SHAPES]


@pytest.mark.parametrize("shape, kernel", WEIGHT_GRAD_CASES, ids=lambda v: "ours" if v is True else "aten" if v is False else str(v))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
def test_weight_grad_matches_formula(shape, layout, kernel):
    n, c, h, w, k, stride = shape
    x = make_input((n, c, h, w), torch.float32, layout)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    grad_out = make_input((n, k, oh, ow), torch.float32, layout)
    got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, stride, kernel)
    assert_weight_grad_close(got, grad_out, x, stride)


def test_empty_batch_gives_zero_weight_grad():
    x = torch.randn(0, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(0, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    for kernel, winograd in ((True, False), (False, False), (False, True)):
        got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, kernel, winograd=winograd)
        assert got.shape == (16, 16, 3, 3) and torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_take_atens_weight_grad(dtype):
    x = make_input((2, 16, 6, 6), dtype, "channels_last")
    grad_out = make_input((2, 8, 6, 6), dtype, "channels_last")
    got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, False)
    expected = torch.ops.aten.convolution_backward(
        grad_out, x, torch.zeros(8, 16, 3, 3, dtype=dtype), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )[1]
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_nothing_outside_the_input_is_read():
    """The taps outside the map are zero padding: the kernel must not load the neighbouring
    pixels (the previous row's last one, the previous image's last one), which are NaN here."""
    x_all = torch.full((4, 16, 6, 6), float("nan")).contiguous(memory_format=torch.channels_last)
    g_all = torch.full((4, 8, 6, 6), float("nan")).contiguous(memory_format=torch.channels_last)
    x, grad_out = x_all[1:3], g_all[1:3]  # channels_last-contiguous views between NaN images
    x.copy_(torch.randn(x.shape))
    grad_out.copy_(torch.randn(grad_out.shape))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.storage_offset() > 0
    for stride in (1, 2):
        g = grad_out if stride == 1 else grad_out[:, :, :3, :3].contiguous(memory_format=torch.channels_last)
        got = torch.ops.resnet_fast.conv3x3_weight_grad(g, x, stride, True)
        assert not got.isnan().any()
        assert_weight_grad_close(got, g, x, stride)


def test_infinities_propagate_like_pytorch():
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    x[0, 3, 0, 0] = float("inf")  # a corner: only some taps see it
    grad_out = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, True)
    expected = reference.conv3x3_weight_grad(grad_out, x, 1)
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    assert got.isinf().any()


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4), 3), "expected stride 1 or 2"),
        ((torch.randn(2, 8, 4, 4), torch.randn(16, 4, 4), 1), "expected 4-D"),
        ((torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8), 1), r"does not fit an input of shape"),
        ((torch.randn(3, 8, 4, 4), torch.randn(2, 16, 8, 8), 2), r"does not fit an input of shape"),
        ((torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4, dtype=torch.float64), 1), "x is Double but grad_out is Float"),
    ],
)
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast.conv3x3_weight_grad(*args, False)


@pytest.mark.skipif(_routing.CPU_CAPABILITY == "DEFAULT", reason="our kernel needs AVX2; without it the op takes ATen's")
def test_a_kernel_request_it_cannot_carry_out_is_refused():
    x, g = torch.randn(2, 12, 4, 4), torch.randn(2, 8, 4, 4)
    with pytest.raises(RuntimeError, match="input channels a multiple of 8.*pass kernel=False"):
        torch.ops.resnet_fast.conv3x3_weight_grad(g, x, 1, True)
    with pytest.raises(RuntimeError, match="takes float32"):
        torch.ops.resnet_fast.conv3x3_weight_grad(g.double(), torch.randn(2, 16, 4, 4).double(), 1, True)


def test_forward_refuses_what_it_cannot_run():
    with pytest.raises(RuntimeError, match=r"expected a \(K, C, 3, 3\) weight"):
        torch.ops.resnet_fast.conv3x3_train(torch.randn(1, 4, 5, 5), torch.randn(8, 4, 1, 1), 1, False, False)
    with pytest.raises(RuntimeError, match="Winograd F\\(2x2, 3x3\\) runs stride 1 only"):
        torch.ops.resnet_fast.conv3x3_train(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3), 2, True, False)


Plan = _routing.Conv3x3Plan
PLANS = {
    "aten": Plan(False, False),
    "our-wgrad": Plan(False, True),
    "winograd": Plan(True, False),
    "winograd+our-wgrad": Plan(True, True),
    "winograd-wgrad": Plan(False, False, weight_grad_winograd=True),
    "winograd+winograd-wgrad": Plan(True, False, winograd_tiles=True, weight_grad_winograd=True),
    "direct": Plan(False, False, direct=True),
}


def conv3x3(x, w, stride, plan, *bn):
    """conv3x3_train as `plan` says (bn: the BatchNorm that made x, as the op takes it)."""
    return torch.ops.resnet_fast.conv3x3_train(x, w, stride, plan.winograd, plan.weight_grad_kernel, *bn, **plan.op_kwargs())


def plan_runs(plan, stride, c, k):
    """Winograd (forward and weight gradient) runs stride 1 only; Winograd's weight gradient and
    tiles take multiples of 16 channels, our direct weight gradient C % 8 == 0 and K % 4 == 0; the
    direct AVX-512 kernel runs stride 1 and 2 (other channel counts: ATen's)."""
    if (plan.winograd or plan.weight_grad_winograd) and stride != 1:
        return False
    if (plan.weight_grad_winograd or plan.winograd_tiles) and (c % 16 or k % 16):
        return False
    return kernel_takes(c, k) or not plan.weight_grad_kernel


# (plan, stride): Winograd runs stride 1 only.
PLAN_CASES = [pytest.param(p, s, id=f"{name}-s{s}") for name, p in PLANS.items() for s in (1, 2) if plan_runs(p, s, 16, 16)]


@pytest.mark.parametrize(
    "plan, stride, channels",
    [pytest.param(*p.values, ch, id=f"{p.id}-{ch[0]}x{ch[1]}") for p in PLAN_CASES for ch in [(16, 32), (64, 72)]
     if plan_runs(*p.values, *ch)],
)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("input_grad", [True, False])  # False: the stem, whose input is the batch
def test_autograd_matches_pytorch(stride, layout, input_grad, channels, plan):
    c, k = channels
    x = make_input((4, c, 10, 9), torch.float32, layout, requires_grad=input_grad)
    w = make_input((k, c, 3, 3), torch.float32, layout, requires_grad=True)
    y = conv3x3(x, w, stride, plan)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref, w_ref = x.detach().double().requires_grad_(input_grad), w.detach().double().requires_grad_(True)
    y_ref = reference.conv3x3_train(x_ref, w_ref, stride)
    y_ref.backward(grad.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-5, atol=1e-3)
    assert w.grad.stride() == w.stride()  # the parameter's own layout
    if input_grad:
        torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-4)
    else:
        assert x.grad is None


def test_the_op_runs_the_plan_it_is_given():
    x = torch.randn(2, 64, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(64, 64, 3, 3, requires_grad=True)
    names = set(op_names(lambda: torch.ops.resnet_fast.conv3x3_train(x, w, 1, True, True).sum().backward()))
    assert "aten::bmm" in names and "aten::convolution" not in names and "aten::convolution_backward" not in names
    names = set(op_names(lambda: torch.ops.resnet_fast.conv3x3_train(x, w, 1, False, False).sum().backward()))
    assert "aten::bmm" not in names and "aten::convolution" in names


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("channels", [(64, 64), (64, 128), (128, 64)])
def test_winograd_by_our_tiles_matches_pytorch(layout, channels):
    """winograd_tiles: the forward's and the input gradient's 16 products by our register tiles
    (no at::bmm), against the formula in float64, as accurate as at::bmm's products."""
    c, k = channels
    x = make_input((3, c, 10, 9), torch.float32, layout, requires_grad=True)
    w = make_input((k, c, 3, 3), torch.float32, layout, requires_grad=True)
    grad = torch.randn(3, k, 10, 9)
    x_ref, w_ref = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y_ref = reference.conv3x3_train(x_ref, w_ref, 1)
    y_ref.backward(grad.double())
    errors = {}
    for tiles in (False, True):
        x.grad = w.grad = None
        run = lambda: torch.ops.resnet_fast.conv3x3_train(x, w, 1, True, False, winograd_tiles=tiles)  # noqa: E731
        names = op_names(lambda: run().backward(grad))
        assert ("aten::bmm" in names) == (not tiles)
        y = run()
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-5, atol=1e-3)
        errors[tiles] = [(y.double() - y_ref).abs().max().item(), (x.grad.double() - x_ref.grad).abs().max().item()]
    for ours, bmm in zip(errors[True], errors[False]):
        assert ours <= 1.5 * bmm, errors


@pytest.mark.parametrize("avx512", [False, True], ids=["AVX2 CPU", "AVX-512 CPU"])
def test_training_plans(monkeypatch, avx512):
    """The routing's rules (resnet_fast._routing): Winograd on wide stride-1 maps (on AVX-512 CPUs
    from 8x8 maps), never past 256 x 256 channels in training; our direct weight gradient on
    AVX2-only CPUs, up to 128 input channels; the Winograd weight gradient on AVX-512 CPUs from 32
    channels in and out, multiples of 16, up to 256 x 256."""
    monkeypatch.setattr(_routing, "_AVX512", avx512)
    monkeypatch.setattr(_routing, "WINOGRAD_TILES", avx512)
    a = avx512

    def full(n, c, h, k, stride=1, source_impl=None):
        x = torch.randn(n, c, h, h)
        return _routing.conv3x3_train_plan(x, torch.randn(k, c, 3, 3, requires_grad=True), stride, source_impl)

    def plan(*args, **kwargs):  # the fields before the direct kernel's
        p = full(*args, **kwargs)
        return None if p is None else tuple(p)[:4]

    # (winograd, weight_grad_kernel, winograd_tiles, weight_grad_winograd): Winograd's products by
    # our register tiles on AVX-512 CPUs, from 64 channels in and out, both multiples of 16 (the
    # input gradient swaps them).
    assert plan(2, 64, 56, 64) == (True, not a, a, a)
    assert plan(2, 256, 14, 256) == (True, False, a, a)
    assert plan(2, 64, 14, 64) == (True, not a, a, a)
    assert plan(2, 64, 14, 72) == (True, not a, False, False)  # 72 % 16 != 0
    assert plan(2, 72, 14, 64) == (True, not a, False, False)  # the input gradient's 72 output channels
    assert plan(2, 64, 8, 64) == (True, not a, a, a)
    assert plan(2, 64, 7, 64) == ((False, False, False, True) if a else (True, True, False, False))
    # 32 channels: Winograd only by our tiles (at::bmm's products do not pay there).
    assert plan(2, 32, 16, 32) == ((True, False, True, True) if a else (False, True, False, False))
    assert plan(2, 32, 16, 40) == (None if a else (False, True, False, False))  # 40 % 16 != 0
    assert plan(2, 512, 7, 512) is None  # 512 x 512: the per-call transform's memory; 512 > 128 for ours
    assert plan(2, 16, 32, 16) == ((False,) * 4 if a else (False, True, False, False))  # 16 < 32 for Winograd's wgrad
    assert plan(2, 16, 32, 32, stride=2) == ((False,) * 4 if a else (False, True, False, False))  # direct on AVX-512
    with torch.no_grad():
        assert plan(2, 64, 56, 64) is None  # nothing to differentiate: PyTorch's convolution
    # An input made by the fused CPU BatchNorm (relu(bn(.))): our op runs where nothing else pays,
    # with ATen's convolutions, to keep the BatchNorm's input instead of x.
    assert plan(2, 512, 7, 512, source_impl="cpu") == (False,) * 4
    assert plan(2, 16, 32, 16, source_impl="cpu") == (False, not a, False, False)
    assert plan(2, 64, 56, 64, source_impl="cpu") == (True, not a, a, a)
    assert plan(2, 512, 7, 512, source_impl="eager") is None
    monkeypatch.setattr(_routing, "RECOMPUTE_CONV_INPUT", False)
    assert plan(2, 512, 7, 512, source_impl="cpu") is None
    monkeypatch.setattr(_routing, "WINOGRAD_WEIGHT_GRAD", False)
    assert plan(2, 64, 56, 64) == (True, not a, a, False)
    assert plan(2, 64, 7, 64) == (None if a else (True, True, False, False))
    # direct: the direct AVX-512 kernel on the 16-channel stride-1 3x3s (forward, input gradient).
    assert full(2, 16, 32, 16).direct == a
    assert full(2, 16, 7, 16).direct == a
    assert full(2, 16, 32, 16, source_impl="cpu").direct == a
    assert not full(2, 32, 16, 32).direct  # Winograd's
    assert full(2, 16, 32, 24) is None or not full(2, 16, 32, 24).direct  # 24 % 16 != 0
    # and on the CIFAR nets' stride-2 3x3s (16 -> 32, 32 -> 64), not on wider ones.
    assert (full(2, 16, 32, 32, stride=2) is not None and full(2, 16, 32, 32, stride=2).direct) == a
    assert (full(2, 32, 16, 64, stride=2) is not None and full(2, 32, 16, 64, stride=2).direct) == a
    assert full(2, 64, 56, 128, stride=2) is None or not full(2, 64, 56, 128, stride=2).direct
    monkeypatch.setattr(_routing, "DIRECT_CONV3X3", False)
    assert full(2, 16, 32, 16) == (None if a else (False, True, False, False, False))


def test_gradcheck():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    for stride in (1, 2):
        assert torch.autograd.gradcheck(lambda a, b: torch.ops.resnet_fast.conv3x3_train(a, b, stride, False, False), (x, w))


def test_gradgradcheck():
    """Double backward (a gradient penalty): the weight gradient is itself differentiable."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    for stride in (1, 2):
        assert torch.autograd.gradgradcheck(
            lambda a, b: torch.ops.resnet_fast.conv3x3_train(a, b, stride, False, False), (x, w)
        )


@pytest.mark.parametrize(
    "c, plan", [pytest.param(c, p, id=f"{name}-{c}") for c in (8, 64) for name, p in PLANS.items() if plan_runs(p, 1, c, c)]
)
def test_double_backward_matches_pytorch_in_float32(c, plan):
    def penalty(conv, x, w):
        (gw,) = torch.autograd.grad(conv(x, w).square().sum(), w, create_graph=True)
        gw.square().sum().backward()
        return x.grad, w.grad

    x = make_input((2, c, 6, 6), torch.float32, "channels_last", requires_grad=True)
    w = torch.randn(c, c, 3, 3, requires_grad=True)
    ours = penalty(lambda a, b: conv3x3(a, b, 1, plan), x, w)
    x_ref, w_ref = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    expected = penalty(lambda a, b: reference.conv3x3_train(a, b, 1), x_ref, w_ref)
    for got, exp in zip(ours, expected):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5 * exp.abs().max().item())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((2, 8, 6, 5), torch.float32, layout, requires_grad=True)
    w = make_input((4, 8, 3, 3), torch.float32, layout, requires_grad=True)
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_train, (x, w, 2, False, True))
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_train, (x, w, 1, True, False))
    g = make_input((2, 4, 6, 5), torch.float32, layout)
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_weight_grad, (g, x.detach(), 1, True))


def _ran_our_op(fn) -> bool:
    return "resnet_fast::conv3x3_train" in op_names(fn)


def test_routing(monkeypatch):
    monkeypatch.setattr(_routing, "_AVX512", False)  # (on an AVX-512 CPU no plan uses our op at 16 channels)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    assert _ran_our_op(lambda: conv3x3_train(x, w, 1))
    with torch.no_grad():  # nothing to differentiate: PyTorch's convolution
        assert not _ran_our_op(lambda: conv3x3_train(x, w, 1))
    assert not _ran_our_op(lambda: conv3x3_train(x, w.detach(), 1))
    assert not _ran_our_op(lambda: conv3x3_train(x.double(), w.double(), 1))
    with resnet_fast.use_backend("eager"):
        assert not _ran_our_op(lambda: conv3x3_train(x, w, 1))
    torch.testing.assert_close(conv3x3_train(x, w, 2), F.conv2d(x, w, None, 2, 1), rtol=0, atol=0)


@pytest.mark.parametrize("avx512", [False, True], ids=["AVX2 CPU", "AVX-512 CPU"])
def test_models_route_their_3x3_convolutions_as_planned(monkeypatch, avx512):
    monkeypatch.setattr(_routing, "_AVX512", avx512)
    monkeypatch.setattr(_routing, "WINOGRAD_TILES", avx512)
    model = resnet_fast.get_model("resnet20")
    x = torch.randn(4, 3, 32, 32)
    names = op_names(lambda: model(x).sum().backward())
    if avx512:
        # Winograd by our tiles (forward, input gradient, weight gradient) on the 32- and 64-channel
        # stages' 10 stride-1 3x3s; the direct kernel (forward, input gradient) on the 16-channel
        # stage's 6, whose weight gradient is oneDNN's (inside our op); the direct kernel's forward on
        # the 2 stride-2 3x3s, whose input gradients are conv3x3_input_grad's.
        assert names.count("resnet_fast::conv3x3_train") == 10 + 10 + 6 + 6 + 2
        assert names.count("resnet_fast::conv3x3_input_grad") == 2
        assert names.count("resnet_fast::conv3x3_weight_grad") == 10 + 6 + 2
        assert "aten::bmm" not in names
    else:
        # Every 3x3 convolution after the stem (whose 3 input channels our weight gradient does not
        # take: no plan, PyTorch's convolution) forward, and again for the input gradient of the 16
        # at stride 1.
        assert names.count("resnet_fast::conv3x3_train") == 18 + 16
        assert names.count("resnet_fast::conv3x3_weight_grad") == 18


def test_under_torch_compile():
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: torch.ops.resnet_fast.conv3x3_train(a, b, 1, False, True).square().sum(), fullgraph=True)
    f(x, w).backward()
    x_ref, w_ref = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    reference.conv3x3_train(x_ref, w_ref, 1).square().sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), c8=st.integers(1, 5), k4=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
    stride=st.sampled_from([1, 2]), channels_last=st.booleans(),
)
def test_random_shapes_match_float64(n, c8, k4, h, w, stride, channels_last):
    layout = "channels_last" if channels_last else "contiguous"
    x = make_input((n, 8 * c8, h, w), torch.float32, layout)
    grad_out = make_input((n, 4 * k4, (h - 1) // stride + 1, (w - 1) // stride + 1), torch.float32, layout)
    assert_weight_grad_close(torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, stride, True), grad_out, x, stride)


# -- the input recomputed from the BatchNorm that made it (bn_input; the weight gradient's prologue) --


def random_bn(c, positive=False):
    """A BatchNorm's (weight, bias, mean, var); with ``positive`` every recomputed value is > 0."""
    weight, var = torch.rand(c) + 0.5, torch.rand(c) + 0.5
    mean = torch.randn(c) * 0.1 if positive else torch.randn(c)
    bias = torch.rand(c) + 3.0 if positive else torch.randn(c)
    return weight, bias, mean, var


def bn_relu_formula(x, weight, bias, mean, var, eps=1e-5):
    v = lambda t: t[:, None, None]  # noqa: E731
    return torch.relu((x - v(mean)) / torch.sqrt(v(var) + eps) * v(weight) + v(bias))


@pytest.mark.parametrize("shape, kernel", WEIGHT_GRAD_CASES, ids=lambda v: "ours" if v is True else "aten" if v is False else str(v))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_weight_grad_prologue_matches_formula(shape, layout, kernel):
    """With a BatchNorm prologue the op's input is relu(batch_norm(x)): recomputed inside our
    kernel (channels_last) or whole before ATen's."""
    n, c, h, w, k, stride = shape
    x = make_input((n, c, h, w), torch.float32, layout)
    bn = random_bn(c)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    grad_out = make_input((n, k, oh, ow), torch.float32, layout)
    got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, stride, kernel, *bn, 1e-5)
    assert_weight_grad_close(got, grad_out, bn_relu_formula(x, *bn), stride)  # a within a rounding of the kernel's


def test_weight_grad_prologue_reads_nothing_outside_the_input():
    """The prologue recomputes only the map's own rows: zero padding stays zero (relu(shift) > 0
    would be wrong there) and the neighbouring images (NaN) are not read."""
    x_all = torch.full((4, 16, 6, 6), float("nan")).contiguous(memory_format=torch.channels_last)
    x = x_all[1:3]
    x.copy_(torch.rand(x.shape))
    bn = random_bn(16, positive=True)
    assert (bn_relu_formula(x, *bn) > 0).all()
    for stride in (1, 2):
        g = torch.randn(2, 8, 6 // stride, 6 // stride).contiguous(memory_format=torch.channels_last)
        got = torch.ops.resnet_fast.conv3x3_weight_grad(g, x, stride, True, *bn, 1e-5)
        assert not got.isnan().any()
        assert_weight_grad_close(got, g, bn_relu_formula(x, *bn), stride)


# -- the weight gradient by Winograd F(2x2, 3x3) (winograd=True; AVX-512, else ATen's) --------------

AVX512 = _routing.CPU_CAPABILITY == "AVX512"
needs_avx512 = pytest.mark.skipif(not AVX512, reason="the Winograd weight gradient needs AVX-512; without it the "
                                  "op hands the request to ATen's (which the formula tests still check)")

# (N, C, H, W, K), stride 1: C and K multiples of 16.
WINOGRAD_WEIGHT_GRAD_SHAPES = [
    (4, 16, 32, 32, 16),  # ResNet-20's first stage: 16 x 16 register tiles
    (3, 64, 8, 8, 64),  # its last stage: 8 x 32 tiles, an odd batch over two threads
    (1, 32, 9, 7, 16),  # batch 1, odd sizes: the last tile row and column overhang the map
    (2, 48, 5, 7, 32),  # 48 columns: one 8 x 32 tile and one 16 x 16
    (2, 16, 1, 1, 16),  # 1x1 map: one tile, three quarters of it padding
    (2, 256, 9, 9, 256),  # 256 x 256: bands of 3 tile rows (the last one shorter)
]


@pytest.mark.parametrize("shape", WINOGRAD_WEIGHT_GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
@pytest.mark.parametrize("prologue", [False, True], ids=["x", "relu(bn(x))"])
def test_winograd_weight_grad_matches_formula(shape, layout, prologue):
    n, c, h, w, k = shape
    x = make_input((n, c, h, w), torch.float32, layout)
    grad_out = make_input((n, k, h, w), torch.float32, layout)
    bn = random_bn(c) if prologue else (None,) * 4
    got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, False, *bn, 1e-5, winograd=True)
    assert_weight_grad_close(got, grad_out, bn_relu_formula(x, *bn) if prologue else x, 1)


@needs_avx512
@pytest.mark.parametrize("shape", [(8, 16, 32, 32, 16), (8, 32, 16, 16, 32), (8, 64, 8, 8, 64), (4, 256, 14, 14, 256)])
def test_winograd_weight_grad_error_within_twice_pytorchs_own(shape):
    """Against float64, no more than 2x the error of PyTorch's float32 weight gradient (oneDNN's
    direct one) on the same data: Winograd's transforms add and subtract, the G^T M G at the end
    is float64; its sums run per band of tiles (blocked), oneDNN's over the whole batch."""
    n, c, h, w, k = shape
    x = torch.randn(n, c, h, w).relu().contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(n, k, h, w).contiguous(memory_format=torch.channels_last)
    exact = exact_weight_grad(grad_out, x, 1)
    ours = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, False, winograd=True)
    theirs = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, False)
    ours_err, theirs_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


def test_winograd_weight_grad_reads_nothing_outside_the_input():
    """Padding is zeros, not the neighbouring pixels or images (NaN here), with and without the
    prologue (whose relu(shift) > 0 must not reach the padding either)."""
    x_all = torch.full((4, 16, 6, 5), float("nan")).contiguous(memory_format=torch.channels_last)
    g_all = torch.full((4, 16, 6, 5), float("nan")).contiguous(memory_format=torch.channels_last)
    x, grad_out = x_all[1:3], g_all[1:3]
    x.copy_(torch.rand(x.shape))
    grad_out.copy_(torch.randn(grad_out.shape))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.storage_offset() > 0
    bn = random_bn(16, positive=True)
    for extra, x_in in (((None,) * 4, x), (bn, bn_relu_formula(x, *bn))):
        got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, False, *extra, 1e-5, winograd=True)
        assert not got.isnan().any()
        assert_weight_grad_close(got, grad_out, x_in, 1)


def test_winograd_weight_grad_keeps_non_finite_values_in_their_channel_pairs():
    """An inf in x reaches the weight gradients of its input channel only, as in PyTorch's; within
    a (k, c) pair it may reach all 9 taps (the transforms mix them), as inf or NaN."""
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    x[0, 3, 0, 0] = float("inf")
    grad_out = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    got = torch.ops.resnet_fast.conv3x3_weight_grad(grad_out, x, 1, False, winograd=True)
    expected = reference.conv3x3_weight_grad(grad_out, x, 1)
    pair_finite = lambda t: t.isfinite().all(dim=(2, 3))  # noqa: E731
    assert torch.equal(pair_finite(got), pair_finite(expected))
    assert not pair_finite(got)[:, 3].any() and pair_finite(got)[:, :3].all()
    assert (~expected.isfinite() <= ~got.isfinite()).all()  # non-finite wherever PyTorch's is


def test_winograd_weight_grad_refuses_what_it_cannot_run():
    x, g = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)
    with pytest.raises(RuntimeError, match="Winograd weight gradient runs stride 1 only.*pass winograd=False"):
        torch.ops.resnet_fast.conv3x3_weight_grad(g, x, 2, False, winograd=True)
    if AVX512:
        x8, g8 = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        with pytest.raises(RuntimeError, match="multiples of 16 on a CPU with AVX-512, got Float with 8 and 16"):
            torch.ops.resnet_fast.conv3x3_weight_grad(g8, x8, 1, False, winograd=True)
        with pytest.raises(RuntimeError, match="takes float32"):
            torch.ops.resnet_fast.conv3x3_weight_grad(g8.double(), torch.randn(2, 16, 4, 4).double(), 1, False,
                                                      winograd=True)


def test_winograd_weight_grad_opcheck():
    x = make_input((2, 16, 6, 5), torch.float32, "channels_last")
    g = make_input((2, 32, 6, 5), torch.float32, "channels_last", requires_grad=True)
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_weight_grad, (g, x, 1, False), {"winograd": True})
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_weight_grad, (g.detach(), x, 1, False, *random_bn(16), 1e-5),
                          {"winograd": True})


def bn_then_conv(x1, bn_w, bn_b, w, stride, plan, recompute, training=True, running=None):
    """conv3x3_train(relu(batch_norm(x1))), the convolution told how its input was made or not."""
    rm, rv = (None, None) if running is None else running
    a, mean, var = torch.ops.resnet_fast.batch_norm_act(x1, bn_w, bn_b, rm, rv, None, 1, training, 1e-5, True)
    extra = (x1, bn_w, bn_b, mean, var, 1e-5, training) if recompute else ()
    return conv3x3(a, w, stride, plan, *extra)


# (channels, plan, stride): our weight gradient takes (16, 32) and (136, 8); ATen's all three.
RECOMPUTE_CASES = [
    pytest.param(ch, p, s, id=f"{ch[0]}x{ch[1]}-{name}-s{s}")
    for ch in [(16, 32), (136, 8), (12, 8)]
    for name, p in PLANS.items()
    for s in (1, 2)
    if plan_runs(p, s, *ch)
]


@pytest.mark.parametrize("channels, plan, stride", RECOMPUTE_CASES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("training", [True, False], ids=["batch-stats", "running-stats"])
def test_recomputed_input_gives_the_same_gradients_bit_for_bit(plan, stride, layout, channels, training):
    """The backward recomputes the input exactly as the BatchNorm's forward made it: every gradient
    is the one the kept input gives, bit for bit (our kernel's prologue, or ATen's after a pass)."""
    c, k = channels
    x1 = make_input((3, c, 9, 8), torch.float32, layout)
    w = make_input((k, c, 3, 3), torch.float32, layout)
    bn_w, bn_b = torch.rand(c) + 0.5, torch.randn(c)
    running = None if training else (torch.randn(c), torch.rand(c) + 0.5)
    results = []
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x1, bn_w, bn_b, w)]
        y = bn_then_conv(*leaves[:3], leaves[3], stride, plan, recompute, training, running)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([y.detach()] + [t.grad for t in leaves])
    for plain, recomputed in zip(*results):
        assert torch.equal(plain, recomputed)


def test_recomputing_conv_keeps_the_batchnorm_input_not_its_own():
    x1 = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    bn_w, bn_b = torch.rand(16, requires_grad=True), torch.randn(16, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    for recompute in (False, True):
        with kept_storages() as kept:
            a, mean, var = torch.ops.resnet_fast.batch_norm_act(x1, bn_w, bn_b, None, None, None, 1, True, 1e-5, True)
            extra = (x1, bn_w, bn_b, mean, var, 1e-5, True) if recompute else ()
            torch.ops.resnet_fast.conv3x3_train(a, w, 1, False, True, *extra)
        assert (a.untyped_storage().data_ptr() in kept) != recompute


@pytest.mark.parametrize("plan", list(PLANS.values()), ids=list(PLANS))
def test_double_backward_through_a_recomputed_input(plan):
    """Under create_graph the input is recomputed by batch_norm_act itself, differentiably: a
    gradient penalty gets the gradients that keeping the input gives."""

    def penalty(recompute):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x1, bn_w, bn_b, w)]
        y = bn_then_conv(*leaves[:3], leaves[3], 1, plan, recompute)
        (gw,) = torch.autograd.grad(y.square().sum(), leaves[3], create_graph=True)
        gw.square().sum().backward()
        return [t.grad for t in leaves]

    x1 = make_input((2, 16, 6, 6), torch.float32, "channels_last")
    bn_w, bn_b, w = torch.rand(16) + 0.5, torch.randn(16), torch.randn(16, 16, 3, 3)
    for kept, recomputed in zip(penalty(False), penalty(True)):
        torch.testing.assert_close(recomputed, kept, rtol=1e-5, atol=1e-5 * kept.abs().max().item())


def test_recompute_arguments_are_checked():
    x = torch.randn(2, 16, 6, 6)
    w, g = torch.randn(8, 16, 3, 3), torch.randn(2, 8, 6, 6)
    v = torch.randn(16)
    with pytest.raises(RuntimeError, match="bn_weight, bn_bias, bn_mean and bn_var, float32 vectors of its 16 channels"):
        torch.ops.resnet_fast.conv3x3_weight_grad(g, x, 1, False, v, v, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="float32 vectors of its 16 channels"):
        torch.ops.resnet_fast.conv3x3_weight_grad(g, x, 1, False, v, v, v, torch.rand(8), 1e-5)
    with pytest.raises(RuntimeError, match="takes a float32 x"):
        torch.ops.resnet_fast.conv3x3_weight_grad(g.double(), x.double(), 1, False, v, v, v, v, 1e-5)
    with pytest.raises(RuntimeError, match="bn_input .* must be float32 of x's shape"):
        torch.ops.resnet_fast.conv3x3_train(x, w, 1, False, True, torch.randn(2, 16, 5, 5), v, v, v, v, 1e-5, True)
    with pytest.raises(RuntimeError, match="must be vectors of x's 16 channels"):
        torch.ops.resnet_fast.conv3x3_train(x, w, 1, False, True, x, v, v, torch.randn(8), v, 1e-5, True)
    g.requires_grad_(True)
    gw = torch.ops.resnet_fast.conv3x3_weight_grad(g, x, 1, False, *random_bn(16), 1e-5)
    with pytest.raises(RuntimeError, match="with a BatchNorm prologue .* is not differentiable"):
        gw.sum().backward()


def test_opcheck_with_a_recomputed_input():
    x1 = make_input((2, 8, 6, 5), torch.float32, "channels_last", requires_grad=True)
    bn_w, bn_b = torch.rand(8, requires_grad=True), torch.randn(8, requires_grad=True)
    a, mean, var = torch.ops.resnet_fast.batch_norm_act(x1, bn_w, bn_b, None, None, None, 1, True, 1e-5, True)
    w = make_input((4, 8, 3, 3), torch.float32, "channels_last", requires_grad=True)
    for stride, plan in ((1, (True, True)), (2, (False, True))):
        torch.library.opcheck(
            torch.ops.resnet_fast.conv3x3_train, (a.detach().requires_grad_(True), w, stride, *plan, x1.detach(),
                                                  bn_w.detach(), bn_b.detach(), mean, var, 1e-5, True)
        )
    g = make_input((2, 4, 6, 5), torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_weight_grad, (g, x1.detach(), 1, True, *random_bn(8), 1e-5))


# -- the direct AVX-512 kernel (direct=True: the forward and the input gradient) ------------------

# (N, C, H, W, K), stride 1. The kernel takes K % 16 == 0 and any C (padded to blocks of 16 in its
# buffer); elsewhere (or without AVX-512) the op runs ATen's, which these tests check just the same.
DIRECT_SHAPES = [
    (4, 16, 32, 32, 16),  # ResNet-20's first stage: two 16-pixel tiles per row
    (3, 16, 7, 5, 32),  # two blocks of output channels; tiles of 4 and 1; an odd batch
    (1, 16, 40, 29, 16),  # batch 1: bands of rows over the threads; 16 + 8 + 4 + 1 pixels a row
    (2, 20, 6, 6, 16),  # C % 16 != 0: a zero-padded channel block
    (2, 3, 9, 33, 16),  # 3 input channels (the input gradient's K = 3: ATen's)
    (2, 16, 1, 1, 16),  # 1x1 map: every tap but the centre is padding
    (2, 48, 5, 19, 48),  # three channel blocks each way
    (2, 16, 6, 6, 24),  # K % 16 != 0: ATen's
]
DIRECT = Plan(False, False, direct=True)


def direct_error_bound(got, exact, theirs):
    """No more than 2x the error of PyTorch's float32 (oneDNN's) on the same data, with a floor of
    16 float32 roundings of the result's largest value: on small sums which of two float32 orders
    rounds better is chance (the 2x bound proper is checked on ResNet-20's shapes below); a wrong
    tap or channel is off by the size of a term."""
    floor = 16 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    return (got.double() - exact).abs().max().item() <= max(2 * (theirs.double() - exact).abs().max().item(), floor)


def check_direct_against_formula(shape, layout, stride):
    """The direct plan's forward, input gradient and weight gradient on (N, C, H, W, K) `shape` at
    `stride` against the formula in float64, each within direct_error_bound of PyTorch's float32;
    returns (weight, grad_x, grad_weight) for the caller's layout checks."""
    n, c, h, w, k = shape
    x = make_input((n, c, h, w), torch.float32, layout, requires_grad=True)
    wt = make_input((k, c, 3, 3), torch.float32, "contiguous", requires_grad=True)
    y = conv3x3(x, wt, stride, DIRECT)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, wt), grad)
    x64, w64 = x.detach().double().requires_grad_(True), wt.detach().double().requires_grad_(True)
    y64 = reference.conv3x3_train(x64, w64, stride)
    gx64, gw64 = torch.autograd.grad(y64, (x64, w64), grad.double())
    xt, wtt = x.detach().requires_grad_(True), wt.detach().requires_grad_(True)
    yt = F.conv2d(xt, wtt, None, stride, 1)
    gxt, gwt = torch.autograd.grad(yt, (xt, wtt), grad)
    for got, exact, theirs in ((y, y64, yt), (gx, gx64, gxt), (gw, gw64, gwt)):
        assert got.shape == exact.shape and got.dtype == torch.float32
        assert direct_error_bound(got, exact, theirs)
    return wt, gx, gw


@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
def test_direct_matches_formula(shape, layout):
    """Forward, input gradient and weight gradient (ATen's, on the recomputed or kept input) against
    the formula in float64, each within 2x PyTorch's float32 error."""
    wt, gx, gw = check_direct_against_formula(shape, layout, 1)
    assert gw.stride() == wt.stride()


def test_direct_is_as_accurate_as_pytorch_on_resnet20s_stage():
    x = torch.randn(8, 16, 32, 32).relu().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = (torch.randn(16, 16, 3, 3) * 0.1).requires_grad_(True)
    y = conv3x3(x, w, 1, DIRECT)
    grad = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (x, w), grad))
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = reference.conv3x3_train(x64, w64, 1)
    exact = (y64, *torch.autograd.grad(y64, (x64, w64), grad.double()))
    y32 = F.conv2d(x, w, None, 1, 1)
    theirs = (y32, *torch.autograd.grad(y32, (x, w), grad))
    for g, e, t in zip(got, exact, theirs):
        ours_err, theirs_err = (g.double() - e).abs().max(), (t.double() - e).abs().max()
        assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


def test_direct_reads_nothing_outside_the_input():
    """Padding is zeros, not the neighbouring pixels or images (NaN here)."""
    x = torch.full((4, 16, 6, 5), float("nan")).contiguous(memory_format=torch.channels_last)[1:3]
    x.copy_(torch.rand(x.shape))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.storage_offset() > 0
    w = torch.randn(16, 16, 3, 3)
    y = torch.ops.resnet_fast.conv3x3_train(x, w, 1, False, False, direct=True)
    assert not y.isnan().any()
    torch.testing.assert_close(y.double(), reference.conv3x3_train(x.double(), w.double(), 1), rtol=1e-5, atol=1e-5)


def test_direct_non_finite_values_reach_what_they_reach_in_pytorch():
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    x[0, 3, 0, 0] = float("inf")  # a corner: only some outputs and taps see it
    w = torch.randn(16, 16, 3, 3)
    got = torch.ops.resnet_fast.conv3x3_train(x, w, 1, False, False, direct=True)
    expected = F.conv2d(x, w, None, 1, 1)
    assert torch.equal(got.isfinite(), expected.isfinite()) and not got.isfinite().all()


def test_direct_refuses_what_it_cannot_run():
    x, w = torch.randn(1, 16, 5, 5), torch.randn(16, 16, 3, 3)
    with pytest.raises(RuntimeError, match="expected stride 1 or 2"):
        torch.ops.resnet_fast.conv3x3_train(x, w, 3, False, False, direct=True)
    with pytest.raises(RuntimeError, match="winograd and direct are two ways"):
        torch.ops.resnet_fast.conv3x3_train(x, w, 1, True, False, direct=True)
    g = torch.randn(1, 16, 3, 3)
    with pytest.raises(RuntimeError, match="expected stride 2"):
        torch.ops.resnet_fast.conv3x3_input_grad(g, w, 1, [1, 16, 5, 5])
    with pytest.raises(RuntimeError, match="stride-2 convolution giving grad_out's map"):
        torch.ops.resnet_fast.conv3x3_input_grad(g, w, 2, [1, 16, 8, 8])
    with pytest.raises(RuntimeError, match="stride-2 convolution giving grad_out's map"):
        torch.ops.resnet_fast.conv3x3_input_grad(g, w, 2, [1, 8, 5, 5])


# (N, C, H, W, K) at stride 2: even and odd maps (an odd width's last output pixel reads column W, a
# zero), C in place (16) and from the buffer (32, 48: the input gradient's dy is K-channel), 1x1
# and 2x2 maps.
DIRECT_STRIDE2_SHAPES = [
    (4, 16, 32, 32, 32),  # ResNet-20's 16 -> 32 downsampling convolution
    (2, 32, 16, 16, 64),  # ResNet-20's 32 -> 64
    (3, 16, 7, 9, 16),  # odd maps, an odd batch
    (2, 48, 5, 6, 32),  # three blocks of input channels
    (1, 16, 2, 2, 48),  # 2x2 -> 1x1
    (2, 16, 1, 1, 16),  # 1x1
    (1, 32, 19, 35, 16),  # batch 1: bands over the threads; 16 + 1 output pixels a row
]


@pytest.mark.parametrize("shape", DIRECT_STRIDE2_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_direct_stride2_matches_formula(shape, layout):
    """The stride-2 forward and input gradient (conv3x3_input_grad: even and odd rows and columns
    take different taps) against the formula in float64, within 2x PyTorch's float32 error."""
    wt, gx, gw = check_direct_against_formula(shape, layout, 2)
    assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("c, k", [(16, 32), (32, 64)])
def test_direct_stride2_is_as_accurate_as_pytorch_on_resnet20s_shapes(c, k):
    h = 32 if c == 16 else 16
    x = torch.randn(8, c, h, h).relu().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = (torch.randn(k, c, 3, 3) * 0.1).requires_grad_(True)
    y = conv3x3(x, w, 2, DIRECT)
    grad = torch.randn_like(y)
    got = (y, torch.autograd.grad(y, x, grad)[0])
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference.conv3x3_train(x64, w.detach().double(), 2)
    exact = (y64, torch.autograd.grad(y64, x64, grad.double())[0])
    y32 = F.conv2d(x, w, None, 2, 1)
    theirs = (y32, torch.autograd.grad(y32, x, grad)[0])
    for g, e, t in zip(got, exact, theirs):
        ours_err, theirs_err = (g.double() - e).abs().max(), (t.double() - e).abs().max()
        assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


def test_direct_stride2_reads_nothing_outside_its_inputs():
    """Padding and dy's missing row and column (even maps) are zeros, not neighbours (NaN here)."""
    x = torch.full((4, 16, 6, 8), float("nan")).contiguous(memory_format=torch.channels_last)[1:3]
    x.copy_(torch.rand(x.shape))
    w = torch.randn(32, 16, 3, 3)
    y = torch.ops.resnet_fast.conv3x3_train(x, w, 2, False, False, direct=True)
    torch.testing.assert_close(y.double(), reference.conv3x3_train(x.double(), w.double(), 2), rtol=1e-5, atol=1e-5)
    for dy_channels in (16, 32):  # dy read in place, and through the buffer
        w = torch.randn(dy_channels, 16, 3, 3)
        g = torch.full((4, dy_channels, 3, 4), float("nan")).contiguous(memory_format=torch.channels_last)[1:3]
        g.copy_(torch.randn(g.shape))
        dx = torch.ops.resnet_fast.conv3x3_input_grad(g, w, 2, [2, 16, 6, 8])
        x64 = torch.zeros(2, 16, 6, 8, dtype=torch.float64, requires_grad=True)
        (expected,) = torch.autograd.grad(reference.conv3x3_train(x64, w.double(), 2), x64, g.double())
        torch.testing.assert_close(dx.double(), expected, rtol=1e-5, atol=1e-5)


def test_direct_stride2_input_grad_double_backward():
    """conv3x3_input_grad's own autograd (a gradient penalty on the input gradient), in float64
    (ATen's kernels: the formula) and through the direct kernel in float32 against float64."""
    g = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    op = torch.ops.resnet_fast.conv3x3_input_grad
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, 2, [2, 3, 6, 4]), (g, w))
    assert torch.autograd.gradgradcheck(lambda a, b: op(a, b, 2, [2, 3, 6, 4]), (g, w))

    def penalty(conv, x, w):
        (gx,) = torch.autograd.grad(conv(x, w).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        return x.grad, w.grad

    x = make_input((2, 16, 6, 7), torch.float32, "channels_last", requires_grad=True)
    w32 = torch.randn(32, 16, 3, 3, requires_grad=True)
    ours = penalty(lambda a, b: conv3x3(a, b, 2, DIRECT), x, w32)
    x_ref, w_ref = x.detach().double().requires_grad_(True), w32.detach().double().requires_grad_(True)
    expected = penalty(lambda a, b: reference.conv3x3_train(a, b, 2), x_ref, w_ref)
    x_t, w_t = x.detach().requires_grad_(True), w32.detach().requires_grad_(True)
    theirs = penalty(lambda a, b: F.conv2d(a, b, None, 2, 1), x_t, w_t)
    for got, exp, their in zip(ours, expected, theirs):
        assert direct_error_bound(got, exp, their)


def test_direct_opcheck():
    x = make_input((2, 16, 6, 5), torch.float32, "contiguous", requires_grad=True)
    w = make_input((16, 16, 3, 3), torch.float32, "contiguous", requires_grad=True)
    for stride in (1, 2):
        torch.library.opcheck(torch.ops.resnet_fast.conv3x3_train, (x, w, stride, False, False), {"direct": True})
    g = make_input((2, 16, 3, 3), torch.float32, "channels_last", requires_grad=True)
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_input_grad, (g, w, 2, [2, 16, 6, 5]))
