"""The compiled extension: it is loaded, its ops are registered, and a CUDA build carries device code."""

import glob
import os
import runpy

import pytest
import torch

import resnet_fast

# CI builds with RESNET_FAST_CUDA=1: there the CUDA kernels are required, not optional.
CUDA_REQUIRED = os.environ.get("RESNET_FAST_CUDA") == "1"
SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


def test_extension_is_loaded():
    assert resnet_fast.extension_available(), f"resnet_fast._C failed to load: {resnet_fast.extension_error()}"
    assert torch.ops.resnet_fast.zero_pad_shortcut.default._schema.name == "resnet_fast::zero_pad_shortcut"
    assert resnet_fast._backend.kernels()["zero_pad_shortcut"]["cpu"]


def _extension_path():
    paths = glob.glob(os.path.join(os.path.dirname(resnet_fast.__file__), "_C*.so"))
    assert len(paths) == 1, paths
    return paths[0]


cubin_archs = runpy.run_path(SETUP, run_name="resnet_fast_setup")["cubin_archs"]


def expected_archs() -> set[int]:
    """The SM versions the build was asked for: TORCH_CUDA_ARCH_LIST, else setup.py's default."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or runpy.run_path(SETUP, run_name="resnet_fast_setup")["DEFAULT_ARCH_LIST"]
    return {int(a.split("+")[0].replace(".", "")) for a in arch_list.replace(" ", ";").split(";") if a}


def test_cuda_build_carries_device_code_for_its_architectures():
    if not resnet_fast._backend.cuda_kernels_built():
        assert not CUDA_REQUIRED, "RESNET_FAST_CUDA=1 but the extension has no CUDA kernels registered"
        pytest.skip("the extension was built without CUDA sources (RESNET_FAST_CUDA=0 or no toolkit)")
    archs = cubin_archs(_extension_path())
    assert expected_archs() <= archs, f"device code found for sm_{sorted(archs)}, expected {sorted(expected_archs())}"
