"""Whole models: resnet_fast against eager PyTorch (torchvision, NCHW and channels_last)."""

import torch
import torchvision

import resnet_fast
from conftest import compare


def test_resnet50_inference_batch8(benchmark):
    tv = torchvision.models.resnet50().eval()
    ours = resnet_fast.ResNet50().eval()
    ours.load_state_dict(tv.state_dict())
    tv_cl = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    tv_cl.load_state_dict(tv.state_dict())
    x = torch.randn(8, 3, 224, 224)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run(model, inp):
        def f():
            with torch.inference_mode():
                return model(inp)

        return f

    compare(
        benchmark,
        "ResNet-50 inference, batch 8, fp32",
        8,
        run(ours, x),
        {"eager NCHW": run(tv, x), "eager channels_last": run(tv_cl, x_cl)},
        pairs=3,
        rounds=2,
    )


def _train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def f():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return f


def test_resnet20_training_batch128(benchmark):
    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))
    ours = resnet_fast.resnet20()
    eager = resnet_fast.resnet20()
    eager_cl = resnet_fast.resnet20().to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ours_step, eager_step, eager_cl_step = _train_step(ours, x, y), _train_step(eager, x, y), _train_step(eager_cl, x_cl, y)

    def with_eager(step):
        def f():
            with resnet_fast.use_backend("eager"):
                step()

        return f

    compare(
        benchmark,
        "CIFAR ResNet-20 training step, batch 128",
        128,
        ours_step,
        {"eager NCHW": with_eager(eager_step), "eager channels_last": with_eager(eager_cl_step)},
    )
