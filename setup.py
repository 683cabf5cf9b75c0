"""Builds the torch extension ``resnet_fast._C`` from ``csrc/``.

The CPU sources are always compiled. The CUDA sources are compiled whenever a CUDA
toolkit is found, also on a machine without a GPU:

* ``RESNET_FAST_CUDA=0`` skips them (fast local builds);
* ``RESNET_FAST_CUDA=1`` requires them and fails the build when no toolkit is found;
* unset: compile them if a toolkit is found.

Without a visible GPU the device code is compiled for sm_80 and sm_90 (plus PTX for newer
GPUs) unless ``TORCH_CUDA_ARCH_LIST`` says otherwise.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The root of a CUDA toolkit, or None.

    torch guesses CUDA_HOME as the parent of the folder that holds ``nvcc``; that is wrong
    when ``nvcc`` on PATH is a wrapper script outside the toolkit, so ask nvcc itself.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if not _is_toolkit(root):
                raise RuntimeError(f"{var}={root} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)")
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(root):
            return root
        # A wrapper script: `nvcc --dryrun` prints the toolkit's own bin folder as TOP=...
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60
            )  # the file need not exist: a dry run only prints the steps
            match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if match:
                root = os.path.realpath(match.group(1))  # TOP is <toolkit>/bin/..
                if _is_toolkit(root):
                    return root
        except (OSError, subprocess.SubprocessError):
            pass
    for root in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_toolkit(root):
            return root
    return None


def cuda_wanted() -> tuple[bool, str | None]:
    mode = os.environ.get("RESNET_FAST_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise RuntimeError(f"RESNET_FAST_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return False, None
    root = find_cuda_home()
    if root is None:
        if mode == "1":
            raise RuntimeError(
                "RESNET_FAST_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root "
                "(the folder that holds bin/nvcc and include/cuda_runtime.h)"
            )
        return False, None
    return True, root


def extensions():
    with_cuda, cuda_home = cuda_wanted()
    if with_cuda:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    if with_cuda and torch.version.cuda is None:
        if os.environ.get("RESNET_FAST_CUDA") == "1":
            raise RuntimeError("RESNET_FAST_CUDA=1 but the installed torch is a CPU-only build")
        with_cuda = False
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

    def rel(pattern):
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]
    # py_limited_api below: the module holds no Python code of its own (ops register through
    # TORCH_LIBRARY), so it builds against the stable ABI like pytorch/extension-cpp.
    define_macros = []
    extra = {"cxx": cxx}
    kind = cpp_extension.CppExtension
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        define_macros.append(("RESNET_FAST_WITH_CUDA", "1"))
        kind = cpp_extension.CUDAExtension
        print(f"resnet_fast: compiling CUDA sources with {cuda_home} for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPU')}")
    else:
        print("resnet_fast: building the CPU kernels only")
    return [
        kind(
            "resnet_fast._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
            py_limited_api=True,
        )
    ], cpp_extension.BuildExtension


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import its helpers
    ext_modules, build_ext = extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext},
        options={"bdist_wheel": {"py_limited_api": "cp311"}},
    )
