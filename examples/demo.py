"""A short tour: dropout on a NumPy array, a mask and its backward, reproducibility, and a quick
throughput comparison with NumPy (and torch, when it is installed)."""

from __future__ import annotations

import time

import fastdrop
import numpy as np


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    print(
        f"fastdrop {fastdrop.__version__}: generator path {fastdrop.simd_backend()}, "
        f"{fastdrop.get_num_threads()} threads\n"
    )

    x = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    g = fastdrop.Generator(seed=0)
    y, mask = fastdrop.dropout(x, p=0.5, generator=g, return_mask=True)
    print("x =\n", x, "\ndropout(x, p=0.5) =\n", y)
    print("mask (True = kept) =\n", mask.numpy())
    print("backward(ones) =\n", mask.backward(np.ones_like(x)), "\n")

    again = fastdrop.dropout(x, p=0.5, generator=fastdrop.Generator(seed=0))
    print("same seed, same mask:", bool(np.array_equal(y, again)))
    print(
        "dropout2d mask on (2, 3, 4, 4):",
        fastdrop.dropout2d(np.ones((2, 3, 4, 4), np.float32), 0.5, return_mask=True)[1].shape,
    )

    n = 1 << 24
    big = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    out = np.empty_like(big)
    gb = 2 * big.nbytes / 1e9
    rng = np.random.default_rng(1)
    rows = [
        ("np.copyto (the floor)", best_of(lambda: np.copyto(out, big))),
        ("fastdrop.dropout", best_of(lambda: fastdrop.dropout(big, 0.5))),
        (
            "numpy x * (rand >= p) / (1 - p)",
            best_of(lambda: big * (rng.random(n, dtype=np.float32) >= 0.5) / 0.5, 3),
        ),
    ]
    try:
        import torch

        t = torch.from_numpy(big)
        rows.append(
            ("torch F.dropout (CPU)", best_of(lambda: torch.nn.functional.dropout(t, 0.5), 3))
        )
        rows.append(
            ("fastdrop.dropout on a torch tensor", best_of(lambda: fastdrop.dropout(t, 0.5)))
        )
    except ImportError:
        print("(torch is not installed: skipping the torch rows)")
    print(f"\n{n:,} float32, p = 0.5, out of place:")
    print(f"{'':38s}{'ms':>9s}{'GB/s':>8s}{'x copyto':>10s}")
    floor = rows[0][1]
    for name, s in rows:
        print(f"{name:38s}{s * 1e3:9.2f}{gb / s:8.1f}{s / floor:10.2f}")


if __name__ == "__main__":
    main()
