"""conv_bn_act_train (a network's stem or a projection shortcut in training, its convolution's
output recomputed in the backward) against what keeping that output gives: ATen's convolution then
batch_norm_act, bit for bit; against its formula in float64; the first block's 3x3 convolution
recomputing its input from the stem (conv3x3_train's bn_conv_weight); and the routing
(resnet_fast._routing.recomputes_conv_output)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import resnet_fast
from resnet_fast import _routing
from resnet_fast.nn.functional import projection_bn, stem_conv_bn_act
from resnet_fast.ops import reference
from tests.conftest import kept_storages, make_input, requires_extension

pytestmark = requires_extension

EPS = 1e-5
# (channels in, out, kernel, stride, padding, input size): the CIFAR stem, the ImageNet stem, a
# projection shortcut (1x1, stride 2), and odd shapes (a channel count off the vector width, a map
# the stride does not divide).
SHAPES = [(3, 16, 3, 1, 1, 8), (3, 64, 7, 2, 3, 17), (16, 32, 1, 2, 0, 8), (5, 7, 1, 2, 0, 5), (2, 3, 3, 2, 0, 9)]


def kept_output(x, w, stride, padding, bn_w, bn_b, relu=True):
    """What the op replaces: ATen's convolution (which keeps x), then the fused BatchNorm (which keeps
    the convolution's output)."""
    c = F.conv2d(x, w, None, stride, padding)
    return torch.ops.resnet_fast.batch_norm_act(c, bn_w, bn_b, None, None, None, 1, True, EPS, relu)


def recomputed(x, w, stride, padding, bn_w, bn_b, relu=True):
    return torch.ops.resnet_fast.conv_bn_act_train(x, w, stride, padding, bn_w, bn_b, EPS, relu)


def leaves(shape, dtype, layout, x_grad=False):
    cin, cout, k, _s, _p, size = shape
    x = make_input((3, cin, size, size + 1), dtype, layout)
    w = make_input((cout, cin, k, k), dtype, "channels_last") * 0.3
    bn_w = (torch.rand(cout) + 0.5).to(dtype)
    bn_b = (torch.randn(cout) * 0.5).to(dtype)
    return [x.requires_grad_(x_grad), w.requires_grad_(True), bn_w.requires_grad_(True), bn_b.requires_grad_(True)]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["images", "input-grad"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_gradients_are_those_of_the_kept_output_bit_for_bit(shape, dtype, layout, x_grad, relu):
    _cin, _cout, _k, stride, padding, _size = shape
    base = leaves(shape, dtype, layout)
    results = []
    for fn in (kept_output, recomputed):
        ts = [t.detach().clone().requires_grad_(t.requires_grad or (i == 0 and x_grad)) for i, t in enumerate(base)]
        y, mean, var = fn(ts[0], ts[1], stride, padding, ts[2], ts[3], relu)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape))
        results.append([y.detach(), mean, var] + [t.grad for t in ts if t.requires_grad])
    for kept, recomp in zip(*results):
        assert kept.dtype == recomp.dtype and kept.stride() == recomp.stride()
        assert torch.equal(kept, recomp)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_formula(shape, relu):
    """In float64 the op is its formula; in float32 it is as close to float64 as PyTorch's own
    conv2d + batch_norm (+ relu) in float32."""
    _cin, _cout, _k, stride, padding, _size = shape
    x, w, bn_w, bn_b = (t.detach() for t in leaves(shape, torch.float64, "contiguous"))
    exact = reference.conv_bn_act_train(x, w, stride, padding, bn_w, bn_b, EPS, relu)
    got64 = recomputed(x, w, stride, padding, bn_w, bn_b, relu)
    for g, e in zip(got64, exact):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    f = [t.float() for t in (x, w, bn_w, bn_b)]
    got32 = recomputed(f[0], f[1], stride, padding, f[2], f[3], relu)
    eager32 = reference.conv_bn_act_train(f[0], f[1], stride, padding, f[2], f[3], EPS, relu)
    for g, e, ex in zip(got32, eager32, exact):
        err, eager_err = (g.double() - ex).abs().max().item(), (e.double() - ex).abs().max().item()
        assert err <= 2 * eager_err + 1e-6, (err, eager_err)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
def test_keeps_its_inputs_and_statistics_only(relu):
    """Not the convolution's output; the bias only for the ReLU mask."""
    x, w, bn_w, bn_b = leaves(SHAPES[0], torch.float32, "contiguous")
    with kept_storages() as kept:
        y, mean, var = recomputed(x, w, 1, 1, bn_w, bn_b, relu)
    assert kept == {t.untyped_storage().data_ptr() for t in (x, w, bn_w, mean, var) + ((bn_b,) if relu else ())}
    assert y.untyped_storage().data_ptr() not in kept


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
def test_gradcheck_and_gradgradcheck(relu):
    x, w, bn_w, bn_b = leaves((2, 3, 3, 2, 1, 5), torch.float64, "contiguous", x_grad=True)

    def fn(x, w, bn_w, bn_b):
        return recomputed(x, w, 2, 1, bn_w, bn_b, relu)[0]

    assert torch.autograd.gradcheck(fn, (x, w, bn_w, bn_b))
    assert torch.autograd.gradgradcheck(fn, (x, w, bn_w, bn_b))


def test_a_gradient_penalty_is_that_of_the_kept_output():
    base = leaves(SHAPES[0], torch.float32, "contiguous")

    def penalty(fn):
        ts = [t.detach().clone().requires_grad_(True) for t in base]
        y = fn(ts[0], ts[1], 1, 1, ts[2], ts[3])[0]
        gw, gbw = torch.autograd.grad(y.square().sum(), (ts[1], ts[2]), create_graph=True)
        (gw.square().sum() + gbw.square().sum()).backward()
        return [t.grad for t in ts]

    for kept, recomp in zip(penalty(kept_output), penalty(recomputed)):
        torch.testing.assert_close(recomp, kept, rtol=1e-4, atol=1e-5 * kept.abs().max().item())


def test_opcheck():
    x, w, bn_w, bn_b = leaves(SHAPES[1], torch.float32, "contiguous")
    torch.library.opcheck(torch.ops.resnet_fast.conv_bn_act_train, (x, w, 2, 3, bn_w, bn_b, EPS, True))
    x, w, bn_w, bn_b = leaves(SHAPES[2], torch.float32, "channels_last", x_grad=True)
    torch.library.opcheck(torch.ops.resnet_fast.conv_bn_act_train, (x, w, 2, 0, bn_w, bn_b, EPS, False))


def test_bad_input_is_refused_clearly():
    x, w, v = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 3, 3), torch.randn(16)
    op = torch.ops.resnet_fast.conv_bn_act_train
    with pytest.raises(RuntimeError, match="expected a 4-D"):
        op(torch.randn(3, 8, 8), w, 1, 1, v, v, EPS, True)
    with pytest.raises(RuntimeError, match="expected a float32 or float64 input"):
        op(x.half(), w.half(), 1, 1, v, v, EPS, True)
    with pytest.raises(RuntimeError, match=r"expected a square \(K, 3, k, k\) weight"):
        op(x, torch.randn(16, 4, 3, 3), 1, 1, v, v, EPS, True)
    with pytest.raises(RuntimeError, match="must have the input's dtype"):
        op(x, w.double(), 1, 1, v, v, EPS, True)
    with pytest.raises(RuntimeError, match="expected stride >= 1"):
        op(x, w, 0, 1, v, v, EPS, True)
    with pytest.raises(RuntimeError, match="expected padding >= 0"):
        op(x, w, 1, -1, v, v, EPS, True)
    with pytest.raises(RuntimeError, match="vectors of the 16 output channels"):
        op(x, w, 1, 1, torch.randn(8), v, EPS, True)


def stem_modules(momentum=0.1):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(16, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return conv, bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_modules_train_as_pytorchs(momentum):
    """Through stem_conv_bn_act: the running statistics, num_batches_tracked and gradients of
    nn.Conv2d -> nn.BatchNorm2d -> ReLU in PyTorch, over two steps."""
    ours, theirs = stem_modules(momentum), stem_modules(momentum)
    for step in range(2):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        assert _routing.recomputes_conv_output(x, *ours, "stem")
        y = stem_conv_bn_act(x, *ours)
        ref = torch.relu(theirs[1](theirs[0](x)))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        ref.backward(g)
    for a, b in zip(list(ours[0].parameters()) + list(ours[1].parameters()), list(theirs[0].parameters()) + list(theirs[1].parameters())):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    for k, v in theirs[1].state_dict().items():
        torch.testing.assert_close(ours[1].state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_single_value_per_channel_is_refused_as_pytorch_does():
    conv, bn = stem_modules()
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        stem_conv_bn_act(x, torch.nn.Conv2d(3, 16, 1, bias=False), bn)


def test_routing():
    conv, bn = stem_modules()
    x = torch.randn(2, 3, 8, 8)
    assert _routing.recomputes_conv_output(x, conv, bn, "stem")
    assert _routing.recomputes_conv_output(x.double(), conv.double(), bn.double(), "stem")
    conv, bn = stem_modules()
    assert not _routing.recomputes_conv_output(x.half(), conv.half(), bn, "stem")
    with torch.no_grad():
        assert not _routing.recomputes_conv_output(x, conv, bn, "stem")
    bn.eval()  # running statistics: the convolution's output is what nn.Conv2d makes, not recomputed
    assert not _routing.recomputes_conv_output(x, conv, bn, "stem")
    bn.train()
    handle = bn.register_forward_hook(lambda *a: None)
    assert not _routing.recomputes_conv_output(x, conv, bn, "stem")
    handle.remove()
    for other in (torch.nn.Conv2d(3, 16, 3, padding=1, bias=True), torch.nn.Conv2d(3, 16, 3, padding=1, groups=1, dilation=2, bias=False), torch.nn.Conv2d(3, 16, (3, 1), bias=False)):
        assert not _routing.recomputes_conv_output(x, other, bn, "stem")
    for p in list(conv.parameters()) + list(bn.parameters()):
        p.requires_grad_(False)
    assert not _routing.recomputes_conv_output(x, conv, bn, "stem")  # nothing to differentiate
    conv, bn = stem_modules()
    with resnet_fast.use_backend("eager"):
        assert not _routing.recomputes_conv_output(x, conv, bn, "stem")
    with pytest.raises(ValueError, match="unit must be 'stem' or 'projection'"):
        _routing.recomputes_conv_output(x, conv, bn, "block")


def test_a_projection_trains_as_pytorchs():
    """Through projection_bn: nn.Conv2d (1x1, stride 2) -> nn.BatchNorm2d in PyTorch, and the
    routing flag that turns it off."""
    torch.manual_seed(0)
    ours = (torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
    theirs = (torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
    theirs[0].load_state_dict(ours[0].state_dict())
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    assert _routing.recomputes_conv_output(x, *ours, "projection")
    with kept_storages() as kept:
        y = projection_bn(x, *ours)
    ref = theirs[1](theirs[0](x))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.untyped_storage().data_ptr() not in kept and x.untyped_storage().data_ptr() in kept
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var)
    try:
        _routing.RECOMPUTE_PROJECTION_CONV = False
        assert not _routing.recomputes_conv_output(x, *ours, "projection")
        assert _routing.recomputes_conv_output(x, *ours, "stem")
    finally:
        _routing.RECOMPUTE_PROJECTION_CONV = True


# -- the first block's 3x3 convolution, told how the stem made its input ------------------------


@pytest.mark.parametrize(
    "plan, kwargs",
    [((False, False), {}), ((True, False), {}), ((False, True), {}),
     ((False, False), {"direct": True})],
    ids=["aten", "winograd", "our-dW", "direct"],
)
def test_a_3x3_after_the_stem_recomputes_its_input_bit_for_bit(plan, kwargs):
    base = leaves(SHAPES[0], torch.float32, "contiguous")
    w2 = make_input((16, 16, 3, 3), torch.float32, "channels_last") * 0.2
    results = []
    for from_stem in (False, True):
        ts = [t.detach().clone().requires_grad_(True) for t in base[1:]]
        w = w2.clone().requires_grad_(True)
        a, mean, var = recomputed(base[0], ts[0], 1, 1, ts[1], ts[2])
        extra = (base[0], ts[1], ts[2], mean, var, EPS, True, ts[0], 1, 1) if from_stem else ()
        with kept_storages() as kept:
            z = torch.ops.resnet_fast.conv3x3_train(a, w, 1, *plan, *extra, **kwargs)
        assert (a.untyped_storage().data_ptr() in kept) != from_stem
        z.backward(torch.linspace(-1, 1, z.numel()).reshape(z.shape))
        results.append([z.detach(), w.grad] + [t.grad for t in ts])
    for kept_a, recomp in zip(*results):
        assert torch.equal(kept_a, recomp)


def test_a_3x3_after_the_stem_checks_the_stems_shapes():
    x, w, v = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 3, 3), torch.randn(16)
    a = torch.randn(2, 16, 8, 8)
    w2 = torch.randn(16, 16, 3, 3)
    op = torch.ops.resnet_fast.conv3x3_train
    with pytest.raises(RuntimeError, match="must give x's shape"):
        op(a, w2, 1, False, False, x, v, v, v, v, EPS, True, w, 2, 1)  # stride 2 gives 4x4
    with pytest.raises(RuntimeError, match="must give x's shape"):
        op(a, w2, 1, False, False, x, v, v, v, v, EPS, True, torch.randn(8, 3, 3, 3), 1, 1)
    with pytest.raises(RuntimeError, match="needs bn_input"):
        op(a, w2, 1, False, False, None, v, v, v, v, EPS, True, w, 1, 1)


def test_a_gradient_penalty_through_the_stem_and_the_first_3x3():
    """Under create_graph the 3x3's weight gradient recomputes the stem differentiably: the same
    second derivatives as keeping the stem's output."""
    base = leaves(SHAPES[0], torch.float32, "contiguous")
    w2 = make_input((16, 16, 3, 3), torch.float32, "channels_last") * 0.2

    def penalty(from_stem):
        ts = [t.detach().clone().requires_grad_(True) for t in base[1:]] + [w2.clone().requires_grad_(True)]
        a, mean, var = recomputed(base[0], ts[0], 1, 1, ts[1], ts[2])
        extra = (base[0], ts[1], ts[2], mean, var, EPS, True, ts[0], 1, 1) if from_stem else ()
        z = torch.ops.resnet_fast.conv3x3_train(a, ts[3], 1, False, False, *extra)
        (gw2,) = torch.autograd.grad(z.square().sum(), (ts[3],), create_graph=True)
        gw2.square().sum().backward()
        return [t.grad for t in ts]

    for kept, recomp in zip(penalty(False), penalty(True)):
        torch.testing.assert_close(recomp, kept, rtol=1e-4, atol=1e-5 * kept.abs().max().item())


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3), cin=st.integers(1, 5), cout=st.integers(1, 9), k=st.sampled_from([1, 3, 5, 7]),
    stride=st.sampled_from([1, 2]), pad=st.integers(0, 3), h=st.integers(1, 9), w=st.integers(1, 9),
    relu=st.booleans(), channels_last=st.booleans(),
)
def test_random_shapes_match_the_formula_in_float64(n, cin, cout, k, stride, pad, h, w, relu, channels_last):
    """Outputs, statistics and every gradient against the formula's autograd, in float64: batch 1,
    1x1 output maps, channel counts off the vector width."""
    pad = min(pad, k // 2)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    assume(oh >= 1 and ow >= 1 and n * oh * ow >= 2)
    layout = "channels_last" if channels_last else "contiguous"
    x = make_input((n, cin, h, w), torch.float64, layout, requires_grad=True)
    wt = make_input((cout, cin, k, k), torch.float64, layout, requires_grad=True)
    bn_w = (torch.rand(cout, dtype=torch.float64) + 0.5).requires_grad_(True)
    bn_b = torch.randn(cout, dtype=torch.float64).requires_grad_(True)
    got = recomputed(x, wt, stride, pad, bn_w, bn_b, relu)
    exact = reference.conv_bn_act_train(x, wt, stride, pad, bn_w, bn_b, EPS, relu)
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    cot = torch.randn(got[0].shape, dtype=torch.float64)
    grads = torch.autograd.grad(got[0], (x, wt, bn_w, bn_b), cot)
    grads_exact = torch.autograd.grad(exact[0], (x, wt, bn_w, bn_b), cot)
    for g, e in zip(grads, grads_exact):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)
