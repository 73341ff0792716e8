"""Smoke test of the main job: ``examples/demo.py --quick`` on the real MNIST files."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from torch_modularity.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.py"


def _readme_commands():
    """The ``torch-modularity ...`` command lines the README prints, optional ``[...]`` parts dropped."""
    found = re.findall(r"^`?(torch-modularity [^`\n]+)`?$", (ROOT / "README.md").read_text(), re.M)
    return [re.sub(r"\s*\[[^\]]*\]", "", line).strip() for line in found]


def test_demo_quick_run(tmp_path, capsys):
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

    # The README's shell commands, on the checkpoints the demo wrote (runs/demo/ is its default --out).
    commands = _readme_commands()
    assert {c.split()[1] for c in commands} == {"measure", "prune-compare"}, commands
    for line in commands:
        argv = [a.replace("runs/demo/", f"{out_dir}/") for a in shlex.split(line)[1:]] + ["--json"]
        assert Path(argv[1]).is_file(), f"the README's command names a file the demo does not write: {line}"
        capsys.readouterr()
        assert cli_main(argv) == 0, line
        record = json.loads(capsys.readouterr().out)
        if argv[0] == "measure":
            assert record["n_shuffles"] == 50 and record["n_clusters"] == 12, line
        else:
            assert abs(record["achieved_sparsity"] - 0.9) < 0.01 and len(record["random_matched"]) == 10, line
