"""Benchmark helpers: interleaved A/B timing in one process, and a summary table at the end.

pytest-benchmark times the candidate (resnet_fast) for its own statistics; :func:`compare`
then runs the candidate and every baseline alternately, pair after pair, and records the
median of the per-pair time ratios: shared machines drift, ratios taken side by side hold.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import pytest
import torch

RESULTS: list[dict] = []
RESULTS_MEMORY: list[tuple[str, dict]] = []  # (workload, {configuration: peak MiB})


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _time(fn, settle: float = 0.0) -> float:
    if settle > 0:  # untimed calls of its own for at least `settle` seconds, at least one
        t0 = time.perf_counter()
        fn()
        while time.perf_counter() - t0 < settle:
            fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(benchmark, name: str, items: int, candidate, baselines: dict, pairs: int = 5, rounds: int = 3,
            extra: dict | None = None, settle: float = 0.0) -> dict:
    """Benchmarks ``candidate`` and records ``candidate`` vs each baseline, interleaved.

    items: images (or elements) per call, for the throughput column.
    settle: seconds of untimed calls (at least one) before each timed one, for baselines with
    thread pools of their own: a runtime's idle threads spin after its call (ONNX Runtime's by
    default, OpenVINO's and OpenMP's too) and slow whatever runs next on the same cores, for
    longer than one short call: on the 2-core Xeon (2026-12-02) resnet_fast's ResNet-18 batch-1
    forwards right after an ONNX Runtime call took 22.0, 17.9, 9.5, 9.0 ms, and alone 8.7; with one
    settling call the timed ones ran 9.8 ms (resnet_fast) and 13.3 ms (OpenVINO, alone 9.0), with
    50 ms of them 8.7-8.9 and 9.3-9.4 (the bench gives 0.1 s). So each timed call follows enough
    of its own, as it would in a process that serves with that runtime alone.
    extra: more fields for the row (e.g. ``bytes``, the traffic model's bytes per call, from which
    the row gets the achieved ``gb_per_s``). With ``RESNET_FAST_BENCH_JSONL`` set, each row is
    also appended to that file as it is measured (bench/gpu_check.py reads it).
    Returns {baseline: median speed-up of the candidate}.
    """
    for fn in (candidate, *baselines.values()):  # warm-up: allocator, oneDNN primitive caches
        fn()
    benchmark.pedantic(candidate, rounds=rounds, iterations=1, warmup_rounds=0)
    ratios = {b: [] for b in baselines}
    cand_times = []
    for _ in range(pairs):
        t = _time(candidate, settle)
        cand_times.append(t)
        for b, fn in baselines.items():
            ratios[b].append(_time(fn, settle) / t)
    speedups = {b: statistics.median(r) for b, r in ratios.items()}
    seconds = statistics.median(cand_times)
    row = {"name": name, "items_per_s": items / seconds, "seconds": seconds, "speedups": speedups, **(extra or {})}
    if "bytes" in row:
        row["gb_per_s"] = row["bytes"] / seconds / 1e9
    RESULTS.append(row)
    path = os.environ.get("RESNET_FAST_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    benchmark.extra_info.update({f"speedup_vs_{b}": round(s, 3) for b, s in speedups.items()})
    benchmark.extra_info["items_per_s"] = round(row["items_per_s"], 2)
    return speedups


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if RESULTS_MEMORY:
        tr.section("resnet_fast: peak memory growth of 3 training steps (MiB, fresh process each)")
        for name, peaks in RESULTS_MEMORY:
            tr.write_line(f"{name:<44} " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()))
    if not RESULTS:
        return
    tr.section("resnet_fast: speed-up over each baseline (median of interleaved pairs)")
    tr.write_line(f"machine: {machine()}")
    tr.write_line(f"{'workload':<44} {'resnet_fast /s':>14}  speed-up vs baseline")
    for row in RESULTS:
        ups = ", ".join(f"{b} {s:.2f}x" for b, s in row["speedups"].items())
        tr.write_line(f"{row['name']:<44} {row['items_per_s']:>14.1f}  {ups}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
