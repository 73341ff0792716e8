"""Benchmark: training-step overhead and gradient error of ``SpectralRegularizer``.

Side by side, in one process, on the 784-256x4-10 MLP (batch 128, Adam lr 1e-3, float32):

* ``plain``: forward + cross-entropy + backward + Adam step;
* ``ours``: the same with ``+ reg()`` (warm-started Chebyshev block solver + HF loss);
* ``naive``: the same with the naive reference penalty: the dense N x N normalized Laplacian
  built in torch and ``torch.linalg.eigh`` with autograd.

The three variants are timed interleaved (round-robin), so that load from other processes
hits them alike; medians and minima are reported (on a shared machine the minima are the
closest to the undisturbed cost). The gradient error is the relative L2 error of
``reg()``'s gradient (what training uses at that step, warm-started) versus the exact
gradient of the same eigenvalue sum by autograd through dense ``eigh`` in float64, at several
steps of a regularized training run; with ``--every N`` also on the reused steps.

Run ``python benchmarks/bench_regularizer.py`` (add ``--quick`` for a smoke run, ``--large``
for the ~21k-node MLP 784-4096x5-10, plain vs ours only, ``--overlap`` for
``SpectralRegularizer(overlap=True)``). Data: MNIST via
``torch_modularity.datasets.load_mnist`` (random inputs if it is missing).
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from typing import Dict, List

import torch
from torch import nn

from torch_modularity import _native
from torch_modularity.regularizer import SpectralRegularizer


def make_mlp(sizes, seed: int = 0) -> nn.Sequential:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the benchmark owns the RNG; restored below
    layers: List[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    torch.random.set_rng_state(gen_state)
    return model


def linears(model: nn.Module) -> List[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def dense_eig_sum(weights: List[torch.Tensor], n_eigs: int) -> torch.Tensor:
    """Naive reference: lambda_2 + ... + lambda_{n_eigs+1} via the dense L and torch.linalg.eigh."""
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    n = offs[-1]
    a = weights[0].new_zeros(n, n)
    for l, w in enumerate(weights):
        a[offs[l + 1]:offs[l + 2], offs[l]:offs[l + 1]] = w.abs()
        a[offs[l]:offs[l + 1], offs[l + 1]:offs[l + 2]] = w.abs().T
    s = a.sum(dim=1).rsqrt()
    lap = torch.eye(n, dtype=a.dtype, device=a.device) - s[:, None] * a * s[None, :]
    return torch.linalg.eigvalsh(lap)[1:n_eigs + 1].sum()


def exact_grad(model: nn.Module, n_eigs: int) -> List[torch.Tensor]:
    ws = [l.weight.detach().double().requires_grad_(True) for l in linears(model)]
    val = dense_eig_sum(ws, n_eigs)
    return list(torch.autograd.grad(val, ws))


def reg_grad(model: nn.Module, reg: SpectralRegularizer) -> List[torch.Tensor]:
    ws = [l.weight for l in linears(model)]
    val = reg() / reg.weight
    return [g.double() for g in torch.autograd.grad(val, ws)]


def rel_err(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((y ** 2).sum()) for y in b)
    return (num / den) ** 0.5


def _gap(reg: SpectralRegularizer) -> float:
    """Relative gap (lambda_{k+1} - lambda_k) / lambda_{k+1} from the solver's Ritz values."""
    r = reg.last_result
    vals = r.ritz_values.double()
    lam = 1.0 - (vals.clamp_min(0).sqrt() if r.method == "gram" else vals)
    k = reg.k
    return round(float((lam[k] - lam[k - 1]) / lam[k]), 4)


def data(n: int, quick: bool):
    try:
        from torch_modularity.datasets import load_mnist

        x, y = load_mnist("train", flatten=True)
        return x[:n], y[:n]
    except Exception as err:  # pragma: no cover - data missing
        print(f"(MNIST unavailable: {err}; using random inputs)")
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(args) -> Dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.sizes:
        sizes = tuple(int(v) for v in args.sizes.split("-"))
    else:
        sizes = (784, 4096, 4096, 4096, 4096, 4096, 10) if args.large else (784, 256, 256, 256, 256, 10)
    n_data = 128 * (args.steps + args.warmup + 4)
    x, y = data(min(n_data, 60000), args.quick)
    x, y = x.to(device), y.to(device)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x) - 127, 128)]
    loss_fn = nn.CrossEntropyLoss()

    solver_dtype = getattr(torch, args.solver_dtype) if args.solver_dtype else None
    variants: Dict[str, Dict] = {}
    names = ["plain", "ours"] + ([] if args.large or args.no_naive else ["naive"])
    for name in names:
        model = make_mlp(sizes, seed=0).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        reg = None
        if name == "ours":
            reg = SpectralRegularizer(model, n_eigs=args.n_eigs, weight=args.weight, every=args.every,
                                      degree=args.degree, tol=args.tol, solver_dtype=solver_dtype,
                                      block_size=args.block_size, overlap=args.overlap)
        variants[name] = dict(model=model, opt=opt, reg=reg, times=[])

    def step(v, xb, yb):
        model, opt, reg = v["model"], v["opt"], v["reg"]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        if reg is not None:
            loss = loss + reg()
        elif v is variants.get("naive"):
            loss = loss + args.weight * dense_eig_sum([l.weight for l in linears(model)], args.n_eigs)
        loss.backward()
        opt.step()

    # Warm-up: the regularized model leaves the random-init regime (the gap opens), caches warm.
    for i in range(args.warmup):
        xb, yb = batches[i % len(batches)]
        for name in names:
            if name == "naive" and i >= 2:
                continue
            step(variants[name], xb, yb)

    # Interleaved timing.
    naive_every = max(1, args.steps // max(1, args.naive_steps))
    for i in range(args.steps):
        xb, yb = batches[(args.warmup + i) % len(batches)]
        for name in names:
            if name == "naive" and i % naive_every:
                continue
            _sync(device)
            t = time.perf_counter()
            step(variants[name], xb, yb)
            _sync(device)
            variants[name]["times"].append(time.perf_counter() - t)

    out: Dict = {"device": str(device), "sizes": sizes, "nodes": sum(sizes), "threads": args.threads, "n_eigs": args.n_eigs,
                 "weight": args.weight, "every": args.every, "degree": args.degree, "block_size": args.block_size,
                 "solver_dtype": args.solver_dtype or "float32"}
    ours = variants["ours"]["reg"]
    # Which path ran: the compiled kernels grow the regularizer's workspace; with several threads
    # they split their work over torch's OpenMP team when there is one.
    out["compiled"] = ours._work.buffer is not None
    out["openmp_team"] = out["compiled"] and _native.openmp_team(torch.get_num_threads()) is not None
    med = {name: statistics.median(v["times"]) for name, v in variants.items()}
    low = {name: min(v["times"]) for name, v in variants.items()}
    out["median_ms"] = {k: round(v * 1e3, 3) for k, v in med.items()}
    out["min_ms"] = {k: round(v * 1e3, 3) for k, v in low.items()}
    out["overhead_ours"] = round(med["ours"] / med["plain"] - 1.0, 3)
    out["overhead_ours_min"] = round(low["ours"] / low["plain"] - 1.0, 3)
    if "naive" in med:
        out["naive_ratio"] = round(med["naive"] / med["plain"], 1)
    reg = variants["ours"]["reg"]
    res = reg.last_result
    out["solver_last"] = {"method": res.method, "iterations": res.iterations, "matvecs": res.matvecs,
                          "residual": float(res.residuals.max())}

    if not args.large:
        # Gradient error along the regularized trajectory (warm-started, as in training): the
        # regularizer's gradient at that step versus autograd through dense eigh in float64.
        model, opt = variants["ours"]["model"], variants["ours"]["opt"]
        errs = []
        batch_i = 0

        def train_steps(n):
            nonlocal batch_i
            for _ in range(n):
                xb, yb = batches[batch_i % len(batches)]
                batch_i += 1
                step(variants["ours"], xb, yb)

        for i in range(args.grad_checks):
            train_steps(args.grad_gap)
            # The gradient the last training step used: same weights as reg's last solve.
            probe = SpectralRegularizer(model, n_eigs=args.n_eigs, weight=1.0, degree=args.degree, tol=args.tol,
                                        solver_dtype=solver_dtype, block_size=args.block_size)
            probe.load_state_dict(reg.state_dict())  # warm state of the training regularizer
            probe.steps = 0  # force a (warm) recompute, as every=1 training does each step
            g_ours = reg_grad(model, probe)
            g_exact = exact_grad(model, args.n_eigs)
            errs.append({"step": reg.steps, "rel_err": rel_err(g_ours, g_exact), "rel_gap": _gap(probe)})
        out["grad_rel_err"] = errs
        out["grad_rel_err_max"] = max(e["rel_err"] for e in errs)
        # every=N: gradient error with eigenvectors that are `age` training steps old.
        stale = SpectralRegularizer(model, n_eigs=args.n_eigs, weight=1.0, every=10 ** 9, degree=args.degree,
                                    tol=args.tol, solver_dtype=solver_dtype, block_size=args.block_size)
        stale.load_state_dict(reg.state_dict())
        stale.steps = 0
        reg_grad(model, stale)  # fresh eigenvectors at the current weights, then frozen
        ages, stale_errs = [1, 2, 5, 10], {}
        for age in range(1, max(ages) + 1):
            train_steps(1)
            if age in ages:
                stale_errs[age] = rel_err(reg_grad(model, stale), exact_grad(model, args.n_eigs))
        out["stale_grad_rel_err"] = stale_errs
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps, smoke test")
    p.add_argument("--large", action="store_true", help="the ~21k-node MLP 784-4096x5-10 (plain vs ours only)")
    p.add_argument("--sizes", default=None, help="layer sizes, e.g. 784-512-512-10 (overrides --large)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--naive-steps", type=int, default=5)
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--n-eigs", type=int, default=11)
    p.add_argument("--weight", type=float, default=0.1)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--degree", type=int, default=None, help="per-step Chebyshev degree (default: the library's)")
    p.add_argument("--block-size", type=int, default=None, help="solver block (default n_eigs + 1 + 8)")
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--solver-dtype", default=None, choices=[None, "float32", "float64"])
    p.add_argument("--grad-checks", type=int, default=5)
    p.add_argument("--grad-gap", type=int, default=10, help="training steps between gradient checks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overlap", action="store_true", help="SpectralRegularizer(overlap=True)")
    p.add_argument("--device", default="cpu", help="where the model and data live, e.g. cuda")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.degree is None:
        args.degree = inspect.signature(SpectralRegularizer).parameters["degree"].default
    if args.quick:
        args.steps, args.warmup, args.naive_steps, args.grad_checks, args.grad_gap = 10, 5, 2, 2, 3
    if args.large:
        args.steps, args.warmup = (3, 1) if args.quick else (6, 3)
    out = bench(args)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    path = "compiled step" if out["compiled"] else "torch step"
    if out["openmp_team"]:
        path += ", split over torch's OpenMP team"
    print(f"[{out['device']}] MLP {'-'.join(map(str, out['sizes']))} ({out['nodes']} nodes), batch 128, Adam, float32, "
          f"{out['threads']} threads; n_eigs={out['n_eigs']} weight={out['weight']} every={out['every']} "
          f"degree={out['degree']} block={out['block_size'] or 'k+8'} solver={out['solver_dtype']}; {path}")
    for k, v in out["median_ms"].items():
        print(f"  {k:6s} step: {v:9.2f} ms median, {out['min_ms'][k]:9.2f} ms min")
    print(f"  overhead of ours: {100 * out['overhead_ours']:+.1f} % of the plain step (medians; "
          f"{100 * out['overhead_ours_min']:+.1f} % from the minima, the least disturbed by other load)")
    if "naive_ratio" in out:
        print(f"  naive dense eigh step: {out['naive_ratio']}x the plain step")
    print(f"  last solve: {out['solver_last']}")
    if "grad_rel_err" in out:
        for e in out["grad_rel_err"]:
            print(f"  step {e['step']:4d}: gradient rel. error vs exact (fp64 dense eigh) {e['rel_err']:.2e}"
                  f"  (relative gap lambda_k+1 vs lambda_k: {e['rel_gap']})")
        print("  every=N: gradient rel. error with eigenvectors reused for `age` steps: "
              + ", ".join(f"age {a}: {v:.1e}" for a, v in out["stale_grad_rel_err"].items()))


if __name__ == "__main__":
    main()
