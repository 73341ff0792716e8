"""Smoke test of the main job: ``examples/demo.py --quick`` on the real MNIST files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_quick_run(tmp_path):
    assert DEMO.is_file(), DEMO
    out_dir = tmp_path / "out"
    env = {**os.environ, "TORCH_MODULARITY_QUICK": "1"}
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(out_dir)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "n-cut" in proc.stdout and "tensorboard --logdir" in proc.stdout
    for name in ("plain.pt", "regularized.pt", "pruned.pt", "report.md", "report.png"):
        assert (out_dir / name).is_file(), name
    report = (out_dir / "report.md").read_text()
    for row in ("| plain |", "| regularized |", "| pruned (90%) |", "| random-pruned, trained values"):
        assert row in report, row
    for run in ("plain", "regularized"):  # one TensorBoard run per net, with event files
        assert list((out_dir / "tb" / run).glob("events.out.tfevents.*")), run
