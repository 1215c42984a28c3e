"""``python -m fastdrop bench``: fastdrop against torch, naive NumPy and the memory floor.

For every variant and size the same data goes through each implementation; the table gives
throughput in GB/s (bytes read + written, so every row is comparable) and two ratios: fastdrop's
time over the floor's and over the allocating floor's, and torch's time over fastdrop's. The
floor uses as many threads as fastdrop: with torch installed it is torch's ``copy_`` into a
preallocated tensor (``mul_`` in place, ``torch.add(a, b, out=c)`` for the fused variants) with
torch at fastdrop's thread count, and the allocating floor is ``clone`` (``torch.add(a, b)``),
which pays for fresh output pages as an out-of-place call does; without torch they are NumPy's
single-threaded ``np.copyto`` / ``np.copy`` and the header says so. ``np.copyto`` is always
shown beside them. Timings are medians of several runs after a warm-up, from
``time.perf_counter``.

``--incache`` gives the in-cache rows (64K and 1M float32 at p = 0.1 and 0.5 against the
threaded copy floor), ``--train`` the training-step table and ``--layers`` the per-layer-shape
forward + backward rows (see `fastdrop.bench_train`); ``--attention`` fastdrop's attention
against torch's and ``--family`` the newer variants against their usual baselines (see
`fastdrop.bench_family`).
"""

from __future__ import annotations

import argparse
import functools
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
    "np_floor": "np floor",
    "floor": "floor",
    "alloc_floor": "alloc floor",
}
#: In-cache rows: sizes (float32 elements), rates, and the targets (fastdrop / threaded copy).
INCACHE_SIZES = (1 << 16, 1 << 20)
INCACHE_P = (0.1, 0.5)
INCACHE_TARGET = {1 << 16: 1.5, 1 << 20: 1.1}


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
        fns["np_floor"] = lambda: np.add(x, r, out=out)
        fns["alloc_floor"] = lambda: np.add(x, r)
        moved = 3 * size
    elif variant == "dropout_inplace":
        floor_name = "np.multiply(x, c, out=x)"
        c = x.dtype.type(1.0)
        fns["np_floor"] = lambda: np.multiply(x, c, out=x)
        moved = 2 * size
    else:
        floor_name = "np.copyto"
        fns["np_floor"] = lambda: np.copyto(out, x)
        fns["alloc_floor"] = lambda: np.copy(x)
        moved = 2 * size
    fns["floor"] = fns["np_floor"]
    torch_floor = _torch_floors(variant, x, r, fns)
    if torch_floor is not None:
        floor_name = torch_floor
    else:
        del fns["np_floor"]
    _torch_cases(variant, x, r, fns)
    return x, fns, floor_name, moved


def _torch_floors(
    variant: str, x: np.ndarray, r: np.ndarray, fns: Dict[str, Callable[[], Any]]
) -> Optional[str]:
    """Sets the floors to torch's multi-threaded ops (torch runs at fastdrop's thread count,
    see `run`) and returns the floor's name; None without torch."""
    torch = _torch()
    if torch is None:
        return None
    t = torch.from_numpy(x.copy())
    tr = torch.from_numpy(r.copy())
    tout = torch.empty_like(t)
    threads = torch.get_num_threads()
    if variant in FUSED:
        fns["floor"] = lambda: torch.add(t, tr, out=tout)
        fns["alloc_floor"] = lambda: torch.add(t, tr)
        return f"torch.add(a, b, out=c), {threads} threads"
    if variant == "dropout_inplace":
        fns["floor"] = lambda: t.mul_(1.0)
        return f"torch mul_(1.0), {threads} threads"
    fns["floor"] = lambda: tout.copy_(t)
    fns["alloc_floor"] = lambda: t.clone()
    return f"torch copy_, {threads} threads"


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


def incache(repeats: int, threads: int) -> Dict[str, Any]:
    """The in-cache rows: float32 dropout of `INCACHE_SIZES` elements at each of `INCACHE_P`,
    fastdrop (NumPy with and without out=, torch tensor) against the threaded copy floor
    (torch's ``copy_`` at fastdrop's thread count; ``np.copyto`` without torch), alternating
    the candidates in each round, medians over ``5 * repeats`` rounds."""
    fastdrop.set_num_threads(threads)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    records: List[Dict[str, Any]] = []
    for n in INCACHE_SIZES:
        records += _incache_size(rng.standard_normal(n, dtype=np.float32), repeats, threads)
    return {"machine": machine(threads), "repeats": repeats, "incache": records}


def _incache_size(x: np.ndarray, repeats: int, threads: int) -> List[Dict[str, Any]]:
    n = x.size
    torch = _torch()
    out = np.empty_like(x)
    fns: Dict[str, Callable[[], Any]] = {"np_floor": lambda: np.copyto(out, x)}
    if torch is not None:
        t = torch.from_numpy(x.copy())
        tout = torch.empty_like(t)
        fns["floor"] = lambda: tout.copy_(t)
        floor = f"torch copy_, {threads} threads"
    else:
        fns["floor"] = fns["np_floor"]
        floor = "np.copyto, 1 thread (torch not installed)"
    for p in INCACHE_P:
        fns[f"fastdrop_out {p}"] = functools.partial(fastdrop.dropout, x, p, out=out)
        fns[f"fastdrop {p}"] = functools.partial(fastdrop.dropout, x, p)
        if torch is not None and _has_fastdrop_torch():
            fns[f"fastdrop_torch {p}"] = functools.partial(fastdrop.dropout, t, p)
    # Calls per timed sample, so the timer's resolution does not count.
    batch = max(1, (1 << 21) // n)
    batched = {k: _batched(f, batch) for k, f in fns.items()}
    # In balanced orders: in a fixed order `fastdrop_out 0.1` always came right after torch's
    # floor, whose OpenMP workers spin on after it and take the second core (a 1M call took
    # 183 us there against 100 us after nothing).
    from .bench_train import alternate_times

    times = alternate_times(batched, 5 * repeats)
    med = {k: statistics.median(v) / batch for k, v in times.items()}
    records = []
    for k, secs in med.items():
        impl, _, p_text = k.partition(" ")
        records.append(
            {
                "size": n,
                "impl": impl,
                "p": float(p_text) if p_text else None,
                "seconds": secs,
                "x_floor": secs / med["floor"],
                "floor": floor,
                "target": INCACHE_TARGET[n] if p_text else None,
            }
        )
    return records


def incache_table(result: Dict[str, Any]) -> str:
    recs = result["incache"]
    floor = recs[0]["floor"] if recs else "-"
    lines = [
        f"in cache, float32 dropout: time / threaded copy floor ({floor}); "
        "np.copyto (1 thread) shown for reference",
        f"{'size':>6} {'p':>4} {'floor us':>9} {'np.copyto':>9} {'fastdrop(out=)':>15} "
        f"{'fastdrop':>9} {'fastdrop(torch)':>16} {'target':>7}",
    ]
    for n in sorted({r["size"] for r in recs}):
        base = {r["impl"]: r for r in recs if r["size"] == n and r["p"] is None}
        for p in sorted({r["p"] for r in recs if r["size"] == n and r["p"] is not None}):
            row = {r["impl"]: r for r in recs if r["size"] == n and r["p"] == p}

            def cell(impl: str, width: int, row=row, base=base) -> str:
                r = row.get(impl) or base.get(impl)
                return f"{r['x_floor']:{width - 1}.2f}x" if r else f"{'-':>{width}}"

            lines.append(
                f"{label(n):>6} {p:4.1f} {1e6 * base['floor']['seconds']:9.1f} "
                f"{cell('np_floor', 9)} {cell('fastdrop_out', 15)} {cell('fastdrop', 9)} "
                f"{cell('fastdrop_torch', 16)} {'<= ' + str(INCACHE_TARGET[n]):>7}"
            )
    return "\n".join(lines)


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
    ap.add_argument(
        "--incache",
        action="store_true",
        help="in-cache rows: 64K and 1M float32 at p = 0.1 and 0.5 against the threaded copy",
    )
    ap.add_argument(
        "--train",
        action="store_true",
        help="training-step table (torch's modules vs replace_dropout) and the layer rows",
    )
    ap.add_argument(
        "--layers",
        action="store_true",
        help="forward + backward of every dropout layer shape of the --train models",
    )
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of the --train/--layers models: "
        "encoder, vit_tiny, resnet50, mixer, mlp",
    )
    ap.add_argument("--batch", type=int, default=None, help="batch size for every --train model")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating rounds for --train, --layers, --attention and --family",
    )
    ap.add_argument(
        "--settings",
        default=None,
        help="comma-separated --train rows: 'default', '1 thread', 'busy core' (default: those "
        "three), 'own threads' (fastdrop's own helpers instead of torch's threads), "
        "'unconverted' (an unconverted copy against the model: the run's noise floor)",
    )
    ap.add_argument(
        "--attention",
        action="store_true",
        help="fastdrop.scaled_dot_product_attention vs torch's, forward + backward, "
        "ViT-S and BERT-base shapes, dropout_p = 0.1",
    )
    ap.add_argument(
        "--family",
        action="store_true",
        help="gaussian_dropout, drop_block_3d, patch_dropout, locked_dropout and noise_shape "
        "against what a user has today",
    )
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

    if args.batch is not None and args.batch < 1:
        ap.error("--batch must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.incache or args.train or args.layers or args.attention or args.family:
        from . import bench_train

        models = [m.strip() for m in (args.models or ",".join(bench_train.MODELS)).split(",")]
        for m in models:
            if m not in bench_train.MODELS:
                ap.error(f"unknown model {m!r}; choose from {', '.join(bench_train.MODELS)}")
        settings = [v.strip() for v in (args.settings or ",".join(bench_train.SETTINGS)).split(",")]
        for v in settings:
            if v not in bench_train.ALL_SETTINGS:
                choices = ", ".join(bench_train.ALL_SETTINGS)
                ap.error(f"unknown setting {v!r}; choose from {choices}")
        result: Dict[str, Any] = {"machine": machine(threads)}
        if args.incache:
            result.update(incache(repeats, threads))
            print(incache_table(result))
        if args.train or args.layers:
            torch = _torch()
            if torch is None:
                ap.error("--train and --layers need torch")
            torch.set_num_threads(threads)
            result["machine"] = machine(threads)
            rounds = args.rounds or (2 if args.quick else 15)
            progress = lambda line: print(line, file=sys.stderr)  # noqa: E731
            if args.train:
                result["train"] = bench_train.train(
                    models, rounds, threads, args.batch, args.quick, settings, log=progress
                )
                print(bench_train.train_table(result["train"]))
            layer_models = models if args.layers else [m for m in models if m != "mlp"]
            result["layers"] = bench_train.layers(
                layer_models, 5 * rounds, threads, args.batch, args.quick, log=progress
            )
            print(bench_train.layers_table(result["layers"]))
        if args.attention or args.family:
            from . import bench_family

            torch = _torch()
            if torch is None:
                ap.error("--attention and --family need torch")
            torch.set_num_threads(threads)
            result["machine"] = machine(threads)
            progress = lambda line: print(line, file=sys.stderr)  # noqa: E731
            if args.attention:
                rounds = args.rounds or (3 if args.quick else 15)
                result["attention"] = bench_family.attention(rounds, threads)
                print(bench_family.attention_table(result["attention"]))
            if args.family:
                rounds = args.rounds or (5 if args.quick else 25)
                result["family"] = bench_family.family(rounds, threads, log=progress)
                print(bench_family.family_table(result["family"]))
    else:
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
