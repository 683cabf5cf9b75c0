"""CPU inference against the runtimes people deploy with: torchvision's model exported to ONNX
(opset 17) and run by ONNX Runtime (CPU execution provider, all graph optimisations, intra-op
threads = this process's torch threads) and OpenVINO (CPU, PERFORMANCE_HINT LATENCY, f32), the
same weights and input, outputs checked against torchvision before timing, interleaved with
resnet_fast (``model.eval()`` under ``torch.inference_mode()``), each timed call after 0.1 s of
untimed ones of its own (the runtimes' spinning threads would otherwise slow the next one's calls). Also reported: resnet_fast's first
call (folding, prepacking, weight transforms) and the peak memory of a forward beside ONNX
Runtime's, each in a fresh process. Skipped, with the reason, where a runtime is not installed
(``pip install -e '.[bench]'``)."""

import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torchvision

import resnet_fast
import runtimes
from conftest import RESULTS_MEMORY, compare

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (the bench extra: pip install -e '.[bench]')")
pytest.importorskip("onnx", reason="onnx is not installed (the bench extra: pip install -e '.[bench]')")

CASES = [("resnet50", 1), ("resnet50", 8), ("resnet18", 1), ("resnet18", 8), ("resnet56", 128)]


def reference_model(arch):
    if arch in resnet_fast.CIFAR_ARCHS:
        with resnet_fast.use_backend("eager"):
            return resnet_fast.get_model(arch).eval()  # the formulas: torchvision's ops
    return getattr(torchvision.models, arch)().eval()


exported = runtimes.export_onnx


def onnx_runtime(path):
    return ort.InferenceSession(path, runtimes.onnx_runtime_options(), providers=["CPUExecutionProvider"])


def openvino(path):
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (the bench extra: pip install -e '.[bench]')")
    return ov.Core().compile_model(path, "CPU", runtimes.openvino_config())


@pytest.mark.parametrize("arch, batch", CASES, ids=lambda v: str(v))
def test_cpu_inference_against_runtimes(benchmark, arch, batch):
    torch.manual_seed(0)
    ref = reference_model(arch)
    for m in ref.modules():  # non-trivial statistics, as trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    ours = resnet_fast.get_model(arch).eval()
    ours.load_state_dict(ref.state_dict())
    size = 32 if arch in resnet_fast.CIFAR_ARCHS else 224
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        expected = ref(x)
    folder = tempfile.mkdtemp()
    path = exported(ref, x, os.path.join(folder, f"{arch}.onnx"))
    session = onnx_runtime(path)
    feed = {"x": x.numpy()}
    runtimes = {"ONNX Runtime": lambda: session.run(None, feed)}
    try:
        compiled_ov = openvino(path)
        request = compiled_ov.create_infer_request()
        runtimes["OpenVINO"] = lambda: request.infer({0: x.numpy()})
    except pytest.skip.Exception as exc:
        benchmark.extra_info["OpenVINO"] = str(exc)
    # The outputs agree before anything is timed.
    scale = float(expected.abs().max())
    for name, fn in runtimes.items():
        got = fn()
        got = torch.from_numpy(got[0] if isinstance(got, list) else next(iter(got.values())))
        assert (got - expected).abs().max().item() <= 1e-3 * scale, name
    with torch.inference_mode():
        assert (ours(x) - expected).abs().max().item() <= 1e-3 * scale

    def resnet_fast_forward():
        with torch.inference_mode():
            ours(x)

    compare(benchmark, f"CPU inference {arch}, batch {batch}, fp32", batch, resnet_fast_forward, runtimes,
            pairs=25 if batch == 1 else 9, rounds=5 if batch == 1 else 3, settle=0.1)


FIRST_CALL = """
import sys, time, torch, resnet_fast
arch, batch = sys.argv[1], int(sys.argv[2])
model = resnet_fast.get_model(arch).eval()
x = torch.randn(batch, 3, 224, 224)
t0 = time.perf_counter()
with torch.inference_mode():
    model(x)
first = time.perf_counter() - t0
t0 = time.perf_counter()
with torch.inference_mode():
    model(x)
print(first, time.perf_counter() - t0)
"""

PEAK = """
import resource, sys, torch
mode, arch, batch, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
x = torch.randn(batch, 3, 224, 224)
def status_mib(field):  # VmHWM (the peak) or VmRSS (now), from /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024
if mode == "resnet_fast":
    import resnet_fast
    model = resnet_fast.get_model(arch).eval()
    run = lambda: model(x)
else:
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = torch.get_num_threads()
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    run = lambda: s.run(None, {"x": x.numpy()})
start = status_mib("VmRSS")
with torch.inference_mode():
    run()
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the peak of the next forward
    base = status_mib("VmHWM")
    run()
# The second forward's peak above the memory before it; the process's resident memory after the
# two forwards above that before the first (one-time state: folded / prepacked weights, arenas).
print(status_mib("VmHWM") - base, status_mib("VmRSS") - start)
"""


def test_first_call_and_peak_memory(benchmark):
    """ResNet-50's first call (folding BatchNorm, prepacking for oneDNN, Winograd transforms) in a
    fresh process, and the peak memory of a batch-8 forward beside ONNX Runtime's."""
    first, steady = map(float, subprocess.run([sys.executable, "-c", FIRST_CALL, "resnet50", "1"], capture_output=True,
                                               text=True, check=True).stdout.split())
    benchmark.extra_info["resnet50 first call s"] = round(first, 3)
    folder = tempfile.mkdtemp()
    path = exported(torchvision.models.resnet50().eval(), torch.randn(8, 3, 224, 224), os.path.join(folder, "r50.onnx"))
    # Every large buffer its own mapping, so that the peak is what a forward holds at once; for
    # resnet_fast without resnet_fast._memory's malloc settings, which keep freed buffers (the
    # resident memory after forwards is reported with them).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")

    def peak(mode, keep=False):
        run_env = dict(env, RESNET_FAST_KEEP_FREED_MEMORY="1" if keep else "0")
        out = subprocess.run([sys.executable, "-c", PEAK, mode, "resnet50", "8", path], capture_output=True, text=True,
                             check=True, env=run_env if mode == "resnet_fast" else env).stdout.split()
        return float(out[0]), float(out[1])

    def measure():
        return peak("resnet_fast"), peak("resnet_fast", keep=True), peak("onnxruntime")

    ours, ours_kept, theirs = benchmark.pedantic(measure, rounds=1, iterations=1)
    RESULTS_MEMORY.append(("ResNet-50 inference, batch 8: peak growth of a forward",
                           {"resnet_fast": ours[0], "onnxruntime": theirs[0]}))
    RESULTS_MEMORY.append(("ResNet-50 inference, batch 8: resident after 2 forwards, above before",
                           {"resnet_fast": ours[1], "resnet_fast (freed memory kept)": ours_kept[1], "onnxruntime": theirs[1]}))
    RESULTS_MEMORY.append(("ResNet-50 first call, batch 1 (s; then a steady call)", {"first": first, "steady": steady}))
    assert first < 1.0, f"the first call took {first:.2f} s (folding, prepacking, transforms)"
