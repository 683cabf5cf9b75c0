"""How the benches build the CPU runtimes they compare with, in one place: bench/test_runtimes.py
times them, bench/profile_layers.py profiles them. torchvision's model exported to ONNX (opset 17);
ONNX Runtime's CPU execution provider with all graph optimisations; OpenVINO's CPU plugin with the
LATENCY hint in f32; both with this process's torch threads."""

import warnings

import torch


def export_onnx(model, x, path: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    return path


def onnx_runtime_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    return options


def openvino_config() -> dict:
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": torch.get_num_threads()}
