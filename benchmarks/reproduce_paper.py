"""Reproduce the research code's MLP clusterability study with torch_modularity.

Protocol (``method.md`` sections 3-6 of "Clusterability in Neural Networks", Filan et al. 2021):

* Conditions (``--conditions``, comma-separated; default all, in this order):

  ==================== ===================================================================
  ``mnist_control``     784-256x4-10 on MNIST, 20 epochs (Adam 1e-3, batch 128) + pruning
  ``mnist_dropout``     the same with Dropout(0.5) after each hidden layer's ReLU
  ``fashion_control``   784-256x4-10 on Fashion-MNIST, 20 + 20 epochs
  ``fashion_dropout``   the same with dropout 0.5
  ``small_reg_research`` 49-64-64-64-10 on 7x7 MNIST, 10 + 10 epochs, with the research
                        code's effective regularizer strength: ``SpectralRegularizer(n_eigs=3,
                        weight=0.5 * 0.1 / 3, normalize_relu=True)`` (its gradient was 0.5x)
  ``small_reg_ours``    the same with ``SpectralRegularizer(model, weight=0.1)`` (n_eigs 11, the
                        library default; 0.1 was the default weight until 2026-11-28, when
                        the README's table was made)
  ``small_control``     the same without regularizer
  ``untrained``         784-256x4-10 at random init (same init as the nets above), measured only
  ==================== ===================================================================

* Every trained net gets the pruning phase after training: a fresh Adam, ``--pruning-epochs``
  more epochs with ``PolynomialSparsity`` 0.5 -> 0.9 (power 3, every 10 steps, each layer
  pruned to the schedule, all Linear layers incl. the first and the output) from step 0 to
  the last step of the phase; the regularizer (if any) stays in the loss. Rows ``unpruned``
  (after training) and ``pruned`` (after the pruning phase, masks made permanent).
* Measurement: ``clusterability`` with k=12, ``--shuffles`` (50) 'layer' shuffles; percentile
  = ``(1 + #{shuffled < ncut}) / (n + 1)`` and z with the population SD of the shuffles.
* Inputs are pixel / 255. ``small_mnist`` = MNIST area-averaged to 7x7
  (``F.interpolate(x[:, None], size=(7, 7), mode="area")``, i.e. exact 4x4 mean pooling, an
  anti-aliased resize), flattened to 49. Weights start as in Keras (Glorot-uniform, zero
  bias; ``--init torch`` for PyTorch's default). Net ``i`` of every condition uses seed
  ``--seed + i`` (init, dropout, data order): conditions are paired by net.

Outputs in ``--out`` (default ``benchmarks/results/``): ``paper_mlp_nets.jsonl`` (one record per
net, appended as soon as it is finished; ``--resume`` skips the nets already there with the same
settings), ``paper_mlp.csv`` and ``paper_mlp.md`` (one row per condition x {unpruned, pruned}),
and ``paper_mlp.png`` (per condition: each net's n-cut against its shuffles).

Run ``python benchmarks/reproduce_paper.py`` (the full protocol, 3 nets per condition),
``--conditions mnist_control --nets 1 --epochs 2 --pruning-epochs 2`` for a small real run,
or ``--quick`` for the smoke test (1000 images, 1 + 1 epochs, 5 shuffles, 1 net).

Cost on the 2-core box, 1 torch thread per net: 784-256x4-10 ~4-6 s per training epoch and
~7-9 s per pruning epoch (mask updates every 10 steps); 49-64-64-64-10 ~1 s per epoch plain,
~3-4 s with the regularizer; one measurement with 50 shuffles ~4-9 s (big MLP; twice when dead
units call for the live measurement) / ~1 s (small). The full default run took 31 min with
``--jobs 2`` (the default on 2 CPUs: two nets train in parallel, shuffles in-process) and 63 min
with one job; ``--epoch-scale 0.75`` (15 + 15 / 8 + 8 epochs) shortens it, and the table then
says that the epochs were shortened. Training uses one torch thread by default (``--threads``):
with two threads a step was 30-80x slower whenever another process held a core.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_modularity import clusterability
from torch_modularity.datasets import load_fashion_mnist, load_mnist
from torch_modularity.pruning import PolynomialSparsity, finalize, layer_sparsity

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"


def _load_examples_module():
    """``examples/mnist_mlp.py`` (make_mlp, train, accuracy), imported by path."""
    path = HERE.parent / "examples" / "mnist_mlp.py"
    spec = importlib.util.spec_from_file_location("_reproduce_paper_mnist_mlp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_mlp = _load_examples_module()
make_mlp, train, accuracy = _mlp.make_mlp, _mlp.train, _mlp.accuracy

BIG = (784, 256, 256, 256, 256, 10)
SMALL = (49, 64, 64, 64, 10)
BATCH = 128
LR = 1e-3
N_CLUSTERS = 12
RESEARCH_LAMBDA, RESEARCH_EIGS = 0.1, 3


@dataclass(frozen=True)
class Condition:
    name: str
    dataset: str  # mnist | fashion | small_mnist
    sizes: Tuple[int, ...]
    epochs: int  # paper's training epochs (0: untrained, measured only)
    pruning_epochs: int  # paper's pruning-phase epochs (0: no pruned row)
    dropout: float = 0.0
    reg: Optional[str] = None  # None | "research" | "ours"
    description: str = ""


CONDITIONS: Dict[str, Condition] = {c.name: c for c in [
    Condition("mnist_control", "mnist", BIG, 20, 20, description="MNIST MLP"),
    Condition("mnist_dropout", "mnist", BIG, 20, 20, dropout=0.5, description="MNIST MLP, dropout 0.5"),
    Condition("fashion_control", "fashion", BIG, 20, 20, description="Fashion-MNIST MLP"),
    Condition("fashion_dropout", "fashion", BIG, 20, 20, dropout=0.5, description="Fashion-MNIST MLP, dropout 0.5"),
    Condition("small_reg_research", "small_mnist", SMALL, 10, 10, reg="research",
              description="7x7 MNIST MLP + regularizer, research strength (n_eigs 3, weight 0.05/3, ReLU normalization)"),
    Condition("small_reg_ours", "small_mnist", SMALL, 10, 10, reg="ours",
              description="7x7 MNIST MLP + regularizer, n_eigs 11, weight 0.1"),
    Condition("small_control", "small_mnist", SMALL, 10, 10, description="7x7 MNIST MLP, no regularizer"),
    Condition("untrained", "mnist", BIG, 0, 0, description="784-256x4-10 at random init"),
]}
PHASES = ("unpruned", "pruned")

CSV_COLUMNS = [
    "condition", "phase", "n_nets", "ncut_mean", "ncut_sd", "shuffle_mean", "shuffle_sd", "z_mean",
    "percentile_mean", "n_significant", "test_acc_mean", "test_acc_sd", "sparsity_mean", "epochs",
    "train_s_per_net", "s_per_epoch", "measure_s_per_net", "n_shuffles", "n_clusters", "dataset",
    "architecture", "n_dead_mean", "live_ncut_mean", "live_z_mean", "n_live_significant",
]


# --------------------------------------------------------------------------- data
def small_mnist(x: torch.Tensor) -> torch.Tensor:
    """MNIST (N, 28, 28) in [0, 1] -> (N, 49): area (4x4 mean) resize to 7x7, flattened."""
    return F.interpolate(x[:, None], size=(7, 7), mode="area").reshape(len(x), 49)


def load_data(dataset: str, n_subset: Optional[int], cache: Dict) -> Tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test); missing files raise FileNotFoundError with the fetch hint."""
    if dataset not in cache:
        loader = load_fashion_mnist if dataset == "fashion" else load_mnist
        out = []
        for split in ("train", "test"):
            x, y = loader(split)  # (N, 28, 28), pixel / 255
            if n_subset:
                x, y = x[:n_subset], y[:n_subset]
            x = small_mnist(x) if dataset == "small_mnist" else x.reshape(len(x), -1)
            out += [x.contiguous(), y]
        cache[dataset] = tuple(out)
    return cache[dataset]


# --------------------------------------------------------------------------- models
def build_model(cond: Condition, seed: int, init: str) -> nn.Sequential:
    torch.manual_seed(seed)  # the script owns the global RNG (init and dropout masks)
    base = make_mlp(cond.sizes)
    if init == "keras":
        with torch.no_grad():
            for m in base.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
    if not cond.dropout:
        return base
    layers: List[nn.Module] = []
    for m in base:
        layers.append(m)
        if isinstance(m, nn.ReLU):
            layers.append(nn.Dropout(cond.dropout))
    return nn.Sequential(*layers)


def build_regularizer(kind: Optional[str], model: nn.Module):
    if kind is None:
        return None
    from torch_modularity.regularizer import SpectralRegularizer  # lazy: only these conditions need it

    if kind == "research":
        # The research gradient was 0.5x the true derivative of (lambda / n_eigs) * sum of eigenvalues.
        return SpectralRegularizer(model, n_eigs=RESEARCH_EIGS, weight=0.5 * RESEARCH_LAMBDA / RESEARCH_EIGS,
                                   normalize_relu=True)
    if kind == "ours":
        return SpectralRegularizer(model, weight=0.1)  # the README's table was made with 0.1
    raise ValueError(f"unknown regularizer {kind!r}")


# --------------------------------------------------------------------------- one net
def _timed_train(model, x, y, epochs, seed, log, tag, schedule=None, penalty=None) -> Tuple[float, List[float]]:
    """``train`` with per-epoch wall times (the loop logs once per epoch)."""
    times: List[float] = []
    t_last = [time.perf_counter()]

    def on_epoch(msg: str) -> None:
        now = time.perf_counter()
        times.append(now - t_last[0])
        t_last[0] = now
        log(f"  {tag}{msg.strip()} [{times[-1]:.1f} s]")

    model.train()
    t0 = time.perf_counter()
    train(model, x, y, epochs, seed, batch_size=BATCH, lr=LR, schedule=schedule, penalty=penalty, log=on_epoch)
    model.eval()
    return time.perf_counter() - t0, times


def _measure(model, args, seed) -> Tuple[Dict, float]:
    t0 = time.perf_counter()
    res = clusterability(model, n_clusters=N_CLUSTERS, n_shuffles=args.shuffles, shuffle="layer", seed=seed,
                         n_workers=args.workers, n_init=args.n_init, refine=not args.no_refine)
    full = res.to_dict()
    rec = {k: full[k] for k in ("ncut", "mean", "std", "z", "p_value", "n_isolated", "n_components", "num_nodes",
                                "shuffled_ncuts", "n_dead")}
    live = {"ncut": res.ncut, "z": res.z, "p_value": res.p_value}
    if (res.n_dead or 0) > res.n_isolated:
        # Units cut off from every input-output path (not only isolated) can pass for clusters:
        # measure the live subgraph too, against its own shuffles (the honest number).
        try:
            lr = clusterability(model, n_clusters=N_CLUSTERS, n_shuffles=args.shuffles, shuffle="layer", seed=seed,
                                n_workers=args.workers, n_init=args.n_init, refine=not args.no_refine,
                                exclude_dead=True)
            live = {"ncut": lr.ncut, "z": lr.z, "p_value": lr.p_value}
        except ValueError:  # fewer live units than clusters
            live = {"ncut": float("nan"), "z": float("nan"), "p_value": float("nan")}
    rec.update({"live_ncut": live["ncut"], "live_z": live["z"], "live_p_value": live["p_value"]})
    return rec, time.perf_counter() - t0


def run_net(cond: Condition, net_seed: int, config: Dict, args, data, log) -> Dict:
    x_tr, y_tr, x_te, y_te = data
    tag = f"[{cond.name} seed {net_seed}] "
    model = build_model(cond, net_seed, args.init)
    reg = build_regularizer(cond.reg, model)
    record = {"condition": cond.name, "seed": net_seed, "config": config, "phases": {}}

    epochs, pruning_epochs = config["epochs"], config["pruning_epochs"]
    train_s, epoch_times = 0.0, []
    if epochs:
        train_s, epoch_times = _timed_train(model, x_tr, y_tr, epochs, net_seed, log, tag, penalty=reg)
    model.eval()
    acc = accuracy(model, x_te, y_te)
    meas, meas_s = _measure(model, args, net_seed)
    record["phases"]["unpruned"] = {**meas, "test_acc": acc, "sparsity": 0.0, "epochs": epochs,
                                    "train_s": train_s, "epoch_s": epoch_times, "measure_s": meas_s}
    log(f"  {tag}unpruned: acc {acc:.4f}, n-cut {meas['ncut']:.3f} vs shuffles {meas['mean']:.3f} "
        f"+- {meas['std']:.3f}, p {meas['p_value']:.3f} (train {train_s:.0f} s, measure {meas_s:.0f} s)")

    if pruning_epochs:
        steps = -(-len(x_tr) // BATCH) * pruning_epochs
        # Steps count from 0: the last step of the phase is the end step, so 0.9 is reached.
        schedule = PolynomialSparsity(model, initial=0.5, final=0.9, begin_step=0, end_step=max(1, steps - 1),
                                      frequency=10, power=3, scope="layer")
        p_s, p_times = _timed_train(model, x_tr, y_tr, pruning_epochs, net_seed + 100_000, log, tag + "pruning ",
                                    schedule=schedule, penalty=reg)
        finalize(model)
        model.eval()
        acc = accuracy(model, x_te, y_te)
        sp = layer_sparsity(model)
        meas, meas_s = _measure(model, args, net_seed)
        record["phases"]["pruned"] = {**meas, "test_acc": acc, "sparsity": float(np.mean(list(sp.values()))),
                                      "layer_sparsity": sp, "epochs": pruning_epochs, "train_s": p_s,
                                      "epoch_s": p_times, "measure_s": meas_s}
        log(f"  {tag}pruned: acc {acc:.4f}, n-cut {meas['ncut']:.3f} vs shuffles {meas['mean']:.3f} "
            f"+- {meas['std']:.3f}, p {meas['p_value']:.3f} (train {p_s:.0f} s, measure {meas_s:.0f} s)")
    if reg is not None:
        record["regularizer"] = {"repr": repr(reg), "disconnected": bool(reg.disconnected),
                                 "n_isolated": int(reg.n_isolated)}
        reg.remove()
    return record


# --------------------------------------------------------------------------- records
def net_config(cond: Condition, args) -> Dict:
    """Everything that determines a net's record; ``--resume`` reuses only exact matches."""
    def scaled(paper: int, override: Optional[int]) -> int:
        if not cond.epochs:
            return 0  # untrained: measured only
        if override is not None:
            return override
        return max(1, math.floor(paper * args.epoch_scale + 0.5))

    return {
        "dataset": cond.dataset, "sizes": list(cond.sizes), "dropout": cond.dropout, "reg": cond.reg,
        "epochs": scaled(cond.epochs, args.epochs),
        "pruning_epochs": scaled(cond.pruning_epochs, args.pruning_epochs),
        "n_train": args.subset, "batch": BATCH, "lr": LR, "init": args.init,
        "n_clusters": N_CLUSTERS, "n_shuffles": args.shuffles, "shuffle": "layer",
        "n_init": args.n_init, "refine": not args.no_refine,
    }


def read_records(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by an interrupted write
            print(f"warning: skipping unreadable line {i + 1} of {path}", file=sys.stderr)
    return out


def append_record(path: Path, record: Dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- summary
def _f(x) -> float:
    return float("nan") if x is None else float(x)


def summarize(records: Sequence[Dict]) -> List[Dict]:
    """One row per (condition, phase), conditions in the canonical order."""
    rows = []
    for name in CONDITIONS:
        recs = [r for r in records if r["condition"] == name]
        for phase in PHASES:
            ph = [r["phases"][phase] for r in recs if phase in r["phases"]]
            if not ph:
                continue
            cfg = recs[0]["config"]
            ncut = np.array([_f(p["ncut"]) for p in ph])
            acc = np.array([_f(p["test_acc"]) for p in ph])
            n_sh = len(ph[0]["shuffled_ncuts"])
            train_s = float(np.mean([p["train_s"] for p in ph]))
            epochs = ph[0]["epochs"]
            rows.append({
                "condition": name, "phase": phase, "n_nets": len(ph),
                "ncut_mean": float(ncut.mean()),
                "ncut_sd": float(ncut.std(ddof=1)) if len(ph) > 1 else float("nan"),
                "shuffle_mean": float(np.mean([_f(p["mean"]) for p in ph])),
                "shuffle_sd": float(np.mean([_f(p["std"]) for p in ph])),
                "z_mean": float(np.mean([_f(p["z"]) for p in ph])),
                "percentile_mean": float(np.mean([_f(p["p_value"]) for p in ph])),
                "n_significant": int(sum(_f(p["p_value"]) <= 1.0 / (n_sh + 1) + 1e-12 for p in ph)),
                "test_acc_mean": float(acc.mean()),
                "test_acc_sd": float(acc.std(ddof=1)) if len(ph) > 1 else float("nan"),
                "sparsity_mean": float(np.mean([p["sparsity"] for p in ph])),
                "epochs": epochs,
                "train_s_per_net": train_s,
                "s_per_epoch": train_s / epochs if epochs else float("nan"),
                "measure_s_per_net": float(np.mean([p["measure_s"] for p in ph])),
                "n_shuffles": n_sh, "n_clusters": cfg["n_clusters"], "dataset": cfg["dataset"],
                "architecture": "-".join(str(s) for s in cfg["sizes"]),
                # Records written before the live measurement existed give NaN here.
                "n_dead_mean": float(np.mean([_f(p.get("n_dead")) for p in ph])),
                "live_ncut_mean": float(np.mean([_f(p.get("live_ncut")) for p in ph])),
                "live_z_mean": float(np.mean([_f(p.get("live_z")) for p in ph])),
                "n_live_significant": int(sum(_f(p.get("live_p_value")) <= 1.0 / (n_sh + 1) + 1e-12 for p in ph)),
            })
    return rows


def write_csv(path: Path, rows: List[Dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def machine() -> str:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count()
    return (f"{platform.machine()}, {cpus} CPUs ({platform.processor() or platform.system()}), "
            f"torch {torch.__version__} (training threads: {torch.get_num_threads()}), Python {platform.python_version()}")


def write_markdown(path: Path, rows: List[Dict], records: Sequence[Dict], args, command: str,
                   wall_s: float) -> None:
    compute = sum(p["train_s"] + p["measure_s"] for r in records for p in r["phases"].values())
    lines = [
        "# Clusterability of MLPs: the research protocol rerun with torch_modularity",
        "",
        f"Machine: {machine()}.  ",
        f"Command: `{command}` (finished {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}).  ",
        f"Wall time of this invocation: {wall_s / 60:.1f} min; training + measurement time of all "
        f"{len(records)} nets in the table: {compute / 60:.1f} min.",
        "",
        f"Measurement: k = {N_CLUSTERS}, {args.shuffles} 'layer' shuffles per net, k-means n_init {args.n_init}, "
        f"n-cut refinement {'off' if args.no_refine else 'on'}. percentile = (1 + #{{shuffled < n-cut}}) / "
        f"(shuffles + 1); z uses the population SD of the net's shuffles. "
        + ("**Quick mode** (smoke test: 1000 train/test images): numbers are meaningless."
           if args.quick else (f"Training on the first {args.subset} images only." if args.subset else "")),
        "",
        _epochs_note(rows),
        "",
        "| condition | phase | nets | n-cut (mean ± sd) | shuffle mean | shuffle sd | mean z | mean percentile "
        "| significant nets | dead units | live n-cut | live z | live significant | test acc | sparsity | epochs "
        "| train s/net | s/epoch | measure s/net |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ncut = _fmt(r["ncut_mean"]) + (f" ± {_fmt(r['ncut_sd'])}" if math.isfinite(r["ncut_sd"]) else "")
        acc = _fmt(r["test_acc_mean"], ".4f")
        lines.append(
            f"| {r['condition']} | {r['phase']} | {r['n_nets']} | {ncut} | {_fmt(r['shuffle_mean'])} | "
            f"{_fmt(r['shuffle_sd'])} | {_fmt(r['z_mean'], '.2f')} | {_fmt(r['percentile_mean'])} | "
            f"{r['n_significant']}/{r['n_nets']} | {_fmt(r['n_dead_mean'], '.0f')} | {_fmt(r['live_ncut_mean'])} | "
            f"{_fmt(r['live_z_mean'], '.2f')} | {r['n_live_significant']}/{r['n_nets']} | {acc} | {_fmt(r['sparsity_mean'], '.2f')} | {r['epochs']} | "
            f"{_fmt(r['train_s_per_net'], '.0f')} | {_fmt(r['s_per_epoch'], '.1f')} | "
            f"{_fmt(r['measure_s_per_net'], '.1f')} |")
    lines += [
        "",
        "Columns: n-cut sd is over nets (ddof 1); shuffle mean / sd are the per-net shuffle mean and "
        "population SD, averaged over nets; significant nets = percentile at its minimum 1/(shuffles+1) "
        "(the research notebooks' `is_sig`); dead units = units on no input-to-output path worth the name "
        "(path flow < 1e-3 of their layer's maximum, isolated ones included; mean over nets); live n-cut / z = "
        "the same measurement on the subgraph without them, against its own shuffles (equal to the raw ones "
        "when no unit is dead); train s/net is the time of that phase (pruned: the pruning "
        "phase only); s/epoch = train s/net / epochs. Lower n-cut, negative z and small percentiles mean "
        "more clusterable than the shuffles.",
        "",
        "Conditions:",
        "",
    ]
    for name in dict.fromkeys(r["condition"] for r in rows):
        c = CONDITIONS[name]
        lines.append(f"- `{name}`: {c.description} ({'-'.join(map(str, c.sizes))}"
                     + (f", dropout {c.dropout}" if c.dropout else "") + ").")
    lines += [
        "",
        f"Recipe: Adam lr {LR}, batch {BATCH}, cross-entropy; weights initialised "
        + ("Glorot-uniform with zero biases (Keras defaults)" if args.init == "keras" else "with PyTorch defaults")
        + "; inputs pixel/255. Pruning phase: fresh Adam, PolynomialSparsity 0.5 -> 0.9 (power 3, every 10 "
        "steps, per layer, all Linear layers) from step 0 to the phase's last step; the regularizer stays on. "
        "7x7 MNIST: `F.interpolate(x[:, None], size=(7, 7), mode='area')` (4x4 mean pooling). "
        "Net i of every condition uses seed base + i for init, dropout and data order.",
        "",
        "Per-net records: `paper_mlp_nets.jsonl`; figure: `paper_mlp.png`.",
        "",
    ]
    path.write_text("\n".join(lines))


def _epochs_note(rows: List[Dict]) -> str:
    """Say plainly whether the table used the paper's epochs."""
    used: Dict[str, Dict[str, int]] = {}
    for r in rows:
        used.setdefault(r["condition"], {})[r["phase"]] = r["epochs"]
    short = []
    for name, phases in used.items():
        c = CONDITIONS[name]
        ours = (phases.get("unpruned", 0), phases.get("pruned", 0))
        if ours != (c.epochs, c.pruning_epochs):
            short.append(f"{name} {ours[0]} + {ours[1]} (paper {c.epochs} + {c.pruning_epochs})")
    if not short:
        return "Epochs: the paper's (784-256x4-10: 20 + 20 pruning; 49-64-64-64-10: 10 + 10 pruning)."
    return "**Epochs shortened, NOT the paper's protocol** (training + pruning): " + "; ".join(short) + "."


def write_plot(path: Path, records: Sequence[Dict]) -> None:
    """Per condition two panels (unpruned above, pruned below): each net's n-cut vs its shuffles."""
    import matplotlib  # lazy: only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CONDITIONS if any(r["condition"] == n for r in records)]
    if not names:
        return
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(2 * nrows, ncols, figsize=(3.4 * ncols, 2.5 * 2 * nrows), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only
    colors = {"unpruned": "tab:blue", "pruned": "tab:orange"}
    for idx, name in enumerate(names):
        recs = sorted((r for r in records if r["condition"] == name), key=lambda r: r["seed"])
        for k, phase in enumerate(PHASES):
            ax = axes[2 * (idx // ncols) + k, idx % ncols]
            nets = [r for r in recs if phase in r["phases"]]
            if not nets:
                ax.axis("off")
                continue
            for pos, r in enumerate(nets):
                p = r["phases"][phase]
                sh = np.array([_f(v) for v in p["shuffled_ncuts"]])
                ax.scatter(pos + rng.uniform(-0.15, 0.15, sh.size), sh, s=6, color="0.6", alpha=0.7, linewidths=0)
                ax.hlines(_f(p["mean"]), pos - 0.25, pos + 0.25, color="0.3", linewidth=1)
                ax.scatter([pos], [_f(p["ncut"])], marker="D", s=32, color=colors[phase], zorder=3)
            ax.set_xlim(-0.6, len(nets) - 0.4)
            ax.set_xticks(range(len(nets)))
            ax.set_xticklabels([f"seed {r['seed']}" for r in nets], fontsize=7)
            ax.set_title(f"{name}, {phase}", fontsize=9)
            ax.set_ylabel(f"n-cut (k={N_CLUSTERS})", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
    for idx in range(len(names), nrows * ncols):
        for k in range(2):
            axes[2 * (idx // ncols) + k, idx % ncols].axis("off")
    fig.suptitle("n-cut of each net (diamond) vs its 'layer' shuffles (grey dots, bar = shuffle mean); "
                 "lower = more clusterable", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conditions", default=None,
                   help=f"comma-separated subset of: {', '.join(CONDITIONS)} (default: all)")
    p.add_argument("--nets", type=int, default=None, help="independently seeded nets per condition (default 3)")
    p.add_argument("--shuffles", type=int, default=None, help="'layer' shuffles per measurement (default 50)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs for every trained condition (default: the paper's, 20 big MLP / 10 small)")
    p.add_argument("--pruning-epochs", type=int, default=None,
                   help="pruning-phase epochs for every trained condition (default: the paper's, 20 / 10)")
    p.add_argument("--epoch-scale", type=float, default=1.0,
                   help="multiply every condition's paper epochs (both phases) by this factor, rounded, at least 1; "
                        "--epochs / --pruning-epochs take precedence (e.g. 0.75: 15 + 15 big, 8 + 8 small)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: benchmarks/results/)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished nets in OUT/paper_mlp_nets.jsonl (same settings) and run only the rest")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1000 train/test images, 1 + 1 epochs, 5 shuffles, 1 net, all conditions")
    p.add_argument("--seed", type=int, default=0, help="net i of each condition uses seed SEED + i")
    p.add_argument("--subset", type=int, default=None, help="use only the first N train and test images")
    p.add_argument("--workers", type=int, default=None, help="processes for the shuffles (default: all CPUs; "
                   "1 inside parallel --jobs)")
    p.add_argument("--jobs", type=int, default=None,
                   help="nets trained in parallel processes (default: all CPUs; Linux); results do not depend on it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for training (default 1: on a shared 2-core machine 2 threads ran "
                        "30-80x slower per step than 1 whenever other processes held the cores)")
    p.add_argument("--n-init", type=int, default=3, help="k-means++ restarts per clustering (library default 3)")
    p.add_argument("--no-refine", action="store_true", help="plain research pipeline: no greedy n-cut refinement")
    p.add_argument("--init", choices=("keras", "torch"), default="keras",
                   help="weight init: Glorot-uniform + zero bias as the research code (default) or PyTorch's")
    args = p.parse_args(argv)
    if args.quick:
        args.nets = 1 if args.nets is None else args.nets
        args.shuffles = 5 if args.shuffles is None else args.shuffles
        args.epochs = 1 if args.epochs is None else args.epochs
        args.pruning_epochs = 1 if args.pruning_epochs is None else args.pruning_epochs
        args.subset = 1000 if args.subset is None else args.subset
    args.nets = 3 if args.nets is None else args.nets
    args.shuffles = 50 if args.shuffles is None else args.shuffles
    names = list(CONDITIONS) if not args.conditions else [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONDITIONS]
    if unknown or not names:
        p.error(f"unknown condition(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONDITIONS)}")
    args.condition_names = list(dict.fromkeys(names))
    if not args.epoch_scale > 0:
        p.error("--epoch-scale must be positive")
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be at least 1")
    for flag in ("nets", "shuffles", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    for flag in ("epochs", "pruning_epochs"):
        v = getattr(args, flag)
        if v is not None and v < (1 if flag == "epochs" else 0):
            p.error(f"--{flag.replace('_', '-')} must be at least {1 if flag == 'epochs' else 0}")
    return args


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = None) -> int:
    args = parse_args(argv)
    if log is None:
        def log(msg: str) -> None:
            print(msg, flush=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, log)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another process (the smoke test)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _net_job(name: str, seed: int, config: Dict, args: argparse.Namespace) -> Dict:
    """One net in a worker process of ``--jobs``: its own data copy and torch thread count."""
    torch.set_num_threads(args.threads)
    cond = CONDITIONS[name]

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"[{name} seed {seed}] {cond.description}: {config['epochs']} + {config['pruning_epochs']} epochs")
    record = run_net(cond, seed, config, args, load_data(cond.dataset, args.subset, {}), log)
    record["torch_threads"] = torch.get_num_threads()
    return record


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]], log: Callable[[str], None]) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / "paper_mlp_nets.jsonl"

    # Resume: reuse the records of nets with exactly this run's settings, for every condition.
    configs = {name: net_config(CONDITIONS[name], args) for name in CONDITIONS}
    records = []
    stale = 0
    for r in (read_records(rec_path) if args.resume else []):
        if r.get("condition") in configs and r.get("config") == configs[r["condition"]]:
            records.append(r)
        else:
            stale += 1
    if stale:
        log(f"note: {stale} record(s) in {rec_path} have other settings; ignored (left in the file)")
    done = {(r["condition"], r["seed"]) for r in records}

    command = "python benchmarks/reproduce_paper.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log(f"{machine()}\nconditions: {', '.join(args.condition_names)}; {args.nets} net(s) each; "
        f"{args.shuffles} shuffles; out: {out}")
    cache: Dict = {}
    for name in args.condition_names:  # fail on missing data files now, not after an hour of training
        if any((name, args.seed + i) not in done for i in range(args.nets)):
            load_data(CONDITIONS[name].dataset, args.subset, cache)
    if rec_path.exists() and not args.resume:
        backup = rec_path.with_name(rec_path.name + ".bak")
        rec_path.replace(backup)
        log(f"previous records moved to {backup} (use --resume to continue them)")
    pending = []
    for name in args.condition_names:
        for i in range(args.nets):
            seed = args.seed + i
            if (name, seed) in done:
                log(f"[{name} seed {seed}] already in the records, skipped")
            else:
                pending.append((name, seed))

    def finish(record: Dict) -> None:
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = _nan_to_none(record)
        append_record(rec_path, record)  # as soon as a net is done: --resume picks up from here
        records.append(record)
        done.add((record["condition"], record["seed"]))

    jobs = min(args.jobs or _cpu_count(), len(pending))
    if jobs > 1 and sys.platform.startswith("linux"):
        # Nets are independent and seeded by (condition, seed) only: train them in parallel, one
        # torch thread each, shuffles in-process (the results do not depend on worker counts).
        log(f"{len(pending)} net(s) on {jobs} parallel jobs (per-net times below are per job)")
        job_args = argparse.Namespace(**{**vars(args), "workers": 1})
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_net_job, name, seed, configs[name], job_args) for name, seed in pending]
            for fut in cf.as_completed(futures):
                finish(fut.result())
    else:
        for name, seed in pending:
            cond, cfg = CONDITIONS[name], configs[name]
            log(f"[{name} seed {seed}] {cond.description}: {cfg['epochs']} + {cfg['pruning_epochs']} epochs")
            record = run_net(cond, seed, cfg, args, load_data(cond.dataset, args.subset, cache), log)
            record["torch_threads"] = torch.get_num_threads()
            finish(record)

    rows = summarize(records)
    write_csv(out / "paper_mlp.csv", rows)
    wall = time.perf_counter() - t_start
    write_markdown(out / "paper_mlp.md", rows, records, args, command, wall)
    write_plot(out / "paper_mlp.png", records)
    log((out / "paper_mlp.md").read_text())
    log(f"wrote {out / 'paper_mlp.csv'}, {out / 'paper_mlp.md'}, {out / 'paper_mlp.png'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FileNotFoundError as exc:  # missing dataset: the message names the file and the fetch command
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
