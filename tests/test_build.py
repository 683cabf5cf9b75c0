"""The compiled extension: it is loaded, its ops are registered, and a CUDA build carries device code."""

import glob
import os
import struct

import pytest
import torch

import resnet_fast

# CI builds with RESNET_FAST_CUDA=1: there the CUDA kernels are required, not optional.
CUDA_REQUIRED = os.environ.get("RESNET_FAST_CUDA") == "1"


def test_extension_is_loaded():
    assert resnet_fast.extension_available(), f"resnet_fast._C failed to load: {resnet_fast.extension_error()}"
    assert torch.ops.resnet_fast.zero_pad_shortcut.default._schema.name == "resnet_fast::zero_pad_shortcut"
    assert resnet_fast._backend.kernels()["zero_pad_shortcut"]["cpu"]


def _extension_path():
    paths = glob.glob(os.path.join(os.path.dirname(resnet_fast.__file__), "_C*.so"))
    assert len(paths) == 1, paths
    return paths[0]


def cubin_archs(path):
    """SM architectures of the cubins embedded in a shared library.

    The toolkit here has no cuobjdump, so read the embedded device ELF images directly: each
    is an ELF file with e_machine EM_CUDA (190); in the ELF ABI that nvcc 12.x/13.x writes
    (OS ABI 0x41, ABI version >= 8) the SM version sits in bits 8-15 of e_flags, in older ones
    in bits 0-7.
    """
    data = open(path, "rb").read()
    archs = set()
    i = data.find(b"\x7fELF", 1)
    while i >= 0:
        if data[i + 4] == 2 and struct.unpack_from("<H", data, i + 18)[0] == 190:  # 64-bit, EM_CUDA
            flags = struct.unpack_from("<I", data, i + 48)[0]
            new_abi = data[i + 7] == 0x41 and data[i + 8] >= 8
            archs.add((flags >> 8) & 0xFF if new_abi else flags & 0xFF)
        i = data.find(b"\x7fELF", i + 1)
    return archs


def test_cuda_build_carries_sm80_and_sm90_code():
    if not resnet_fast._backend.cuda_kernels_built():
        assert not CUDA_REQUIRED, "RESNET_FAST_CUDA=1 but the extension has no CUDA kernels registered"
        pytest.skip("the extension was built without CUDA sources (RESNET_FAST_CUDA=0 or no toolkit)")
    archs = cubin_archs(_extension_path())
    assert {80, 90} <= archs, f"device code found for sm_{sorted(archs)}"
