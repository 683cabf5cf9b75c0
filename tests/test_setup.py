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


def test_the_supported_torch_range(setup_module):
    check = setup_module["check_torch_version"]
    for ok in ("2.11.0", "2.14.1+cu130", "2.15.0", "2.16.0.dev20270101", "3.0.0"):
        check(ok)  # no upper bound
    for old in ("2.10.0", "2.9.1+cpu", "1.13.1"):
        with pytest.raises(RuntimeError, match=r"needs torch 2\.11 or newer \(tested with 2\.11 and 2\.14\); this environment has torch"):
            check(old)


def test_an_isolated_build_asks_for_the_environments_own_torch(setup_module, monkeypatch, tmp_path):
    # pip's isolated build hides the environment's site-packages from sys.path, not from sysconfig:
    # the torch found there is the release the build environment must get.
    site = tmp_path / "site-packages"
    (site / "torch-2.11.0+cpu.dist-info").mkdir(parents=True)
    (site / "torch-2.11.0+cpu.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0+cpu\n")
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"purelib": str(site), "platlib": str(site)})
    assert setup_module["target_torch_version"]() == "2.11.0+cpu"
    assert setup_module["build_requirements"]() == ["torch==2.11.0"]
    (site / "torch-2.11.0+cpu.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.1\n")
    with pytest.raises(RuntimeError, match="needs torch 2.11 or newer"):
        setup_module["build_requirements"]()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"purelib": str(tmp_path), "platlib": str(tmp_path)})
    assert setup_module["build_requirements"]() == ["torch>=2.11"]  # no torch yet: a supported one
