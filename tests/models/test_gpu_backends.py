"""Whole networks through the GPU implementations: Triton (in its interpreter on this machine)
and CUDA C++ (skipped without a GPU), against the eager backend with the same weights."""

import copy

import pytest
import torch

import resnet_fast
from resnet_fast.nn import functional as RF
from tests.conftest import IMPLS, device_of

GPU_IMPLS = [p for p in IMPLS if p.values[0] != "cpu"]


def assert_close_rel(a, b, rel, name):
    scale = b.abs().max().item() + 1e-12
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def training_step(model, x, backend):
    with resnet_fast.use_backend(backend):
        out = model(x)
        out.square().sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()] + list(model.buffers())


@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_training_step_matches_eager(impl, arch):
    """Logits, every gradient and the running statistics of one training step. In float64, so
    that the comparison is exact up to rounding: in float32 a pre-activation within rounding of 0
    may flip its ReLU mask between any two implementations (eager PyTorch's NCHW and
    channels_last runs differ from each other by up to 6% on a bias gradient of resnet18 that way)."""
    dev = device_of(impl)
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.get_model(arch, num_classes=10).to(dev).double()
    x = torch.randn(2, 3, 32, 32, device=dev, dtype=torch.float64)
    ours = training_step(copy.deepcopy(ref), x, impl)
    exact = training_step(copy.deepcopy(ref), x, "eager")
    names = ["logits"] + [f"grad of {n}" for n, _ in ref.named_parameters()] + [n for n, _ in ref.named_buffers()]
    for name, o, ex in zip(names, ours, exact):
        assert_close_rel(o, ex, 1e-7, name)  # (batch 2, 1x1 maps: ill-conditioned, 1e-9 relative seen)


@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_float32_training_step_runs_the_kernels(impl):
    """The float32 kernels inside a network (the op tests check them against the formula)."""
    dev = device_of(impl)
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.resnet20().to(dev)
    x = torch.randn(4, 3, 32, 32, device=dev)
    ours = training_step(copy.deepcopy(ref), x, impl)
    eager = training_step(copy.deepcopy(ref), x, "eager")
    assert_close_rel(ours[0], eager[0], 1e-4, "logits")
    assert_close_rel(ours[1], eager[1], 1e-2, "grad of conv1")


@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_inference_folds_batchnorm_into_the_convolutions(impl, arch, monkeypatch):
    dev = device_of(impl)
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.get_model(arch, num_classes=10).to(dev)
        for m in ref.modules():  # non-trivial running statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        ref.eval()
    model = copy.deepcopy(ref)
    calls = []
    real = resnet_fast.ops.bias_act
    monkeypatch.setattr(RF.ops, "bias_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32, device=dev)
    with torch.no_grad():
        with resnet_fast.use_backend(impl):
            out = model(x)
        with resnet_fast.use_backend("eager"):
            out_ref = ref(x)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(calls) == n_bn  # every conv + BN ran folded, with the epilogue kernel
    assert_close_rel(out, out_ref, 1e-4, "logits")


# -- GPU only: compiled Triton, CUDA graphs, AMP ------------------------------------------------

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@requires_gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_cuda_graph_replays_a_training_step(impl):
    resnet_fast.set_backend(impl)
    torch.manual_seed(0)
    model = resnet_fast.resnet20().cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (autotuning, allocations) outside the graph
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    losses = []
    for _ in range(5):
        graph.replay()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@requires_gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_amp_training_matches_eager_amp(impl):
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.resnet18(num_classes=10).cuda()
    model = copy.deepcopy(ref)
    x = torch.randn(8, 3, 64, 64, device="cuda")
    outs = []
    for m, backend in ((model, impl), (ref, "eager")):
        with resnet_fast.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        out.float().square().mean().backward()
        outs.append(out.float())
    assert_close_rel(outs[0], outs[1], 3e-2, "logits under bf16 autocast")
    assert_close_rel(model.fc.weight.grad, ref.fc.weight.grad, 5e-2, "fc grad")


@requires_gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_resnet50_training_step_matches_eager(impl):
    """A whole ResNet-50 step on the GPU: float64 to rounding, float32 within twice eager
    PyTorch's own float32 error (norms over the logits and over all parameter gradients)."""
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.resnet50(num_classes=10).cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    exact = training_step(copy.deepcopy(ref).double(), x.double(), "eager")
    ours64 = training_step(copy.deepcopy(ref).double(), x.double(), impl)
    for o, ex in zip(ours64, exact):
        assert_close_rel(o, ex, 1e-7, "float64")
    ours = training_step(copy.deepcopy(ref), x, impl)
    eager = training_step(copy.deepcopy(ref), x, "eager")
    for group in (slice(0, 1), slice(1, 1 + len(list(ref.parameters())))):
        flat = lambda r: torch.cat([t.double().flatten() for t in r[group]])  # noqa: E731
        err, eager_err = (flat(ours) - flat(exact)).norm().item(), (flat(eager) - flat(exact)).norm().item()
        assert err <= 2 * eager_err + 1e-6 * flat(exact).norm().item(), (err, eager_err)


@requires_gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_same_bits_twice(impl):
    """Deterministic: the reductions write per-block partials merged in a fixed order (no
    atomics), so the same step from the same state gives the same bits."""
    torch.manual_seed(0)
    with resnet_fast.use_backend("eager"):
        ref = resnet_fast.resnet20().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 32, 32, device="cuda")
    first = training_step(copy.deepcopy(ref), x, impl)
    second = training_step(copy.deepcopy(ref), x, impl)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_compiled_model_with_the_gpu_kernels(impl):
    resnet_fast.set_backend(impl)
    torch.manual_seed(0)
    model = resnet_fast.resnet20().cuda()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    out = compiled(x)
    out.sum().backward()
    with resnet_fast.use_backend("eager"):
        out_ref = ref(x)
        out_ref.sum().backward()
    assert_close_rel(out, out_ref, 1e-3, "logits")
    assert_close_rel(model.conv1.weight.grad, ref.conv1.weight.grad, 5e-3, "conv1 grad")
    torch._dynamo.reset()


@requires_gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_speed_sanity(impl):
    """Not a benchmark (bench/ measures speed): only catches a pathologically slow kernel, e.g.
    a reduction left serial, by comparing with the eager ops on a ResNet-50-sized tensor."""
    x = torch.randn(64, 256, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(256).cuda()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn):
        for _ in range(3):
            fn()
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    with resnet_fast.use_backend(impl):
        ours = timed(lambda: RF.bn_act(x, bn))
    eager = timed(lambda: torch.relu(bn(x)))
    assert ours < 3 * eager, (ours, eager)
