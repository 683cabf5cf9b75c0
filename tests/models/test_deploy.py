"""Where people take a trained ResNet next: ONNX (both exporters, run by ONNX Runtime),
TorchScript (script and trace, saved and loaded without resnet_fast), torch.export. A captured
model runs the formulas in torchvision's order (resnet_fast._routing.formulas_only), so its graph
is torchvision's: PyTorch's own ops, no resnet_fast op."""

import collections
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torchvision

import resnet_fast

onnx = pytest.importorskip("onnx", reason="the test extra installs onnx (pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime (pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="the default (dynamo) exporter needs onnxscript, a test extra")

TORCHVISION = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}
# Every architecture (resnet1202 aside: 1202 layers take a minute to export; it is the same blocks).
ARCHS = [a for a in resnet_fast.list_models() if a != "resnet1202"]
# The default (dynamo) exporter takes 2-8 s a model here: one of each kind of block and shortcut.
DYNAMO_ARCHS = ["resnet18", "resnet50", "plain18", "resnet20", "plain20"]


def pair(arch):
    """(ours, reference) with the same weights and non-trivial running statistics, in eval mode:
    the reference is torchvision's model, or for the CIFAR nets ours on the eager backend (the
    formulas, bit-exact with an independent implementation: tests/models/test_cifar.py)."""
    torch.manual_seed(0)
    ours = resnet_fast.get_model(arch)
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    if arch in TORCHVISION:
        ref = TORCHVISION[arch]()
        ref.load_state_dict(ours.state_dict())
    else:
        with resnet_fast.use_backend("eager"):
            ref = resnet_fast.get_model(arch)
        ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def image_for(arch, batch=2):
    size = 32 if arch in resnet_fast.CIFAR_ARCHS else 64
    return torch.randn(batch, 3, size, size)


def export(model, x, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, verbose=False)
    return onnx.load(path)


def op_counts(graph):
    return collections.Counter(n.op_type for n in graph.graph.node)


COMPUTE_OPS = {"Conv", "BatchNormalization", "Relu", "Add", "MaxPool", "GlobalAveragePool", "ReduceMean", "Gemm", "Pad", "Slice"}


def run_onnx(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def close_to_reference(got, ref_model, x):
    """Within float32 rounding of the reference: float64 as the oracle, the reference's own
    float32 error (both layouts) as the yardstick."""
    with torch.no_grad():
        exact = ref_model.double()(x.double())
        ref_model.float()
        yard = max(
            (ref_model(x).double() - exact).abs().max().item(),
            (ref_model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)).double() - exact)
            .abs().max().item(),
        )
        ref_model.to(memory_format=torch.contiguous_format)
    err = (got.double() - exact).abs().max().item()
    assert err <= 2 * yard + 1e-6 * exact.abs().max().item(), (err, yard)


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_export_torchscript_exporter(arch, tmp_path):
    ours, ref = pair(arch)
    x = image_for(arch)
    graph = export(ours, x, str(tmp_path / "ours.onnx"), dynamo=False)
    assert {n.domain for n in graph.graph.node} <= {""}, "no custom op domain"
    ref_graph = export(ref, x, str(tmp_path / "ref.onnx"), dynamo=False)
    assert op_counts(graph) == op_counts(ref_graph)  # torchvision's graph, node for node
    close_to_reference(run_onnx(str(tmp_path / "ours.onnx"), x), ref, x)


@pytest.mark.parametrize("arch", DYNAMO_ARCHS)
def test_onnx_export_default_exporter(arch, tmp_path):
    ours, ref = pair(arch)
    x = image_for(arch)
    graph = export(ours, x, str(tmp_path / "ours.onnx"), dynamo=True)
    assert {n.domain for n in graph.graph.node} <= {""}, "no custom op domain"
    ref_graph = export(ref, x, str(tmp_path / "ref.onnx"), dynamo=True)
    # The same compute, op for op. (Flattening our channels_last activations adds a Gather and a
    # Reshape of shape arithmetic; the conv weights are channels_last where the fused path runs.)
    ours_ops = {k: v for k, v in op_counts(graph).items() if k in COMPUTE_OPS}
    ref_ops = {k: v for k, v in op_counts(ref_graph).items() if k in COMPUTE_OPS}
    assert ours_ops == ref_ops
    close_to_reference(run_onnx(str(tmp_path / "ours.onnx"), x), ref, x)


def test_onnx_export_in_train_mode_behaves_as_torchvisions(tmp_path):
    ours, ref = pair("resnet18")
    x = image_for("resnet18")
    for dynamo in (False, True):
        ours.train(), ref.train()
        got = export(ours, x, str(tmp_path / "ours.onnx"), dynamo)
        want = export(ref, x, str(tmp_path / "ref.onnx"), dynamo)
        assert {k: v for k, v in op_counts(got).items() if k in COMPUTE_OPS} == {
            k: v for k, v in op_counts(want).items() if k in COMPUTE_OPS
        }
        assert ours.training == ref.training


def test_onnx_export_of_unsupported_input_fails_as_torchvisions(tmp_path):
    ours, ref = pair("resnet18")
    bad = torch.randn(2, 4, 64, 64)  # four channels into a 3-channel stem
    with pytest.raises(Exception) as theirs:
        export(ref, bad, str(tmp_path / "ref.onnx"), dynamo=False)
    with pytest.raises(Exception) as mine:
        export(ours, bad, str(tmp_path / "ours.onnx"), dynamo=False)
    assert type(mine.value) is type(theirs.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_torchscript_script_and_trace(arch):
    ours, ref = pair(arch)
    x = image_for(arch)
    scripted = torch.jit.script(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # the trace check finds nothing to warn of
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(ours, x)
    for captured in (scripted, traced):
        kinds = {n.kind() for n in captured.inlined_graph.nodes()}
        assert not any(k.startswith("resnet_fast") for k in kinds), kinds
        with torch.no_grad():
            close_to_reference(captured(x), ref, x)
    # The scripted model keeps working on other sizes, as torchvision's does.
    x1 = image_for(arch, batch=1)
    with torch.no_grad():
        close_to_reference(scripted(x1), ref, x1)


def test_a_scripted_model_loads_without_resnet_fast(tmp_path):
    ours, _ = pair("resnet50")
    cifar, _ = pair("resnet20")
    for name, model in (("resnet50", ours), ("resnet20", cifar)):
        x = image_for(name)
        with torch.no_grad():
            expected = model(x)
        torch.jit.save(torch.jit.script(model), str(tmp_path / f"{name}.pt"))
        torch.save(x, str(tmp_path / f"{name}-x.pt"))
        torch.save(expected, str(tmp_path / f"{name}-y.pt"))
    code = f"""
        import sys, torch
        for name in ("resnet50", "resnet20"):
            m = torch.jit.load("{tmp_path}/" + name + ".pt")
            x, y = torch.load("{tmp_path}/" + name + "-x.pt"), torch.load("{tmp_path}/" + name + "-y.pt")
            with torch.no_grad():
                out = m(x)
            err = (out - y).abs().max().item()
            assert err <= 1e-3 * y.abs().max().item(), (name, err)
        assert not any(k.startswith("resnet_fast") for k in sys.modules), "resnet_fast was imported"
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.parametrize("arch", ["resnet50", "resnet20"])
def test_torch_export(arch):
    ours, ref = pair(arch)
    x = image_for(arch)
    program = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("resnet_fast" in t for t in targets), targets
    with torch.no_grad():
        close_to_reference(program.module()(x), ref, x)
