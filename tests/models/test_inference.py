"""Inference with BatchNorm folded into the convolutions (oneDNN post-ops for residual + ReLU)."""

import copy
import pickle

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import _routing
from resnet_fast.nn import functional as rf_functional
from tests.conftest import op_names, requires_extension

pytestmark = requires_extension


@pytest.mark.parametrize(
    "build",
    [
        lambda: resnet_fast.resnet50(),
        lambda: resnet_fast.resnet18(shortcut="A"),
        lambda: resnet_fast.resnet34(shortcut="C"),
        lambda: resnet_fast.resnet20(),
        lambda: resnet_fast.resnet50(stride_in_1x1=True, replace_stride_with_dilation=[False, False, True]),
    ],
)
def test_folded_inference_matches_eager(build):
    model = build()
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    size = 32 if isinstance(model, resnet_fast.CifarResNet) else 96
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        with resnet_fast.use_backend("eager"):
            expected = model(x)
        rf_functional._FOLDED.clear()
        got = model(x)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c in rf_functional._FOLDED for c in convs), "every convolution should have run folded"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_folded_weights_follow_parameter_changes():
    tv = torchvision.models.resnet18().eval()
    model = resnet_fast.resnet18().eval()
    model.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        model.layer1[0].bn1.running_var.mul_(4.0)  # in place: the cache must notice
        tv.layer1[0].bn1.running_var.mul_(4.0)
        torch.testing.assert_close(model(x), tv(x), rtol=1e-4, atol=1e-4)
        other = torchvision.models.resnet18().eval()
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), other(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(torch.randn(5, 3, 64, 64))[:0], torch.empty(0, 1000))  # another batch size


def test_eval_with_gradients_stays_differentiable():
    model = resnet_fast.resnet20().eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert x.grad is not None and model.conv1.weight.grad is not None


def test_pickle_and_deepcopy_after_folding():
    model = resnet_fast.resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expected)
        torch.testing.assert_close(copy.deepcopy(model)(x), expected)


# Per architecture: the in-place op its block ends run on this CPU at (2, 3, 64, 64) (ResNet-50's
# 1x1s by our GEMM where it routes, ResNet-18's 3x3s by Winograd), and a block with its input.
DONATING = {
    "resnet50": ("resnet_fast::conv_bias_act_", lambda m: m.layer2[1], (2, 512, 8, 8)),
    "resnet18": ("resnet_fast::conv3x3_bias_act_", lambda m: m.layer1[1], (2, 64, 16, 16)),
}


@pytest.mark.parametrize("arch", sorted(DONATING))
def test_block_ends_write_into_their_residual_only_when_the_network_owns_it(arch):
    """In a whole network's inference forward, block ends write into the residual's storage (as
    torch.compile's freezing does), by oneDNN's in-place post-op or our kernels' in-place forms;
    the caller's tensors, a block called on its own, and any tensor a hook could hold are never
    written."""
    torch.manual_seed(0)
    model = getattr(resnet_fast, arch)().eval()
    with resnet_fast.use_backend("eager"):
        ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    x_before = x.clone()
    with torch.no_grad():
        out = model(x)
        expected = ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(x, x_before)
    in_place, pick_block, block_input = DONATING[arch]
    if _routing.CPU_CAPABILITY in ("AVX2", "AVX512"):  # where our GEMM and Winograd's tiles route
        def forward():
            with torch.no_grad():
                model(torch.randn(2, 3, 64, 64))

        assert in_place in op_names(forward)
    # A block on its own leaves its input alone.
    block = pick_block(model)
    inp = torch.randn(*block_input).contiguous(memory_format=torch.channels_last)
    kept = inp.clone()
    with torch.no_grad():
        block(inp)
    assert torch.equal(inp, kept)
    # A hook that keeps block outputs sees them as they were produced.
    seen = {}

    def keep(module, inputs, output):
        seen.setdefault("out", (output, output.clone()))

    handle = model.layer1[1].register_forward_hook(keep)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    handle.remove()
    kept_tensor, snapshot = seen["out"]
    assert torch.equal(kept_tensor, snapshot)


def test_a_model_built_under_inference_mode_runs_as_torchvisions():
    # Its parameters are inference tensors, without version counters: nothing folded can be cached
    # (nor a forward planned), so it runs the convolutions and the fused BatchNorm as they are.
    with torch.inference_mode():
        tv = torchvision.models.resnet18().eval()
        model = resnet_fast.resnet18().eval()
        model.load_state_dict(tv.state_dict())
        x = torch.randn(2, 3, 64, 64)
        expected = tv(x)
        for _ in range(2):
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        model.layer1[0].bn1.running_var.mul_(4.0)  # in place, untracked
        tv.layer1[0].bn1.running_var.mul_(4.0)
        torch.testing.assert_close(model(x), tv(x), rtol=1e-4, atol=1e-4)
