"""The README's op table (what runs where) against the code, so that it cannot drift: every fused
op has a row; its formula exists; the files it names register the op for that device (or, where it
says PyTorch's or cuDNN's, none does); the routing functions it names exist."""

import os
import re

import pytest

from resnet_fast import _backend, _routing
from resnet_fast.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTORCHS = ("PyTorch's", "cuDNN's")


def op_table() -> dict[str, list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("### What runs where", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[re.match(r"`(\w+)`", cells[0]).group(1)] = cells[1:]
    return rows


def registers(path: str, key: str, op: str) -> bool:
    """Whether the C++ file registers ``op`` for dispatch key ``key``."""
    text = open(os.path.join(ROOT, path)).read()
    blocks = re.findall(r"TORCH_LIBRARY_IMPL\(resnet_fast, (\w+), m\) \{(.*?)\n\}", text, re.S)
    return any(k == key and f'm.impl("{op}"' in body for k, body in blocks)


def cxx_files(folder: str) -> list[str]:
    return [os.path.join("csrc", folder, f) for f in os.listdir(os.path.join(ROOT, "csrc", folder)) if f.endswith((".cpp", ".cu"))]


TABLE = op_table()


def test_every_fused_op_has_a_row():
    assert set(TABLE) == set(_backend.FUSED_OPS)


@pytest.mark.parametrize("op", sorted(TABLE))
def test_a_row_says_what_the_code_does(op):
    formula, cpu, cuda, triton, routing = TABLE[op][:5]
    assert hasattr(reference, re.search(r"reference\.(\w+)", formula).group(1))
    cpu_file = re.search(r"`(csrc/cpu/\w+\.cpp)`", cpu).group(1)
    assert registers(cpu_file, "CPU", op), (op, cpu_file)
    cuda_file = re.search(r"`(csrc/cuda/\w+\.cu)`", cuda)
    if cuda_file:
        assert registers(cuda_file.group(1), "CUDA", op), (op, cuda_file.group(1))
    else:
        assert cuda.startswith(PYTORCHS) and not any(registers(f, "CUDA", op) for f in cxx_files("cuda")), op
    launchers = open(os.path.join(ROOT, "resnet_fast", "triton", "__init__.py")).read()
    triton_file = re.search(r"`(triton/\w+\.py)`", triton)
    if triton_file:
        assert re.search(rf'"{op}": _\w+\.{op},', launchers), op
        assert f"def {op}(" in open(os.path.join(ROOT, "resnet_fast", triton_file.group(1))).read(), op
    else:
        assert triton.startswith(PYTORCHS) and f'"{op}":' not in launchers, op
    names = re.findall(r"`(\w+)`", routing)
    assert names and all(callable(getattr(_routing, n, None)) for n in names), (op, names)
