"""Smoke test of ``benchmarks/reproduce_paper.py --quick`` on the real MNIST / Fashion-MNIST files.

Only checks that the pipeline runs end to end and writes well-formed output; the numbers of a
1-epoch run on 1000 images mean nothing.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_paper.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("_reproduce_paper_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_well_formed_outputs(tmp_path):
    script = _load_script()
    messages = []
    assert script.main(["--quick", "--out", str(tmp_path), "--workers", "1"], log=messages.append) == 0

    with (tmp_path / "paper_mlp.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == script.CSV_COLUMNS
        rows = list(reader)
    got = {(r["condition"], r["phase"]) for r in rows}
    expected = {(name, phase) for name, cond in script.CONDITIONS.items()
                for phase in (("unpruned", "pruned") if cond.epochs else ("unpruned",))}
    assert got == expected and len(rows) == len(expected)

    for r in rows:
        assert int(r["n_nets"]) == 1 and int(r["n_shuffles"]) == 5 and int(r["n_clusters"]) == 12
        for col in ("ncut_mean", "shuffle_mean", "shuffle_sd", "z_mean", "percentile_mean", "test_acc_mean",
                    "sparsity_mean", "train_s_per_net", "measure_s_per_net"):
            assert math.isfinite(float(r[col])), (r["condition"], r["phase"], col, r[col])
        assert 0 < float(r["ncut_mean"]) <= 12
        assert 1 / 6 - 1e-9 <= float(r["percentile_mean"]) <= 1
        assert 0 <= float(r["test_acc_mean"]) <= 1
        assert math.isnan(float(r["ncut_sd"]))  # one net: no spread over nets
        sparsity = float(r["sparsity_mean"])
        assert abs(sparsity - (0.9 if r["phase"] == "pruned" else 0.0)) < 0.01
        trained = r["condition"] != "untrained"
        assert int(r["epochs"]) == (1 if trained else 0)
        assert math.isfinite(float(r["s_per_epoch"])) == trained

    md = (tmp_path / "paper_mlp.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, separator, one line per row
    assert len({line.count("|") for line in table}) == 1
    assert "Machine:" in md and "--quick" in md

    records = [json.loads(line) for line in (tmp_path / "paper_mlp_nets.jsonl").read_text().splitlines()]
    assert sorted(r["condition"] for r in records) == sorted(script.CONDITIONS)
    assert (tmp_path / "paper_mlp.png").stat().st_size > 0

    # --resume keeps the finished net and redoes nothing.
    messages.clear()
    assert script.main(["--quick", "--out", str(tmp_path), "--resume", "--conditions", "small_control"],
                       log=messages.append) == 0
    assert any("already in the records, skipped" in m for m in messages)
    assert len((tmp_path / "paper_mlp_nets.jsonl").read_text().splitlines()) == len(records)


def test_parallel_jobs_give_the_same_records(tmp_path):
    script = _load_script()
    common = ["--quick", "--conditions", "small_control,untrained", "--nets", "2", "--workers", "1"]
    by_jobs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert script.main(common + ["--out", str(out), "--jobs", str(jobs)], log=lambda m: None) == 0
        recs = [json.loads(line) for line in (out / "paper_mlp_nets.jsonl").read_text().splitlines()]
        by_jobs[jobs] = {(r["condition"], r["seed"]): {ph: (p["ncut"], p["shuffled_ncuts"], p["test_acc"])
                                                       for ph, p in r["phases"].items()} for r in recs}
    assert len(by_jobs[1]) == 4 and by_jobs[1] == by_jobs[2]
