"""conv3x3_bias_act (inference 3x3 convolution by Winograd F(2x2, 3x3) with bias, residual and
ReLU) against its formula, reference.conv3x3_bias_act, computed in float64."""

import pytest
import torch

import resnet_fast
from resnet_fast import _routing
from resnet_fast.ops import conv3x3_bias_act, reference, winograd_weight
from tests.conftest import make_input, op_names, requires_extension

pytestmark = requires_extension

# (N, C, H, W, K): ResNet-50's stages, and awkward ones.
SHAPES = [
    (2, 64, 14, 14, 64),
    (1, 128, 7, 7, 256),  # odd map: the last tiles overhang it
    (3, 8, 5, 6, 16),  # odd height, even width, batch 3
    (2, 16, 1, 1, 8),  # 1x1 map: one tile, three of its four outputs outside
    (1, 8, 2, 3, 24),
    (2, 256, 4, 4, 64),  # wide: one block, the transforms and products each parallel
]


def expected_output(x, weight, bias, residual, relu):
    r = None if residual is None else residual.double()
    return reference.conv3x3_bias_act(x.double(), weight.double(), bias.double(), r, relu)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
@pytest.mark.parametrize("with_residual, relu", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("tiles", [False, True], ids=["bmm", "tiles"])
def test_matches_formula(shape, layout, with_residual, relu, tiles):
    n, c, h, w, k = shape
    x = make_input((n, c, h, w), torch.float32, layout)
    weight = torch.randn(k, c, 3, 3) / (3 * c**0.5)
    bias = torch.randn(k)
    residual = make_input((n, k, h, w), torch.float32, layout) if with_residual else None
    y = conv3x3_bias_act(x, winograd_weight(weight), bias, residual, relu, tiles=tiles)
    assert y.shape == (n, k, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), expected_output(x, weight, bias, residual, relu), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "shape", [(1, 256, 14, 14, 256), (1, 512, 7, 7, 512), (2, 128, 28, 28, 128), (8, 32, 16, 16, 32), (4, 32, 8, 8, 32)]
)
def test_products_by_our_tiles_are_as_accurate_as_the_direct_convolution(shape):
    # Against float64: the products by our register tiles, blocked sums of 64 channels, within 1.5x
    # the error of PyTorch's direct convolution in float32 (measured 0.99-1.17x; one 256-deep sum
    # was 2.0-2.5x).
    n, c, h, w, k = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    weight = torch.randn(k, c, 3, 3) / (3 * c**0.5)
    bias = torch.randn(k)
    ref = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    ours = conv3x3_bias_act(x, winograd_weight(weight), bias, None, False, tiles=True).double()
    direct = torch.nn.functional.conv2d(x, weight, bias, padding=1).double()
    assert (ours - ref).norm() <= 1.5 * (direct - ref).norm()


def test_weight_transform_is_g_g_gt():
    g = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    weight = torch.randn(5, 3, 3, 3)
    u = winograd_weight(weight)
    assert u.shape == (16, 3, 5) and u.dtype == torch.float32
    for kk in range(5):
        for cc in range(3):  # in float64, rounded once: bit for bit
            expected = (g @ weight[kk, cc].double() @ g.T).reshape(16).float()
            torch.testing.assert_close(u[:, cc, kk], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected a \(K, C, 3, 3\) weight"):
        winograd_weight(torch.randn(4, 3, 1, 1))


def test_training_transforms_the_weight_as_inference_does():
    """One weight transform (resnet_fast::winograd_weight, in float64): training's conv3x3_train
    with Winograd and inference's conv3x3_bias_act compute the same bits."""
    x = torch.randn(2, 64, 6, 6).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3)
    train = torch.ops.resnet_fast.conv3x3_train(x, weight, 1, True, False)
    infer = conv3x3_bias_act(x, winograd_weight(weight), torch.zeros(64), None, False)
    assert torch.equal(train, infer)


def test_non_finite_inputs_stay_within_their_tiles():
    """A NaN input reaches every output whose 3x3 window holds it, as in the direct convolution;
    Winograd mixes the 4x4 input tile, so it also reaches the rest of those 2x2 output tiles, and
    nothing beyond them."""
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    x[0, 2, 3, 4] = float("nan")
    weight, bias = torch.randn(8, 8, 3, 3), torch.randn(8)
    y = conv3x3_bias_act(x, winograd_weight(weight), bias, None, False)
    expected = expected_output(x, weight, bias, None, False)
    assert (y.isnan() | ~expected.isnan()).all()  # NaN wherever the formula has one
    tiles = torch.zeros(8, 8, dtype=torch.bool)
    tiles[2:6, 2:6] = True  # the 2x2 tiles whose 4x4 input windows hold pixel (3, 4)
    assert y[:, :, ~tiles].isfinite().all()
    torch.testing.assert_close(y[:, :, ~tiles].double(), expected[:, :, ~tiles], rtol=1e-5, atol=2e-5)


def test_relu_keeps_nan_like_torch_relu():
    x = torch.zeros(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    bias = torch.zeros(8)
    bias[3] = float("nan")
    y = conv3x3_bias_act(x, winograd_weight(torch.zeros(8, 8, 3, 3)), bias, None, True)
    assert y[:, 3].isnan().all() and (y[:, :3] == 0).all()


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(8, 4, 4), torch.randn(16, 8, 8), torch.randn(8), None, True), "expected a 4-D"),
        ((torch.randn(1, 8, 4, 4), torch.randn(16, 4, 8), torch.randn(8), None, True), r"Winograd weight of shape \(16, 8, K\)"),
        ((torch.randn(1, 8, 4, 4), torch.randn(16, 8, 8), torch.randn(4), None, True), r"bias of shape \(8\)"),
        ((torch.randn(1, 8, 4, 4), torch.randn(16, 8, 8), torch.randn(8), torch.randn(1, 8, 2, 2), True), "residual of shape"),
        ((torch.randn(1, 8, 4, 4).double(), torch.randn(16, 8, 8), torch.randn(8), None, True), "expected float32"),
    ],
)
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast.conv3x3_bias_act(*args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((2, 8, 5, 4), torch.float32, layout)
    residual = make_input((2, 16, 5, 4), torch.float32, layout)
    u = winograd_weight(torch.randn(16, 8, 3, 3))
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_bias_act, (x, u, torch.randn(16), residual, True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("tiles", [False, True], ids=["bmm", "tiles"])
def test_in_place_writes_the_same_bits_into_the_residual(shape, relu, tiles):
    n, c, h, w, k = shape
    x = make_input((n, c, h, w), torch.float32, "channels_last")
    u, bias = winograd_weight(torch.randn(k, c, 3, 3) / (3 * c**0.5)), torch.randn(k)
    residual = make_input((n, k, h, w), torch.float32, "channels_last")
    expected = conv3x3_bias_act(x, u, bias, residual, relu, tiles=tiles)
    target = residual.clone(memory_format=torch.channels_last)
    out = resnet_fast.ops.conv3x3_bias_act_(target, x, u, bias, relu, tiles=tiles)
    assert out is target and torch.equal(target, expected)


def test_in_place_is_refused_where_it_cannot_be_done():
    x = make_input((1, 8, 4, 4), torch.float32, "channels_last")
    u = winograd_weight(torch.randn(8, 8, 3, 3))
    with pytest.raises(RuntimeError, match="channels_last contiguous residual"):
        torch.ops.resnet_fast.conv3x3_bias_act_(torch.randn(1, 8, 4, 4), x, u, torch.randn(8), True)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):  # its own input as the residual
        torch.ops.resnet_fast.conv3x3_bias_act_(x, x, u, torch.randn(8), True)


def test_in_place_opcheck():
    x = make_input((2, 8, 5, 4), torch.float32, "channels_last")
    residual = make_input((2, 16, 5, 4), torch.float32, "channels_last")
    u = winograd_weight(torch.randn(16, 8, 3, 3))
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_bias_act_, (residual, x, u, torch.randn(16), True))


def _count(model, x, name):
    """How many times ``model(x)`` runs op ``name``, its in-place form (a block end written into
    its residual) included."""
    def forward():
        with torch.inference_mode():
            model(x)

    names = op_names(forward)
    return names.count(name) + names.count(name + "_")


def test_resnet50_inference_runs_its_wide_3x3_convolutions_here():
    model = resnet_fast.ResNet50().eval()
    x = torch.randn(8, 3, 128, 128)
    # The stride-1 3x3s: 3 in layer1, 3 of layer2's 4 (its first has stride 2), 5 of 6, 2 of 3.
    assert _count(model, x, "resnet_fast::conv3x3_bias_act") == 13
    # At batch 2 layer4's 4x4 maps have 8 tiles, below _routing.WINOGRAD_MIN_TILES: oneDNN's.
    assert _count(model, torch.randn(2, 3, 128, 128), "resnet_fast::conv3x3_bias_act") == 11
    with resnet_fast.use_backend("eager"):
        assert _count(model, x, "resnet_fast::conv3x3_bias_act") == 0
    model.train()  # training: the convolutions with BatchNorm unfolded
    assert _count(model, torch.randn(2, 3, 64, 64), "resnet_fast::conv3x3_bias_act") == 0


@pytest.mark.parametrize("tiles", [False, True], ids=["at::bmm (AVX2 CPU)", "our tiles (AVX-512 CPU)"])
def test_narrow_convolutions_keep_onednn(monkeypatch, tiles):
    # 16 channels: oneDNN; 32: ours where our tiles run the products (_routing.winograd_tiles),
    # else oneDNN; 64: ours. Each stage has 5 stride-1 3x3s (its first has stride 2).
    monkeypatch.setattr(_routing, "WINOGRAD_TILES", tiles)
    model = resnet_fast.get_model("resnet20").eval()
    assert _count(model, torch.randn(2, 3, 32, 32), "resnet_fast::conv3x3_bias_act") == (10 if tiles else 5)
