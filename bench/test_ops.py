"""Each fused op, forward + backward, against the eager ops it replaces (its formula)."""

import torch

import resnet_fast
from conftest import compare
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
        pairs=20,
        rounds=20,
    )
