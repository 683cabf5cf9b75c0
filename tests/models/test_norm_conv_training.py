"""Training across the convolution (issue 18, GPUs; opt-in: RESNET_FAST_NORM_CONV=1): basic and
bottleneck blocks through norm_conv, each BatchNorm's statistics in its convolution's epilogue and its scale,
shift and ReLU in the next one's prologue, against the eager backend with the same weights: the
output, every gradient, the running statistics and num_batches_tracked, in float64 to rounding;
momentum=None; option-A, projection and plain blocks; bottlenecks with the stride on either
convolution; a whole CIFAR ResNet-20 step; and where it
steps aside (eval mode, frozen BatchNorm, hooks, switched off). Without a GPU the kernels run in
Triton's interpreter (tests/conftest.py)."""

import copy

import pytest
import torch
from torch import nn

import resnet_fast
from resnet_fast import _backend, _routing, ops
from resnet_fast.nn import BasicBlock, Bottleneck, ZeroPadShortcut
from resnet_fast.nn import functional as RF

pytestmark = pytest.mark.skipif(not _backend.triton_available(), reason=f"Triton cannot run: {_backend.triton_error()}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def norm_conv_on(monkeypatch):
    """The routing switched on, and a count of the norm_conv calls that the blocks make."""
    monkeypatch.setattr(_routing, "NORM_CONV_TRAINING", True)
    calls = []
    real = ops.norm_conv

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(RF.ops, "norm_conv", counted)
    return calls


def step(model, x, backend, steps=1):
    """``steps`` training steps' outputs (the last), every parameter's gradient (summed over the
    steps) and every buffer."""
    with resnet_fast.use_backend(backend):
        for _ in range(steps):
            out = model(x)
            torch.manual_seed(1)
            (out * torch.randn_like(out)).sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()] + [b.clone() for b in model.buffers()]


def assert_steps_match(model, x, steps=1):
    names = ["output"] + [f"grad of {n}" for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    ours = step(copy.deepcopy(model), x, "triton", steps)
    exact = step(copy.deepcopy(model), x, "eager", steps)
    for name, o, e in zip(names, ours, exact):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-9 * (e.abs().max().item() + 1), msg=name)


def randomised(block):
    """BatchNorms with random affine parameters and running statistics, in float64."""
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return block.to(DEVICE).double()


@pytest.mark.parametrize("kind", ["identity", "option-A", "projection", "plain"])
def test_basic_block_step_matches_eager(norm_conv_on, kind):
    inplanes, planes, stride = (8, 8, 1) if kind in ("identity", "plain") else (8, 16, 2)
    downsample = {
        "option-A": lambda: ZeroPadShortcut(inplanes, planes, stride),
        "projection": lambda: nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)),
    }.get(kind, lambda: None)()
    block = randomised(BasicBlock(inplanes, planes, stride, downsample, residual=kind != "plain"))
    x = torch.randn(2, inplanes, 6, 6, device=DEVICE, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert_steps_match(block, x)
    assert len(norm_conv_on) == 2  # (the triton run's two convolutions; eager's ran its formula)


@pytest.mark.parametrize("kind", ["identity", "stride on the 3x3", "stride on the 1x1", "plain"])
def test_bottleneck_step_matches_eager(norm_conv_on, kind):
    """A bottleneck's three convolutions (1x1, 3x3, 1x1: two prologues), torchvision's stride on
    the 3x3 and the paper's on the first 1x1, a projection shortcut where the shape changes."""
    strided = kind.startswith("stride")
    inplanes, planes = (16, 4) if not strided else (8, 4)
    downsample = None
    if strided:
        downsample = nn.Sequential(nn.Conv2d(inplanes, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    block = randomised(Bottleneck(inplanes, planes, 2 if strided else 1, downsample, residual=kind != "plain",
                                  stride_in_1x1=kind == "stride on the 1x1"))
    x = torch.randn(2, inplanes, 5, 5, device=DEVICE, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert_steps_match(block, x)
    assert [tuple(s[2:]) for s in norm_conv_on] == [(1, 1), (3, 3), (1, 1)]


def test_momentum_none_over_two_steps(norm_conv_on):
    """momentum=None: the running statistics are the cumulative average of the batches'."""
    block = randomised(BasicBlock(8, 8))
    block.bn1.momentum = block.bn2.momentum = None
    x = torch.randn(2, 8, 5, 5, device=DEVICE, dtype=torch.float64)
    assert_steps_match(block, x, steps=2)


def test_cifar_resnet20_step_matches_eager(norm_conv_on):
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        model = resnet_fast.resnet20(num_classes=10).to(DEVICE).double()
    x = torch.randn(2, 3, 8, 8, device=DEVICE, dtype=torch.float64)
    assert_steps_match(model, x)
    assert len(norm_conv_on) == 18  # nine basic blocks, two convolutions each


def test_float32_block_within_eager_float32s_error(norm_conv_on):
    """Float32 against a float64 oracle, with eager float32's own error as the yardstick."""
    block = randomised(BasicBlock(8, 8))
    x64 = torch.randn(4, 8, 6, 6, device=DEVICE, dtype=torch.float64)
    oracle = step(copy.deepcopy(block), x64, "eager")
    ours = step(copy.deepcopy(block).float(), x64.float(), "triton")
    eager = step(copy.deepcopy(block).float(), x64.float(), "eager")
    for o, e, w in zip(ours, eager, oracle):
        err = (o.double() - w).abs().max().item()
        yardstick = (e.double() - w).abs().max().item()
        assert err <= 4 * yardstick + 4 * torch.finfo(torch.float32).eps * (w.abs().max().item() + 1)


def test_batch_of_one_value_per_channel_is_refused_like_batchnorm(norm_conv_on):
    block = BasicBlock(4, 4).to(DEVICE)
    with resnet_fast.use_backend("triton"), pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(torch.randn(1, 4, 1, 1, device=DEVICE))


@pytest.mark.parametrize("case", ["switched off", "eval", "frozen bn", "hook"])
def test_steps_aside(norm_conv_on, monkeypatch, case):
    block = BasicBlock(8, 8).to(DEVICE)
    if case == "switched off":
        monkeypatch.setattr(_routing, "NORM_CONV_TRAINING", False)
    elif case == "eval":
        block.eval()
    elif case == "frozen bn":
        block.bn2.eval()
    else:
        block.conv1.register_forward_hook(lambda *a: None)
    with resnet_fast.use_backend("triton"):
        block(torch.randn(2, 8, 5, 5, device=DEVICE))
    assert norm_conv_on == []


def test_torch_compile_without_graph_breaks(norm_conv_on):
    """fullgraph=True (a graph break would raise): the ops' fake kernels and registered autograd
    trace; the compiled step equals the eager one, running statistics included."""
    block = randomised(BasicBlock(8, 8)).float()
    ref = copy.deepcopy(block)
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    with resnet_fast.use_backend("triton"):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        compiled(x).sum().backward()
        ref(x).sum().backward()
    for (name, a), b in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    torch.testing.assert_close(block.bn1.running_var, ref.bn1.running_var)
