"""Models under torch.compile: no graph break, same results as eager."""

import pytest
import torch

import resnet_fast


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_compiled_resnet20_matches_eager(backend):
    resnet_fast.set_backend(backend)
    model = resnet_fast.resnet20()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 32, 32)
    ref = resnet_fast.resnet20()
    ref.load_state_dict(model.state_dict())
    out, out_ref = compiled(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(model.conv1.weight.grad, ref.conv1.weight.grad, rtol=1e-3, atol=1e-4)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_optimizer_steps_match_the_eager_backend():
    # Three SGD steps (momentum, weight decay) with the fused kernels and with the formulas, from
    # the same weights, in float64 so that the comparison is about the math.
    torch.manual_seed(0)
    models = {}
    for backend in ("auto", "eager"):
        resnet_fast.set_backend(backend)
        torch.manual_seed(0)
        model = resnet_fast.resnet20().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 10, (16,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[backend] = model
    fused, eager = models["auto"].state_dict(), models["eager"].state_dict()
    for k, v in eager.items():
        torch.testing.assert_close(fused[k], v, rtol=1e-9, atol=1e-11, msg=lambda m: f"{k}: {m}")


def test_bfloat16_training_step_tracks_the_eager_backend():
    # bfloat16 end to end (oneDNN convolutions, fused BatchNorm in bfloat16 with float sums):
    # against float64, the fused path may be at most twice as far off as PyTorch's own bfloat16.
    torch.manual_seed(0)
    base = resnet_fast.resnet20()
    x = torch.randn(8, 3, 32, 32)

    def run(backend, dtype):
        resnet_fast.set_backend(backend)
        model = resnet_fast.resnet20().to(dtype)
        model.load_state_dict(base.state_dict())
        xx = x.to(dtype).requires_grad_(True)
        out = model(xx)
        out.float().square().sum().backward()
        return out.double(), xx.grad.double(), model.conv1.weight.grad.double()

    exact = run("eager", torch.float64)
    fused, eager = run("auto", torch.bfloat16), run("eager", torch.bfloat16)
    for name, f, e, ex in zip(("output", "input grad", "conv1 grad"), fused, eager, exact):
        err, eager_err = (f - ex).norm().item(), (e - ex).norm().item()
        assert err <= 2 * eager_err + 1e-3 * ex.norm().item(), (name, err, eager_err)


def test_compiled_resnet18_training_matches_eager():
    """The ImageNet family's training ops under torch.compile without a graph break: the stem and
    the projection shortcuts (conv_bn_act_train), the pooling (max_pool2d_train), the blocks."""
    resnet_fast.set_backend("auto")
    torch.manual_seed(0)
    model = resnet_fast.resnet18()
    ref = resnet_fast.resnet18()
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    out, out_ref = compiled(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    out_ref.sum().backward()
    # Float32 sums in another order (the compiled graph's): up to 1.4e-5 of a gradient's largest
    # value apart on torch 2.11 (the stem's weight gradient, up to 112, differed by 1.5e-3), so the
    # absolute tolerance scales with that value; a wrong gradient is off by the size of its terms.
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
