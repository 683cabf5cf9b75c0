"""The GPU check: everything a lent GPU can tell about resnet_fast, from one command.

    python bench/gpu_check.py OUTDIR            # on a machine with an NVIDIA GPU (or bench/gpu_check.sh)
    python bench/gpu_check.py --rehearse OUTDIR # here, without one: every stage that can run

Run from a checkout with a Python that already has torch and triton (no network needed: the
build uses --no-build-isolation and fetches nothing). Stages, each in its own process and time box
(a stage that overruns is stopped and reported as such; later stages still run, and a failure in
one never hides the others' results):

1. ``machine``  nvidia-smi, torch / triton / CUDA versions, the device's name and capability.
2. ``ceilings`` a large device-to-device copy (GB/s, bytes read + written) and a large bf16 matmul
   (TFLOP/s): what the memory-bound kernels are measured against.
3. ``build``    the extension in place against this torch, for the detected architecture only
   (``TORCH_CUDA_ARCH_LIST``), with all cores. Rehearsal: for ``--arch`` (default 9.0) into
   OUTDIR/build, leaving the installed build alone.
4. ``tests``    groups of GPU tests: the CUDA C++ kernels against the formulas, the Triton kernels
   compiled (under the interpreter in a rehearsal), the whole-network GPU tests (CUDA graphs, AMP,
   determinism, torch.compile, ResNet-50/ResNet-20 training steps against the eager backend).
5. ``bench``    bench/test_gpu.py: each fused op against eager and torch.compile with its GB/s
   beside the traffic model's prediction, ResNet-50 at batch 256 (training and inference, bf16 AMP
   and fp32), CIFAR ResNet-20 training, issue 18's NormConvolution (norm_conv) forward, and forward
   with its fused backward, against cuDNN's convolution and the statistics passes.
6. ``summary``  OUTDIR/summary.md (one table) and OUTDIR/summary.json; the table is printed last.

The budgets below add up to under 8 minutes on a 16-core machine with one H200; they come from
what this machine measures for the same stages (see the README's GPU section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("machine", "ceilings", "build", "tests", "bench", "summary")
# Seconds per stage; the tests and bench stages are the sums of their groups' budgets below.
# machine and ceilings: a few seconds of work each. build: here the two .cu files take about 2.5
# minutes each on one core for one architecture and the C++ files about a minute on 2 cores; with
# 16 cores they compile side by side. tests and bench: Triton compiles each kernel variant once
# (about a second each, autotuning off by default: --autotune), torch.compile's inductor takes
# tens of seconds per network, so the groups are ordered by what matters most and each has its own
# time box.
BUDGETS = {"machine": 20, "ceilings": 15, "build": 145, "tests": 140, "bench": 155, "summary": 5}
# (name, pytest selection, seconds, environment)
TEST_GROUPS = [
    ("cuda kernels", ["tests/ops", "-k", "cuda"], 25, {}),
    ("triton kernels", ["tests/ops", "-k", "triton"], 40, {}),
    # (norm_conv's forward and fused backward in float32, one layout, the prologue and ReLU on,
    # and the blocks through it: each constexpr variant of a kernel is a compilation, about
    # 25 here; the box is a guess until a GPU has run it.)
    ("norm_conv (Triton)", ["tests/ops/test_norm_conv.py", "tests/models/test_norm_conv_training.py", "-k",
                            "fp32 and channels_last and scale-shift and relu and not no-relu or block or bottleneck or compile"], 20, {}),
    ("networks on the GPU", ["tests/models/test_gpu_backends.py"], 35, {}),
    ("backend and build", ["tests/test_backend.py", "tests/test_build.py"], 20, {}),  # (5 fresh interpreters)
]
# A rehearsal runs the Triton kernels in the interpreter: a share of their tests. Its time boxes
# check that the groups run, not how fast a GPU would: 3-4x what they took on a 2-core Xeon
# (10, 38, 27, 30 s; the Triton group had reached 38 s of a 40-s box there, 2026-12-02).
REHEARSAL_TEST_GROUPS = [
    ("cuda kernels", ["tests/ops", "-k", "cuda"], 60, {}),
    ("triton kernels", ["tests/ops/test_zero_pad_shortcut.py", "tests/ops/test_bias_act.py", "-k", "triton"], 150, {}),
    # (The whole file took 16 s on the Xeon when it tested the forward alone; the backward's
    # share here.)
    ("norm_conv (Triton)", ["tests/ops/test_norm_conv.py", "tests/models/test_norm_conv_training.py", "-k",
                            "not fuzz and not backward_against or backward_against and fp64 and channels_last and scale"], 150, {}),
    ("networks on the GPU", ["tests/models/test_gpu_backends.py", "-k", "not resnet18"], 100, {}),
    ("backend and build", ["tests/test_backend.py", "tests/test_build.py"], 100, {}),  # (5 fresh interpreters, 2 cores)
]
BENCH_GROUPS = [
    ("networks vs eager", ["bench/test_gpu.py", "-k", "resnet50 or resnet20"], 45, {"RESNET_FAST_BENCH_COMPILE": "0"}),
    ("ops vs eager and torch.compile", ["bench/test_gpu.py", "-k", "batch_norm_act"], 30, {}),
    # (Issue 18's NormConvolution forward, and forward + fused backward, checked against float64
    # before timing, 3 shapes each; ResNet-20's training step with and without its blocks through
    # norm_conv.)
    ("norm_conv vs cuDNN + statistics", ["bench/test_gpu.py", "-k", "norm_conv"], 40, {}),
    ("networks vs torch.compile", ["bench/test_gpu.py", "-k", "resnet50 or resnet20"], 40, {"RESNET_FAST_BENCH_ONLY_COMPILE": "1"}),
]

OUTCOMES_PLUGIN = '''
import json, os
def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        if report.when in ("setup", "teardown") and report.outcome == "passed":
            return
        with open(os.environ["RESNET_FAST_OUTCOMES"], "a") as f:
            f.write(json.dumps({"test": report.nodeid, "outcome": report.outcome, "when": report.when}) + "\\n")
'''


def run_stage(cmd: list[str], budget: float, env: dict | None = None, log: str | None = None) -> dict:
    """Runs ``cmd`` in its own process group for at most ``budget`` seconds."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, budget))
            status = "ok" if rc == 0 else f"failed (exit code {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
    finally:
        if log:
            out.close()
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1)}


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def stage_machine(out: str, args) -> dict:
    path = os.path.join(out, "machine.json")
    code = f"""
        import json, os, platform, shutil, subprocess
        import torch
        info = {{"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cpus": os.cpu_count(), "gpu": None}}
        try:
            import triton
            info["triton"] = triton.__version__
        except Exception as exc:
            info["triton"] = f"not importable: {{exc}}"
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["capability"] = f"{{p.major}}.{{p.minor}}"
            info["memory_gib"] = round(p.total_memory / 2**30, 1)
            info["multiprocessors"] = p.multi_processor_count
        smi = shutil.which("nvidia-smi")
        info["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True).stdout if smi else "not found"
        json.dump(info, open({path!r}, "w"), indent=2)
    """
    result = run_stage(python(code), BUDGETS["machine"], log=os.path.join(out, "machine.log"))
    if os.path.exists(path):
        result["machine"] = json.load(open(path))
        m = result["machine"]
        result["detail"] = (f"{m['gpu']} (sm {m.get('capability')}), " if m["gpu"] else "no GPU; ") + (
            f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, {m['cpus']} CPUs, Python {m['python']}")
    return result


def stage_ceilings(out: str, args) -> dict:
    if not args.gpu:
        return {"status": "skipped", "seconds": 0.0, "detail": "no GPU"}
    path = os.path.join(out, "ceilings.json")
    code = f"""
        import json, torch
        def timed(fn, reps):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        a = torch.empty(2**30, dtype=torch.float32, device="cuda")  # 4 GiB
        b = torch.empty_like(a)
        t = timed(lambda: b.copy_(a), 10)
        copy = 2 * a.numel() * 4 / t / 1e9
        del a, b
        n = 8192
        x, y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = timed(lambda: x @ y, 10)
        json.dump({{"copy_gb_per_s": copy, "bf16_matmul_tflop_per_s": 2 * n**3 / t / 1e12}}, open({path!r}, "w"))
    """
    result = run_stage(python(code), BUDGETS["ceilings"], log=os.path.join(out, "ceilings.log"))
    if os.path.exists(path):
        result["ceilings"] = json.load(open(path))
        c = result["ceilings"]
        result["detail"] = f"copy {c['copy_gb_per_s']:.0f} GB/s, bf16 matmul {c['bf16_matmul_tflop_per_s']:.0f} TFLOP/s"
    return result


def stage_build(out: str, args) -> dict:
    env = {"RESNET_FAST_CUDA": "1", "TORCH_CUDA_ARCH_LIST": args.arch, "MAX_JOBS": str(os.cpu_count() or 2)}
    if args.gpu:
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        where = "in place"
    else:
        build = os.path.join(out, "build")
        cmd = [sys.executable, "setup.py", "build_ext", "-b", os.path.join(build, "lib"), "-t", os.path.join(build, "tmp")]
        where = f"into {build}"
    result = run_stage(cmd, BUDGETS["build"], env=env, log=os.path.join(out, "build.log"))
    result["detail"] = f"TORCH_CUDA_ARCH_LIST={args.arch}, {env['MAX_JOBS']} jobs, {where}"
    if result["status"] == "ok":
        root = ROOT if args.gpu else os.path.join(out, "build", "lib")
        sos = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "resnet_fast")) for f in fs if f.startswith("_C") and f.endswith(".so")]
        import runpy

        cubin_archs = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="gpu_check")["cubin_archs"]
        archs = sorted(cubin_archs(sos[0])) if sos else []
        result["detail"] += f"; device code for sm_{', sm_'.join(map(str, archs)) or ' none'}"
        want = int(args.arch.split(";")[0].split("+")[0].replace(".", ""))
        if want not in archs:
            result["status"] = f"failed (no sm_{want} code in the built extension)"
    return result


def run_groups(out: str, args, stage: str, groups, extra_env: dict) -> dict:
    """pytest groups one after another, each in its own time box; each test's outcome is appended
    to a file as it finishes (a plugin), so a group stopped at its limit still reports what ran."""
    plugin_dir = os.path.join(out, "plugin")
    os.makedirs(plugin_dir, exist_ok=True)
    with open(os.path.join(plugin_dir, "gpu_check_outcomes.py"), "w") as f:
        f.write(OUTCOMES_PLUGIN)
    results, statuses, t0 = {}, [], time.perf_counter()
    for i, (name, selection, budget, env) in enumerate(groups):
        outcomes = os.path.join(out, f"{stage}-{i}.jsonl")
        open(outcomes, "w").close()
        group_env = {
            "RESNET_FAST_OUTCOMES": outcomes,
            "PYTHONPATH": os.pathsep.join([plugin_dir, ROOT, os.environ.get("PYTHONPATH", "")]),
            **extra_env, **env,
        }
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_outcomes", *selection]
        if stage == "bench":
            cmd.append("--benchmark-only")
        r = run_stage(cmd, budget, env=group_env, log=os.path.join(out, f"{stage}-{i}.log"))
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for line in open(outcomes):
            o = json.loads(line)["outcome"]
            counts[o] = counts.get(o, 0) + 1
        status = r["status"]
        if status == "failed (exit code 5)":  # pytest: nothing selected
            status = "ok (nothing selected)"
        results[name] = {**counts, "status": status, "seconds": r["seconds"], "budget": budget}
        statuses.append(status)
    overall = "ok" if all(s.startswith("ok") for s in statuses) else ("timeout" if "timeout" in statuses else "failed")
    detail = "; ".join(f"{k}: {v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped ({v['status']})" for k, v in results.items())
    return {"status": overall, "seconds": round(time.perf_counter() - t0, 1), "groups": results, "detail": detail}


def stage_tests(out: str, args) -> dict:
    env = {"TORCH_CUDA_ARCH_LIST": args.arch}
    if args.gpu:
        env["RESNET_FAST_TRITON_AUTOTUNE"] = "1" if args.autotune else "0"
    else:
        env["TRITON_INTERPRET"] = "1"
    return run_groups(out, args, "tests", TEST_GROUPS if args.gpu else REHEARSAL_TEST_GROUPS, env)


def stage_bench(out: str, args) -> dict:
    rows = os.path.join(out, "bench.jsonl")
    open(rows, "w").close()
    env = {"RESNET_FAST_BENCH_JSONL": rows, "RESNET_FAST_TRITON_AUTOTUNE": "1" if args.autotune else "0"}
    r = run_groups(out, args, "bench", BENCH_GROUPS, env)
    r["rows"] = [json.loads(line) for line in open(rows)]
    if not args.gpu:
        r["detail"] = "no GPU: every GPU benchmark skipped; " + r["detail"]
    return r


def summarize(out: str, report: dict) -> str:
    m = report["stages"].get("machine", {}).get("machine", {})
    ceilings = report["stages"].get("ceilings", {}).get("ceilings", {})
    lines = [
        f"# resnet_fast GPU check{' (rehearsal, no GPU)' if report['rehearsal'] else ''}",
        "",
        f"{report['date']}; {m.get('gpu') or 'no GPU'}; torch {m.get('torch')}, triton {m.get('triton')}, "
        f"CUDA {m.get('cuda')}; {m.get('cpus')} CPUs.",
        "",
        "| stage | status | seconds (budget) | result |",
        "|---|---|---|---|",
    ]
    for name in STAGES:
        s = report["stages"].get(name, {"status": "not run", "seconds": 0.0})
        lines.append(f"| {name} | {s['status']} | {s['seconds']} ({report['budgets'][name]}) | {s.get('detail', '')} |")
    groups = report["stages"].get("tests", {}).get("groups", {})
    if groups:
        lines += ["", "| test group | passed | failed | skipped | status |", "|---|---|---|---|---|"]
        for g, c in groups.items():
            lines.append(f"| {g} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['status']} |")
    rows = report["stages"].get("bench", {}).get("rows", [])
    if rows:
        copy = ceilings.get("copy_gb_per_s")
        lines += ["", "| workload | per s | speed-ups | GB/s (of copy) | model's speed-up vs eager |", "|---|---|---|---|---|"]
        for r in rows:
            ups = ", ".join(f"{b} {v:.2f}x" for b, v in r["speedups"].items())
            gbs = ""
            if "gb_per_s" in r:
                gbs = f"{r['gb_per_s']:.0f}" + (f" ({r['gb_per_s'] / copy:.0%})" if copy else "")
            model = f"{r['model_speedup_vs_eager']:.2f}x" if "model_speedup_vs_eager" in r else ""
            lines.append(f"| {r['name']} | {r['items_per_s']:.1f} | {ups} | {gbs} | {model} |")
    return "\n".join(lines) + "\n"


def validate(summary: dict) -> list[str]:
    """What is wrong with a summary.json (empty when it is well-formed)."""
    problems = []
    for key in ("date", "rehearsal", "budgets", "stages"):
        if key not in summary:
            problems.append(f"no {key!r}")
    stages = summary.get("stages", {})
    for name in STAGES:
        if name not in stages:
            problems.append(f"stage {name!r} missing")
            continue
        s = stages[name]
        if not isinstance(s.get("status"), str) or not isinstance(s.get("seconds"), (int, float)):
            problems.append(f"stage {name!r} lacks a status or its seconds")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (summary.md, summary.json, one log per stage)")
    p.add_argument("--rehearse", action="store_true", help="run what can run without a GPU")
    p.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST for the build (default: the GPU's; 9.0 in a rehearsal)")
    p.add_argument("--only", default=None, help=f"comma-separated stages to run (of {', '.join(STAGES)}); the others are listed as not selected")
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="override a stage's time box")
    p.add_argument("--autotune", action="store_true", help="autotune the Triton kernels (default: fixed blocks; "
                   "autotuning compiles 16 configurations of each kernel, minutes on a fresh machine)")
    p.add_argument("--validate", action="store_true", help="check OUT/summary.json and exit non-zero if it is malformed or a stage failed")
    args = p.parse_args(argv)
    if args.validate:
        summary = json.load(open(os.path.join(args.out, "summary.json")))
        problems = validate(summary)
        failed = [n for n, s in summary["stages"].items() if s["status"].startswith(("failed", "timeout"))]
        for msg in problems + [f"stage {n!r}: {summary['stages'][n]['status']}" for n in failed]:
            print(f"gpu_check: {msg}", file=sys.stderr)
        return 1 if problems or failed else 0
    if args.rehearse:
        # Here the build compiles on 2 cores what the GPU machine compiles on 16 (about 4 minutes
        # for one architecture): the rehearsal checks that it builds, not how fast.
        BUDGETS["build"] = 600
        BUDGETS["tests"] = sum(g[2] for g in REHEARSAL_TEST_GROUPS)
    for item in args.budget:
        stage, _, seconds = item.partition("=")
        if stage not in BUDGETS:
            p.error(f"--budget: unknown stage {stage!r}")
        BUDGETS[stage] = float(seconds)
        for groups in (TEST_GROUPS, REHEARSAL_TEST_GROUPS, BENCH_GROUPS) if stage in ("tests", "bench") else ():
            if (groups is BENCH_GROUPS) == (stage == "bench"):  # the groups share the stage's new budget
                total = sum(g[2] for g in groups)
                groups[:] = [(n, sel, max(1.0, b * float(seconds) / total), e) for n, sel, b, e in groups]
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    import torch

    args.gpu = torch.cuda.is_available() and not args.rehearse
    if not args.rehearse and not torch.cuda.is_available():
        p.error("no CUDA device is visible; use --rehearse to run the stages that can run without one")
    if args.arch is None:
        if args.gpu:
            major, minor = torch.cuda.get_device_capability(0)
            args.arch = f"{major}.{minor}"
        else:
            args.arch = "9.0"
    selected = set(STAGES if args.only is None else args.only.split(",")) | {"summary"}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "rehearsal": args.rehearse,
              "budgets": dict(BUDGETS), "stages": {}}
    runners = {"machine": stage_machine, "ceilings": stage_ceilings, "build": stage_build, "tests": stage_tests,
               "bench": stage_bench}
    for name in STAGES[:-1]:
        if name not in selected:
            report["stages"][name] = {"status": "not selected", "seconds": 0.0}
            continue
        print(f"gpu_check: {name} (at most {BUDGETS[name]:.0f} s)", flush=True)
        try:
            report["stages"][name] = runners[name](out, args)
        except Exception as exc:  # a stage's own failure never hides the others
            report["stages"][name] = {"status": f"failed ({type(exc).__name__}: {exc})", "seconds": 0.0}
    report["stages"]["summary"] = {"status": "ok", "seconds": 0.0, "detail": "summary.md, summary.json"}
    text = summarize(out, report)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
