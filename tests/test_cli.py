"""The command line: ``torch-modularity measure`` in-process, as a module and as a console script."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from torch_modularity import WeightGraph, clusterability
from torch_modularity.cli import main

SETTINGS = ["--n-clusters", "3", "--shuffles", "4", "--seed", "5"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))


@pytest.fixture
def checkpoints(tmp_path):
    model = _model()
    paths = {
        "state_dict": tmp_path / "mlp_state.pt",
        "whole": tmp_path / "mlp_whole.pt",
        "nested": tmp_path / "mlp_nested.pt",
        "list": tmp_path / "a_list.pt",
        "string": tmp_path / "a_string.pt",
        "corrupt": tmp_path / "corrupt.pt",
    }
    torch.save(model.state_dict(), paths["state_dict"])
    torch.save(model, paths["whole"])
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "optimizer": "adam"}, paths["nested"])
    torch.save([torch.ones(2, 2), torch.ones(2, 2)], paths["list"])
    torch.save("not a model", paths["string"])
    paths["corrupt"].write_bytes(b"garbage12345")
    paths["truncated"] = tmp_path / "truncated.pt"  # an interrupted copy of a real checkpoint
    paths["truncated"].write_bytes(paths["state_dict"].read_bytes()[:300])
    return model, paths


def _direct(model, **extra):
    """What the CLI must report: clusterability called directly with the same settings."""
    return clusterability(WeightGraph.from_module(model), n_clusters=3, n_shuffles=4, seed=5, n_workers=1, **extra)


def test_measure_state_dict_human_output(checkpoints, capsys):
    model, paths = checkpoints
    rc = main(["measure", str(paths["state_dict"]), *SETTINGS, "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "n-cut" in out
    assert re.search(r"(?m)^\s*z\b", out), out  # a row for z
    assert re.search(r"(?m)^\s*p\b", out), out  # and one for the p-value
    assert "8-12-10-4" in out
    expected = _direct(model)
    assert f"{expected.ncut:.4f}" in out


def test_measure_json_equals_direct_call(checkpoints, capsys):
    model, paths = checkpoints
    rc = main(["measure", str(paths["state_dict"]), *SETTINGS, "--workers", "1", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    expected = _direct(model)
    assert data["ncut"] == expected.ncut
    assert data["shuffled_ncuts"] == expected.shuffled_ncuts.tolist()
    assert data["labels"] == expected.labels.tolist()
    assert (data["n_clusters"], data["n_shuffles"], data["shuffle"], data["seed"]) == (3, 4, "layer", 5)
    assert data["z"] == pytest.approx(expected.z) and data["p_value"] == pytest.approx(expected.p_value)


def test_measure_layer_nonzero_option(checkpoints, capsys):
    model, paths = checkpoints
    rc = main(["measure", str(paths["state_dict"]), *SETTINGS, "--workers", "1", "--json", "--shuffle", "layer_nonzero"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shuffle"] == "layer_nonzero"
    assert data["shuffled_ncuts"] == _direct(model, shuffle="layer_nonzero").shuffled_ncuts.tolist()


def test_nested_state_dict_checkpoint(checkpoints, capsys):
    model, paths = checkpoints
    rc = main(["measure", str(paths["nested"]), *SETTINGS, "--workers", "1", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["ncut"] == _direct(model).ncut


def test_whole_module_needs_trust(checkpoints, capsys):
    model, paths = checkpoints
    rc = main(["measure", str(paths["whole"]), *SETTINGS, "--workers", "1", "--json"])
    captured = capsys.readouterr()
    assert rc != 0
    assert "--trust-checkpoint" in captured.err
    assert captured.out == ""
    rc = main(["measure", str(paths["whole"]), *SETTINGS, "--workers", "1", "--json", "--trust-checkpoint"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["ncut"] == _direct(model).ncut


@pytest.mark.parametrize("kind, word", [("list", "list"), ("string", "str")])
def test_checkpoint_that_is_not_a_model_fails_clearly(checkpoints, capsys, kind, word):
    _, paths = checkpoints
    rc = main(["measure", str(paths[kind]), *SETTINGS, "--workers", "1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert word in err
    assert "state_dict" in err or "module" in err.lower()
    assert "Traceback" not in err


def test_missing_checkpoint_fails(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    rc = main(["measure", str(missing), *SETTINGS, "--workers", "1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "not found" in err and "nope.pt" in err


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_corrupt_checkpoint_fails_without_advising_to_trust_it(checkpoints, capsys, kind):
    # A damaged file is not a pickled module: telling the user it "holds pickled objects"
    # and to pass --trust-checkpoint (unpickling runs code) is wrong advice, and following
    # it does not help either (checked below).
    _, paths = checkpoints
    rc = main(["measure", str(paths[kind]), *SETTINGS, "--workers", "1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert paths[kind].name in err
    rc_trusted = main(["measure", str(paths[kind]), *SETTINGS, "--workers", "1", "--trust-checkpoint"])
    capsys.readouterr()
    assert rc_trusted != 0
    assert "--trust-checkpoint" not in err


def test_bad_settings_exit_non_zero(checkpoints, capsys):
    _, paths = checkpoints
    assert main(["measure", str(paths["state_dict"]), "--n-clusters", "1", "--shuffles", "2", "--workers", "1"]) != 0
    assert "n_clusters" in capsys.readouterr().err
    assert main(["measure", str(paths["state_dict"]), "--n-clusters", "40", "--shuffles", "2", "--workers", "1"]) != 0
    assert "n_clusters" in capsys.readouterr().err
    assert main(["measure", str(paths["state_dict"]), "--device", "gpu0", "--shuffles", "2", "--workers", "1"]) != 0
    assert "not a torch device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse rejects unknown shuffle methods
        main(["measure", str(paths["state_dict"]), "--shuffle", "rows"])
    assert info.value.code != 0


def test_measure_device_option(checkpoints, capsys):
    model, paths = checkpoints
    rc = main(["measure", str(paths["state_dict"]), *SETTINGS, "--workers", "1", "--device", "cpu", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["ncut"] == _direct(model).ncut
    if not torch.cuda.is_available():
        assert main(["measure", str(paths["state_dict"]), *SETTINGS, "--workers", "1", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    else:
        rc = main(["measure", str(paths["state_dict"]), *SETTINGS, "--workers", "1", "--device", "cuda", "--json"])
        assert rc == 0 and json.loads(capsys.readouterr().out)["ncut"] == _direct(model).ncut


def test_python_dash_m_subprocess_round_trip(checkpoints, tmp_path):
    model, paths = checkpoints
    # default worker count (a process pool): must equal the in-process single-worker result
    proc = subprocess.run(
        [sys.executable, "-m", "torch_modularity", "measure", str(paths["state_dict"]), *SETTINGS, "--json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    expected = _direct(model)
    assert data["ncut"] == expected.ncut
    assert data["shuffled_ncuts"] == expected.shuffled_ncuts.tolist()
    np.testing.assert_array_equal(data["labels"], expected.labels)


def test_console_script_is_installed_and_runs_help(tmp_path):
    bindir = Path(sys.executable).parent
    script = shutil.which("torch-modularity", path=str(bindir))
    assert script is not None, f"no torch-modularity console script in {bindir}"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert proc.returncode == 0, proc.stderr
    assert "measure" in proc.stdout
