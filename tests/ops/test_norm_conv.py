"""norm_conv (issue 18's NormConvolution forward: the previous BatchNorm applied as the input is
loaded, the next one's statistics reduced in the epilogue; resnet_fast/triton/norm_conv.py)
against its formula: float64 to rounding, float32 within a few times eager float32's own error
against float64; every layout, prologue on and off, strides, paddings, kernel sizes, channel
counts off the tiles' sizes, batch 1, 1x1 output maps; clear errors; the fake kernel (opcheck);
the fused backward (norm_conv_backward: every gradient, through y and the statistics, against the
formula's autograd over the forward's shapes and a fuzz; what output_mask leaves out; clear
errors) and the autograd around it (gradcheck; gradgradcheck, which runs the PyTorch-ops backward
under create_graph; only the gradients asked for). Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_fast import _backend
from resnet_fast.ops import norm_conv, reference
from tests.conftest import make_input

pytestmark = pytest.mark.skipif(not _backend.triton_available(), reason=f"Triton cannot run: {_backend.triton_error()}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (N, C, H, W, K, kernel, stride, padding): a basic block's 3x3, a stride-2 3x3 on an odd map, a
# bottleneck's 1x1s (stride 1 and 2), the ImageNet stem, channel counts off the tiles (5, 17, 33),
# batch 1, a 1x1 output map.
SHAPES = [
    (2, 16, 8, 8, 32, 3, 1, 1), (2, 5, 7, 7, 17, 3, 2, 1), (1, 24, 4, 4, 16, 1, 1, 0), (2, 33, 6, 6, 16, 1, 2, 0),
    (2, 3, 9, 9, 16, 7, 2, 3), (1, 8, 3, 3, 33, 3, 1, 0),
]


def args(shape, dtype, layout, prologue):
    n, c, h, w, k, r, _s, _p = shape
    x = make_input((n, c, h, w), dtype, layout, device=DEVICE)
    weight = (torch.randn(k, c, r, r, device=DEVICE) / (c * r * r) ** 0.5).to(dtype)
    if not prologue:
        return x, weight, None, None
    scale = (torch.rand(c, device=DEVICE) + 0.5).to(dtype)
    shift = (torch.randn(c, device=DEVICE) * 0.5).to(dtype)
    return x, weight, scale, shift


def as64(t):
    return None if t is None else t.double()


def check_against_formula(shape, dtype, layout, prologue, relu):
    _n, _c, _h, _w, _k, _r, stride, padding = shape
    x, weight, scale, shift = args(shape, dtype, layout, prologue)
    y, mean, var = norm_conv(x, weight, stride, padding, scale, shift, relu)
    oracle = reference.norm_conv(x.double(), weight.double(), stride, padding, as64(scale), as64(shift), relu)
    assert y.shape == oracle[0].shape and y.dtype == dtype
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float64:
        for got, want in zip((y, mean, var), oracle):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        return
    eager = reference.norm_conv(x, weight, stride, padding, scale, shift, relu)
    for name, got, own, want in zip(("y", "mean", "var"), (y, mean, var), eager, oracle):
        err = (got.double() - want).abs().max().item()
        yardstick = (own.double() - want).abs().max().item()
        # Within a few times eager float32's error, or float32's rounding of the largest value.
        bound = 4 * yardstick + 4 * torch.finfo(torch.float32).eps * want.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} against float64, eager float32's {yardstick:.3g}"


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("prologue", [True, False], ids=["scale-shift", "plain"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_against_formula(shape, dtype, layout, prologue, relu):
    check_against_formula(shape, dtype, layout, prologue, relu)


# The fuzz tests' cases (forward and backward): a convolution's shape, its prologue and ReLU.
FUZZ = dict(
    n=st.integers(1, 3), c=st.integers(1, 20), size=st.integers(1, 9), k=st.integers(1, 40),
    r=st.sampled_from([1, 3, 5]), stride=st.integers(1, 3), pad=st.integers(0, 2),
    prologue=st.booleans(), relu=st.booleans(),
)


@settings(max_examples=15, deadline=None)
@given(**FUZZ)
def test_fuzz_against_formula_in_float64(n, c, size, k, r, stride, pad, prologue, relu):
    pad = min(pad, r - 1)
    size = max(size, r - 2 * pad)  # (the padded input holds at least one window)
    check_against_formula((n, c, size, size, k, r, stride, pad), torch.float64, "channels_last", prologue, relu)


def test_padding_is_the_normalised_activations():
    """The zero padding belongs to the normalised input, not to x: a shift of 1 with no ReLU
    makes the inside 1 more, the padding stays 0."""
    x = torch.zeros(1, 1, 3, 3, device=DEVICE, dtype=torch.float64)
    weight = torch.ones(1, 1, 3, 3, device=DEVICE, dtype=torch.float64)
    one = torch.ones(1, device=DEVICE, dtype=torch.float64)
    y, mean, _var = norm_conv(x, weight, 1, 1, one, one, False)
    assert y[0, 0].tolist() == [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
    assert mean.item() == pytest.approx(49 / 9)


def test_statistics_of_a_large_offset_channel():
    """Each tile is centred on its own mean and the partials merge in float64: the variance of
    outputs near 1000 with spread 1 keeps float32's precision (a sum of squares would lose it)."""
    x = (torch.randn(4, 16, 8, 8, device=DEVICE) + 1000.0).contiguous(memory_format=torch.channels_last)
    weight = torch.zeros(16, 16, 1, 1, device=DEVICE)
    weight[:, 0] = 1.0  # each output channel is input channel 0
    _y, mean, var = norm_conv(x, weight)
    want = x[:, 0].double()
    torch.testing.assert_close(mean.double(), want.mean().expand(16), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want.var(unbiased=False).expand(16), rtol=1e-4, atol=0)


def test_empty_batch():
    x = torch.randn(0, 4, 5, 5, device=DEVICE)
    y, mean, var = norm_conv(x, torch.randn(8, 4, 3, 3, device=DEVICE), 1, 1)
    assert y.shape == (0, 8, 5, 5) and mean.shape == var.shape == (8,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"x": torch.randn(4, 5, 5)}, "expected a 4-D input"),
        ({"x": torch.randn(1, 4, 5, 5).half()}, "expected a float32 or float64 input"),
        ({"weight": torch.randn(8, 3, 3, 3)}, r"expected a square \(K, 4, R, R\) weight"),
        ({"weight": torch.randn(8, 4, 3, 1)}, "expected a square"),
        ({"weight": torch.randn(8, 4, 3, 3).double()}, "weight like the input"),
        ({"scale": torch.ones(4)}, "expected both scale and shift or neither"),
        ({"scale": torch.ones(3), "shift": torch.ones(3)}, r"scale and a shift of shape \(4\)"),
        ({"stride": 0}, "expected a stride of 1 or more"),
        ({"padding": 3}, r"padding in \[0, kernel\)"),
        ({"x": torch.randn(1, 4, 1, 1), "padding": 0}, "is smaller than the 3x3 kernel"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_gets_a_clear_error(kwargs, message):
    call = {"x": torch.randn(1, 4, 5, 5), "weight": torch.randn(8, 4, 3, 3), "stride": 1, "padding": 1,
            "scale": None, "shift": None, "relu": True}
    call.update(kwargs)
    call = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with pytest.raises(RuntimeError, match=message):
        norm_conv(**call)


def test_opcheck():
    """Schema, fake kernel, and the autograd's registration and tracing (inputs requiring grad)."""
    x, weight, scale, shift = (t.requires_grad_(True) for t in args((2, 8, 6, 6, 16, 3, 1, 1), torch.float32, "channels_last", True))
    torch.library.opcheck(torch.ops.resnet_fast_triton.norm_conv, (x, weight, 1, 1, scale, shift, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


# (shape, prologue, relu) for the gradient tests: small, as each forward runs in the interpreter here.
GRAD_CASES = [
    ((2, 5, 6, 6, 7, 3, 1, 1), True, True), ((2, 5, 6, 6, 7, 3, 2, 1), True, False),
    ((1, 6, 4, 4, 9, 1, 1, 0), False, True), ((2, 4, 5, 5, 6, 1, 2, 0), False, False),
]


def loss_of(outputs, cotangents):
    """A loss that reaches y and both statistics, with fixed random weights on each."""
    return sum((o * g).sum() for o, g in zip(outputs, cotangents))


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradients_against_formula(case, dtype, layout):
    """The gradients of x, weight, scale and shift through y, mean and var: float64 to rounding,
    float32 within a few times eager float32's error against float64."""
    shape, prologue, relu = case
    stride, padding = shape[6], shape[7]
    inputs = [t for t in args(shape, dtype, layout, prologue) if t is not None]

    def grads(fn, ins):
        ins = [t.detach().clone().requires_grad_(True) for t in ins]
        outputs = fn(*ins)
        torch.manual_seed(1)
        cotangents = [torch.randn(o.shape, dtype=o.dtype, device=o.device) for o in outputs]
        return torch.autograd.grad(loss_of(outputs, cotangents), ins)

    def ours(x, w, *ss):
        return norm_conv(x, w, stride, padding, *(ss or (None, None)), relu)

    def formula(x, w, *ss):
        return reference.norm_conv(x, w, stride, padding, *(ss or (None, None)), relu)

    got = grads(ours, inputs)
    want = grads(formula, [t.double() for t in inputs])
    names = ["x", "weight", "scale", "shift"]
    if dtype == torch.float64:
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)
        return
    eager = grads(formula, inputs)
    for name, g, own, w in zip(names, got, eager, want):
        assert g.dtype == dtype and g.shape == w.shape
        err = (g.double() - w).abs().max().item()
        yardstick = (own.double() - w).abs().max().item()
        bound = 4 * yardstick + 4 * torch.finfo(torch.float32).eps * w.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} against float64, eager float32's {yardstick:.3g}"


@pytest.mark.parametrize("prologue", [True, False], ids=["scale-shift", "plain"])
def test_gradcheck_and_gradgradcheck(prologue):
    """Numerical against analytical gradients in float64, and again for the backward itself (a
    gradient penalty): the backward is PyTorch ops, differentiable in everything it reads."""
    x, weight, scale, shift = args((1, 3, 4, 4, 4, 3, 1, 1), torch.float64, "channels_last", prologue)
    inputs = [t.requires_grad_(True) for t in (x, weight, scale, shift) if t is not None]

    def fn(x, w, *ss):
        return norm_conv(x, w, 1, 1, *(ss or (None, None)), True)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("wanted", ["x", "weight", "scale"])
def test_only_the_gradients_asked_for(wanted):
    """With one input requiring grad, the others get none and the one asked for is the formula's."""
    shape = (2, 4, 5, 5, 6, 3, 1, 1)
    x, weight, scale, shift = args(shape, torch.float64, "channels_last", True)
    inputs = {"x": x, "weight": weight, "scale": scale, "shift": shift}
    inputs[wanted].requires_grad_(True)
    y, _mean, var = norm_conv(inputs["x"], inputs["weight"], 1, 1, inputs["scale"], inputs["shift"], True)
    (got,) = torch.autograd.grad(y.sum() + var.sum(), inputs[wanted])
    ref = {k: v.detach().clone().requires_grad_(k == wanted) for k, v in inputs.items()}
    y, _mean, var = reference.norm_conv(ref["x"], ref["weight"], 1, 1, ref["scale"], ref["shift"], True)
    (want,) = torch.autograd.grad(y.sum() + var.sum(), ref[wanted])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert all(t.grad is None for t in inputs.values())


def test_backward_with_only_the_statistics_used():
    """A loss of the statistics alone (y's gradient None) still reaches x and weight."""
    x, weight, _scale, _shift = args((2, 4, 5, 5, 6, 3, 1, 1), torch.float64, "channels_last", False)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    _y, mean, var = norm_conv(x, weight, 1, 1, None, None, False)
    got = torch.autograd.grad(mean.sum() + (var * var).sum(), (x, weight))
    xr, wr = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    _y, mean, var = reference.norm_conv(xr, wr, 1, 1, None, None, False)
    want = torch.autograd.grad(mean.sum() + (var * var).sum(), (xr, wr))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def backward_case(shape, dtype, layout, prologue, relu, with_grad_y=True, with_stats=True, seed=1):
    """norm_conv_backward's gradients and the formula's autograd (in float64) for one case, and
    eager float32's (the formula's autograd in the case's dtype)."""
    _n, _c, _h, _w, _k, _r, stride, padding = shape
    x, weight, scale, shift = args(shape, dtype, layout, prologue)
    y, mean, _var = norm_conv(x, weight, stride, padding, scale, shift, relu)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    acc = mean.dtype
    grad_y = torch.randn(y.shape, generator=gen, device=DEVICE).to(dtype) if with_grad_y else None
    grad_mean = torch.randn(y.shape[1], generator=gen, device=DEVICE).to(acc) if with_stats else None
    grad_var = torch.randn(y.shape[1], generator=gen, device=DEVICE).to(acc) if with_stats else None
    got = torch.ops.resnet_fast_triton.norm_conv_backward(
        grad_y, x, weight, stride, padding, scale, shift, relu, y, mean, grad_mean, grad_var, [True, True, True]
    )

    def formula(dt):
        ins = [t.detach().to(dt).requires_grad_(True) for t in (x, weight, scale, shift) if t is not None]
        out = reference.norm_conv(ins[0], ins[1], stride, padding, *(ins[2:] or (None, None)), relu)
        cot = [(grad_y, out[0]), (grad_mean, out[1]), (grad_var, out[2])]
        loss = sum((o * g.to(o.dtype)).sum() for g, o in cot if g is not None)
        return torch.autograd.grad(loss, ins)

    return got, formula(torch.float64), formula(dtype) if dtype != torch.float64 else None


def assert_backward_close(shape, dtype, layout, prologue, relu, **kw):
    got, want, eager = backward_case(shape, dtype, layout, prologue, relu, **kw)
    names = ["x", "weight", "scale", "shift"][: len(want)]
    assert all(t.numel() == 0 for t in got[len(want):]), "scale and shift gradients without a prologue"
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        assert g.shape == w.shape and g.dtype == (dtype if i < 2 else torch.float32 if dtype == torch.float32 else dtype)
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)
            continue
        err = (g.double() - w).abs().max().item()
        yardstick = (eager[i].double() - w).abs().max().item()
        bound = 4 * yardstick + 4 * torch.finfo(torch.float32).eps * w.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} against float64, eager float32's {yardstick:.3g}"


# The forward's shapes, the stem's smaller (its 49 taps cost the interpreter most).
BACKWARD_SHAPES = [s if s[5] != 7 else (1, 3, 7, 7, 16, 7, 2, 3) for s in SHAPES]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("prologue", [True, False], ids=["scale-shift", "plain"])
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
def test_backward_against_formula(shape, dtype, layout, prologue, relu):
    """The fused backward (the data gradient's gather over strides, the ReLU mask and the
    reductions in its epilogue; the weight gradient's slices) against the formula's autograd."""
    assert_backward_close(shape, dtype, layout, prologue, relu)


@pytest.mark.parametrize("with_grad_y, with_stats", [(True, False), (False, True)], ids=["y-only", "stats-only"])
def test_backward_with_some_gradients_none(with_grad_y, with_stats):
    assert_backward_close((2, 6, 5, 5, 9, 3, 2, 1), torch.float64, "channels_last", True, True,
                          with_grad_y=with_grad_y, with_stats=with_stats)


@settings(max_examples=15, deadline=None)
@given(**FUZZ)
def test_fuzz_backward_in_float64(n, c, size, k, r, stride, pad, prologue, relu):
    pad = min(pad, r - 1)
    size = max(size, r - 2 * pad)
    assert_backward_close((n, c, size, size, k, r, stride, pad), torch.float64, "channels_last", prologue, relu)


def test_weight_gradient_over_many_slices():
    """Enough output pixels that the weight gradient's programs share them out in several slices
    (the interpreter's at most 8), summed in order: still the formula's."""
    assert_backward_close((4, 8, 12, 12, 16, 3, 1, 1), torch.float64, "channels_last", True, True)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True]], ids=str)
def test_backward_outputs_not_asked_for_are_empty(mask):
    shape = (2, 4, 5, 5, 6, 3, 1, 1)
    x, weight, scale, shift = args(shape, torch.float64, "channels_last", True)
    y, mean, _var = norm_conv(x, weight, 1, 1, scale, shift, True)
    out = torch.ops.resnet_fast_triton.norm_conv_backward(
        torch.ones_like(y), x, weight, 1, 1, scale, shift, True, y, mean, None, None, mask
    )
    asked = [mask[0], mask[1], mask[2], mask[2]]
    assert [t.numel() > 0 for t in out] == asked


@pytest.mark.parametrize(
    "change, message",
    [
        ({"y": torch.randn(1, 8, 4, 4)}, r"expected the forward's output y of shape \[1, 8, 5, 5\]"),
        ({"grad_y": torch.randn(1, 8, 4, 4)}, "expected grad_y like y"),
        ({"grad_mean": torch.randn(3)}, r"expected grad_mean and grad_var of shape \(8\)"),
        ({"mean": torch.randn(3)}, r"expected the forward's mean of shape \(8\)"),
        ({"weight": torch.randn(8, 3, 3, 3)}, "norm_conv: expected a square"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_backward_bad_input_gets_a_clear_error(change, message):
    call = {"grad_y": torch.randn(1, 8, 5, 5), "x": torch.randn(1, 4, 5, 5), "weight": torch.randn(8, 4, 3, 3),
            "stride": 1, "padding": 1, "scale": None, "shift": None, "relu": True, "y": torch.randn(1, 8, 5, 5),
            "mean": torch.randn(8), "grad_mean": None, "grad_var": None, "output_mask": [True, True, False]}
    call.update(change)
    call = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast_triton.norm_conv_backward(**call)


def test_backward_opcheck():
    shape = (2, 8, 6, 6, 16, 3, 2, 1)
    x, weight, scale, shift = args(shape, torch.float32, "channels_last", True)
    y, mean, _var = norm_conv(x, weight, 2, 1, scale, shift, True)
    torch.library.opcheck(
        torch.ops.resnet_fast_triton.norm_conv_backward,
        (torch.randn_like(y), x, weight, 2, 1, scale, shift, True, y, mean, torch.randn_like(mean), None,
         [True, True, True]),
        test_utils=("test_schema", "test_faketensor"),
    )
