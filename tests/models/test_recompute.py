"""Whole training steps with the convolutions inside a block recomputing their inputs from the
BatchNorm that made them (resnet_fast._routing.recomputes_conv_input, conv1x1_recomputes_input)
against the same steps keeping them: the same gradients and state, bit for bit, and the expected
number of activations fewer kept for the backward."""

import pytest
import torch

import resnet_fast
from resnet_fast import _routing
from tests.conftest import kept_storages, requires_extension

pytestmark = requires_extension


# (arch, batch, input size, activations fewer): one per block, its second 3x3's input (our op
# runs it on every CPU, with ATen's convolutions where neither Winograd nor our weight gradient
# pays), and in ResNet-50 one more per bottleneck, conv3's input (16 blocks).
CASES = [("resnet20", 4, 32, 9), ("resnet18", 4, 64, 8), ("resnet18", 2, 64, 8), ("resnet50", 2, 64, 16 + 16)]


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
