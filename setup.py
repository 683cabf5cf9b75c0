"""Builds the torch extension ``resnet_fast._C`` from ``csrc/``, against the torch that is
installed (any release from ``MIN_TORCH`` on; a C++ extension must be compiled against the torch
it runs with).

* ``pip install --no-build-isolation -e .`` compiles against the environment's torch directly.
* ``pip install -e .`` (an isolated build) asks pip for exactly the environment's torch release in
  the build environment (``setup_requires``, read by setuptools' ``get_requires_for_build_*``),
  so that the extension matches it too; with no torch installed yet, the newest supported one.

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
# The oldest torch the extension builds against. Releases after the newest one tested (README,
# "Supported torch releases") are not refused: the C++ API the kernels use has been stable.
MIN_TORCH = (2, 11)
TESTED_TORCH = "2.11 and 2.14"


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as "2.14.1+cu130" or "2.15.0.dev20261101"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise RuntimeError(f"cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: str) -> None:
    """Refuses a torch older than MIN_TORCH, naming the supported range."""
    if torch_release(version) < MIN_TORCH:
        raise RuntimeError(
            f"resnet_fast needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer (tested with {TESTED_TORCH}); this "
            f"environment has torch {version}. Install a supported release, e.g. "
            f"pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}' and its torchvision, then build again."
        )


def target_torch_version() -> str | None:
    """The torch release of the environment being installed into, or None. In pip's isolated build
    environment that torch is hidden from sys.path, but its metadata is still in the interpreter's
    own site-packages (sysconfig's purelib and platlib)."""
    import sysconfig
    from importlib import metadata

    paths = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def build_requirements() -> list[str]:
    """What an isolated build needs beyond pyproject's build-system: the environment's own torch
    release (its public version: pip matches a local build such as +cpu with it), else a
    supported one."""
    version = target_torch_version()
    if version is None:
        return [f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}"]
    check_torch_version(version)
    return [f"torch=={version.split('+')[0]}"]


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


def cubin_archs(path: str) -> set[int]:
    """SM architectures of the cubins embedded in a shared library (tests/test_build.py and
    bench/gpu_check.py check a build with it).

    The toolkit here has no cuobjdump, so read the embedded device ELF images directly: each
    is an ELF file with e_machine EM_CUDA (190); in the ELF ABI that nvcc 12.x/13.x writes
    (OS ABI 0x41, ABI version >= 8) the SM version sits in bits 8-15 of e_flags, in older ones
    in bits 0-7.
    """
    import struct

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

    check_torch_version(torch.__version__)
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


def torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import its helpers
    if not torch_importable():
        # pip's isolated build asking what it needs (get_requires_for_build_*): torch, the release
        # the package will run with. Nothing is built in this pass.
        setup(setup_requires=build_requirements())
    else:
        ext_modules, build_ext = extensions()
        setup(
            ext_modules=ext_modules,
            cmdclass={"build_ext": build_ext},
            options={"bdist_wheel": {"py_limited_api": "cp311"}},
        )
