"""Smoke tests of the benchmark and example scripts in their ``--quick`` modes.

Each runs in a subprocess, as a user would run it, and must finish and print or write what it
promises. The measured numbers themselves are not checked here (machines are noisy; the
benchmarks' targets are read from their full runs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "TORCH_MODULARITY_QUICK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_bench_clusterability_quick(tmp_path):
    out = _run("benchmarks/bench_clusterability.py", "--quick", cwd=tmp_path)
    rows = [line for line in out.splitlines() if line.count(" | ") >= 10]
    names = [row.split(" | ")[0] for row in rows[1:]]
    for expected in ("784-256x4-10 MLP, random init", "784-256x4-10 MLP, planted modules",
                     "quality, 784-256x4-10 random", "VGG-16 channel graph", "20 shuffles, 784-256x4-10"):
        assert expected in names, (expected, names)
    compiled = [row for row in rows if "vs compiled" in row]
    assert len(compiled) == 2 and all("same labels: True" in row for row in compiled), compiled
    assert "wrote" not in out  # a quick run leaves benchmarks/results/ alone


def test_bench_regularizer_quick(tmp_path):
    out = _run("benchmarks/bench_regularizer.py", "--quick", "--threads", "1", cwd=tmp_path)
    assert "overhead of ours" in out and "gradient rel. error vs exact" in out
    assert "compiled step" in out or "torch step" in out  # which path the timings are of


def test_profile_regularizer_runs(tmp_path):
    out = _run("benchmarks/profile_regularizer.py", "--steps", "2", "--rows", "5", cwd=tmp_path)
    assert "regularized step" in out and "probes" in out


@pytest.mark.parametrize("script,files", [
    ("examples/train_regularized.py", ["control.pt", "regularized.pt", "results.json"]),
    ("examples/prune_compare.py", ["mlp.pt", "pruned.pt", "compare.png"]),
])
def test_example_quick_runs_write_their_outputs(tmp_path, script, files):
    out_dir = tmp_path / "out"
    _run(script, "--quick", "--out", str(out_dir), cwd=tmp_path)
    for name in files:
        assert (out_dir / name).is_file(), name
    if script.endswith("train_regularized.py"):
        results = json.loads((out_dir / "results.json").read_text())
        assert {"settings", "control", "regularized"} <= set(results)


def test_monitor_example_quick_run_logs_events(tmp_path):
    out_dir = tmp_path / "out"
    out = _run("examples/monitor_mnist.py", "--quick", "--out", str(out_dir), cwd=tmp_path)
    assert "n-cut" in out
    assert list(out_dir.glob("events.out.tfevents.*"))
