"""Where a CPU inference forward's time goes, layer by layer, beside ONNX Runtime's and OpenVINO's.

    python bench/profile_layers.py --arch resnet50 --batch 1

resnet_fast: every fused convolution (conv + folded BatchNorm + add + ReLU, the projection
shortcuts included) timed inside the whole network's forward (wall clock around each call, Python
included: what the network pays for it), grouped by shape and by the path the routing chose
(``winograd``: conv3x3_bias_act, ``gemm``: conv_bias_act, ``onednn``: oneDNN with post-ops), and
the rest of the forward (pooling, the classifier, Python between the layers) as one line; then
the same for the planned forward, each of its steps timed in place (what a user's ``model(x)``
runs: no Python between the layers; the ratios are to it). ONNX Runtime: its own profiler's
kernel times for the same convolutions; OpenVINO: its per-node counters (``PERF_COUNT``, which slow its forward a little:
its wall clock with them is the one shown). Both run torchvision's model exported to ONNX (opset
17) with the bench's settings (all graph optimisations, the same threads). Times are medians per
forward, in ms. Run it on a quiet machine: it measures, it does not interleave.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import statistics
import tempfile
import time

import torch
import torchvision

import resnet_fast
import runtimes
from resnet_fast import _plan, _routing
from resnet_fast.models import resnet as _resnet_models
from resnet_fast.nn import blocks as _blocks
from resnet_fast.nn import functional as _functional


def layer_key(x_shape, conv, residual) -> tuple:
    """(input C, H, W), output channels, kernel, stride, with a residual."""
    return (tuple(x_shape[1:]), conv.out_channels, conv.kernel_size[0], conv.stride[0], residual)


def layer_macs(key, batch: int, path: str) -> tuple[int, int]:
    """(the direct convolution's multiply-adds, the multiplies its path runs) for one convolution
    of ``key``'s kind (padding ``kernel // 2``, as in the residual nets): Winograd F(2x2, 3x3)
    runs 16 per 2x2 output tile and channel pair (its map padded to whole tiles), the others the
    direct convolution's."""
    (c, h, w), k, r, s, _ = key
    oh, ow = (h + 2 * (r // 2) - r) // s + 1, (w + 2 * (r // 2) - r) // s + 1
    direct = batch * oh * ow * k * c * r * r
    if path == "winograd":
        return direct, batch * ((oh + 1) // 2) * ((ow + 1) // 2) * 16 * c * k
    return direct, direct


def gemm_rate(repeats: int = 200) -> float:
    """GFLOP/s of our GEMM (conv_bias_act, the routing's register tiles) on a 1x1 convolution
    whose operands stay in cache, (1, 256, 12, 12) to 256 channels, on this process's threads: the
    rate its kernels reach where memory does not hold them back (the best of 5 runs)."""
    x = torch.randn(1, 256, 12, 12).contiguous(memory_format=torch.channels_last)
    weight, bias = resnet_fast.ops.pack_conv_weight(torch.randn(256, 256, 1, 1)), torch.randn(256)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(20):
            resnet_fast.ops.conv_bias_act(x, weight, bias)
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                resnet_fast.ops.conv_bias_act(x, weight, bias)
            best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * 144 * 256 * 256 / best / 1e9


def profile_resnet_fast(model, x, forwards: int) -> tuple[dict, dict, float, list]:
    """Per-layer-kind median ms per forward, the path of each kind, the median forward in ms, and
    the kinds of a forward's convolutions in the order they ran (tests/test_profile_layers.py
    holds their count to the model's: each entry point of the models' fused convolutions is
    patched here)."""
    original, original_source = _functional.conv_bn_act, _functional.conv_bn_relu_source
    original_stem, original_projection = _functional.stem_conv_bn_act, _functional.projection_bn
    times: dict[tuple, list[float]] = collections.defaultdict(list)
    paths: dict[tuple, str] = {}
    current: dict[tuple, float] = collections.defaultdict(float)
    order: list[tuple] = []  # the keys in the order of the calls, in the last forward

    def timed_call(fn, x, conv, bn, residual, *args, **kwargs):
        key = layer_key(x.shape, conv, residual is not None)
        if key not in paths:  # (asked once, in the first forward: not timed again in the others)
            paths[key] = _routing.conv_bn_inference_plan(x, conv, bn) or "unfused"
        t0 = time.perf_counter()
        y = fn(x, conv, bn, *args, **kwargs)
        current[key] += time.perf_counter() - t0
        order.append(key)
        return y

    def timed(x, conv, bn, residual=None, relu=True, residual_stride=1, input_source=None):
        return timed_call(original, x, conv, bn, residual, residual, relu, residual_stride, input_source)

    def timed_source(x, conv, bn, input_source=None):  # a block's first units (conv_bn_relu_source)
        return timed_call(original_source, x, conv, bn, None, input_source)

    def timed_stem(x, conv, bn):  # the network's first unit (stem_conv_bn_act)
        return timed_call(original_stem, x, conv, bn, None)

    def timed_projection(x, conv, bn):  # a projection shortcut (projection_bn)
        return timed_call(original_projection, x, conv, bn, None)

    totals = []
    _blocks.conv_bn_act = timed
    _blocks.conv_bn_relu_source = timed_source
    _blocks.projection_bn = timed_projection
    _resnet_models.stem_conv_bn_act = timed_stem
    plan_forward, _routing.PLAN_FORWARD = _routing.PLAN_FORWARD, False  # (a replay would call none of them)
    try:
        with torch.inference_mode():
            for i in range(forwards + 3):
                current.clear()
                order.clear()
                t0 = time.perf_counter()
                model(x)
                if i >= 3:  # after warm-up: folding, prepacking, allocator
                    totals.append(time.perf_counter() - t0)
                    for k, v in current.items():
                        times[k].append(v)
    finally:
        _blocks.conv_bn_act = original
        _blocks.conv_bn_relu_source = original_source
        _blocks.projection_bn = original_projection
        _resnet_models.stem_conv_bn_act = original_stem
        _routing.PLAN_FORWARD = plan_forward
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return medians, paths, statistics.median(totals) * 1e3, list(order)


# The ops a fused convolution records in a plan: one per convolution, whatever its path.
CONV_OPS = {"resnet_fast::conv_bias_act", "resnet_fast::conv_bias_act_", "resnet_fast::conv3x3_bias_act",
            "resnet_fast::conv3x3_bias_act_", "mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_"}


def profile_planned(model, x, forwards: int, order: list) -> tuple[dict, float]:
    """The planned forward (what a user's ``model(x)`` runs: no Python between the layers), each
    of its steps timed in place: per-layer-kind median ms per forward (its convolutions matched in
    order with ``order``, the kinds of the modules' forward) and the median forward in ms."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        plan = _plan.plan_of(model, x)
        if plan is None:
            raise RuntimeError(f"{type(model).__name__} has no plan for this input: nothing to time")
        runs, totals = [], []
        for _ in range(forwards):
            steps: list = []
            t0 = time.perf_counter()
            plan(x, steps)
            totals.append(time.perf_counter() - t0)
            convs = [seconds for func, seconds in steps if func._schema.name in CONV_OPS]
            if len(convs) != len(order):
                raise RuntimeError(f"the plan has {len(convs)} convolutions, the modules' forward {len(order)}")
            run: dict[tuple, float] = collections.defaultdict(float)
            for key, seconds in zip(order, convs):
                run[key] += seconds * 1e3
            runs.append(run)
    return _medians(runs), statistics.median(totals) * 1e3


def export_onnx(reference, x) -> str:
    """torchvision's model exported to ONNX as the runtimes bench exports it, in a scratch folder."""
    return runtimes.export_onnx(reference, x, os.path.join(tempfile.mkdtemp(), "model.onnx"))


def onnx_conv_shapes(path: str) -> dict[str, tuple]:
    """Each Conv node's name in the exported graph -> (input (C, H, W), output channels, kernel):
    with whether it carries a block's residual add (which each runtime says for itself), the key
    the runtimes' times are matched on (neither reports a stride; these tell a ResNet's
    convolutions apart)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info})
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    return {
        n.name: (tuple(shapes[n.input[0]][1:]), shapes[n.input[1]][0], shapes[n.input[1]][2])
        for n in graph.node
        if n.op_type == "Conv"
    }


def profile_onnxruntime(path: str, x, forwards: int) -> tuple[dict, float]:
    """ONNX Runtime's kernel times per convolution key (and ("other",)), median ms per forward,
    and its median forward."""
    import onnxruntime as ort

    options = runtimes.onnx_runtime_options()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(os.path.dirname(path), "ort")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    totals = []
    for i in range(forwards + 3):
        t0 = time.perf_counter()
        session.run(None, feed)
        if i >= 3:
            totals.append(time.perf_counter() - t0)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    # Each forward's kernels by time: the profile writes a run's event after its kernels' events.
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs: list[dict[tuple, float]] = [collections.defaultdict(float) for _ in starts]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        args = e["args"]
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        if args.get("op_name") in ("Conv", "FusedConv") and len(shapes) >= 2:
            x_shape, w_shape = shapes[0], shapes[1]
            key = (tuple(x_shape[1:]), w_shape[0], w_shape[2], len(shapes) > 3)
        else:
            key = ("other",)
        runs[bisect.bisect_right(starts, e["ts"]) - 1][key] += e["dur"] / 1e3
    return _medians(runs[3:]), statistics.median(totals) * 1e3


def profile_openvino(path: str, x, forwards: int) -> tuple[dict, float]:
    """OpenVINO's per-node times (its performance counters) per convolution key (and
    ("other",)), median ms per forward, and its median forward with the counters on."""
    import openvino

    compiled = openvino.Core().compile_model(path, "CPU", {**runtimes.openvino_config(), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    # A node of the compiled model runs a convolution with what was fused into it (the block's
    # Add and ReLU) and keeps the convolution's name, with "/WithoutBiases" after it.
    conv_shapes = onnx_conv_shapes(path)
    keys = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        name = op.get_friendly_name()
        shape = conv_shapes.get(name.removesuffix("/WithoutBiases"))
        if shape is not None:
            fused = op.get_rt_info()["originalLayersNames"].astype(str).split(",")
            keys[name] = shape + (any(layer.endswith("/Add") for layer in fused),)
    runs, totals = [], []
    for i in range(forwards + 3):
        t0 = time.perf_counter()
        request.infer({0: x.numpy()})
        if i < 3:
            continue
        totals.append(time.perf_counter() - t0)
        run: dict[tuple, float] = collections.defaultdict(float)
        for node in request.get_profiling_info():
            key = keys.get(node.node_name, ("other",))
            run[key] += node.real_time.total_seconds() * 1e3
        runs.append(run)
    return _medians(runs), statistics.median(totals) * 1e3


def _medians(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r}
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--forwards", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    reference = getattr(torchvision.models, args.arch)().eval()
    model = resnet_fast.get_model(args.arch).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(args.batch, 3, 224, 224)
    ours, paths, ours_total, order = profile_resnet_fast(model, x, args.forwards)
    if _routing.PLAN_FORWARD:
        planned, planned_total = profile_planned(model, x, args.forwards, order)
    else:
        planned, planned_total = {}, float("nan")
    path = export_onnx(reference, x)
    runtimes = {}
    for name, profile in (("ORT", profile_onnxruntime), ("OV", profile_openvino)):
        try:
            runtimes[name] = profile(path, x, args.forwards)
        except ImportError:  # (not installed: the bench extra)
            runtimes[name] = ({}, float("nan"))
    nan = float("nan")
    print(f"{args.arch}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("ms per forward; 'modules': each convolution timed in the modules' forward (its Python included), "
          "'plan': in the planned forward (what model(x) runs); the ratios are to 'plan'")
    print("GF/s: the direct convolution's multiply-adds x 2 per second in the planned forward (Winograd's"
          " exceed the machine's rate: it runs 16/36 of the multiplies); n: convolutions of the kind")
    print(f"{'input (C, H, W)':<18} {'out':>5} {'k':>2} {'s':>2} {'res':>4} {'n':>3} {'path':>9} {'modules':>8} "
          f"{'plan':>8} {'GF/s':>6}" + "".join(f" {name:>8} {name + '/plan':>8}" for name in runtimes))
    counts = collections.Counter(order)
    macs = {key: layer_macs(key, args.batch, paths[key]) for key in ours}
    for key in sorted(ours, key=lambda k: -ours[k]):
        mine = planned.get(key, nan)
        theirs = [times.get((key[0], key[1], key[2], key[4]), nan) for times, _ in runtimes.values()]
        rate = 2 * macs[key][0] * counts[key] / (mine * 1e-3) / 1e9
        print(f"{str(key[0]):<18} {key[1]:>5} {key[2]:>2} {key[3]:>2} {'yes' if key[4] else 'no':>4} "
              f"{counts[key]:>3} {paths[key]:>9} {ours[key]:8.3f} {mine:8.3f} {rate:6.0f}"
              + "".join(f" {t:8.3f} {t / mine:8.2f}" for t in theirs))
    print(f"{'convolutions':<56} {sum(ours.values()):8.3f} {sum(planned.values()):8.3f} {'':>6}"
          + "".join(f" {sum(v for k, v in times.items() if k != ('other',)):8.3f} {'':>8}" for times, _ in runtimes.values()))
    print(f"{'rest (pooling, fc, Python between layers)':<56} {ours_total - sum(ours.values()):8.3f} "
          f"{planned_total - sum(planned.values()):8.3f} {'':>6}"
          + "".join(f" {times.get(('other',), nan):8.3f} {'':>8}" for times, _ in runtimes.values()))
    print(f"{'forward (wall clock; OV with its counters on)':<56} {ours_total:8.3f} {planned_total:8.3f} {'':>6}"
          + "".join(f" {total:8.3f} {total / planned_total:8.2f}" for _, total in runtimes.values()))
    # What the multiplies alone would take at the rate our GEMM reaches in cache: a floor for any
    # kernel that runs them (the runtimes run the direct convolution's, all of them).
    direct = sum(macs[k][0] * n for k, n in counts.items())
    run = sum(macs[k][1] * n for k, n in counts.items())
    rate = gemm_rate()
    print(f"multiply-adds per forward: {direct / 1e9:.3f} G direct, {run / 1e9:.3f} G run (Winograd's at 16 per "
          f"tile); our GEMM in cache: {rate:.0f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"  at that rate: ours {2e3 * run / (rate * 1e9):.2f} ms (the convolutions take "
          f"{sum(planned.values()):.2f}), the direct convolution {2e3 * direct / (rate * 1e9):.2f} ms"
          + "".join(f"; {name} at {2 * direct / (sum(v for k, v in times.items() if k != ('other',)) * 1e-3) / 1e9:.0f}"
                    f" GFLOP/s" for name, (times, _) in runtimes.items() if times))

if __name__ == "__main__":
    main()
