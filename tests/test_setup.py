"""The build's CUDA decisions (setup.py), without building anything."""

import os
import runpy

import pytest

SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


@pytest.fixture
def setup_module():
    return runpy.run_path(SETUP, run_name="resnet_fast_setup")  # defines the helpers, builds nothing


def test_cuda_can_be_skipped_or_required(setup_module, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CUDA", "0")
    assert setup_module["cuda_wanted"]() == (False, None)
    monkeypatch.setenv("RESNET_FAST_CUDA", "2")
    with pytest.raises(RuntimeError, match="must be 0, 1 or unset"):
        setup_module["cuda_wanted"]()


def test_required_cuda_without_a_toolkit_fails_clearly(setup_module, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CUDA", "1")
    monkeypatch.setitem(setup_module["cuda_wanted"].__globals__, "find_cuda_home", lambda: None)
    with pytest.raises(RuntimeError, match="RESNET_FAST_CUDA=1 but no CUDA toolkit was found"):
        setup_module["cuda_wanted"]()
    monkeypatch.delenv("RESNET_FAST_CUDA")
    assert setup_module["cuda_wanted"]() == (False, None)  # unset: CPU kernels only


def test_a_wrong_cuda_home_is_named(setup_module, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=f"CUDA_HOME={tmp_path} is not a CUDA toolkit"):
        setup_module["find_cuda_home"]()


def test_a_toolkit_behind_an_nvcc_wrapper_is_found(setup_module, monkeypatch, tmp_path):
    # A fake toolkit, and a wrapper script elsewhere on PATH that execs its nvcc (as on our machines).
    root = tmp_path / "cuda-x"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    real = root / "bin" / "nvcc"
    real.write_text(f"#!/bin/sh\necho '#$ TOP={root}/bin/..'\n")
    real.chmod(0o755)
    wrapper_dir = tmp_path / "wrappers"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}:{os.environ['PATH']}")
    assert setup_module["find_cuda_home"]() == str(root)
