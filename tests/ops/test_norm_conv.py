"""norm_conv (issue 18's NormConvolution forward: the previous BatchNorm applied as the input is
loaded, the next one's statistics reduced in the epilogue; resnet_fast/triton/norm_conv.py)
against its formula: float64 to rounding, float32 within a few times eager float32's own error
against float64; every layout, prologue on and off, strides, paddings, kernel sizes, channel
counts off the tiles' sizes, batch 1, 1x1 output maps; clear errors; the fake kernel (opcheck).
Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py)."""

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


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 20), size=st.integers(1, 9), k=st.integers(1, 40),
    r=st.sampled_from([1, 3, 5]), stride=st.integers(1, 3), pad=st.integers(0, 2),
    prologue=st.booleans(), relu=st.booleans(),
)
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
    x, weight, scale, shift = args((2, 8, 6, 6, 16, 3, 1, 1), torch.float32, "channels_last", True)
    torch.library.opcheck(torch.ops.resnet_fast_triton.norm_conv, (x, weight, 1, 1, scale, shift, True),
                          test_utils=("test_schema", "test_faketensor"))
