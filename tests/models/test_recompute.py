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


# (arch, batch, input size, activations fewer): one per block whose second 3x3 runs our op
# (ResNet-18's and ResNet-50's layer4, 512 x 512 channels, has no plan: PyTorch's convolution keeps
# its input), and in ResNet-50 one more per bottleneck, conv3's input (16).
CASES = [("resnet20", 4, 32, 9), ("resnet18", 4, 64, 6), ("resnet18", 2, 64, 6), ("resnet50", 2, 64, 16 + 12)]


@pytest.mark.parametrize("arch, batch, size, fewer", CASES)
def test_models_train_the_same_with_fewer_kept_activations(monkeypatch, arch, batch, size, fewer):
    monkeypatch.setattr(_routing, "_AVX512", False)  # the plans (our 3x3 op) of an AVX2 CPU
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
