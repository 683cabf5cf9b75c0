"""Where a CPU inference forward's time goes, layer by layer, beside ONNX Runtime's.

    python bench/profile_layers.py --arch resnet50 --batch 1

resnet_fast: every fused convolution (conv + folded BatchNorm + add + ReLU) timed inside the
whole network's forward (wall clock around each call, Python included: what the network pays
for it), grouped by shape and by the path the routing chose (``winograd``: conv3x3_bias_act,
``onednn``: oneDNN with post-ops); the rest of the forward (pooling, the classifier, Python
between the layers) as one line, and the planned forward's wall clock after it (the per-layer
timing runs the modules' forward; a user's ``model(x)`` replays the plan). ONNX Runtime: its own
profiler's kernel times for the same convolutions (torchvision's model exported to ONNX, opset 17;
all graph optimisations, spinning off, the same threads). Times are medians per forward, in ms. Run it on a quiet machine: it
measures, it does not interleave.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
import warnings

import torch
import torchvision

import resnet_fast
from resnet_fast import _routing
from resnet_fast.models import resnet as _resnet_models
from resnet_fast.nn import blocks as _blocks
from resnet_fast.nn import functional as _functional


def layer_key(x_shape, conv, residual) -> tuple:
    """(input C, H, W), output channels, kernel, stride, with a residual."""
    return (tuple(x_shape[1:]), conv.out_channels, conv.kernel_size[0], conv.stride[0], residual)


def profile_resnet_fast(model, x, forwards: int) -> tuple[dict, dict, float]:
    """Per-layer-kind median ms per forward, the path of each kind, the median forward in ms."""
    original, original_source = _functional.conv_bn_act, _functional.conv_bn_relu_source
    original_stem = _functional.stem_conv_bn_act
    times: dict[tuple, list[float]] = collections.defaultdict(list)
    paths: dict[tuple, str] = {}
    current: dict[tuple, float] = collections.defaultdict(float)

    def timed_call(fn, x, conv, bn, residual, *args, **kwargs):
        key = layer_key(x.shape, conv, residual is not None)
        if key not in paths:  # (asked once, in the first forward: not timed again in the others)
            paths[key] = _routing.conv_bn_inference_plan(x, conv, bn) or "unfused"
        t0 = time.perf_counter()
        y = fn(x, conv, bn, *args, **kwargs)
        current[key] += time.perf_counter() - t0
        return y

    def timed(x, conv, bn, residual=None, relu=True, residual_stride=1, input_source=None):
        return timed_call(original, x, conv, bn, residual, residual, relu, residual_stride, input_source)

    def timed_source(x, conv, bn, input_source=None):  # a block's first units (conv_bn_relu_source)
        return timed_call(original_source, x, conv, bn, None, input_source)

    def timed_stem(x, conv, bn):  # the network's first unit (stem_conv_bn_act)
        return timed_call(original_stem, x, conv, bn, None)

    totals = []
    _blocks.conv_bn_act = timed
    _blocks.conv_bn_relu_source = timed_source
    _resnet_models.stem_conv_bn_act = timed_stem
    plan_forward, _routing.PLAN_FORWARD = _routing.PLAN_FORWARD, False  # (a replay would call none of them)
    try:
        with torch.inference_mode():
            for i in range(forwards + 3):
                current.clear()
                t0 = time.perf_counter()
                model(x)
                if i >= 3:  # after warm-up: folding, prepacking, allocator
                    totals.append(time.perf_counter() - t0)
                    for k, v in current.items():
                        times[k].append(v)
    finally:
        _blocks.conv_bn_act = original
        _blocks.conv_bn_relu_source = original_source
        _resnet_models.stem_conv_bn_act = original_stem
        _routing.PLAN_FORWARD = plan_forward
    return ({k: statistics.median(v) * 1e3 for k, v in times.items()}, paths, statistics.median(totals) * 1e3)


def planned_forward_ms(model, x, forwards: int) -> float:
    """The median wall clock of the planned forward (what a user's ``model(x)`` runs: no Python
    between the layers), which the per-layer timing above must turn off."""
    totals = []
    with torch.inference_mode():
        for i in range(forwards + 3):
            t0 = time.perf_counter()
            model(x)
            if i >= 3:
                totals.append(time.perf_counter() - t0)
    return statistics.median(totals) * 1e3


def profile_onnxruntime(reference, x, forwards: int) -> tuple[dict, float]:
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(reference, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
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
    runs: list[dict[tuple, float]] = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(collections.defaultdict(float))
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not runs:
            continue
        args = e["args"]
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        if args.get("op_name") in ("Conv", "FusedConv") and len(shapes) >= 2:
            x_shape, w_shape = shapes[0], shapes[1]
            key = (tuple(x_shape[1:]), w_shape[0], w_shape[2], None, len(shapes) > 3)
        else:
            key = ("other",)
        runs[-1][key] += e["dur"] / 1e3
    runs = runs[3:]
    keys = {k for r in runs for k in r}
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}, statistics.median(totals) * 1e3


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
    ours, paths, ours_total = profile_resnet_fast(model, x, args.forwards)
    planned = planned_forward_ms(model, x, args.forwards) if _routing.PLAN_FORWARD else float("nan")
    try:
        theirs, theirs_total = profile_onnxruntime(reference, x, args.forwards)
    except ImportError:
        theirs, theirs_total = {}, float("nan")
    # ONNX Runtime's shapes carry no stride: matched on (input, output channels, kernel, residual),
    # which tell a ResNet's convolutions apart.
    by_shape: dict[tuple, float] = collections.defaultdict(float)
    for k, v in theirs.items():
        if k != ("other",):
            by_shape[(k[0], k[1], k[2], k[4])] += v
    print(f"{args.arch}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'input (C, H, W)':<18} {'out':>5} {'k':>2} {'s':>2} {'res':>4} {'path':>9} {'ours ms':>8} {'ORT ms':>8} {'ORT/ours':>8}")
    for key in sorted(ours, key=lambda k: -ours[k]):
        ort_ms = by_shape.get((key[0], key[1], key[2], key[4]), float("nan"))
        print(f"{str(key[0]):<18} {key[1]:>5} {key[2]:>2} {key[3]:>2} {'yes' if key[4] else 'no':>4} {paths[key]:>9} "
              f"{ours[key]:8.3f} {ort_ms:8.3f} {ort_ms / ours[key]:8.2f}")
    rest = ours_total - sum(ours.values())
    print(f"{'rest (pooling, fc, Python between layers)':<52} {rest:8.3f} {theirs.get(('other',), float('nan')):8.3f}")
    print(f"{'forward (wall clock)':<52} {ours_total:8.3f} {theirs_total:8.3f} {theirs_total / ours_total:8.2f}")
    print(f"{'planned forward (wall clock: what model(x) runs)':<52} {planned:8.3f} {theirs_total:8.3f} "
          f"{theirs_total / planned:8.2f}")


if __name__ == "__main__":
    main()
