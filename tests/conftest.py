import contextlib
import importlib
import os
import sys

import pytest
import torch

# Without a GPU, the Triton kernels are tested in Triton's interpreter on CPU tensors; it must be
# switched on before resnet_fast (which defines the kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import resnet_fast  # noqa: E402
from resnet_fast import _backend  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated():
    """Each test starts from the default backend and a fixed seed, and leaves them as it found them."""
    torch.manual_seed(0)
    previous = resnet_fast.get_backend()
    yield
    resnet_fast.set_backend(previous)


def import_bench(name: str):
    """A script of bench/ (profile_layers, profile_training, gpu_check) imported as a module."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
requires_extension = pytest.mark.skipif(
    not resnet_fast.extension_available(), reason=f"extension not built: {resnet_fast.extension_error()}"
)


# The implementations of the fused ops, each skipped with its reason where it cannot run.
_GPU_KERNELS = torch.cuda.is_available() and _backend.cuda_kernels_built()
IMPLS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _backend.kernels()["batch_norm_act"]["cpu"], reason=f"C++ kernels not built: {resnet_fast.extension_error()}")),
    pytest.param("triton", marks=pytest.mark.skipif(not _backend.triton_available(), reason=f"Triton cannot run: {_backend._triton_error}")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _GPU_KERNELS, reason="needs a CUDA device and the extension's CUDA kernels (none on this machine)")),
]


def device_of(impl: str) -> str:
    """Where an implementation's tensors live: Triton runs CPU tensors only in its interpreter."""
    return "cuda" if impl == "cuda" or (impl == "triton" and torch.cuda.is_available()) else "cpu"


ops_of = _backend.ops_for  # the op namespace of an implementation


def make_input(shape, dtype, layout, device="cpu", requires_grad=False):
    """A random (N, C, H, W) input in one of the layouts the ops take: "contiguous" (NCHW),
    "channels_last", or "noncontiguous" (a transposed, subsampled view)."""
    n, c, h, w = shape
    if layout == "channels_last":
        x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        x = torch.randn(n, c, w, 2 * h, device=device).to(dtype).transpose(2, 3)[:, :, ::2]
        assert not x.is_contiguous() and x.shape == (n, c, h, w)
    else:
        x = torch.randn(n, c, h, w, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def op_names(fn) -> list[str]:
    """The names of the operator events (e.g. "resnet_fast::conv3x3", "aten::bmm") that running
    ``fn()`` records in torch.profiler, in order, with repeats: which kernels a call routed to."""
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events()]


@contextlib.contextmanager
def kept_storages():
    """The storages (their data pointers) that autograd keeps for the backward of what runs inside."""
    kept: set[int] = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept
