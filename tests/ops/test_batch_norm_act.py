"""batch_norm_act (BatchNorm + residual + ReLU) against its formula and against nn.BatchNorm2d."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import resnet_fast
from resnet_fast import _backend
from resnet_fast.nn import bn_act
from resnet_fast.ops import batch_norm_act, reference
from tests.conftest import IMPLS, device_of, ops_of, requires_extension

# Tests that take `impl` run for the C++ kernels ("cpu"), the Triton kernels (in the interpreter
# on this machine) and the CUDA C++ kernels (skipped without a GPU).
op = torch.ops.resnet_fast.batch_norm_act if resnet_fast.extension_available() else None


def on(device, t):
    """t on device, keeping its layout (a strided view stays a strided view)."""
    if t is None or t.device.type == device:
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)

# Per dtype: how far from the float64 formula an output may be, relative to eager PyTorch's own
# error in that dtype (flash-attention's rule) plus a floor in units of the dtype's epsilon.
EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.8e-3, torch.float64: 2.2e-16}


def make(shape, dtype, layout, scale=3.0, offset=1.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        n, c, h, w = shape
        big = torch.zeros(n, c, h, 2 * w, dtype=dtype)
        big[..., ::2] = x.to(dtype)
        return big[..., ::2]
    return x.to(dtype)


def residual_for(kind, shape, dtype, layout):
    n, c, h, w = shape
    if kind is None:
        return None, 1
    if kind == "identity":
        return make(shape, dtype, layout, 1.0, 0.0), 1
    # option A: the block input, twice the size and up to half the channels
    return make((n, max(1, c // 2), 2 * h - (h % 2), 2 * w), dtype, layout, 1.0, 0.0), 2


def run(fn, x, w, b, rm, rv, training, r, relu, stride, grad, device="cpu"):
    x, w, b = (on(device, t).detach().clone().requires_grad_(True) for t in (x, w, b))
    r = None if r is None else on(device, r).detach().clone().requires_grad_(True)
    rm, rv = on(device, rm).clone(), on(device, rv).clone()
    if fn is None:  # the formula, with the residual padded explicitly
        rr = None if r is None else reference.zero_pad_shortcut(r, x.shape[1], stride) if stride != 1 or r.shape[1] != x.shape[1] else r
        y = reference.batch_norm_act(x, w, b, rm, rv, training, 0.1, 1e-5, rr, relu)
    else:
        y = fn(x, w, b, rm, rv, training, 0.1, 1e-5, r, relu, stride)
    inputs = [x, w, b] + ([r] if r is not None else [])
    grads = torch.autograd.grad(y, inputs, grad.to(y.dtype).to(device))
    return [t.cpu() for t in (y.detach(), rm, rv, *grads)]


SHAPES = [(4, 16, 8, 8), (1, 3, 5, 7), (3, 17, 1, 1), (2, 64, 4, 4), (5, 8, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("residual", [None, "identity", "option_a"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_formula(impl, shape, dtype, layout, residual, relu, training):
    if training and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("one value per channel: tested as an error")
    c = shape[1]
    x = make(shape, dtype, layout)
    r, stride = residual_for(residual, shape, dtype, layout)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, dtype=torch.float64).to(dtype)
    rm, rv = torch.randn(c, dtype=torch.float64).to(dtype), (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype)
    grad = torch.randn(shape, dtype=torch.float64)

    exact = run(None, *(t.double() if t is not None else None for t in (x, w, b, rm, rv)), training,
                None if r is None else r.double(), relu, stride, grad)
    with resnet_fast.use_backend(impl):
        ours = run(batch_norm_act, x, w, b, rm, rv, training, r, relu, stride, grad, device_of(impl))
    eager = run(None, x, w, b, rm, rv, training, r, relu, stride, grad)
    names = ["y", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bias", "grad_residual"]
    for name, o, e, ex in zip(names, ours, eager, exact):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        err = (o.double() - ex).abs().max().item()
        eager_err = (e.double() - ex).abs().max().item()
        floor = 8 * EPS[dtype] * (ex.abs().max().item() + 1)
        assert err <= 2 * eager_err + floor, (name, err, eager_err, floor)
    if layout == "channels_last":
        assert ours[0].is_contiguous(memory_format=torch.channels_last)


@requires_extension
def test_running_statistics_follow_batchnorm_exactly_in_float64():
    bn = torch.nn.BatchNorm2d(6, momentum=None).double()
    ours = torch.nn.BatchNorm2d(6, momentum=None).double()
    for step in range(3):
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * (step + 1)
        torch.testing.assert_close(bn_act(x, ours, relu=False), bn(x), rtol=1e-12, atol=1e-12)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    torch.manual_seed(0)
    op, dev = ops_of(impl).batch_norm_act, device_of(impl)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=dev, requires_grad=True)
    r = torch.randn(2, 2, 8, 5, dtype=torch.float64, device=dev, requires_grad=True)
    for training in (True, False):
        rm, rv = torch.zeros(3, dtype=torch.float64, device=dev), torch.ones(3, dtype=torch.float64, device=dev)
        fn = lambda x, w, b, r: op(x, w, b, rm, rv, r, 2, training, 1e-5, True)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b, r), fast_mode=impl == "triton")
        fn = lambda x, w, b: op(x, w, b, rm, rv, None, 1, training, 1e-5, False)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=impl == "triton")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl, layout):
    ops, dev = ops_of(impl), device_of(impl)
    op = ops.batch_norm_act
    x = on(dev, make((2, 4, 3, 3), torch.float32, layout)).requires_grad_(True)
    w, b = torch.rand(4, device=dev, requires_grad=True), torch.randn(4, device=dev, requires_grad=True)
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    r = on(dev, make((2, 2, 6, 5), torch.float32, layout)).requires_grad_(True)
    torch.library.opcheck(op, (x, w, b, None, None, r, 2, True, 1e-5, True))
    torch.library.opcheck(op, (x, w, b, rm, rv, None, 1, False, 1e-5, False))
    with torch.no_grad():
        y, mean, var = op(x, w, b, None, None, None, 1, True, 1e-5, True)
    torch.library.opcheck(
        ops.batch_norm_act_backward,
        (torch.randn_like(y), x.detach(), y, w.detach(), mean, var, True, 1e-5, True, True),
    )
    if impl == "cpu":  # the backward in two ops: the extension's CPU kernels only
        g = torch.randn_like(y)
        torch.library.opcheck(ops.batch_norm_act_backward_reduce, (g, x.detach(), y, w.detach(), mean, var, 1e-5, True))
        dz, s1, s2 = ops.batch_norm_act_backward_reduce(g, x.detach(), y, w.detach(), mean, var, 1e-5, True)
        torch.library.opcheck(ops.batch_norm_act_backward_input, (dz, x.detach(), w.detach(), mean, var, s1, s2, True, 1e-5))


def _residual_input(kind, dev):
    if kind is None:
        return None, 1
    if kind == "identity":
        return torch.randn(2, 3, 3, 2, dtype=torch.float64, device=dev, requires_grad=True), 1
    return torch.randn(2, 2, 6, 4, dtype=torch.float64, device=dev, requires_grad=True), 2  # option A


@pytest.mark.parametrize("residual", [None, "identity", "option_a"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradgradcheck_float64(impl, residual):
    """Double backward (gradient penalties, MAML): the second derivatives against finite
    differences of the first, in train and eval mode, with and without ReLU."""
    torch.manual_seed(0)
    op, dev = ops_of(impl).batch_norm_act, device_of(impl)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, device=dev, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64, device=dev) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, device=dev, requires_grad=True)
    r, stride = _residual_input(residual, dev)
    rm = torch.randn(3, dtype=torch.float64, device=dev) * 0.1
    rv = torch.rand(3, dtype=torch.float64, device=dev) + 0.5
    inputs = (x, w, b) + ((r,) if r is not None else ())
    for training in (True, False):
        for relu in (True, False):
            def fn(x, w, b, *rest):
                stats = (None, None) if training else (rm, rv)
                return op(x, w, b, *stats, rest[0] if rest else None, stride, training, 1e-5, relu)[0]

            assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=impl == "triton"), (training, relu)


@pytest.mark.skipif(not (_backend.extension_available() and _backend.triton_available()),
                    reason="needs both the C++ kernels and Triton (its interpreter here)")
@pytest.mark.parametrize("residual", [None, "identity", "option_a"])
@pytest.mark.parametrize("training", [True, False])
def test_cpp_and_python_autograd_agree(residual, training):
    """The extension's op has its autograd in C++ (csrc/autograd.cpp), the Triton op the same rules
    in Python (resnet_fast/ops/batch_norm_act.py): the same cases through both, every subset of
    inputs asking for a gradient, first and second derivatives."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    w0, b0 = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    r0, stride = _residual_input(residual, "cpu")
    rm, rv = torch.randn(3, dtype=torch.float64) * 0.1, torch.rand(3, dtype=torch.float64) + 0.5
    grad = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    stats = (None, None) if training else (rm, rv)
    for need in [(True, True, True, True), (False, True, True, False), (True, False, False, True), (True, True, True, False)]:
        results = []
        for ns in (torch.ops.resnet_fast, torch.ops.resnet_fast_triton):
            x, w, b = (t.detach().clone().requires_grad_(n) for t, n in zip((x0, w0, b0), need))
            r = None if r0 is None else r0.detach().clone().requires_grad_(need[3])
            y = ns.batch_norm_act(x, w, b, *stats, r, stride, training, 1e-5, True)[0]
            wanted = [t for t in (x, w, b, r) if t is not None and t.requires_grad]
            firsts = torch.autograd.grad(y, wanted, grad, create_graph=True)
            seconds = torch.autograd.grad(sum(g.square().sum() for g in firsts), wanted, allow_unused=True,
                                          materialize_grads=True)  # (an unreached input: zeros)
            results.append([*firsts, *seconds])
        assert len(results[0]) == len(results[1])
        for a, c in zip(*results):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@requires_extension
def test_one_value_per_channel_raises_like_pytorch():
    x, bn = torch.randn(1, 4, 1, 1), torch.nn.BatchNorm2d(4)
    with pytest.raises(ValueError) as theirs:
        bn(x)
    with pytest.raises(ValueError) as ours:
        bn_act(x, bn)
    assert str(ours.value) == str(theirs.value)
    bn.eval()
    torch.testing.assert_close(bn_act(x, bn), F.relu(bn(x)))  # eval mode is fine


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=torch.randn(2, 4, 3)), "expected a 4-D input"),
        (dict(weight=torch.ones(3)), "expected weight and bias of 4 elements"),
        (dict(residual=torch.randn(2, 4, 5, 5)), "does not fit an output"),
        (dict(residual=torch.randn(2, 8, 3, 3)), "does not fit an output"),
        (dict(residual=torch.randn(2, 4, 3, 3, dtype=torch.float64)), "must have the input's dtype"),
        (dict(training=False), "eval mode needs running_mean"),
        (dict(x=torch.randn(1, 4, 1, 1)), "Expected more than 1 value per channel when training"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_refused_clearly(impl, kwargs, message):
    args = dict(x=torch.randn(2, 4, 3, 3), weight=torch.ones(4), bias=torch.zeros(4), running_mean=None,
                running_var=None, residual=None, residual_stride=1, training=True, eps=1e-5, relu=True)
    args.update(kwargs)
    args = {k: on(device_of(impl), v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=message):
        ops_of(impl).batch_norm_act(*args.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_large_channel_and_batch_counts_are_accurate(impl):
    # Many values per channel, a large mean: the statistics must not cancel.
    op, dev = ops_of(impl).batch_norm_act, device_of(impl)
    x = torch.randn(64, 8, 32, 32, device=dev) * 0.01 + 100
    for fmt in (torch.contiguous_format, torch.channels_last):
        ones, zeros = torch.ones(8, device=dev), torch.zeros(8, device=dev)
        y, mean, var = op(x.contiguous(memory_format=fmt), ones, zeros, None, None, None, 1, True, 0.0, False)
        xd = x.double()
        torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-7, atol=0)
        torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)


@requires_extension
@pytest.mark.parametrize("shape", [(6, 16, 8, 8), (2, 40, 33, 33), (3, 600, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("training", [True, False])
def test_relu_mask_from_input_equals_mask_from_output(shape, dtype, layout, training):
    # Without the output, the CPU backward recomputes the ReLU mask from x through the forward's
    # affine: every gradient must be bit for bit the one taken with the output's mask. Values are
    # quantised so that many pre-activations sit exactly on or next to 0.
    torch.manual_seed(1)
    c = shape[1]
    x = make(shape, dtype, layout)
    x = (x * 4).round().div(4).to(dtype)
    w, b = (torch.rand(c) + 0.5).to(dtype), torch.randn(c).to(dtype)
    rm, rv = torch.randn(c).to(dtype), (torch.rand(c) + 0.5).to(dtype)
    ops = torch.ops.resnet_fast
    y, mean, var = ops.batch_norm_act(x, w, b, None if training else rm, None if training else rv, None, 1,
                                      training, 1e-5, True)
    assert 0.2 < (y == 0).double().mean().item() < 0.8
    g = make(shape, dtype, layout)
    with_output = ops.batch_norm_act_backward(g, x, y, w, mean, var, training, 1e-5, True, False)
    from_input = ops.batch_norm_act_backward(g, x, None, w, mean, var, training, 1e-5, True, False, b)
    for a, e in zip(from_input[:3], with_output[:3]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf_propagate_like_eager(impl, dtype):
    # Eval mode, channels_last (the vectorised bfloat16 conversions): NaN stays NaN through the
    # ReLU, +-inf saturate as in eager, and -0 / tiny values round as c10 rounds them.
    dev = device_of(impl)
    x = torch.randn(2, 32, 3, 5).to(dtype)
    x[0, 3, 1, 2], x[1, 7, 0, 0], x[1, 30, 2, 4], x[0, 0, 0, 0] = float("nan"), float("inf"), -float("inf"), -0.0
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.rand(32) + 0.5).to(dtype), torch.randn(32).to(dtype)
    rm, rv = torch.randn(32).to(dtype), (torch.rand(32) + 0.5).to(dtype)
    y = ops_of(impl).batch_norm_act(on(dev, x), on(dev, w), on(dev, b), on(dev, rm), on(dev, rv), None, 1, False,
                                    1e-5, True)[0].cpu()
    expected = F.relu(F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
    assert y[0, 3, 1, 2].isnan() and y[1, 7, 0, 0] == float("inf") and y[1, 30, 2, 4] == 0
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=0.02 if dtype == torch.bfloat16 else 1e-5,
                               atol=0.02 if dtype == torch.bfloat16 else 1e-5)


@requires_extension
@pytest.mark.parametrize("shape", [(6, 16, 8, 8), (2, 40, 33, 33), (3, 600, 2, 3), (2, 8, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_backward_in_two_ops_equals_the_single_op(shape, dtype, layout, relu, training):
    # batch_norm_act_backward_reduce + _input (the CPU autograd's path at a block end) must give
    # batch_norm_act_backward's gradients bit for bit, dz included.
    c = shape[1]
    x, g = make(shape, dtype, layout), make(shape, dtype, layout)
    w, b = (torch.rand(c) + 0.5).to(dtype), torch.randn(c).to(dtype)
    rm, rv = torch.randn(c).to(dtype), (torch.rand(c) + 0.5).to(dtype)
    r = make(shape, dtype, layout, 1.0, 0.0)
    ops = torch.ops.resnet_fast
    y, mean, var = ops.batch_norm_act(x, w, b, None if training else rm, None if training else rv, r, 1,
                                      training, 1e-5, relu)
    single = ops.batch_norm_act_backward(g, x, y, w, mean, var, training, 1e-5, relu, True)
    dz, sum_dz, sum_dzxmu = ops.batch_norm_act_backward_reduce(g, x, y, w, mean, var, 1e-5, relu)
    assert sum_dz.dtype == sum_dzxmu.dtype == torch.float64 and sum_dz.shape == (c,)
    two = ops.batch_norm_act_backward_input(dz, x, w, mean, var, sum_dz, sum_dzxmu, training, 1e-5)
    for a, e in zip((*two, dz), (*single[:3], single[3])):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    if layout == "channels_last" and shape[2] > 1:
        assert dz.is_contiguous(memory_format=torch.channels_last)
        assert two[0].is_contiguous(memory_format=torch.channels_last)


@requires_extension
def test_backward_input_refuses_sums_it_cannot_use():
    x = torch.randn(2, 3, 4, 4)
    ones = torch.ones(3)
    with pytest.raises(RuntimeError, match="expected sum_dz and sum_dzxmu as float64 tensors of 3 elements"):
        torch.ops.resnet_fast.batch_norm_act_backward_input(x, x, ones, ones, ones, ones, ones, True, 1e-5)
    with pytest.raises(RuntimeError, match="expected a gradient of shape"):
        torch.ops.resnet_fast.batch_norm_act_backward_reduce(x[:1], x, x, ones, ones, ones, 1e-5, True)


def _node_peak_bytes(loss: torch.Tensor, node: str) -> int:
    """How far live CPU memory rises above its level at the start of the backward node whose
    name contains ``node`` while that node runs (the allocator's own events, in torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    events = list(prof.profiler.kineto_results.events())
    start, end = next(
        (e.start_ns(), e.start_ns() + e.duration_ns())
        for e in events
        if e.name().startswith("autograd::engine::evaluate_function") and node in e.name()
    )
    live, at_start, peak = 0, None, 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if at_start is None and t >= start:
            at_start = peak = live
        live += nbytes
        if at_start is not None and t <= end:
            peak = max(peak, live)
    return peak - at_start


@requires_extension
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("residual", ["identity", "option_a"])
def test_block_end_backward_holds_two_block_sized_gradients_not_three(grad_layout, residual):
    # The end of a residual block, in training: its backward needs dz (the residual's gradient)
    # and dx. The incoming gradient is freed once dz is written (and first put in x's layout if it
    # comes in another, as average pooling's does), so memory rises by one block-sized tensor above
    # where the node started (which counts the incoming gradient), plus option A's gradient of
    # the block input: eager's ReLU backward + add + BatchNorm backward reach the same. Holding all three put ResNet-20's training peak above
    # eager's.
    shape = (16, 32, 16, 16)  # 512 KiB per tensor
    block = 16 * 32 * 16 * 16 * 4
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    if residual == "identity":
        r, stride = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True), 1
    else:
        r, stride = torch.randn(16, 16, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True), 2
    bn = torch.nn.BatchNorm2d(32)
    y = bn_act(x, bn, residual=r, residual_stride=stride)
    weight = torch.randn(shape)
    if grad_layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    loss = (y * weight).sum()  # the incoming gradient: a fresh tensor that autograd alone holds
    rise = _node_peak_bytes(loss, "BatchNormAct")
    # Option A's gradient for the block input (twice a block here) is a tensor of its own, made
    # from dz after dx.
    shortcut = r.numel() * 4 if residual == "option_a" else 0
    assert rise <= block + shortcut + 64 * 1024, (rise, block, shortcut)
    assert x.grad is not None and r.grad is not None


@requires_extension
def test_relu_backward_without_output_or_bias_is_refused():
    x = torch.randn(2, 3, 4, 4)
    ones = torch.ones(3)
    with pytest.raises(RuntimeError, match="forward output is needed"):
        torch.ops.resnet_fast.batch_norm_act_backward(x, x, None, ones, ones, ones, True, 1e-5, True, False)


@requires_extension
@pytest.mark.parametrize("shape", [(70, 700, 5, 5), (3, 5, 31, 31), (40, 16, 8, 8)])
def test_small_nchw_planes_backward_in_memory_order(shape):
    # The CPU backward reads small NCHW planes in memory order: channel chunks (700 x 25 values
    # exceed one chunk), ranges of images per task (40 x 16 x 64 values: two on two threads), lanes
    # folded every 32 images.
    n, c, h, w = shape
    x = make(shape, torch.float32, "contiguous") * 3 + 50
    r = make((n, c // 2, 2 * h, 2 * w), torch.float32, "contiguous")
    wt, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    grad = torch.randn(shape, dtype=torch.float64)
    ours = run(batch_norm_act, x, wt, b, rm, rv, True, r, True, 2, grad)
    exact = run(None, x.double(), wt.double(), b.double(), rm.double(), rv.double(), True, r.double(), True, 2, grad)
    names = ["y", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bias", "grad_residual"]
    for name, o, ex in zip(names, ours, exact):
        torch.testing.assert_close(o.double(), ex, rtol=1e-4, atol=1e-4 * (ex.abs().max().item() + 1), msg=name)


@requires_extension
@pytest.mark.parametrize("shape", [(129, 8, 7, 5), (3, 16, 3, 3), (40, 32, 6, 6), (33, 64, 5, 5), (10, 96, 7, 7)])
@pytest.mark.parametrize("residual", [None, "identity", "option_a"])
def test_channels_last_lanes_statistics_and_backward(shape, residual):
    # float32 channels_last with 8, 16, 32 or 64 channels runs the register-held lanes (the
    # backward's pass 1 up to 32): 32 / C rows per lane row with rows left over (129 x 7 x 5 rows
    # of 8 channels: 3 left, 3 x 3 x 3 of 16: 1 left), two chunks of 32 channels (64), two tasks on
    # two threads (all but the second); without a residual the backward rebuilds the ReLU mask
    # from x in them too. 96 channels take the period loops.
    n, c, h, w = shape
    x = make(shape, torch.float32, "channels_last") * 3 + 50
    r, stride = residual_for(residual, shape, torch.float32, "channels_last")
    wt, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    grad = torch.randn(shape, dtype=torch.float64)
    ours = run(batch_norm_act, x, wt, b, rm, rv, True, r, True, stride, grad)
    exact = run(None, x.double(), wt.double(), b.double(), rm.double(), rv.double(), True,
                None if r is None else r.double(), True, stride, grad)
    names = ["y", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bias", "grad_residual"]
    for name, o, ex in zip(names, ours, exact):
        torch.testing.assert_close(o.double(), ex, rtol=1e-4, atol=1e-4 * (ex.abs().max().item() + 1), msg=name)


@requires_extension
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64])
def test_update_stats_is_the_formula_in_double(running_dtype, stat_dtype):
    # running = momentum * batch + (1 - momentum) * running, the variance made unbiased, taken in
    # double and rounded once (as ATen's batch_norm): bit for bit.
    torch.manual_seed(0)
    rm, rv = torch.randn(37).to(running_dtype), (torch.rand(37) + 0.5).to(running_dtype)
    mean, var = torch.randn(37, dtype=stat_dtype), torch.rand(37, dtype=stat_dtype)
    m, count = 0.1, 50
    want_m = (m * mean.double() + (1 - m) * rm.double()).to(running_dtype)
    want_v = (m * var.double() * (count / (count - 1)) + (1 - m) * rv.double()).to(running_dtype)
    torch.ops.resnet_fast.batch_norm_update_stats_(rm, rv, mean, var, m, count)
    torch.testing.assert_close(rm, want_m, rtol=0, atol=0)
    torch.testing.assert_close(rv, want_v, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.resnet_fast.batch_norm_update_stats_, (rm, rv, mean, var, m, count))


@requires_extension
def test_update_stats_refuses_what_it_cannot_update():
    update = torch.ops.resnet_fast.batch_norm_update_stats_
    ones = torch.ones(4)
    with pytest.raises(RuntimeError, match="expected running_mean, running_var, mean and var of one size"):
        update(torch.ones(3), ones.clone(), ones, ones, 0.1, 8)
    with pytest.raises(RuntimeError, match="expected contiguous running statistics"):
        update(torch.ones(8)[::2], ones.clone(), ones, ones, 0.1, 8)
    with pytest.raises(RuntimeError, match="expected a positive count"):
        update(ones.clone(), ones.clone(), ones, ones, 0.1, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiles_without_graph_break(impl):
    resnet_fast.set_backend(impl)
    dev = device_of(impl)
    bn = torch.nn.BatchNorm2d(4).to(dev)
    x = torch.randn(2, 4, 5, 5, device=dev, requires_grad=True)
    r = torch.randn(2, 2, 10, 10, device=dev, requires_grad=True)
    fn = torch.compile(lambda x, r: bn_act(x, bn, residual=r, residual_stride=2), fullgraph=True, backend="aot_eager")
    y = fn(x, r)
    y.sum().backward()
    assert int(bn.num_batches_tracked) == 1
    ref_bn = torch.nn.BatchNorm2d(4).to(dev)
    x2, r2 = x.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
    y2 = F.relu(ref_bn(x2) + reference.zero_pad_shortcut(r2, 4, 2))
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.grad, r2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4), c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9),
    channels_last=st.booleans(), relu=st.booleans(), with_residual=st.booleans(), training=st.booleans(),
)
@requires_extension
def test_random_shapes_match_float64(n, c, h, w, channels_last, relu, with_residual, training):
    if training and n * h * w == 1:
        return
    layout = "channels_last" if channels_last else "contiguous"
    x = make((n, c, h, w), torch.float32, layout)
    r = make((n, c, h, w), torch.float32, layout, 1.0, 0.0) if with_residual else None
    wt, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    grad = torch.randn(n, c, h, w, dtype=torch.float64)
    ours = run(batch_norm_act, x, wt, b, rm, rv, training, r, relu, 1, grad)
    exact = run(None, x.double(), wt.double(), b.double(), rm.double(), rv.double(), training,
                None if r is None else r.double(), relu, 1, grad)
    for o, ex in zip(ours, exact):
        # batch statistics over few values amplify rounding by up to 1/std of the batch.
        torch.testing.assert_close(o.double(), ex, rtol=1e-3, atol=1e-3 * (ex.abs().max().item() + 1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual", [None, "option_a"])
@pytest.mark.parametrize("impl", [p for p in IMPLS if p.values[0] != "cpu"])
def test_float16_on_the_gpu_implementations(impl, layout, residual):
    """float16 (the GPU kernels' third dtype; the C++ CPU kernels take float32, float64, bfloat16)."""
    shape = (4, 16, 8, 8)
    x = make(shape, torch.float16, layout)
    r, stride = residual_for(residual, shape, torch.float16, layout)
    w, b = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    rm, rv = torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    with resnet_fast.use_backend(impl):
        ours = run(batch_norm_act, x, w.half(), b.half(), rm.half(), rv.half(), True, r, True, stride, grad, device_of(impl))
    exact = run(None, x.double(), w, b, rm, rv, True, None if r is None else r.double(), True, stride, grad)
    for name, o, ex in zip(["y", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bias", "grad_residual"], ours, exact):
        assert o.dtype == torch.float16, name
        torch.testing.assert_close(o.double(), ex, rtol=2e-3, atol=4e-3 * (ex.abs().max().item() + 1), msg=name)
