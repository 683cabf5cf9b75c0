"""Whole training steps with the convolutions inside a block recomputing their inputs from the
BatchNorm that made them (resnet_fast._routing.recomputes_conv_input, conv1x1_recomputes_input),
and the stem and the projection shortcuts recomputing their convolutions' outputs
(recomputes_conv_output), against the same steps
keeping them: the same gradients and state, bit for bit, and the expected number of activations
fewer kept for the backward."""

import pytest
import torch

import resnet_fast
from resnet_fast import _routing
from tests.conftest import kept_storages, requires_extension

pytestmark = requires_extension


# (arch, batch, input size, activations fewer): one per block, its second 3x3's input (our op
# runs it on every CPU, with ATen's convolutions where neither Winograd nor our weight gradient
# pays), in ResNet-50 one more per bottleneck, conv3's input (16 blocks), and in the CIFAR nets the
# first block's first 3x3's input (the stem's output, recomputed from the images).
CASES = [("resnet20", 4, 32, 9 + 1), ("resnet18", 4, 64, 8), ("resnet18", 2, 64, 8), ("resnet50", 2, 64, 16 + 16)]


@pytest.mark.parametrize("avx512", [False, True], ids=["AVX2 CPU", "AVX-512 CPU"])
@pytest.mark.parametrize("arch, batch, size, fewer", CASES)
def test_models_train_the_same_with_fewer_kept_activations(monkeypatch, arch, batch, size, fewer, avx512):
    monkeypatch.setattr(_routing, "_AVX512", avx512)  # the plans (our 3x3 op) of that CPU
    results = []
    for recompute in (False, True):
        monkeypatch.setattr(_routing, "RECOMPUTE_CONV_INPUT", recompute)
        torch.manual_seed(0)
        model = resnet_fast.get_model(arch)
        x = torch.randn(batch, 3, size, size)
        with kept_storages() as kept:
            loss = model(x).square().mean()
        loss.backward()
        results.append((len(kept), [p.grad for p in model.parameters()], list(model.state_dict().values())))
    (kept_plain, grads_plain, state_plain), (kept_re, grads_re, state_re) = results
    assert kept_re == kept_plain - fewer
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_re))
    assert all(torch.equal(a, b) for a, b in zip(state_plain, state_re))


def train_step(arch, batch, size, kept_hook=None, **kwargs):
    torch.manual_seed(0)
    model = resnet_fast.get_model(arch, **kwargs)
    if kept_hook is not None:
        kept_hook(model)
    x = torch.randn(batch, 3, size, size)
    with kept_storages() as kept:
        loss = model(x).square().mean()
    loss.backward()
    return len(kept), [p.grad for p in model.parameters()], list(model.state_dict().values())


def assert_same_steps_with_fewer_kept(monkeypatch, flag, fewer, arch, batch, size, **kwargs):
    """A training step with the routing flag off, then on: the same gradients and state, bit for
    bit, and ``fewer`` tensors kept for the backward."""
    results = []
    for recompute in (False, True):
        monkeypatch.setattr(_routing, flag, recompute)
        results.append(train_step(arch, batch, size, **kwargs))
    (kept_plain, grads_plain, state_plain), (kept_re, grads_re, state_re) = results
    assert kept_re == kept_plain - fewer
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_re))
    assert all(torch.equal(a, b) for a, b in zip(state_plain, state_re))


# (arch, batch, input size, keyword arguments, activations fewer): the stem's convolution output,
# and in the CIFAR nets its ReLU output too, which the first block's first 3x3 recomputes from the
# images, where nothing else keeps it (an identity shortcut; option C projects it).
STEM_CASES = [
    ("resnet20", 4, 32, {}, 2),
    ("plain20", 4, 32, {}, 2),
    ("resnet20", 4, 32, {"shortcut": "C"}, 1),
    ("resnet18", 2, 64, {}, 1),
    ("resnet50", 2, 64, {}, 1),
]


@pytest.mark.parametrize("avx512", [False, True], ids=["AVX2 CPU", "AVX-512 CPU"])
@pytest.mark.parametrize("arch, batch, size, kwargs, fewer", STEM_CASES)
def test_the_stem_recomputes_its_convolution(monkeypatch, arch, batch, size, kwargs, fewer, avx512):
    monkeypatch.setattr(_routing, "_AVX512", avx512)
    assert_same_steps_with_fewer_kept(monkeypatch, "RECOMPUTE_STEM_CONV", fewer, arch, batch, size, **kwargs)


@pytest.mark.parametrize("where", ["layer1", "layer1[0]"])
def test_a_hook_on_the_first_block_still_fires(monkeypatch, where):
    """The CIFAR nets hand the stem's ConvInput to their first block by calling its fused body;
    a hook on that block or its stage keeps the modules' own calls (and the stem's output is kept)."""
    calls = []

    def hook(model):
        module = model.layer1 if where == "layer1" else model.layer1[0]
        module.register_forward_hook(lambda m, inp, out: calls.append(out.shape))

    kept_hooked, grads_hooked, _ = train_step("resnet20", 4, 32, kept_hook=hook)
    kept_plain, grads_plain, _ = train_step("resnet20", 4, 32)
    assert calls == [torch.Size([4, 16, 32, 32])]
    assert kept_hooked == kept_plain + 1
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_hooked))


# (arch, batch, input size, keyword arguments, activations fewer): one per projection shortcut,
# its convolution's output, recomputed from the block's input (which the block's first
# convolution keeps).
PROJECTION_CASES = [
    ("resnet18", 2, 64, {}, 3),
    ("resnet50", 2, 64, {}, 4),
    ("resnet20", 4, 32, {"shortcut": "B"}, 2),
    ("resnet20", 4, 32, {}, 0),
]


@pytest.mark.parametrize("arch, batch, size, kwargs, fewer", PROJECTION_CASES)
def test_projection_shortcuts_recompute_their_convolution(monkeypatch, arch, batch, size, kwargs, fewer):
    assert_same_steps_with_fewer_kept(monkeypatch, "RECOMPUTE_PROJECTION_CONV", fewer, arch, batch, size, **kwargs)


def test_a_first_block_compiled_in_place_runs_compiled():
    """``model.layer1[0].compile()``: the CIFAR nets' forward calls that block through its
    ``__call__`` (the compiled one), not its fused body."""
    torch.manual_seed(0)
    model = resnet_fast.resnet20()
    first = model.layer1[0]
    assert _routing.may_bypass_call(model.layer1, first)
    first.compile(backend="eager")
    assert not _routing.may_bypass_call(model.layer1, first)
    calls = []
    inner = first._compiled_call_impl
    first._compiled_call_impl = lambda *a, **k: calls.append(1) or inner(*a, **k)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [1]
