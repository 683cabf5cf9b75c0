"""conv1x1_bias_act (inference 1x1 convolution as one matrix product with bias, residual and ReLU)
against its formula, reference.conv1x1_bias_act, computed in float64; its error against that of
PyTorch's own float32 convolution."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import _routing
from resnet_fast.ops import conv1x1_bias_act, conv1x1_weight, reference
from tests.conftest import make_input, op_names, requires_extension

pytestmark = requires_extension

# (N, C, H, W, K, stride): ResNet-50's 1x1 shapes (reduced maps) and awkward ones.
SHAPES = [
    (2, 64, 14, 14, 256, 1),
    (1, 512, 7, 7, 2048, 1),  # 49 pixels: one block, the panels split between threads
    (2, 256, 9, 9, 512, 2),  # the projection shortcut: stride 2 on an odd map
    (3, 5, 4, 3, 7, 1),  # K not a multiple of 16 (one partial panel), C not of 8
    (1, 24, 1, 1, 40, 1),  # one pixel; 2.5 panels
    (2, 16, 5, 6, 33, 3),  # stride 3, 33 channels: a panel of one
    (4, 1024, 3, 3, 16, 1),  # wide C: four slices of 256 input channels, partial sums through y
    (1, 600, 2, 2, 32, 2),  # three slices of 200
    (1, 300, 3, 3, 20, 1),  # a partial panel: one slice of all 300
]


def expected_output(x, weight, bias, residual, relu, stride):
    r = None if residual is None else residual.double()
    return reference.conv1x1_bias_act(x.double(), weight.double(), bias.double(), r, relu, stride)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
@pytest.mark.parametrize("with_residual, relu", [(False, True), (True, True), (False, False)])
def test_matches_formula(shape, layout, with_residual, relu):
    n, c, h, w, k, s = shape
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    x = make_input((n, c, h, w), torch.float32, layout)
    weight = torch.randn(k, c, 1, 1) / max(c, 1) ** 0.5
    bias = torch.randn(k)
    residual = make_input((n, k, oh, ow), torch.float32, layout) if with_residual else None
    y = conv1x1_bias_act(x, conv1x1_weight(weight), bias, residual, relu, s)
    assert y.shape == (n, k, oh, ow) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), expected_output(x, weight, bias, residual, relu, s), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("c", [64, 512, 2048])
def test_error_within_twice_pytorchs_own(c):
    """Against float64, no more than 2x the error of PyTorch's float32 convolution (oneDNN's
    direct path) on the same data: every output sums C products in float32 either way."""
    x = torch.randn(2, c, 7, 7).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(256, c, 1, 1) / c**0.5, torch.randn(256)
    exact = expected_output(x, weight, bias, None, False, 1)
    ours = conv1x1_bias_act(x, conv1x1_weight(weight), bias, None, False, 1)
    theirs = F.conv2d(x, weight, bias)
    ours_err, theirs_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


def test_weight_packing():
    weight = torch.randn(20, 3, 1, 1, dtype=torch.float64)
    packed = conv1x1_weight(weight)
    assert packed.shape == (2, 3, 16) and packed.dtype == torch.float32 and packed.is_contiguous()
    for k in range(32):
        expected = weight[k, :, 0, 0].float() if k < 20 else torch.zeros(3)
        assert torch.equal(packed[k // 16, :, k % 16], expected)
    with pytest.raises(ValueError, match=r"expected a \(K, C, 1, 1\) weight"):
        conv1x1_weight(torch.randn(4, 3, 3, 3))


def test_non_finite_values_stay_in_their_pixels_and_channels():
    """A NaN input reaches exactly the outputs of its pixel (every output channel), an inf weight
    those of its output channel, as in the direct convolution; the zero padding of the last panel
    never leaks into a real channel."""
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, 2, 1, 3] = float("nan")
    weight, bias = torch.randn(20, 8, 1, 1), torch.randn(20)
    weight[17, 5] = float("inf")
    y = conv1x1_bias_act(x, conv1x1_weight(weight), bias, None, False, 1)
    expected = expected_output(x, weight, bias, None, False, 1)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(y.double()[finite], expected[finite], rtol=1e-5, atol=2e-5)


def test_relu_keeps_nan_like_torch_relu():
    x = torch.zeros(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    bias = -torch.ones(20)
    bias[3] = bias[18] = float("nan")  # in a full panel and in the partial one
    y = conv1x1_bias_act(x, conv1x1_weight(torch.zeros(20, 8, 1, 1)), bias, None, True, 1)
    nan = torch.zeros(20, dtype=torch.bool)
    nan[[3, 18]] = True
    assert y[:, nan].isnan().all() and (y[:, ~nan] == 0).all()


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(8, 4, 4), torch.randn(1, 8, 16), torch.randn(8), None, True, 1), "expected a 4-D"),
        ((torch.randn(1, 8, 4, 4), torch.randn(1, 4, 16), torch.randn(8), None, True, 1), r"packed weight of shape \(1, 8, 16\)"),
        ((torch.randn(1, 8, 4, 4), torch.randn(1, 8, 16), torch.randn(20), None, True, 1), r"packed weight of shape \(2, 8, 16\)"),
        ((torch.randn(1, 8, 4, 4), torch.randn(1, 8, 16), torch.randn(8), torch.randn(1, 8, 4, 4), True, 2), r"residual of shape \(1, 8, 2, 2\)"),
        ((torch.randn(1, 8, 4, 4).double(), torch.randn(1, 8, 16), torch.randn(8), None, True, 1), "expected float32"),
        ((torch.randn(1, 8, 4, 4), torch.randn(1, 8, 16), torch.randn(8), None, True, 0), "stride of 1 or more"),
    ],
)
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast.conv1x1_bias_act(*args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck(layout, stride):
    x = make_input((2, 8, 5, 4), torch.float32, layout)
    residual = make_input((2, 20, (5 - 1) // stride + 1, (4 - 1) // stride + 1), torch.float32, layout)
    packed = conv1x1_weight(torch.randn(20, 8, 1, 1))
    torch.library.opcheck(torch.ops.resnet_fast.conv1x1_bias_act, (x, packed, torch.randn(20), residual, True, stride))


def _count(model, x, name):
    def forward():
        with torch.inference_mode():
            model(x)

    return op_names(forward).count(name)


@pytest.mark.skipif(not _routing.GEMM1X1_APPLIES, reason=f"our 1x1 convolutions run on AVX2-only CPUs; this one has {_routing.CPU_CAPABILITY}")
def test_resnet50_inference_runs_its_1x1_convolutions_here():
    model = resnet_fast.ResNet50().eval()
    # 16 blocks x 2 + the 4 projection shortcuts (3 of them with stride 2).
    assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv1x1_bias_act") == 36
    with resnet_fast.use_backend("eager"):
        assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv1x1_bias_act") == 0
    model.train()  # training: the convolutions with BatchNorm unfolded
    assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv1x1_bias_act") == 0
