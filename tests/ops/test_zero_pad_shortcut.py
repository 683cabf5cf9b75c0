"""The option-A shortcut op against its formula (resnet_fast.ops.reference.zero_pad_shortcut)."""

import pytest
import torch

import resnet_fast
from resnet_fast.ops import reference, zero_pad_shortcut
from tests.conftest import IMPLS, device_of, make_input, ops_of, requires_extension

# Tests that take `impl` run for the C++ kernels ("cpu"), the Triton kernels (in the interpreter
# on this machine) and the CUDA C++ kernels (skipped without a GPU).

# (N, C_in, H, W, C_out, stride): the paper's transitions, and awkward ones.
SHAPES = [
    (2, 16, 32, 32, 32, 2),
    (4, 32, 16, 16, 64, 2),
    (1, 3, 7, 5, 17, 2),  # batch 1, odd sizes and channels
    (3, 5, 1, 1, 8, 2),  # 1x1 map
    (2, 8, 9, 9, 8, 3),  # stride 3, no padding channels
    (2, 64, 6, 6, 256, 1),  # bottleneck layer1 under option A: stride 1
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_and_backward_match_formula(impl, shape, dtype, layout):
    n, c, h, w, c_out, stride = shape
    x = make_input((n, c, h, w), dtype, layout, device=device_of(impl), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = ops_of(impl).zero_pad_shortcut(x, c_out, stride)
    y_ref = reference.zero_pad_shortcut(x_ref, c_out, stride)
    # A copy: exact in every dtype.
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    expected_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if layout != "noncontiguous" or impl != "triton":  # (Triton's output follows suggest_memory_format)
        assert y.stride() == torch.empty(y.shape).contiguous(memory_format=expected_format).stride()
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_and_double_backward(impl):
    op = ops_of(impl).zero_pad_shortcut
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device_of(impl), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, 7, 2), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, 7, 2), (x,))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl, layout):
    ops, dev = ops_of(impl), device_of(impl)
    x = make_input((2, 4, 6, 5), torch.float32, layout, device=dev, requires_grad=True)
    torch.library.opcheck(ops.zero_pad_shortcut, (x, 8, 2))
    g = make_input((2, 8, 3, 3), torch.float32, layout, device=dev, requires_grad=True)
    torch.library.opcheck(ops.zero_pad_shortcut_backward, (g, [2, 4, 6, 5], 2))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 3, 4), 4, 2), "expected a 4-D input"),
        ((torch.randn(1, 4, 4, 4), 3, 2), "must be at least the input's channels"),
        ((torch.randn(1, 4, 4, 4), 8, 0), "expected stride >= 1"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_refused_clearly(impl, args, message):
    with pytest.raises(RuntimeError, match=message):
        ops_of(impl).zero_pad_shortcut(args[0].to(device_of(impl)), *args[1:])
    with pytest.raises(ValueError, match=message):
        reference.zero_pad_shortcut(*args)


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_input_is_refused(impl):
    with pytest.raises(RuntimeError, match="floating-point"):
        ops_of(impl).zero_pad_shortcut(torch.ones(1, 4, 4, 4, dtype=torch.int64, device=device_of(impl)), 8, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_rejects_mismatched_sizes(impl):
    with pytest.raises(RuntimeError, match="does not fit an input"):
        ops_of(impl).zero_pad_shortcut_backward(torch.randn(2, 8, 3, 3, device=device_of(impl)), [2, 4, 8, 8], 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_offsets_past_int32(impl):
    op = ops_of(impl).zero_pad_shortcut
    if impl == "triton" and device_of(impl) == "cpu":
        pytest.skip("Triton's interpreter copies a tensor's whole 4 GiB storage; runs on a GPU")
    # A view whose second sample starts 2^31 elements in: 32-bit offsets would wrap. torch.empty
    # does not touch the 4 GiB it reserves, so only the pages written here are ever allocated.
    storage = torch.empty(2**31 + 64, dtype=torch.float16, device=device_of(impl))
    x = storage.as_strided((2, 3, 4, 4), (2**31, 16, 4, 1))
    x.copy_(torch.randn(2, 3, 4, 4))  # (copy_ moves it to the storage's device)
    torch.testing.assert_close(op(x, 5, 2), reference.zero_pad_shortcut(x, 5, 2), rtol=0, atol=0)
    grad_out = storage.as_strided((2, 5, 2, 2), (2**31, 4, 2, 1))
    grad_out.copy_(torch.randn(2, 5, 2, 2))
    expected = torch.zeros(2, 3, 4, 4, dtype=torch.float16, device=storage.device)
    expected[:, :, ::2, ::2] = grad_out[:, :3]
    grad_x = ops_of(impl).zero_pad_shortcut_backward(grad_out, [2, 3, 4, 4], 2)
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=0)


@requires_extension
def test_routing_follows_the_backend(monkeypatch):
    calls = []
    real = reference.zero_pad_shortcut
    monkeypatch.setattr(reference, "zero_pad_shortcut", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(2, 4, 4, 4)
    resnet_fast.set_backend("eager")
    zero_pad_shortcut(x, 8, 2)
    assert len(calls) == 1
    for backend in ("auto", "cpu"):
        resnet_fast.set_backend(backend)
        torch.testing.assert_close(zero_pad_shortcut(x, 8, 2), real(x, 8, 2), rtol=0, atol=0)
    assert len(calls) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_compiles_without_graph_break(impl):
    resnet_fast.set_backend(impl)
    x = torch.randn(2, 4, 6, 6, device=device_of(impl), requires_grad=True)
    fn = torch.compile(lambda t: zero_pad_shortcut(t, 8, 2).sin(), fullgraph=True, backend="aot_eager")
    y = fn(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    reference.zero_pad_shortcut(x_ref, 8, 2).sin().sum().backward()
    torch.testing.assert_close(y, reference.zero_pad_shortcut(x, 8, 2).sin())
    torch.testing.assert_close(x.grad, x_ref.grad)
