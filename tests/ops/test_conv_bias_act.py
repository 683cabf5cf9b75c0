"""conv_bias_act (inference convolution as one implicit matrix product with bias, residual and
ReLU) against its formula, reference.conv_bias_act, computed in float64; its error against that of
PyTorch's own float32 convolution."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import _routing
from resnet_fast.ops import conv_bias_act, pack_conv_weight, reference
from tests.conftest import make_input, op_names, requires_extension

pytestmark = requires_extension

# (N, C, H, W, K, kernel, stride, padding): ResNet-50's shapes (reduced maps) and awkward ones.
SHAPES = [
    (2, 64, 14, 14, 256, 1, 1, 0),
    (1, 512, 7, 7, 2048, 1, 1, 0),  # 49 pixels: one block, the panels split between threads
    (2, 256, 9, 9, 512, 1, 2, 0),  # the projection shortcut: stride 2 on an odd map
    (3, 5, 4, 3, 7, 1, 1, 0),  # K not a multiple of 16 (one partial panel), C not of 8
    (1, 24, 1, 1, 40, 1, 1, 0),  # one pixel; 2.5 panels
    (2, 16, 5, 6, 33, 1, 3, 0),  # stride 3, 33 channels: a panel of one
    (4, 1024, 3, 3, 16, 1, 1, 0),  # wide C: four slices of 256 input channels, partial sums through y
    (1, 600, 2, 2, 32, 1, 2, 0),  # three slices of 200
    (1, 300, 3, 3, 20, 1, 1, 0),  # a partial panel: one slice of all 300
    (2, 128, 9, 9, 128, 3, 2, 1),  # a stride-2 3x3 on an odd map: two taps a slice
    (1, 64, 5, 4, 32, 3, 1, 1),  # four taps a slice, the last slice one tap
    (1, 512, 4, 4, 64, 3, 1, 1),  # two slices per tap
    (2, 24, 6, 6, 16, 3, 1, 0),  # no padding
    (1, 3, 11, 11, 16, 7, 2, 3),  # the stem's kind: 3 channels, 16 taps a slice
    (1, 16, 1, 1, 16, 3, 1, 1),  # a 1x1 map: eight of nine taps in the padding
]


def expected_output(x, weight, bias, residual, relu, stride, padding):
    r = None if residual is None else residual.double()
    return reference.conv_bias_act(x.double(), weight.double(), bias.double(), r, relu, stride, padding)


def output_size(h, kernel, stride, padding):
    return (h + 2 * padding - kernel) // stride + 1


# The register tiles: AVX2's 6 x 16 (run by every x86-64 CPU with AVX2) and AVX-512's 6 x 64.
HAS_AVX512 = _routing.CPU_CAPABILITY == "AVX512"
TILES = [
    pytest.param(False, id="6x16"),
    pytest.param(True, id="6x64", marks=pytest.mark.skipif(
        not HAS_AVX512, reason=f"the AVX-512 tiles need AVX-512; this CPU has {_routing.CPU_CAPABILITY}")),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
@pytest.mark.parametrize("with_residual, relu", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("wide", TILES)
def test_matches_formula(shape, layout, with_residual, relu, wide):
    n, c, h, w, k, r, s, p = shape
    oh, ow = output_size(h, r, s, p), output_size(w, r, s, p)
    x = make_input((n, c, h, w), torch.float32, layout)
    weight = torch.randn(k, c, r, r) / (c * r * r) ** 0.5
    bias = torch.randn(k)
    residual = make_input((n, k, oh, ow), torch.float32, layout) if with_residual else None
    y = conv_bias_act(x, pack_conv_weight(weight), bias, residual, relu, r, s, p, wide)
    assert y.shape == (n, k, oh, ow) and y.is_contiguous(memory_format=torch.channels_last)
    expected = expected_output(x, weight, bias, residual, relu, s, p)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("c, kernel", [(64, 1), (512, 1), (2048, 1), (256, 3)])
@pytest.mark.parametrize("wide", TILES)
def test_error_within_twice_pytorchs_own(c, kernel, wide):
    """Against float64, no more than 2x the error of PyTorch's float32 convolution (oneDNN's
    direct path) on the same data: every output sums C * kernel^2 products in float32 either way."""
    x = torch.randn(2, c, 7, 7).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(256, c, kernel, kernel) / (c * kernel**2) ** 0.5, torch.randn(256)
    pad = kernel // 2
    exact = expected_output(x, weight, bias, None, False, 1, pad)
    ours = conv_bias_act(x, pack_conv_weight(weight), bias, None, False, kernel, 1, pad, wide)
    theirs = F.conv2d(x, weight, bias, 1, pad)
    ours_err, theirs_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


def test_weight_packing():
    weight = torch.randn(20, 3, 2, 2, dtype=torch.float64)
    packed = pack_conv_weight(weight)
    assert packed.shape == (2, 12, 16) and packed.dtype == torch.float32 and packed.is_contiguous()
    for k in range(32):
        for i in range(2):
            for j in range(2):
                tap = (2 * i + j) * 3
                expected = weight[k, :, i, j].float() if k < 20 else torch.zeros(3)
                assert torch.equal(packed[k // 16, tap : tap + 3, k % 16], expected)
    with pytest.raises(ValueError, match=r"expected a \(K, C, R, R\) weight"):
        pack_conv_weight(torch.randn(4, 3, 3, 1))


@pytest.mark.parametrize("wide", TILES)
def test_non_finite_values_stay_in_their_windows_and_channels(wide):
    """A NaN input reaches exactly the outputs whose window holds it (every output channel), an
    inf weight those of its output channel, as in the direct convolution; the padding of the last
    panel never leaks into a real channel."""
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    x[0, 2, 1, 3] = float("nan")
    for k, kernel in [(20, 1), (32, 3)]:
        weight, bias = torch.randn(k, 8, kernel, kernel), torch.randn(k)
        weight[17, 5] = float("inf")
        pad = kernel // 2
        y = conv_bias_act(x, pack_conv_weight(weight), bias, None, False, kernel, 1, pad, wide)
        expected = expected_output(x, weight, bias, None, False, 1, pad)
        assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
        finite = expected.isfinite()
        torch.testing.assert_close(y.double()[finite], expected[finite], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("wide", TILES)
def test_relu_keeps_nan_like_torch_relu(wide):
    x = torch.zeros(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    bias = -torch.ones(20)
    bias[3] = bias[18] = float("nan")  # in a full panel and in the partial one
    y = conv_bias_act(x, pack_conv_weight(torch.zeros(20, 8, 1, 1)), bias, None, True, wide=wide)
    nan = torch.zeros(20, dtype=torch.bool)
    nan[[3, 18]] = True
    assert y[:, nan].isnan().all() and (y[:, ~nan] == 0).all()


X = torch.randn(1, 8, 4, 4)
W1 = torch.randn(1, 8, 16)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(8, 4, 4), W1, torch.randn(8), None, True, 1, 1, 0), "expected a 4-D"),
        ((X, torch.randn(1, 4, 16), torch.randn(8), None, True, 1, 1, 0), r"packed weight of shape \(1, 8, 16\)"),
        ((X, W1, torch.randn(20), None, True, 1, 1, 0), r"packed weight of shape \(2, 8, 16\)"),
        ((X, W1, torch.randn(8), None, True, 3, 1, 1), r"packed weight of shape \(1, 72, 16\)"),
        ((X, torch.randn(1, 72, 16), torch.randn(8), None, True, 3, 1, 1), "needs a multiple of 16 output channels"),
        ((X, W1, torch.randn(8), torch.randn(1, 8, 4, 4), True, 1, 2, 0), r"residual of shape \(1, 8, 2, 2\)"),
        ((X.double(), W1, torch.randn(8), None, True, 1, 1, 0), "expected float32"),
        ((X, W1, torch.randn(8), None, True, 1, 0, 0), "a stride of 1 or more"),
        ((X, torch.randn(1, 8 * 49, 16), torch.randn(16), None, True, 7, 1, 0), "smaller than the 7x7 kernel"),
    ],
)
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast.conv_bias_act(*args)


@pytest.mark.skipif(HAS_AVX512, reason="this CPU has AVX-512: its wide tiles run")
def test_wide_tiles_without_avx512_are_refused():
    with pytest.raises(RuntimeError, match="without AVX-512F"):
        torch.ops.resnet_fast.conv_bias_act(X, W1, torch.randn(8), None, True, 1, 1, 0, True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel, stride, padding, k", [(1, 1, 0, 20), (1, 2, 0, 20), (3, 2, 1, 32)])
@pytest.mark.parametrize("wide", TILES)
def test_opcheck(layout, kernel, stride, padding, k, wide):
    x = make_input((2, 8, 5, 4), torch.float32, layout)
    oh, ow = output_size(5, kernel, stride, padding), output_size(4, kernel, stride, padding)
    residual = make_input((2, k, oh, ow), torch.float32, layout)
    packed = pack_conv_weight(torch.randn(k, 8, kernel, kernel))
    torch.library.opcheck(
        torch.ops.resnet_fast.conv_bias_act, (x, packed, torch.randn(k), residual, True, kernel, stride, padding, wide)
    )


# (N, C, H, W, K, kernel, stride, padding) whose depth is one slice (kernel^2 * C <= GEMM_SLICE):
# where conv_bias_act_ may write into its residual.
ONE_SLICE = [
    (2, 64, 14, 14, 256, 1, 1, 0),
    (1, 256, 7, 7, 1024, 1, 1, 0),  # exactly one slice deep; 49 pixels, the panels split between threads
    (2, 128, 9, 9, 512, 1, 2, 0),
    (3, 5, 4, 3, 7, 1, 1, 0),  # a partial panel
    (1, 24, 6, 6, 32, 3, 1, 1),  # a 3x3: nine taps of 24 channels in one slice
]


@pytest.mark.parametrize("shape", ONE_SLICE, ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("wide", TILES)
def test_in_place_writes_the_same_bits_into_the_residual(shape, relu, wide):
    n, c, h, w, k, r, s, p = shape
    assert r * r * c <= _routing.GEMM_SLICE
    x = make_input((n, c, h, w), torch.float32, "channels_last")
    weight, bias = torch.randn(k, c, r, r) / (r * c**0.5), torch.randn(k)
    residual = make_input((n, k, output_size(h, r, s, p), output_size(w, r, s, p)), torch.float32, "channels_last")
    packed = pack_conv_weight(weight)
    expected = conv_bias_act(x, packed, bias, residual, relu, r, s, p, wide=wide)
    target = residual.clone(memory_format=torch.channels_last)
    out = resnet_fast.ops.conv_bias_act_(target, x, packed, bias, relu, r, s, p, wide=wide)
    assert out is target and torch.equal(target, expected)


def test_in_place_is_refused_where_it_cannot_be_done():
    x = make_input((1, 300, 3, 3), torch.float32, "channels_last")
    packed, bias = pack_conv_weight(torch.randn(32, 300, 1, 1)), torch.randn(32)
    residual = make_input((1, 32, 3, 3), torch.float32, "channels_last")
    with pytest.raises(RuntimeError, match=r"only where kernel\^2 \* C <= 256"):  # two slices deep
        torch.ops.resnet_fast.conv_bias_act_(residual, x, packed, bias, True, 1, 1, 0)
    x = make_input((1, 16, 3, 3), torch.float32, "channels_last")
    packed = pack_conv_weight(torch.randn(32, 16, 1, 1))
    with pytest.raises(RuntimeError, match="channels_last contiguous residual"):
        torch.ops.resnet_fast.conv_bias_act_(torch.randn(1, 32, 3, 3), x, packed, bias, True, 1, 1, 0)
    same = make_input((1, 16, 3, 3), torch.float32, "channels_last")
    with pytest.raises(RuntimeError, match="refer to a single memory location"):  # its own input as the residual
        torch.ops.resnet_fast.conv_bias_act_(same, same, pack_conv_weight(torch.randn(16, 16, 1, 1)),
                                             torch.randn(16), True, 1, 1, 0)


def test_in_place_opcheck():
    x = make_input((2, 8, 5, 4), torch.float32, "channels_last")
    residual = make_input((2, 20, 5, 4), torch.float32, "channels_last")
    packed = pack_conv_weight(torch.randn(20, 8, 1, 1))
    torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act_, (residual, x, packed, torch.randn(20), True, 1, 1, 0))


def _count(model, x, name):
    """How many times ``model(x)`` runs op ``name``, its in-place form (a block end written into
    its residual) included."""
    def forward():
        with torch.inference_mode():
            model(x)

    names = op_names(forward)
    return names.count(name) + names.count(name + "_")


@pytest.mark.skipif(
    _routing.CPU_CAPABILITY not in ("AVX2", "AVX512"),
    reason=f"our GEMM runs on AVX2 and AVX-512 CPUs; this one has {_routing.CPU_CAPABILITY}",
)
def test_resnet50_inference_runs_its_1x1_convolutions_here(monkeypatch):
    model = resnet_fast.ResNet50().eval()
    # 16 blocks x 2 + the 4 projection shortcuts (3 of them with stride 2); no 3x3 (see GEMM_APPLIES).
    # At 64x64 and batch 2 every 1x1's output has at most 512 pixels: within AVX-512's bound too.
    assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv_bias_act") == 36
    with resnet_fast.use_backend("eager"):
        assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv_bias_act") == 0
    if not _routing.GEMM_APPLIES:  # AVX-512: only the maps of at most GEMM_AVX512_MAX_PIXELS pixels
        monkeypatch.setattr(_routing, "GEMM_AVX512_MAX_PIXELS", 32)
        # layer3's 4x4 maps (32 pixels at batch 2) and layer4's 2x2: in layer3 conv1 of blocks 1-5,
        # conv3 of all 6 and the shortcut (its first conv1 runs on layer2's 8x8: 128 pixels), in
        # layer4 all 7.
        assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv_bias_act") == 19
        monkeypatch.setattr(_routing, "GEMM_AVX512_MAX_PIXELS", 0)
        assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv_bias_act") == 0
    model.train()  # training: the convolutions with BatchNorm unfolded
    assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv_bias_act") == 0