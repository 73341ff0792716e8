"""Where a regularized training step spends its time: torch.profiler tables and linalg probes.

Runs ``steps`` warm training steps of the 784-256x4-10 MLP (or ``--sizes``) with
``SpectralRegularizer`` under ``torch.profiler`` and prints the top operators by self device
time and by self CPU time, then times the small dense linear algebra of one solver step
(QR of the ``(n_small, m)`` block, ``eigh`` of the ``m x m`` Rayleigh-Ritz matrix) on the
device and through a CPU round trip, and the cost of one host-device synchronisation.

Run ``python benchmarks/profile_regularizer.py --device cuda`` (or ``--device cpu``).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from torch_modularity.regularizer import SpectralRegularizer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps=50):
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="784-256-256-256-256-10")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    device = torch.device(args.device)
    sizes = [int(v) for v in args.sizes.split("-")]
    torch.manual_seed(0)
    layers = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    model = nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    reg = SpectralRegularizer(model)
    x = torch.rand(128, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (128,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step(with_reg=True):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if with_reg:
            loss = loss + reg()
        loss.backward()
        opt.step()

    for _ in range(30):
        step()
    print(f"[{device}] plain step {_time(lambda: step(False), device, 30):.3f} ms, "
          f"regularized step {_time(step, device, 30):.3f} ms, reg() forward alone "
          f"{_time(lambda: reg(), device, 30):.3f} ms")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        _sync(device)
    table = prof.key_averages()
    if device.type == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))

    # Small dense linear algebra of one solver step, on the device vs a CPU round trip.
    n_small = reg.last_result.block.shape[0]
    m = reg.last_result.block.shape[1]
    yb = torch.randn(n_small, m, device=device)
    h = yb.T @ yb
    print(f"probes: block ({n_small}, {m})")
    print(f"  qr on {device}: {_time(lambda: torch.linalg.qr(yb, mode='reduced'), device):.3f} ms")
    print(f"  qr via cpu: {_time(lambda: torch.linalg.qr(yb.cpu(), mode='reduced').Q.to(device), device):.3f} ms")
    print(f"  eigh {m}x{m} on {device}: {_time(lambda: torch.linalg.eigh(h), device):.3f} ms")
    print(f"  eigh via cpu: {_time(lambda: [t.to(device) for t in torch.linalg.eigh(h.cpu())], device):.3f} ms")

    def cholqr():
        g = (yb.T @ yb).cpu().double()
        r = torch.linalg.cholesky(g, upper=True)
        return yb @ torch.linalg.inv(r).to(device=device, dtype=yb.dtype)

    print(f"  cholesky-qr (gram on {device}, chol on cpu): {_time(cholqr, device):.3f} ms")
    s = yb.sum()
    print(f"  one sync (.item() of a ready scalar): {_time(lambda: s.item(), device, 200) * 1e3:.1f} us")


if __name__ == "__main__":
    main()
