"""The backend switch, and the fallback when the extension is missing."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import resnet_fast


def run_python(code, **env):
    """Runs code in a fresh interpreter (the backend is chosen at import)."""
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300)


def test_set_backend_returns_the_previous_one():
    assert resnet_fast.get_backend() == "auto"
    assert resnet_fast.set_backend("eager") == "auto"
    assert resnet_fast.get_backend() == "eager"
    assert resnet_fast.set_backend("auto") == "eager"
    with resnet_fast.use_backend("eager"):
        assert resnet_fast.get_backend() == "eager"
    assert resnet_fast.get_backend() == "auto"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown resnet_fast backend 'fast'.*auto, eager, cpu, cuda, triton"):
        resnet_fast.set_backend("fast")
    assert resnet_fast.get_backend() == "auto"


def test_unavailable_backends_say_why():
    if not torch.cuda.is_available():
        r = run_python(
            """
            import resnet_fast
            try:
                resnet_fast.set_backend("triton")
            except RuntimeError as e:
                print(e)
            """,
            TRITON_INTERPRET="0",
        )
        assert r.returncode == 0, r.stderr
        assert "'triton' is not available here: Triton kernels need a CUDA device" in r.stdout
        assert "TRITON_INTERPRET=1" in r.stdout
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' is not available here"):
            resnet_fast.set_backend("cuda")
        assert "cuda" not in resnet_fast.available_backends()
    assert resnet_fast.get_backend() == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cpu_backend_refuses_cuda_tensors():
    resnet_fast.set_backend("cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' was selected but zero_pad_shortcut got a tensor on cuda"):
        resnet_fast.ops.zero_pad_shortcut(torch.randn(1, 2, 4, 4, device="cuda"), 4, 2)


def test_environment_variable_selects_the_backend():
    r = run_python("import resnet_fast; print(resnet_fast.get_backend())", RESNET_FAST_BACKEND="eager")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eager"
    r = run_python("import resnet_fast", RESNET_FAST_BACKEND="turbo")
    assert r.returncode != 0
    assert "unknown resnet_fast backend 'turbo'" in r.stderr


def test_fallback_when_the_extension_is_missing():
    r = run_python(
        """
        import sys, warnings
        sys.modules["resnet_fast._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import resnet_fast
            import torch
            model = resnet_fast.resnet20()
            out = model(torch.randn(4, 3, 32, 32))
            out.sum().backward()
        messages = [str(w.message) for w in caught if "resnet_fast._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert "falls back to its eager PyTorch formula" in messages[0]
        assert not resnet_fast.extension_available()
        assert "resnet_fast._C" in resnet_fast.extension_error()
        assert resnet_fast.available_backends() == ["auto", "eager"], resnet_fast.available_backends()
        try:
            resnet_fast.set_backend("cpu")
        except RuntimeError as e:
            assert "extension is not loaded" in str(e)
        else:
            raise AssertionError("set_backend('cpu') should fail without the extension")
        print("ok", tuple(out.shape))
        """,
        TRITON_INTERPRET="0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok (4, 10)"


def test_kernel_table_lists_built_kernels():
    table = resnet_fast.kernels()
    assert set(table) == {
        "zero_pad_shortcut", "batch_norm_act", "bias_act", "max_pool2d", "conv3x3_train", "conv3x3_bias_act",
        "conv_bias_act", "conv1x1_train", "max_pool2d_train", "conv_bn_act_train", "pool_linear",
    }
    # The GPUs keep PyTorch's pooling and cuDNN's convolutions.
    cpu_only = {
        "max_pool2d", "max_pool2d_train", "conv3x3_train", "conv3x3_bias_act", "conv_bias_act", "conv1x1_train",
        "conv_bn_act_train", "pool_linear",
    }
    for op in table:
        assert table[op]["cpu"] == resnet_fast.extension_available()
        assert table[op]["triton"] == (resnet_fast._backend.triton_available() and op not in cpu_only)
    for op in cpu_only:
        assert not table[op]["cuda"]


@pytest.mark.skipif(not resnet_fast._backend.TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
def test_triton_backend_runs_cpu_tensors_in_the_interpreter():
    resnet_fast.set_backend("triton")
    x = torch.randn(2, 4, 3, 3)
    assert resnet_fast._routing.impl_for("batch_norm_act", x.device) == "triton"
    resnet_fast.set_backend("auto")
    assert resnet_fast._routing.impl_for("batch_norm_act", x.device) != "triton"  # auto keeps the C++ kernels on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_auto_prefers_triton_for_cuda_tensors():
    x = torch.randn(2, 4, 3, 3, device="cuda")
    expected = "triton" if resnet_fast._backend.triton_available() else "cuda"
    assert resnet_fast._routing.impl_for("batch_norm_act", x.device) == expected
    if resnet_fast._backend.cuda_kernels_built():
        resnet_fast.set_backend("cuda")
        assert resnet_fast._routing.impl_for("batch_norm_act", x.device) == "cuda"


@pytest.mark.skipif(not resnet_fast._backend.triton_available(), reason=f"Triton cannot run: {resnet_fast._backend.triton_error()}")
def test_triton_ops_have_the_cpp_schemas():
    """The Triton ops take their schemas from the C++ library (csrc/ops.cpp), not a copy."""
    from resnet_fast import triton as rf_triton

    for op in rf_triton.LAUNCHERS:
        cpp = str(getattr(torch.ops.resnet_fast, op).default._schema)
        tri = str(getattr(torch.ops.resnet_fast_triton, op).default._schema)
        assert tri == cpp.replace("resnet_fast::", "resnet_fast_triton::"), op
        assert hasattr(torch.ops.resnet_fast, f"check_{op}"), f"{op} has no C++ argument check for the Triton launcher"
