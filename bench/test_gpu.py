"""GPU benchmarks (run where torch.cuda.is_available(); skipped here with the reason): each
fused op forward + backward against eager and torch.compile, with its achieved GB/s (the traffic
model's bytes, bench/traffic.py, over the measured time) and the model's predicted speed-up beside
the measured one; ResNet-50 at batch 256, training and inference, AMP bf16 and fp32, against eager
NCHW, eager channels_last + AMP, and torch.compile; CIFAR ResNet-20 training at batch 128.
bench/gpu_check.py runs them on a lent GPU."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from conftest import compare
from resnet_fast import _routing
from resnet_fast.nn import bn_act
from traffic import Site, passes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")

# bench/gpu_check.py measures in time boxes: first against eager alone (RESNET_FAST_BENCH_COMPILE=0),
# then against torch.compile alone (RESNET_FAST_BENCH_ONLY_COMPILE=1), whose compilation takes
# tens of seconds a network.
WITH_COMPILE = os.environ.get("RESNET_FAST_BENCH_COMPILE", "1") != "0"
ONLY_COMPILE = os.environ.get("RESNET_FAST_BENCH_ONLY_COMPILE", "0") == "1"


def baselines(eager: dict, compiled: dict) -> dict:
    """The baselines of this run (see WITH_COMPILE and ONLY_COMPILE); compiled: {name: thunk}."""
    if ONLY_COMPILE:
        return {k: v() for k, v in compiled.items()}
    return {**eager, **({k: v() for k, v in compiled.items()} if WITH_COMPILE else {})}


def synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, residual", [((256, 256, 56, 56), True), ((256, 512, 28, 28), False), ((256, 64, 56, 56), False)], ids=str)
def test_gpu_batch_norm_act_fwd_bwd(benchmark, impl, dtype, shape, residual):
    if impl not in resnet_fast.available_backends():
        pytest.skip(f"backend {impl} is not available")
    fmt = torch.channels_last
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    r = torch.randn_like(x).requires_grad_(True) if residual else None
    grad = torch.randn_like(x)
    bn = torch.nn.BatchNorm2d(shape[1]).cuda()

    def ours():
        with resnet_fast.use_backend(impl):
            bn_act(x, bn, residual=r).backward(grad)

    def eager():
        y = bn(x)
        if r is not None:
            y = y + r
        F.relu(y).backward(grad)

    def make_compiled():
        compiled_fn = torch.compile(lambda x, r: F.relu(bn(x) + r) if r is not None else F.relu(bn(x)))
        return synced(lambda: compiled_fn(x, r).backward(grad))

    site = Site("bench", x.numel(), relu=True, residual=residual)
    fused_bytes = passes(site, True, True) * x.numel() * x.element_size()
    eager_bytes = passes(site, True, False) * x.numel() * x.element_size()
    compare(benchmark, f"GPU {impl} batch_norm_act {shape} {str(dtype)[6:]}", x.numel(), synced(ours),
            baselines({"eager": synced(eager)}, {"torch.compile": make_compiled}), pairs=20, rounds=20,
            extra={"bytes": fused_bytes, "model_speedup_vs_eager": eager_bytes / fused_bytes})


def resnet50_pair():
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.resnet50().cuda()
    return copy.deepcopy(ref).to(memory_format=torch.channels_last), ref


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gpu_resnet50_batch256(benchmark, mode):
    ours, eager_nchw = resnet50_pair()
    eager_cl = copy.deepcopy(eager_nchw).to(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(eager_cl))  # (compiles at its first call)
    models = [ours, eager_nchw, eager_cl, compiled]
    for m in models:
        m.train(mode == "train")
    x = torch.randn(256, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (256,), device="cuda")
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models}

    def step(model, amp, backend="eager", channels_last=False):
        inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def run():
            with resnet_fast.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                if mode == "train":
                    loss = F.cross_entropy(model(inp), y)
                    opts[id(model)].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[id(model)].step()
                else:
                    with torch.no_grad():
                        model(inp)
            torch.cuda.synchronize()

        return run

    compare(benchmark, f"GPU ResNet-50 {mode} b256 bf16 AMP", 256, step(ours, True, "auto"),
            baselines({"eager NCHW fp32": step(eager_nchw, False), "eager CL + AMP": step(eager_cl, True, channels_last=True)},
                      {"torch.compile CL + AMP": lambda: step(compiled, True, channels_last=True)}), pairs=5, rounds=5)
    compare(benchmark, f"GPU ResNet-50 {mode} b256 fp32", 256, step(ours, False, "auto"),
            baselines({"eager CL fp32": step(eager_cl, False, channels_last=True)},
                      {"torch.compile CL fp32": lambda: step(compiled, False, channels_last=True)}), pairs=5, rounds=5)


def test_gpu_cifar_resnet20_training_batch128(benchmark):
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.resnet20().cuda()
    ours = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    eager_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(eager_cl))  # (compiles at its first call)
    x = torch.randn(128, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device="cuda")

    def step(model, backend):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def run():
            with resnet_fast.use_backend(backend):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            torch.cuda.synchronize()

        return run

    compare(benchmark, "GPU CIFAR ResNet-20 training b128 fp32", 128, step(ours, "auto"),
            baselines({"eager CL": step(eager_cl, "eager")}, {"torch.compile CL": lambda: step(compiled, "eager")}),
            pairs=10, rounds=10)


@pytest.mark.parametrize(
    "shape", [(256, 64, 56, 56, 64, 3, 1), (256, 256, 14, 14, 256, 3, 1), (256, 256, 56, 56, 64, 1, 1)], ids=str
)
def test_gpu_norm_conv_forward(benchmark, shape):
    """Issue 18's NormConvolution forward (resnet_fast.ops.norm_conv, Triton) against what it
    would replace: the previous BatchNorm's normalise + ReLU written out, cuDNN's convolution, then
    the batch statistics read back (torch.var_mean); checked against float64 before timing.
    Decides whether it may be routed on GPUs (it is not yet)."""
    if "triton" not in resnet_fast.available_backends():
        pytest.skip("Triton is not available")
    n, c, h, w, k, r, stride = shape
    x = torch.randn(n, c, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, device="cuda") / (c * r * r) ** 0.5).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda") * 0.5
    pad = r // 2

    def ours():
        return resnet_fast.ops.norm_conv(x, weight, stride, pad, scale, shift, True)

    def eager():
        y = F.conv2d(F.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), weight, None, stride, pad)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
        return y, mean, var

    # (TF32 products where torch.backends.cudnn.allow_tf32, as cuDNN's: a loose bound; the
    # float64 and float32 checks are tests/ops/test_norm_conv.py's.)
    sub = x[:8]
    oracle = resnet_fast.ops.reference.norm_conv(
        sub.double(), weight.double(), stride, pad, scale.double(), shift.double(), True
    )
    got = resnet_fast.ops.norm_conv(sub, weight, stride, pad, scale, shift, True)
    for name, g, want in zip(("y", "mean", "var"), got, oracle):
        assert (g.double() - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-4, name
    compare(benchmark, f"GPU norm_conv forward {shape} fp32", x.numel(), synced(ours),
            baselines({"eager (cuDNN + statistics)": synced(eager)},
                      {"torch.compile": lambda: synced(torch.compile(eager))}), pairs=20, rounds=20)


def test_gpu_norm_conv_training_cifar(benchmark, monkeypatch):
    """CIFAR ResNet-20's training step at batch 128 with its basic blocks across the convolutions
    (RESNET_FAST_NORM_CONV=1: norm_conv forward and backward) against the same model without
    (the default GPU path: cuDNN's convolutions and the fused BatchNorm), the switch flipped inside
    each timed call; the two steps' losses checked against each other first. Decides whether the
    routing may be on by default on GPUs (it is not)."""
    if "triton" not in resnet_fast.available_backends():
        pytest.skip("Triton is not available")
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.resnet20().cuda().to(memory_format=torch.channels_last)
    with_nc, without = copy.deepcopy(ref), copy.deepcopy(ref)
    x = torch.randn(128, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device="cuda")

    def step(model, on):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def run():
            monkeypatch.setattr(_routing, "NORM_CONV_TRAINING", on)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            return loss.item()

        return run

    first = [step(copy.deepcopy(ref), on)() for on in (True, False)]
    assert abs(first[0] - first[1]) <= 1e-3 * abs(first[1]), first
    compare(benchmark, "GPU CIFAR ResNet-20 training b128 fp32, norm_conv blocks", 128, step(with_nc, True),
            {"resnet_fast without norm_conv": step(without, False)}, pairs=10, rounds=10)


@pytest.mark.parametrize("shape", [(256, 64, 56, 56, 64, 3, 1), (256, 256, 56, 56, 64, 1, 1), (256, 128, 28, 28, 128, 3, 2)], ids=str)
def test_gpu_norm_conv_forward_backward(benchmark, shape):
    """norm_conv forward + its fused backward (the statistics' gradients folded into y's, the data
    gradient with the ReLU mask and the scale's and shift's reductions in its epilogue, the weight
    gradient with the normalised input recomputed) against eager autograd through the same formula
    (cuDNN's forward, data and weight gradients, the elementwise passes); every gradient checked
    against float64 on a slice of the batch before timing."""
    if "triton" not in resnet_fast.available_backends():
        pytest.skip("Triton is not available")
    n, c, h, w, k, r, stride = shape
    pad = r // 2
    x = torch.randn(n, c, h, w, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = (torch.randn(k, c, r, r, device="cuda") / (c * r * r) ** 0.5).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    scale = (torch.rand(c, device="cuda") + 0.5).requires_grad_(True)
    shift = (torch.randn(c, device="cuda") * 0.5).requires_grad_(True)
    ins = (x, weight, scale, shift)

    def step(fn, args):
        y, mean, var = fn(args[0], args[1], stride, pad, args[2], args[3], True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        loss = (y * torch.randn(y.shape, generator=gen, device="cuda").to(y.dtype)).sum() + mean.sum() + var.sum()
        return torch.autograd.grad(loss, args)

    sub = [t.detach()[:8].requires_grad_(True) if i == 0 else t for i, t in enumerate(ins)]
    got = step(resnet_fast.ops.norm_conv, sub)
    oracle = step(resnet_fast.ops.reference.norm_conv, [t.detach().double().requires_grad_(True) for t in sub])
    for name, g, want in zip(("x", "weight", "scale", "shift"), got, oracle):
        assert (g.double() - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-4, name

    def ours():
        return step(resnet_fast.ops.norm_conv, ins)

    def eager():
        return step(resnet_fast.ops.reference.norm_conv, ins)

    compare(benchmark, f"GPU norm_conv fwd+bwd {shape} fp32", x.numel(), synced(ours),
            baselines({"eager (cuDNN + statistics)": synced(eager)}, {}), pairs=10, rounds=10)
