"""pool_linear (inference's classifier head: global average pooling, then the linear layer, by our
GEMM) against its formula, reference.pool_linear, computed in float64; its error against that of
PyTorch's own float32 ops; the models' heads routed to it in inference and only there."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast import _routing
from resnet_fast.nn import functional as rf_functional
from resnet_fast.ops import pack_conv_weight, pool_linear, reference
from tests.conftest import make_input, op_names, requires_extension

pytestmark = requires_extension

HAS_AVX512 = _routing.CPU_CAPABILITY == "AVX512"
TILES = [
    pytest.param(False, id="6x16"),
    pytest.param(True, id="6x64", marks=pytest.mark.skipif(
        not HAS_AVX512, reason=f"the AVX-512 tiles need AVX-512; this CPU has {_routing.CPU_CAPABILITY}")),
]

# (N, C, H, W, K): the models' heads and awkward ones.
SHAPES = [
    (1, 2048, 7, 7, 1000),  # ResNet-50 at batch 1: 1000 = 62.5 panels, 8 slices of 256
    (3, 512, 7, 7, 1000),  # ResNet-18
    (5, 64, 8, 8, 10),  # CIFAR ResNet-20: one partial panel
    (2, 300, 3, 5, 48),  # C not a multiple of the pooling's 64-channel items; whole panels
    (1, 7, 1, 1, 33),  # a 1x1 map, C not a multiple of 8, a panel of one channel
    (7, 24, 2, 3, 16),  # more images than tile rows (6)
]


def expected_output(x, weight, bias):
    return reference.pool_linear(x.double(), weight.double(), bias.double())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "noncontiguous"])
@pytest.mark.parametrize("wide", TILES)
def test_matches_formula(shape, layout, wide):
    n, c, h, w, k = shape
    x = make_input((n, c, h, w), torch.float32, layout)
    weight, bias = torch.randn(k, c) / c**0.5, torch.randn(k)
    y = pool_linear(x, pack_conv_weight(weight[:, :, None, None]), bias, wide)
    assert y.shape == (n, k) and y.is_contiguous() and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected_output(x, weight, bias), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("n, c, k", [(1, 2048, 1000), (8, 2048, 1000), (8, 512, 1000), (128, 64, 10)])
@pytest.mark.parametrize("offset", [0.0, 3.0], ids=["relu", "relu+offset"])
@pytest.mark.parametrize("wide", TILES)
def test_error_within_twice_pytorchs_own(n, c, k, offset, wide):
    """Against float64, no more than 2x the error of PyTorch's pooling and linear layer (MKL) in
    float32 on the same data, post-ReLU features with and without a per-channel offset (a trained
    network's features have a mean): the pooling adds its blocks of 8 rows in float64, the
    product's depth runs in slices of 16-64 (blocked sums), which a 1000-wide output could not
    without its padding to whole panels (one 2048-long sum: 2-5x; slices of 256: up to 2.1x)."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(n, c, 7, 7)) + offset * torch.rand(1, c, 1, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(k, c) / c**0.5, torch.randn(k) * 0.1
    exact = expected_output(x, weight, bias)
    ours = pool_linear(x, pack_conv_weight(weight[:, :, None, None]), bias, wide)
    theirs = F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), weight, bias)
    ours_err, theirs_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


@pytest.mark.parametrize("wide", TILES)
def test_non_finite_values_reach_exactly_their_outputs(wide):
    """A NaN in one image's map reaches all of that image's outputs and no other image's; an inf
    weight its own output channel; the padding of the last panel never leaks into a real one."""
    x = torch.randn(3, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 0] = float("nan")
    weight, bias = torch.randn(20, 8), torch.randn(20)
    weight[17, 5] = float("inf")
    y = pool_linear(x, pack_conv_weight(weight[:, :, None, None]), bias, wide)
    expected = expected_output(x, weight, bias)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    finite = expected.isfinite()
    torch.testing.assert_close(y.double()[finite], expected[finite], rtol=1e-5, atol=2e-5)


X = torch.randn(2, 8, 3, 3)
W1 = torch.randn(1, 8, 16)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(8, 3, 3), W1, torch.randn(10)), "expected a 4-D"),
        ((X, torch.randn(1, 4, 16), torch.randn(10)), r"packed weight of shape \(1, 8, 16\)"),
        ((X, W1, torch.randn(20)), r"packed weight of shape \(2, 8, 16\)"),
        ((X, W1, torch.randn(2, 5)), r"expected a 1-D bias"),
        ((X.double(), W1, torch.randn(10)), "expected float32"),
        ((torch.randn(2, 8, 0, 3), W1, torch.randn(10)), "cannot average over an empty 0x3 map"),
    ],
)
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fast.pool_linear(*args)


def test_empty_batch():
    y = torch.ops.resnet_fast.pool_linear(torch.randn(0, 8, 3, 3), W1, torch.randn(10))
    assert y.shape == (0, 10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k", [10, 32])
@pytest.mark.parametrize("wide", TILES)
def test_opcheck(layout, k, wide):
    x = make_input((3, 8, 5, 4), torch.float32, layout)
    packed = pack_conv_weight(torch.randn(k, 8, 1, 1))
    torch.library.opcheck(torch.ops.resnet_fast.pool_linear, (x, packed, torch.randn(k), wide))


def _head_ops(model, x, **mode):
    def forward():
        with torch.inference_mode(**mode):
            model(x)

    names = op_names(forward)
    return names.count("resnet_fast::pool_linear"), names.count("aten::linear")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20"])
def test_models_run_their_head_here_in_inference_only(arch, monkeypatch):
    model = resnet_fast.models.__dict__[arch]().eval()
    if arch == "resnet20":  # a 64 x 10 weight: below POOL_LINEAR_MIN_WEIGHTS, PyTorch's ops run it
        x = torch.randn(2, 3, 32, 32)
        assert _head_ops(model, x) == (0, 1)
        monkeypatch.setattr(_routing, "POOL_LINEAR_MIN_WEIGHTS", 640)
    else:
        x = torch.randn(2, 3, 64, 64)
    assert _head_ops(model, x) == (1, 0)
    with torch.inference_mode():
        fused = model(x)
        with resnet_fast.use_backend("eager"):
            assert _head_ops(model, x) == (0, 1)
            formula = model(x)
    torch.testing.assert_close(fused, formula, rtol=1e-4, atol=1e-4)
    # Anything to differentiate, a hook, or a head of another kind: the modules themselves.
    assert _head_ops(model, x, mode=False) == (0, 1)  # grad mode, parameters requiring gradients
    handle = model.fc.register_forward_hook(lambda *a: None)
    assert _head_ops(model, x) == (0, 1)
    handle.remove()
    model.avgpool = nn.AdaptiveMaxPool2d(1)
    assert _head_ops(model, x) == (0, 1)


def test_packed_weight_follows_the_parameters():
    """An in-place change to the classifier (fine-tuning, load_state_dict) is seen at the next
    inference forward, through the plan and the packed weight's cache."""
    model = resnet_fast.ResNet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x), model(x)
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
        model.fc.bias.fill_(0.5)
    with torch.inference_mode():
        y = model(x)
        with resnet_fast.use_backend("eager"):
            expected = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert model.fc in rf_functional._PACKED_FC


def test_linear_without_bias():
    pool, fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(256, 300, bias=False).requires_grad_(False)
    x = torch.randn(2, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    assert _routing.pool_linear_applies(x, pool, fc)
    torch.testing.assert_close(rf_functional.pool_linear(x, pool, fc), fc(torch.flatten(pool(x), 1)), rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_modules():
    """Under CPU autocast, linear runs in bfloat16 (torchvision's logits are bfloat16): so do ours."""
    model = resnet_fast.ResNet18().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, linear = _head_ops(model, torch.randn(1, 3, 64, 64))
        assert fused == 0 and linear >= 1  # (the profiler sees autocast's linear and the one it calls)
        assert model(torch.randn(1, 3, 64, 64)).dtype == torch.bfloat16
