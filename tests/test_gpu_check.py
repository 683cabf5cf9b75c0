"""bench/gpu_check.py, rehearsed: the summary of a rehearsal is well-formed and lists every stage,
a stage that overruns its time box is stopped and reported, and later stages still run. (CI runs
the whole rehearsal, the build included, and checks its summary with --validate: .ci/run.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import import_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
STAGES = ["machine", "ceilings", "build", "tests", "bench", "summary"]


def rehearse(out, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, SCRIPT, "--rehearse", str(out), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def test_a_rehearsal_summary_lists_every_stage_and_reports_an_overrun(tmp_path):
    # The machine stage runs; the bench stage gets 3 seconds (pytest alone takes longer to start):
    # it must be stopped and reported as a timeout, and the summary still written.
    res = rehearse(tmp_path, "--only", "machine,bench", "--budget", "bench=3")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert list(summary["stages"]) == STAGES
    assert summary["rehearsal"] is True
    assert summary["stages"]["machine"]["status"] == "ok"
    assert summary["stages"]["machine"]["machine"]["torch"]
    assert summary["stages"]["ceilings"]["status"] == "not selected"
    bench = summary["stages"]["bench"]
    assert bench["status"] == "timeout" and all(g["status"] == "timeout" for g in bench["groups"].values())
    assert bench["seconds"] < 30
    text = (tmp_path / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in text
    assert res.stdout.rstrip().endswith(text.rstrip().splitlines()[-1])  # the table is printed last
    # --validate reads it back: well-formed, but a stage timed out.
    check = subprocess.run([sys.executable, SCRIPT, "--validate", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 1 and "stage 'bench': timeout" in check.stderr


def test_the_budgets_fit_the_lease():
    gpu_check = import_bench("gpu_check")
    assert sum(gpu_check.BUDGETS.values()) <= 8 * 60
    assert sum(g[2] for g in gpu_check.TEST_GROUPS) <= gpu_check.BUDGETS["tests"]
    assert sum(g[2] for g in gpu_check.BENCH_GROUPS) <= gpu_check.BUDGETS["bench"]
    assert gpu_check.validate({"date": "", "rehearsal": True, "budgets": {"x": 1}, "stages": {}})  # malformed
    with pytest.raises(SystemExit):
        gpu_check.main([str(ROOT), "--budget", "nonsense=3"])
