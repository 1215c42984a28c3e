"""``python -m fastdrop bench``: fastdrop against torch, naive NumPy and the memory floor.

For every variant and size the same data goes through each implementation; the table gives
throughput in GB/s (bytes read + written, so every row is comparable) and two ratios: fastdrop's
time over the floor's (``np.copyto`` into a preallocated array; ``np.multiply(x, c, out=x)`` for
the in-place variant; ``np.add(a, b, out=c)`` for the fused ones), the same over the
allocating floor (``np.copy(x)``, ``np.add(a, b)``: an out-of-place call pays for fresh output
pages as these do), and torch's time over fastdrop's. Timings are medians of several runs after a
warm-up, from ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

import fastdrop

P = 0.1
VARIANTS = (
    "dropout",
    "dropout_inplace",
    "dropout2d",
    "drop_path",
    "alpha_dropout",
    "dropout_add",
    "drop_path_add",
)
FUSED = ("dropout_add", "drop_path_add")
DEFAULT_SIZES = (1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 26)
QUICK_SIZES = (1 << 10, 1 << 16, 1 << 20)
#: Implementations in table order: name -> column heading.
IMPLS = {
    "fastdrop": "fastdrop",
    "fastdrop_out": "fastdrop(out=)",
    "fastdrop_torch": "fastdrop(torch)",
    "torch": "torch",
    "numpy": "numpy naive",
    "unfused": "fastdrop+np.add",
    "floor": "floor",
    "alloc_floor": "alloc floor",
}


def parse_size(text: str) -> int:
    """``"1024"``, ``"1K"``, ``"64M"``, ``"1G"`` (powers of two) -> elements."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    value = int(float(digits) * mult)
    if value < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return value


def label(n: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def machine(threads: int) -> Dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd_backend": fastdrop.simd_backend(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastdrop": fastdrop.__version__,
    }
    torch = _torch()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _has_fastdrop_torch() -> bool:
    try:
        from . import _torch  # noqa: F401
    except ImportError:
        return False
    return True


def median_time(
    fn: Callable[[], Any], repeats: int, reset: Optional[Callable[[], Any]] = None
) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def nchw(n: int):
    """An (N, C, H, W) shape of about `n` elements, (64, 256, 1, L) once `n` is large enough."""
    batch = 64 if n >= 64 * 256 else max(1, n // 256)
    chans = max(1, min(256, n // batch))
    return (batch, chans, 1, max(1, n // (batch * chans)))


def _cases(variant: str, n: int, dtype: np.dtype, rng: np.random.Generator):
    """(data, {impl: callable}, floor name, bytes moved) for one variant and size."""
    keep = 1.0 - P
    s = 1.0 / keep
    shape = nchw(n) if variant in ("dropout2d", "drop_path", "drop_path_add") else (n,)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    r = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    out = np.empty_like(x)
    buf = np.empty_like(x)  # fastdrop's preallocated output (out=): no fresh pages to fault in
    size = x.size * x.itemsize
    fns: Dict[str, Callable[[], Any]] = {}
    path_mask = (shape[0],) + (1,) * (len(shape) - 1)
    chan_mask = shape[:2] + (1,) * (len(shape) - 2)
    ALPHA = 1.7580993408473766
    a = 1.0 / math.sqrt((ALPHA * ALPHA * P + 1.0) * keep)
    if variant == "dropout":
        fns["fastdrop"] = lambda: fastdrop.dropout(x, P)
        fns["fastdrop_out"] = lambda: fastdrop.dropout(x, P, out=buf)
        fns["numpy"] = lambda: x * (rng.random(shape) >= P) / keep
    elif variant == "dropout_inplace":
        fns["fastdrop"] = lambda: fastdrop.dropout(x, P, inplace=True)
        fns["numpy"] = lambda: np.multiply(x, (rng.random(shape) >= P) * s, out=x, casting="unsafe")
    elif variant == "dropout2d":
        fns["fastdrop"] = lambda: fastdrop.dropout2d(x, P)
        fns["fastdrop_out"] = lambda: fastdrop.dropout2d(x, P, out=buf)
        fns["numpy"] = lambda: x * (rng.random(chan_mask) >= P) / keep
    elif variant == "drop_path":
        fns["fastdrop"] = lambda: fastdrop.drop_path(x, P, True)
        fns["fastdrop_out"] = lambda: fastdrop.drop_path(x, P, True, out=buf)
        fns["numpy"] = lambda: x * (rng.random(path_mask) >= P) / keep
    elif variant == "alpha_dropout":
        fns["fastdrop"] = lambda: fastdrop.alpha_dropout(x, P, True)
        fns["fastdrop_out"] = lambda: fastdrop.alpha_dropout(x, P, True, out=buf)
        fns["numpy"] = lambda: a * np.where(rng.random(shape) >= P, x, -ALPHA) + ALPHA * a * P
    elif variant == "dropout_add":
        fns["fastdrop"] = lambda: fastdrop.dropout_add(x, r, P)
        fns["fastdrop_out"] = lambda: fastdrop.dropout_add(x, r, P, out=buf)
        fns["unfused"] = lambda: np.add(r, fastdrop.dropout(x, P))
        fns["numpy"] = lambda: r + x * (rng.random(shape) >= P) / keep
    elif variant == "drop_path_add":
        fns["fastdrop"] = lambda: fastdrop.drop_path_add(r, x, P, True)
        fns["fastdrop_out"] = lambda: fastdrop.drop_path_add(r, x, P, True, out=buf)
        fns["unfused"] = lambda: np.add(r, fastdrop.drop_path(x, P, True))
        fns["numpy"] = lambda: r + x * (rng.random(path_mask) >= P) / keep
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if variant in FUSED:
        floor_name = "np.add(a, b, out=c)"
        fns["floor"] = lambda: np.add(x, r, out=out)
        fns["alloc_floor"] = lambda: np.add(x, r)
        moved = 3 * size
    elif variant == "dropout_inplace":
        floor_name = "np.multiply(x, c, out=x)"
        c = x.dtype.type(1.0)
        fns["floor"] = lambda: np.multiply(x, c, out=x)
        moved = 2 * size
    else:
        floor_name = "np.copyto"
        fns["floor"] = lambda: np.copyto(out, x)
        fns["alloc_floor"] = lambda: np.copy(x)
        moved = 2 * size
    _torch_cases(variant, x, r, fns)
    return x, fns, floor_name, moved


def _torch_cases(
    variant: str, x: np.ndarray, r: np.ndarray, fns: Dict[str, Callable[[], Any]]
) -> None:
    torch = _torch()
    if torch is None:
        return
    import torch.nn.functional as F

    t = torch.from_numpy(x.copy())
    tr = torch.from_numpy(r.copy())
    keep = 1.0 - P

    def path(v):
        mask = v.new_empty((v.shape[0],) + (1,) * (v.ndim - 1)).bernoulli_(keep)
        return v * mask.div_(keep)

    torch_fns = {
        "dropout": lambda: F.dropout(t, P, True),
        "dropout_inplace": lambda: F.dropout(t, P, True, inplace=True),
        "dropout2d": lambda: F.dropout2d(t, P, True),
        "drop_path": lambda: path(t),
        "alpha_dropout": lambda: F.alpha_dropout(t, P, True),
        "dropout_add": lambda: tr + F.dropout(t, P, True),
        "drop_path_add": lambda: tr + path(t),
    }
    fns["torch"] = torch_fns[variant]
    if _has_fastdrop_torch():
        fd = {
            "dropout": lambda: fastdrop.dropout(t, P),
            "dropout_inplace": lambda: fastdrop.dropout(t, P, inplace=True),
            "dropout2d": lambda: fastdrop.dropout2d(t, P),
            "drop_path": lambda: fastdrop.drop_path(t, P, True),
            "alpha_dropout": lambda: fastdrop.alpha_dropout(t, P, True),
            "dropout_add": lambda: fastdrop.dropout_add(t, tr, P),
            "drop_path_add": lambda: fastdrop.drop_path_add(tr, t, P, True),
        }
        fns["fastdrop_torch"] = fd[variant]


def _batched(fn: Callable[[], Any], batch: int) -> Callable[[], Any]:
    if batch == 1:
        return fn

    def many() -> None:
        for _ in range(batch):
            fn()

    return many


def run(variants, sizes, dtypes, repeats: int, threads: int, log=print) -> Dict[str, Any]:
    """Measures every (variant, dtype, size); returns the machine and one record per cell."""
    fastdrop.set_num_threads(threads)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
    records: List[Dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        for variant in variants:
            for n in sizes:
                x, fns, floor_name, moved = _cases(variant, n, np.dtype(dtype), rng)
                # Big arrays get fewer repeats: each run already averages over much memory.
                reps = repeats if x.nbytes < (64 << 20) else max(3, repeats // 3)
                # Small calls are timed in batches so the timer's resolution does not count.
                batch = 100 if n <= 1 << 12 else 1
                times = {k: median_time(_batched(f, batch), reps) / batch for k, f in fns.items()}
                for impl, secs in times.items():
                    records.append(
                        {
                            "variant": variant,
                            "dtype": np.dtype(dtype).name,
                            "size": int(x.size),
                            "impl": impl,
                            "seconds": secs,
                            "bytes": moved,
                            "gbps": moved / secs / 1e9,
                            "floor": floor_name if impl == "floor" else None,
                        }
                    )
    return {"machine": machine(threads), "p": P, "repeats": repeats, "records": records}


def _fmt_gbps(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:7.2f}"


def table(result: Dict[str, Any]) -> str:
    """One table per (dtype, variant): rows are sizes, columns GB/s per implementation, then
    fastdrop/floor and fastdrop/allocating floor (time ratios, lower is better) and
    torch/fastdrop (speed-up)."""
    m = result["machine"]
    lines = [
        f"fastdrop {m['fastdrop']} on {m['cpu']} ({m['cores']} cores), generator path "
        f"{m['simd_backend']}, {m['threads']} threads"
        + (f"; torch {m['torch']}" if "torch" in m else "; torch not installed"),
        f"p = {result['p']}; GB/s = (bytes read + written) / median time; "
        "x floor, x alloc = fastdrop time / (allocating) floor time; "
        "out= x floor = the same with a preallocated out=; "
        "vs torch = torch time / fastdrop time",
    ]
    cells: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for rec in result["records"]:
        cells.setdefault((rec["dtype"], rec["variant"], rec["size"]), {})[rec["impl"]] = rec
    keys = sorted(cells, key=lambda k: (k[0], VARIANTS.index(k[1]), k[2]))
    current = None
    present = [i for i in IMPLS if any(i in c for c in cells.values())]
    for key in keys:
        dtype, variant, size = key
        row = cells[key]
        if (dtype, variant) != current:
            current = (dtype, variant)
            floor = row["floor"]["floor"]
            lines.append("")
            lines.append(f"{variant} ({dtype}; floor: {floor})")
            head = f"{'size':>6} " + " ".join(f"{IMPLS[i]:>15}" for i in present)
            lines.append(
                head + f" {'x floor':>8} {'x alloc':>8} {'out= x floor':>12} {'vs torch':>9}"
            )
        gb = " ".join(f"{_fmt_gbps(row[i]['gbps'] if i in row else None):>15}" for i in present)
        fd = row["fastdrop"]["seconds"]
        ratio = fd / row["floor"]["seconds"]
        alloc = row.get("alloc_floor")
        xa = f"{fd / alloc['seconds']:7.2f}x" if alloc else f"{'-':>8}"
        vs = f"{row['torch']['seconds'] / fd:8.1f}x" if "torch" in row else f"{'-':>9}"
        fo = row.get("fastdrop_out")
        xo = f"{fo['seconds'] / row['floor']['seconds']:11.2f}x" if fo else f"{'-':>12}"
        lines.append(f"{label(size):>6} {gb} {ratio:7.2f}x {xa} {xo} {vs}")
    if "fastdrop_torch" not in present and "torch" in m:
        lines.append("")
        lines.append("fastdrop(torch): skipped, fastdrop._torch is not available")
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: str) -> None:
    """Throughput against size, one panel per variant (first dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    dtype = recs[0]["dtype"]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in recs)]
    cols = min(4, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, variant in zip(axes.flat, variants):
        for impl, name in IMPLS.items():
            pts = sorted(
                (r["size"], r["gbps"])
                for r in recs
                if r["variant"] == variant and r["impl"] == impl and r["dtype"] == dtype
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{variant} ({dtype})")
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(variants) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    m = result["machine"]
    fig.suptitle(f"{m['cpu']}, {m['threads']} threads, {m['simd_backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastdrop bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few repeats (seconds, for `make demo`)",
    )
    ap.add_argument(
        "--sizes",
        type=lambda s: [parse_size(v) for v in s.split(",") if v],
        help="comma-separated element counts, e.g. 1K,1M,64M",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        help="float16, float32 or float64 (comma-separated for several)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for fastdrop and torch (default: fastdrop's default)",
    )
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ", ".join(VARIANTS),
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell (median)")
    ap.add_argument("--json", metavar="FILE", help="write the machine and every record as JSON")
    ap.add_argument("--plot", metavar="FILE", help="write a PNG of GB/s against size")
    args = ap.parse_args(argv)

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float16", "float32", "float64"):
            ap.error(f"--dtype must be float16, float32 or float64, got {d!r}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats or (3 if args.quick else 9)
    threads = args.threads or fastdrop.get_num_threads()
    if threads < 1:
        ap.error("--threads must be at least 1")

    result = run(variants, sizes, dtypes, repeats, threads)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print(
                "--plot needs matplotlib, which is not installed (pip install matplotlib); "
                "no plot written",
                file=sys.stderr,
            )
            return 1
    return 0
