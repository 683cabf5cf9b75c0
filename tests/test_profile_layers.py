"""bench/profile_layers.py's bookkeeping: every convolution of a forward is timed (the models call
several entry points; twice a new one fell into 'rest' unseen), the planned forward's steps are
matched with them, and each runtime's times land on the same keys as ours."""

import collections

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import _backend, _routing
from tests.conftest import import_bench

pytestmark = pytest.mark.skipif(
    not _backend.extension_available(), reason=f"the C++ extension is not built: {_backend.extension_error()}"
)


@pytest.fixture(scope="module")
def profile_layers():
    return import_bench("profile_layers")


@pytest.fixture(scope="module")
def setup(profile_layers):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    model = resnet_fast.get_model("resnet50").eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    ours, paths, total, order = profile_layers.profile_resnet_fast(model, x, forwards=1)
    return reference, model, x, ours, paths, total, order


def test_every_convolution_is_timed(setup):
    _, model, _, ours, paths, total, order = setup
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(order) == len(convs) == 53  # the stem, 16 blocks' 3, 4 projections
    assert set(order) == set(ours) == set(paths)
    assert sum(ours.values()) < total
    assert collections.Counter(k[2] for k in order) == {1: 36, 3: 16, 7: 1}
    assert sum(k[4] for k in order) == 16  # one residual add per block


def test_layer_macs_count_the_convolutions(profile_layers, setup):
    """layer_macs against the modules' own shapes (forward hooks), and Winograd's 16 multiplies
    per 2x2 tile: fewer than the direct 36, more than 16/36 of them where a map is odd."""
    _, model, x, _, paths, _, order = setup
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.numel() * m.in_channels * m.kernel_size[0] ** 2))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with resnet_fast.use_backend("eager"), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    direct = [profile_layers.layer_macs(k, x.shape[0], "onednn") for k in order]
    assert all(d == r for d, r in direct) and sum(d for d, _ in direct) == sum(seen)
    assert profile_layers.layer_macs(((64, 56, 56), 64, 3, 1, False), 2, "winograd") == (
        2 * 56 * 56 * 64 * 64 * 9, 2 * 28 * 28 * 16 * 64 * 64)
    assert profile_layers.layer_macs(((512, 7, 7), 512, 3, 1, False), 1, "winograd") == (
        49 * 512 * 512 * 9, 16 * 16 * 512 * 512)
    assert profile_layers.layer_macs(((256, 56, 56), 512, 1, 2, False), 1, "gemm") == (28 * 28 * 512 * 256,) * 2


def test_planned_steps_match_the_modules(profile_layers, setup):
    _, model, x, ours, _, _, order = setup
    if not _routing.PLAN_FORWARD:
        pytest.skip("planned forwards are off (_routing.PLAN_FORWARD)")
    planned, planned_total = profile_layers.profile_planned(model, x, 1, order)
    assert set(planned) == set(ours)
    assert 0 < sum(planned.values()) < planned_total


def _as_runtime_keys(order):
    return collections.Counter((k[0], k[1], k[2], k[4]) for k in order)


def test_onnx_shapes_are_ours(profile_layers, setup):
    pytest.importorskip("onnx", reason="onnx is not installed (the test extra)")
    reference, _, x, _, _, _, order = setup
    shapes = profile_layers.onnx_conv_shapes(profile_layers.export_onnx(reference, x))
    assert collections.Counter(shapes.values()) == collections.Counter((k[0], k[1], k[2]) for k in order)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_times_land_on_our_keys(profile_layers, setup, runtime):
    pytest.importorskip(runtime, reason=f"{runtime} is not installed (the bench extra)")
    pytest.importorskip("onnx", reason="onnx is not installed (the test extra)")
    reference, _, x, _, _, _, order = setup
    profile = {"onnxruntime": profile_layers.profile_onnxruntime, "openvino": profile_layers.profile_openvino}[runtime]
    times, total = profile(profile_layers.export_onnx(reference, x), x, 1)
    keys = set(times) - {("other",)}
    assert keys == set(_as_runtime_keys(order))  # each of ours has its runtime's time, and no other
    assert all(v > 0 for v in times.values()) and total > 0
