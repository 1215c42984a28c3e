"""How fastdrop's threads get along with other threads (issue 14, cause 1).

Alternates, in one process, round after round, so that a shared machine's drift hits every
candidate alike; prints the median and the spread (quartiles) of each:

  a) a 1M-element float32 dropout (p = 0.1, in place), fastdrop on 1 vs N threads, on an idle
     machine and with a busy loop in another process pinned to one core;
  b) a timm `vit_tiny_patch16_224` training step (forward, backward, SGD; every dropout rate
     0.1) with torch on N threads: torch's own dropout, and fastdrop after
     `fastdrop.nn.replace_dropout` on 1 vs N threads; idle and with the busy loop.

    python benches/threads.py [--rounds 15] [--batch 8] [--steps 1] [--only micro|train]

Wall-clock numbers on a shared machine: read the spread, not just the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import fastdrop
import numpy as np
from fastdrop.bench_train import _SPIN

# Pinned to one CPU, and gone with its parent like bench_train's spinner.
BUSY = "import os\nos.sched_setaffinity(0, {%d})\n" + _SPIN


@contextmanager
def busy_core(cpu: int | None):
    """Another process spinning on `cpu` (nothing when None)."""
    if cpu is None:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY % cpu])
    time.sleep(0.3)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def spread(xs):
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[0], q[2]


def report(title: str, results: dict, unit: str, scale: float, base: str | None = None):
    print(title)
    base_med = statistics.median(results[base]) if base else None
    for name, xs in results.items():
        med, lo, hi = spread(xs)
        ratio = f"  {base_med / med:5.2f}x vs {base}" if base_med else ""
        print(
            f"  {name:<24} {med * scale:9.1f} {unit}  (quartiles {lo * scale:.1f}-"
            f"{hi * scale:.1f}){ratio}"
        )
    sys.stdout.flush()


def micro(rounds: int, threads: int, busy: int | None, calls: int = 50):
    x = np.ones(1 << 20, np.float32)
    cands = {f"fastdrop {t} thread{'s' * (t > 1)}": t for t in (1, threads)}
    results = {name: [] for name in cands}
    with busy_core(busy):
        for _ in range(rounds):
            for name, t in cands.items():
                fastdrop.set_num_threads(t)
                fastdrop.dropout(x, 0.1, inplace=True)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fastdrop.dropout(x, 0.1, inplace=True)
                    times.append(time.perf_counter() - t0)
                results[name].append(statistics.median(times))
    where = "idle" if busy is None else f"core {busy} busy"
    report(
        f"1M float32 dropout in place, p=0.1 ({where}; median of {calls} calls a round, "
        f"{rounds} rounds)",
        results,
        "us",
        1e6,
        base=next(iter(cands)),
    )


def train(rounds: int, threads: int, busy: int | None, batch: int, steps: int):
    import fastdrop.nn
    import timm
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw = dict(drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1)
    models = {"torch dropout": timm.create_model("vit_tiny_patch16_224", **kw)}
    fd = timm.create_model("vit_tiny_patch16_224", **kw)
    fd.load_state_dict(models["torch dropout"].state_dict())
    fastdrop.nn.replace_dropout(fd)
    cands = {"torch dropout": (models["torch dropout"], None)}
    for t in (1, threads):
        cands[f"fastdrop {t} thread{'s' * (t > 1)}"] = (fd, t)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3) for m, _ in cands.values()}

    def step(model):
        opt = opts[id(model)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    results = {name: [] for name in cands}
    with busy_core(busy):
        for model, t in cands.values():  # warm-up
            if t:
                fastdrop.set_num_threads(t)
            step(model)
        for _ in range(rounds):
            for name, (model, t) in cands.items():
                if t:
                    fastdrop.set_num_threads(t)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(model)
                results[name].append((time.perf_counter() - t0) / steps)
    where = "idle" if busy is None else f"core {busy} busy"
    report(
        f"vit_tiny_patch16_224 training step, batch {batch}, torch {threads} threads ({where};"
        f" {steps} steps a round, {rounds} rounds)",
        results,
        "ms",
        1e3,
        base="torch dropout",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1, help="training steps a round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--busy-cpu", type=int, default=(os.cpu_count() or 2) - 1)
    ap.add_argument("--only", choices=["micro", "train"])
    args = ap.parse_args()
    print(
        f"{os.cpu_count()} CPUs, fastdrop default {fastdrop.get_num_threads()} threads, "
        f"{fastdrop.simd_backend()}"
    )
    for busy in (None, args.busy_cpu):
        if args.only in (None, "micro"):
            micro(args.rounds * 2, args.threads, busy)
        if args.only in (None, "train"):
            train(args.rounds, args.threads, busy, args.batch, args.steps)


if __name__ == "__main__":
    main()
