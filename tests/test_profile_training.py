"""bench/profile_training.py's bookkeeping: the floor's multiply-adds (each convolution's three
passes, Winograd's where the training plan runs it) and which ops count as the convolutions."""


import pytest
import torch

import resnet_fast
from resnet_fast import _backend, _routing
from tests.conftest import import_bench

pytestmark = pytest.mark.skipif(
    not _backend.extension_available(), reason=f"the C++ extension is not built: {_backend.extension_error()}"
)


@pytest.fixture(scope="module")
def profile_training():
    return import_bench("profile_training")


def forward_macs(arch, shape):
    """Each convolution's direct multiply-adds in a forward (output size x input channels x taps),
    from the modules' own shapes."""
    with resnet_fast.use_backend("eager"):
        model = resnet_fast.get_model(arch)
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: seen.append(o.numel() * m.in_channels * m.kernel_size[0] ** 2))
    with resnet_fast.use_backend("eager"), torch.no_grad():
        model(torch.randn(shape))
    return seen


@pytest.mark.parametrize("arch, shape", [("resnet20", (4, 3, 32, 32)), ("resnet50", (2, 3, 64, 64))])
def test_direct_multiply_adds_are_three_passes_but_the_stems_two(profile_training, monkeypatch, arch, shape):
    per_conv = forward_macs(arch, shape)
    monkeypatch.setattr(_routing, "winograd_applies", lambda *a, **k: False)
    monkeypatch.setattr(_routing, "WINOGRAD_WEIGHT_GRAD", False)
    direct, run = profile_training.step_macs(arch, shape)
    assert direct == 3 * sum(per_conv) - per_conv[0]
    assert run == direct


def test_winograd_runs_16_multiplies_per_tile_in_the_forward_and_the_stride_1_input_gradient(
    profile_training, monkeypatch
):
    # Winograd only for 32 -> 32 channels: CIFAR ResNet-20's five stride-1 3x3s on 16x16 maps (the
    # stage's first 3x3 is 16 -> 32); 16 of the 36 multiplies in the forward and the input gradient.
    monkeypatch.setattr(_routing, "winograd_applies", lambda c, k, stride, training, map_size=0: c == k == 32)
    monkeypatch.setattr(_routing, "winograd_tiles", lambda c, k: False)
    monkeypatch.setattr(_routing, "WINOGRAD_WEIGHT_GRAD", False)
    direct, run = profile_training.step_macs("resnet20", (4, 3, 32, 32))
    d = 4 * 16 * 16 * 32 * 32 * 9
    w = 4 * 8 * 8 * 16 * 32 * 32
    assert direct - run == 5 * 2 * (d - w)


def test_the_winograd_weight_gradient_runs_16_multiplies_per_tile(profile_training, monkeypatch):
    # The weight gradient alone by Winograd, for 64 -> 64 channels: ResNet-20's five stride-1 3x3s on 8x8 maps.
    monkeypatch.setattr(_routing, "winograd_applies", lambda c, k, stride, training, map_size=0: False)
    monkeypatch.setattr(_routing, "weight_grad_winograd_applies", lambda c, k, stride: c == k == 64)
    direct, run = profile_training.step_macs("resnet20", (4, 3, 32, 32))
    d = 4 * 8 * 8 * 64 * 64 * 9
    w = 4 * 4 * 4 * 16 * 64 * 64
    assert direct - run == 5 * (d - w)


def test_every_convolution_op_of_a_step_is_classified(profile_training):
    torch.manual_seed(0)
    for arch, shape in [("resnet20", (4, 3, 32, 32)), ("resnet50", (2, 3, 64, 64))]:
        model = resnet_fast.get_model(arch)
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        by_phase = profile_training.profile_step(model, x, y, steps=1)
        names = {n for ops in by_phase.values() for n in ops if profile_training.names_a_convolution(n)}
        unclassified = names - set(profile_training.CONV_OPS) - set(profile_training.NOT_CONV_OPS)
        assert not unclassified, f"{arch}: ops named for a convolution, neither counted nor excluded: {unclassified}"
        assert {"aten::mkldnn_convolution", "aten::convolution_backward"} <= names
        conv_ms = sum(ms for ops in by_phase.values() for n, ms in ops.items() if n in profile_training.CONV_OPS)
        assert conv_ms > 0
