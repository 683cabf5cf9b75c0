"""Each fused op, forward + backward, against the eager ops it replaces (its formula)."""

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import _routing
from conftest import compare
from resnet_fast.nn import bn_act
from resnet_fast.nn.functional import stem_conv_bn_act
from resnet_fast.ops import reference


def test_zero_pad_shortcut_fwd_bwd(benchmark):
    # ResNet-20's first transition at batch 128: (128, 16, 32, 32) -> (128, 32, 16, 16).
    x = torch.randn(128, 16, 32, 32, requires_grad=True)
    grad = torch.randn(128, 32, 16, 16)

    def run(fn):
        def f():
            fn(x, 32, 2).backward(grad)
            x.grad = None

        return f

    compare(
        benchmark,
        "zero_pad_shortcut fwd+bwd (128,16,32,32)",
        x.numel(),
        run(resnet_fast.ops.zero_pad_shortcut),
        {"eager": run(reference.zero_pad_shortcut)},
        pairs=60,
        rounds=20,
    )


def test_max_pool2d_inference(benchmark):
    # ResNet-50's stem pooling at batch 8 (inference): (8, 64, 112, 112) -> (8, 64, 56, 56), channels_last.
    x = torch.randn(8, 64, 112, 112).relu().contiguous(memory_format=torch.channels_last)

    def run(fn):
        def f():
            with torch.inference_mode():
                fn(x, 3, 2, 1)

        return f

    compare(
        benchmark,
        "max_pool2d inference (8,64,112,112) channels_last",
        x.numel(),
        run(resnet_fast.ops.max_pool2d),
        {"eager": run(F.max_pool2d)},
        pairs=60,
        rounds=20,
    )


def test_max_pool2d_train_fwd_bwd(benchmark):
    # ResNet-50's stem pooling in training at batch 16: (16, 64, 112, 112) -> (16, 64, 56, 56),
    # channels_last; ours keeps one byte per output for the backward, PyTorch's int64 indices.
    x = torch.randn(16, 64, 112, 112).relu().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(16, 64, 56, 56).contiguous(memory_format=torch.channels_last)

    def run(fn):
        def f():
            fn(x, 3, 2, 1).backward(grad)
            x.grad = None

        return f

    compare(
        benchmark,
        "max_pool2d_train fwd+bwd (16,64,112,112) channels_last",
        x.numel(),
        run(resnet_fast.ops.max_pool2d),
        {"eager": run(F.max_pool2d)},
        pairs=30,
        rounds=10,
    )


@pytest.mark.parametrize(
    "shape, out_channels, kernel, stride", [((128, 3, 32, 32), 16, 3, 1), ((16, 3, 224, 224), 64, 7, 2)], ids=str
)
def test_stem_conv_bn_act_train_fwd_bwd(benchmark, shape, out_channels, kernel, stride):
    """The stem in training (ResNet-20's at batch 128, ResNet-50's at 16): ours recomputes the
    convolution's output in the backward instead of keeping it; PyTorch's nn.Conv2d -> BatchNorm2d
    -> ReLU keeps it, and its BatchNorm output, for its backward. The images need no gradient."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, out_channels, kernel, stride, kernel // 2, bias=False)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(out_channels)
    x = torch.randn(shape)
    out = shape[2] // stride
    grad = torch.randn(shape[0], out_channels, out, out).contiguous(memory_format=torch.channels_last)

    def run(fn):
        def f():
            fn(x).backward(grad)
            conv.weight.grad = bn.weight.grad = bn.bias.grad = None

        return f

    assert _routing.recomputes_conv_output(x, conv, bn, "stem")
    compare(
        benchmark,
        f"stem conv{kernel}x{kernel}+BN+ReLU fwd+bwd {shape}->{out_channels} stride {stride}",
        grad.numel(),
        run(lambda t: stem_conv_bn_act(t, conv, bn)),
        {"eager": run(lambda t: torch.relu(bn(conv(t))))},
        pairs=30 if shape[0] == 128 else 10,
        rounds=10 if shape[0] == 128 else 4,
    )


# (input shape, output channels, stride): ResNet-20's stages at batch 128, ResNet-50's first 3x3 at batch 16.
CONV_CASES = [
    ((128, 16, 32, 32), 16, 1),
    ((128, 16, 32, 32), 32, 2),
    ((128, 64, 8, 8), 64, 1),
    ((16, 64, 56, 56), 64, 1),
]


@pytest.mark.parametrize("shape, out_channels, stride", CONV_CASES, ids=lambda v: str(v))
def test_conv3x3_fwd_bwd(benchmark, shape, out_channels, stride):
    """Training's 3x3 convolution, channels_last float32, as the routing runs it on this machine
    (resnet_fast._routing.conv3x3_train_plan, named in the row: Winograd's forward and input gradient
    and/or our weight gradient, or, where neither pays, PyTorch's convolution itself), the whole
    fwd+bwd against PyTorch's."""
    cl = torch.channels_last
    x = torch.randn(shape).contiguous(memory_format=cl).requires_grad_(True)
    w = torch.randn(out_channels, shape[1], 3, 3).contiguous(memory_format=cl).requires_grad_(True)
    grad = torch.randn(shape[0], out_channels, shape[2] // stride, shape[3] // stride).contiguous(memory_format=cl)

    def run(fn):
        def f():
            fn(x, w, stride).backward(grad)
            x.grad = w.grad = None

        return f

    plan = _routing.conv3x3_train_plan(x, w, stride)
    parts = {"winograd": "winograd", "weight_grad_kernel": "our wgrad", "weight_grad_winograd": "winograd wgrad"}
    what = "no plan: PyTorch's" if plan is None else ", ".join(v for k, v in parts.items() if getattr(plan, k))
    compare(
        benchmark,
        f"conv3x3_train fwd+bwd {shape}->{out_channels} stride {stride} ({what})",
        x.numel(),
        run(resnet_fast.ops.conv3x3_train),
        {"eager": run(reference.conv3x3_train)},
        pairs=30,
        rounds=10,
    )


@pytest.mark.parametrize(
    "shape", [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8), (16, 64, 56, 56), (16, 256, 14, 14)], ids=str
)
def test_conv3x3_weight_grad_winograd(benchmark, shape):
    """The stride-1 3x3 weight gradient alone (ResNet-20's at batch 128, ResNet-50's at batch 16),
    channels_last float32: Winograd F(2x2, 3x3) against oneDNN's (what PyTorch's convolution
    backward runs). The routing takes Winograd's from 32 channels
    (resnet_fast._routing.WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS): the 16-channel row shows why."""
    if _routing.CPU_CAPABILITY != "AVX512":
        pytest.skip("the Winograd weight gradient needs AVX-512")
    cl = torch.channels_last
    x = torch.randn(shape).relu().contiguous(memory_format=cl)
    grad = torch.randn(shape).contiguous(memory_format=cl)
    op = torch.ops.resnet_fast.conv3x3_weight_grad
    compare(benchmark, f"conv3x3 weight gradient {shape}->{shape[1]} stride 1 (winograd)", shape[0],
            lambda: op(grad, x, 1, False, winograd=True), {"oneDNN": lambda: op(grad, x, 1, False)},
            pairs=30, rounds=10)


@pytest.mark.parametrize("part", ["forward", "input gradient"])
def test_conv3x3_direct(benchmark, part):
    """ResNet-20's 16-channel stride-1 3x3 at batch 128 in training, channels_last float32: our
    direct AVX-512 kernel (conv3x3_train's `direct`) against oneDNN's, the call PyTorch's
    convolution and its backward make for each part."""
    if _routing.CPU_CAPABILITY != "AVX512":
        pytest.skip("the direct kernel needs AVX-512")
    cl = torch.channels_last
    x = torch.randn(128, 16, 32, 32).relu().contiguous(memory_format=cl)
    grad = torch.randn(128, 16, 32, 32).contiguous(memory_format=cl)
    w = (torch.randn(16, 16, 3, 3) * 0.1).contiguous(memory_format=cl)
    conv = torch.ops.resnet_fast.conv3x3_train
    shape = [1, 1], [1, 1], [1, 1], False, [0, 0], 1
    if part == "forward":
        ours, theirs = lambda: conv(x, w, 1, False, False, direct=True), lambda: F.conv2d(x, w, None, 1, 1)
    else:  # the op on the flipped, transposed weight, as its autograd runs it
        wt = w.flip((2, 3)).transpose(0, 1)
        ours = lambda: conv(grad, wt, 1, False, False, direct=True)  # noqa: E731
        theirs = lambda: torch.ops.aten.convolution_backward(grad, x, w, None, *shape, [True, False, False])  # noqa: E731
    compare(benchmark, f"conv3x3 direct (128, 16, 32, 32)->16 {part}", 128, ours, {"oneDNN": theirs},
            pairs=30, rounds=10)


@pytest.mark.parametrize("part", ["forward", "input gradient"])
@pytest.mark.parametrize("c, h, k", [(16, 32, 32), (32, 16, 64)], ids=lambda v: str(v))
def test_conv3x3_direct_stride2(benchmark, c, h, k, part):
    """ResNet-20's two stride-2 3x3s at batch 128 in training, channels_last float32: our direct
    kernel's forward and its input gradient (conv3x3_input_grad, the transposed convolution)
    against oneDNN's forward and backward-data, as PyTorch's convolution and its backward call them."""
    if _routing.CPU_CAPABILITY != "AVX512":
        pytest.skip("the direct kernel needs AVX-512")
    cl = torch.channels_last
    x = torch.randn(128, c, h, h).relu().contiguous(memory_format=cl)
    grad = torch.randn(128, k, h // 2, h // 2).contiguous(memory_format=cl)
    w = (torch.randn(k, c, 3, 3) * 0.1).contiguous(memory_format=cl)
    shape = [2, 2], [1, 1], [1, 1], False, [0, 0], 1
    if part == "forward":
        ours = lambda: torch.ops.resnet_fast.conv3x3_train(x, w, 2, False, False, direct=True)  # noqa: E731
        theirs = lambda: F.conv2d(x, w, None, 2, 1)  # noqa: E731
    else:
        ours = lambda: torch.ops.resnet_fast.conv3x3_input_grad(grad, w, 2, list(x.shape))  # noqa: E731
        theirs = lambda: torch.ops.aten.convolution_backward(grad, x, w, None, *shape, [True, False, False])  # noqa: E731
    compare(benchmark, f"conv3x3 direct stride 2 (128, {c}, {h}, {h})->{k} {part}", 128, ours, {"oneDNN": theirs},
            pairs=30, rounds=10)


@pytest.mark.parametrize("shape", [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)], ids=str)
def test_conv3x3_bias_act_inference(benchmark, shape):
    """ResNet-50's stride-1 3x3 convolutions at batch 8 in inference, BatchNorm folded: Winograd
    against the strongest baseline, oneDNN's direct convolution with prepacked weights and the
    bias and ReLU as post-ops (what resnet_fast ran before, and what torch.compile's freezing runs)."""
    cl = torch.channels_last
    c = shape[1]
    x = torch.randn(shape).relu().contiguous(memory_format=cl)
    weight, bias = torch.randn(c, c, 3, 3) / (3 * c**0.5), torch.randn(c)
    packed = torch.ops.mkldnn._reorder_convolution_weight(
        weight.contiguous(memory_format=cl), [1, 1], [1, 1], [1, 1], 1, list(shape)
    )
    u = resnet_fast.ops.winograd_weight(weight)

    def ours():
        with torch.inference_mode():
            resnet_fast.ops.conv3x3_bias_act(x, u, bias, None, True)

    def onednn():
        with torch.inference_mode():
            torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [None], "")

    compare(benchmark, f"conv3x3_bias_act inference {shape} channels_last", shape[0], ours,
            {"oneDNN (prepacked, ReLU post-op)": onednn}, pairs=30, rounds=10)


# (input shape, out channels, stride, residual): ResNet-50's 1x1 convolutions at batch 1 and 8.
CONV1X1_CASES = [
    ((1, 64, 56, 56), 256, 1, True),
    ((1, 1024, 14, 14), 256, 1, False),
    ((1, 512, 7, 7), 2048, 1, True),
    ((8, 512, 28, 28), 128, 1, False),
    ((8, 256, 56, 56), 512, 2, False),
]


@pytest.mark.parametrize("shape, out_channels, stride, with_residual", CONV1X1_CASES, ids=str)
def test_conv_bias_act_1x1_inference(benchmark, shape, out_channels, stride, with_residual):
    """ResNet-50's 1x1 convolutions in inference, BatchNorm folded: our packed-weight GEMM against
    oneDNN with prepacked weights and the residual add and ReLU as post-ops (what resnet_fast ran
    before, and what torch.compile's freezing runs). Warm caches: inside the network the ratio
    differs (bench/profile_layers.py)."""
    cl = torch.channels_last
    n, c, h, w = shape
    k = out_channels
    x = torch.randn(shape).relu().contiguous(memory_format=cl)
    weight, bias = torch.randn(k, c, 1, 1) / c**0.5, torch.randn(k)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    residual = torch.randn(n, k, oh, ow).contiguous(memory_format=cl) if with_residual else None
    args = ([0, 0], [stride, stride], [1, 1], 1)
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight.contiguous(memory_format=cl), *args, list(shape))
    ours_weight = resnet_fast.ops.pack_conv_weight(weight)

    def ours():
        with torch.inference_mode():
            resnet_fast.ops.conv_bias_act(x, ours_weight, bias, residual, True, 1, stride, 0)

    def onednn():
        with torch.inference_mode():
            if residual is None:
                torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "relu", [None], "")
            else:
                torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *args, "add", None, "relu", [], "")

    what = f"{shape}->{k} stride {stride}" + (" + residual" if with_residual else "")
    compare(benchmark, f"conv_bias_act 1x1 inference {what} channels_last", n, ours,
            {"oneDNN (prepacked, post-ops)": onednn}, pairs=30, rounds=10)


@pytest.mark.parametrize("shape, out_channels", [((1, 64, 56, 56), 256), ((1, 128, 28, 28), 512),
                                                 ((1, 256, 14, 14), 1024), ((8, 128, 28, 28), 512)], ids=str)
def test_block_end_in_place_inference(benchmark, shape, out_channels):
    """A bottleneck's last 1x1 (BatchNorm folded, + residual, ReLU) written into the residual's
    storage (conv_bias_act_, what a network's forward runs where our GEMM routes) against the same
    GEMM writing a new tensor, and oneDNN's in-place post-op: each call on the next of enough
    inputs and residuals to fill 64 MB, so that it finds them out of cache, as inside the network
    (where its residual was written three convolutions earlier)."""
    cl = torch.channels_last
    n, c, h, w = shape
    k = out_channels
    ring = max(2, (64 << 20) // (4 * n * h * w * (c + k)))
    xs = [torch.randn(shape).relu().contiguous(memory_format=cl) for _ in range(ring)]
    residuals = {name: [torch.randn(n, k, h, w).contiguous(memory_format=cl) for _ in range(ring)]
                 for name in ("in place", "new tensor", "onednn")}
    weight, bias = torch.randn(k, c, 1, 1) / c**0.5, torch.randn(k)
    args = ([0, 0], [1, 1], [1, 1], 1)
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight.contiguous(memory_format=cl), *args, list(shape))
    ours_weight = resnet_fast.ops.pack_conv_weight(weight)
    turn = {"in place": 0, "new tensor": 0, "onednn": 0}

    def next_of(name):
        i = turn[name] = (turn[name] + 1) % ring
        return xs[i], residuals[name][i]

    def in_place():
        x, r = next_of("in place")
        with torch.inference_mode():
            resnet_fast.ops.conv_bias_act_(r, x, ours_weight, bias, True)

    def new_tensor():
        x, r = next_of("new tensor")
        with torch.inference_mode():
            resnet_fast.ops.conv_bias_act(x, ours_weight, bias, r, True)

    def onednn():
        x, r = next_of("onednn")
        with torch.inference_mode():
            torch.ops.mkldnn._convolution_pointwise_.binary(r, x, packed, bias, *args, "add", None, "relu", [], "")

    compare(benchmark, f"conv_bias_act_ block end {shape}->{k} into its residual, out of cache", n, in_place,
            {"our GEMM, a new tensor": new_tensor, "oneDNN in place (sum post-op)": onednn}, pairs=30, rounds=10)


@pytest.mark.parametrize("shape, classes", [((1, 2048, 7, 7), 1000), ((8, 2048, 7, 7), 1000),
                                            ((1, 512, 7, 7), 1000), ((128, 64, 8, 8), 10)], ids=str)
def test_pool_linear_inference(benchmark, shape, classes):
    """The classifier head (ResNet-50 and ResNet-18 at batch 1 and 8, CIFAR ResNet-20 at 128):
    our pooling + GEMM against PyTorch's adaptive_avg_pool2d, flatten and linear (MKL). Warm
    caches: alone, the 8 MB weight stays in L3; inside the network it does not
    (bench/profile_layers.py)."""
    x = torch.randn(shape).relu().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(classes, shape[1]) / shape[1] ** 0.5, torch.randn(classes)
    packed = resnet_fast.ops.pack_conv_weight(weight[:, :, None, None])

    def ours():
        with torch.inference_mode():
            resnet_fast.ops.pool_linear(x, packed, bias)

    def eager():
        with torch.inference_mode():
            F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), weight, bias)

    compare(benchmark, f"pool_linear inference {shape}->{classes} channels_last", shape[0], ours,
            {"eager (adaptive_avg_pool2d + linear)": eager}, pairs=30, rounds=10)


# (shape, residual): ResNet-20's stages at batch 128 and ResNet-50's at batch 16.
CASES = [
    ((128, 16, 32, 32), None),
    ((128, 16, 32, 32), "identity"),
    ((128, 64, 8, 8), "option_a"),
    ((16, 256, 56, 56), "identity"),
    ((16, 512, 28, 28), None),
]


@pytest.mark.parametrize("shape, residual", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_norm_act_fwd_bwd(benchmark, shape, residual, layout, dtype):
    if dtype == torch.bfloat16 and (layout == "nchw" or residual == "option_a"):
        pytest.skip("bfloat16 is measured on the channels_last cases only")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def make(*size):
        return torch.randn(*size, dtype=dtype).contiguous(memory_format=fmt)

    x = make(shape).requires_grad_(True)
    n, c, h, w = shape
    r, stride = None, 1
    if residual == "identity":
        r = make(shape).requires_grad_(True)
    elif residual == "option_a":
        r, stride = make(n, c // 2, 2 * h, 2 * w).requires_grad_(True), 2
    grad = make(shape)
    bn = torch.nn.BatchNorm2d(c).to(dtype)

    # In a network an activation's gradient is produced once, not accumulated over calls: the
    # gradients are reset after every call, so that neither side pays an accumulation pass.
    def reset():
        x.grad = None
        if r is not None:
            r.grad = None

    def ours():
        bn_act(x, bn, residual=r, residual_stride=stride).backward(grad)
        reset()

    def eager():  # what torchvision's block runs: BN, the (padded) shortcut added, ReLU
        y = bn(x)
        if r is not None:
            y = y + (reference.zero_pad_shortcut(r, c, stride) if stride != 1 else r)
        F.relu(y).backward(grad)
        reset()

    label = f"batch_norm_act fwd+bwd {shape} {residual or ''} {layout} {str(dtype)[6:]}"
    compare(benchmark, label, x.numel(), ours, {"eager": eager},
            pairs=60, rounds=10)
