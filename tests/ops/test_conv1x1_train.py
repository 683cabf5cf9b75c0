"""conv1x1_train (a bottleneck's 1x1 convolution in training, its input recomputed from the
BatchNorm that made it) against what keeping the input gives: nn.Conv2d's own autograd, bit for
bit; and its routing (resnet_fast._routing.conv1x1_recomputes_input)."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import _routing
from resnet_fast.ops import reference
from tests.conftest import kept_storages, make_input, requires_extension

pytestmark = requires_extension


def bn_relu(x1, bn_w, bn_b, training, running):
    rm, rv = (None, None) if running is None else running
    return torch.ops.resnet_fast.batch_norm_act(x1, bn_w, bn_b, rm, rv, None, 1, training, 1e-5, True)


def bn_then_conv1x1(x1, bn_w, bn_b, w, stride, recompute, training=True, running=None):
    a, mean, var = bn_relu(x1, bn_w, bn_b, training, running)
    if not recompute:
        return F.conv2d(a, w, None, stride)  # nn.Conv2d's path: ATen's convolution keeps a
    return torch.ops.resnet_fast.conv1x1_train(a, w, stride, x1, bn_w, bn_b, mean, var, 1e-5, training)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("channels", [(64, 256), (17, 5)])
@pytest.mark.parametrize("training", [True, False], ids=["batch-stats", "running-stats"])
def test_gradients_are_those_of_the_kept_input_bit_for_bit(stride, layout, channels, training):
    c, k = channels
    x1 = make_input((3, c, 9, 8), torch.float32, layout)
    w = make_input((k, c, 1, 1), torch.float32, layout)
    bn_w, bn_b = torch.rand(c) + 0.5, torch.randn(c)
    running = None if training else (torch.randn(c), torch.rand(c) + 0.5)
    results = []
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x1, bn_w, bn_b, w)]
        y = bn_then_conv1x1(*leaves, stride, recompute, training, running)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([y.detach()] + [t.grad for t in leaves])
    for kept, recomputed in zip(*results):
        assert torch.equal(kept, recomputed)


def test_matches_the_formula_in_float64():
    x1 = make_input((2, 8, 5, 5), torch.float64, "channels_last")
    bn_w, bn_b, w = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64), torch.randn(4, 8, 1, 1, dtype=torch.float64)
    a, mean, var = bn_relu(x1, bn_w, bn_b, True, None)
    got = torch.ops.resnet_fast.conv1x1_train(a, w, 1, x1, bn_w, bn_b, mean, var, 1e-5, True)
    torch.testing.assert_close(got, reference.conv1x1_train(a, w, 1), rtol=0, atol=0)


def test_the_input_is_not_kept():
    x1 = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    bn_w, bn_b = torch.rand(16, requires_grad=True), torch.randn(16, requires_grad=True)
    w = torch.randn(32, 16, 1, 1, requires_grad=True)
    for recompute in (False, True):
        with kept_storages() as kept:
            a, mean, var = bn_relu(x1, bn_w, bn_b, True, None)
            if recompute:
                torch.ops.resnet_fast.conv1x1_train(a, w, 1, x1, bn_w, bn_b, mean, var, 1e-5, True)
            else:
                F.conv2d(a, w)
        assert (a.untyped_storage().data_ptr() in kept) != recompute


def test_double_backward_through_a_recomputed_input():
    """Under create_graph the input is recomputed by batch_norm_act itself, differentiably."""

    def penalty(recompute):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x1, bn_w, bn_b, w)]
        y = bn_then_conv1x1(*leaves, 1, recompute)
        gx, gw = torch.autograd.grad(y.square().sum(), (leaves[0], leaves[3]), create_graph=True)
        (gx.square().sum() + gw.square().sum()).backward()
        return [t.grad for t in leaves]

    x1 = make_input((2, 16, 6, 6), torch.float32, "channels_last")
    bn_w, bn_b, w = torch.rand(16) + 0.5, torch.randn(16), torch.randn(8, 16, 1, 1)
    for kept, recomputed in zip(penalty(False), penalty(True)):
        torch.testing.assert_close(recomputed, kept, rtol=1e-5, atol=1e-5 * kept.abs().max().item())


def test_bad_input_is_refused_clearly():
    x, v = torch.randn(2, 16, 6, 6), torch.randn(16)
    w = torch.randn(8, 16, 1, 1)
    with pytest.raises(RuntimeError, match=r"expected a \(K, 16, 1, 1\) weight"):
        torch.ops.resnet_fast.conv1x1_train(x, torch.randn(8, 16, 3, 3), 1, x, v, v, v, v, 1e-5, True)
    with pytest.raises(RuntimeError, match="expected stride >= 1"):
        torch.ops.resnet_fast.conv1x1_train(x, w, 0, x, v, v, v, v, 1e-5, True)
    with pytest.raises(RuntimeError, match="bn_input .* must have x's shape and dtype"):
        torch.ops.resnet_fast.conv1x1_train(x, w, 1, torch.randn(2, 16, 5, 5), v, v, v, v, 1e-5, True)
    with pytest.raises(RuntimeError, match="vectors of x's 16 channels"):
        torch.ops.resnet_fast.conv1x1_train(x, w, 1, x, v, v, torch.randn(8), v, 1e-5, True)


def test_opcheck():
    x1 = make_input((2, 8, 6, 5), torch.float32, "channels_last", requires_grad=True)
    bn_w, bn_b = torch.rand(8, requires_grad=True), torch.randn(8, requires_grad=True)
    a, mean, var = bn_relu(x1, bn_w, bn_b, True, None)
    w = make_input((4, 8, 1, 1), torch.float32, "channels_last", requires_grad=True)
    for stride in (1, 2):
        torch.library.opcheck(
            torch.ops.resnet_fast.conv1x1_train,
            (a.detach().requires_grad_(True), w, stride, x1.detach(), bn_w.detach(), bn_b.detach(), mean, var, 1e-5, True),
        )


def test_routing():
    conv = torch.nn.Conv2d(16, 32, 1, bias=False)
    x = torch.randn(2, 16, 4, 4)
    assert _routing.conv1x1_recomputes_input(x, conv, "cpu")
    assert not _routing.conv1x1_recomputes_input(x, conv, "triton")  # another BatchNorm's output
    assert not _routing.conv1x1_recomputes_input(x.double(), conv.double(), "cpu")
    assert not _routing.conv1x1_recomputes_input(x, torch.nn.Conv2d(16, 32, 1, bias=True), "cpu")
    assert not _routing.conv1x1_recomputes_input(x, torch.nn.Conv2d(16, 32, 1, bias=False, groups=2), "cpu")
    with torch.no_grad():
        assert not _routing.conv1x1_recomputes_input(x, conv, "cpu")
    conv.weight.requires_grad_(False)
    assert not _routing.conv1x1_recomputes_input(x, conv, "cpu")
    with resnet_fast.use_backend("eager"):
        assert not _routing.conv1x1_recomputes_input(x, torch.nn.Conv2d(16, 32, 1, bias=False), "cpu")
