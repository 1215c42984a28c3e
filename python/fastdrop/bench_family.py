"""``python -m fastdrop bench --attention`` and ``--family``.

``--attention``: `fastdrop.scaled_dot_product_attention` against torch's
``F.scaled_dot_product_attention`` at the same ``dropout_p``, forward + backward, at the ViT-S
and BERT-base shapes, alternating call by call (see `fastdrop.attention.benchmark`), with the
bytes each keeps for backward beyond q, k and v.

``--family``: one row per new variant against what a user has today, all candidates of a row
alternating in each round, medians; float32.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import fastdrop

ATTENTION_P = 0.1
ATTENTION_SHAPES: List[Tuple[str, Tuple[int, int, int, int]]] = [
    ("ViT-S", (16, 6, 197, 64)),
    ("BERT-base", (8, 12, 512, 64)),
]
#: The --family rows in table order.
FAMILY = ("gaussian_dropout", "drop_block_3d", "patch_dropout", "locked_dropout", "noise_shape")


def attention(
    rounds: int,
    threads: int,
    shapes: Optional[List[Tuple[str, Tuple[int, int, int, int]]]] = None,
    dropout_p: float = ATTENTION_P,
) -> List[Dict[str, Any]]:
    """`fastdrop.attention.benchmark` at `threads` threads (torch's and fastdrop's), one record
    per shape: medians (seconds), speed-up (torch time / fastdrop time) and saved bytes."""
    import torch

    from .attention import benchmark

    fastdrop.set_num_threads(threads)
    torch.set_num_threads(threads)
    rows = benchmark(shapes or ATTENTION_SHAPES, dropout_p=dropout_p, rounds=rounds)
    for row in rows:
        row["bhld"] = list(row["bhld"])
        row["dropout_p"] = dropout_p
        row["rounds"] = rounds
        row["threads"] = threads
    return rows


def attention_table(rows: List[Dict[str, Any]]) -> str:
    p = rows[0]["dropout_p"] if rows else ATTENTION_P
    lines = [
        f"attention forward + backward, float32, dropout_p = {p}: fastdrop vs torch "
        "F.scaled_dot_product_attention (medians, alternating); saved = bytes kept for "
        "backward beyond q, k, v",
        f"{'shape':>10} {'B,H,L,D':>16} {'fastdrop ms':>12} {'torch ms':>9} {'speedup':>8} "
        f"{'fastdrop saved MiB':>19} {'torch saved MiB':>16}",
    ]
    for r in rows:
        lines.append(
            f"{r['shape']:>10} {','.join(map(str, r['bhld'])):>16} "
            f"{1e3 * r['fastdrop_s']:12.2f} {1e3 * r['torch_s']:9.2f} {r['speedup']:7.2f}x "
            f"{r['fastdrop_saved_bytes'] / 2**20:19.1f} {r['torch_saved_bytes'] / 2**20:16.1f}"
        )
    return "\n".join(lines)


# --- the family -------------------------------------------------------------------------------


def drop_block3d_reference(x, p: float, block_size: int, eps: float = 1e-6):
    """torchvision.ops.drop_block3d's maths (training mode), written out from
    torchvision/ops/drop_block.py since torchvision is not a dependency."""
    import torch.nn.functional as F

    n, c, d, h, w = x.shape
    block_size = min(block_size, d, h, w)
    gamma = (p * d * h * w) / (
        (block_size**3) * ((d - block_size + 1) * (h - block_size + 1) * (w - block_size + 1))
    )
    noise = x.new_empty(
        (n, c, d - block_size + 1, h - block_size + 1, w - block_size + 1)
    ).bernoulli_(gamma)
    noise = F.pad(noise, [block_size // 2] * 6, value=0)
    noise = F.max_pool3d(
        noise, stride=(1, 1, 1), kernel_size=(block_size,) * 3, padding=block_size // 2
    )
    noise = 1 - noise
    normalize_scale = noise.numel() / (eps + noise.sum())
    return x * noise * normalize_scale


def _family_cases(name: str) -> Tuple[str, str, Dict[str, Callable[[], Any]], str]:
    """(shape text, setting, {column: callable}, baseline column) of one --family row. The
    columns are "fastdrop", the baseline's name, and for noise_shape also the copy floor."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    fns: Dict[str, Callable[[], Any]] = {}
    if name == "gaussian_dropout":
        p = 0.1
        s = math.sqrt(p / (1 - p))
        t = torch.randn(1 << 20, generator=gen)
        fns["fastdrop"] = lambda: fastdrop.gaussian_dropout(t, p)
        fns["torch x*(1+s*randn)"] = lambda: t * (1 + s * torch.randn_like(t))
        return "1M", f"p = {p}, torch tensor", fns, "torch x*(1+s*randn)"
    if name == "drop_block_3d":
        p, b = 0.1, 5
        t = torch.randn(8, 16, 16, 32, 32, generator=gen)
        fns["fastdrop"] = lambda: fastdrop.drop_block_3d(t, p, b)
        fns["torchvision maths"] = lambda: drop_block3d_reference(t, p, b)
        return "8,16,16,32,32", f"p = {p}, block {b}", fns, "torchvision maths"
    if name == "patch_dropout":
        from timm.layers import PatchDropout

        prob = 0.5
        t = torch.randn(64, 197, 384, generator=gen)
        timm_pd = PatchDropout(prob).train()
        fns["fastdrop"] = lambda: fastdrop.patch_dropout(t, prob)
        fns["timm PatchDropout"] = lambda: timm_pd(t)
        return "64,197,384", f"prob = {prob}", fns, "timm PatchDropout"
    if name == "locked_dropout":
        p = 0.3
        t = torch.randn(70, 64, 400, generator=gen)

        def awd():
            mask = t.new_empty(1, t.size(1), t.size(2)).bernoulli_(1 - p) / (1 - p)
            return mask.expand_as(t) * t

        fns["fastdrop"] = lambda: fastdrop.locked_dropout(t, p)
        fns["AWD-LSTM formula"] = awd
        return "70,64,400", f"p = {p}, (T, B, F)", fns, "AWD-LSTM formula"
    if name == "noise_shape":
        p = 0.1
        x = np.random.default_rng(0).standard_normal((32, 28, 28, 256), dtype=np.float32)
        out = np.empty_like(x)
        tp = torch.from_numpy(x.copy()).permute(0, 3, 1, 2)  # NCHW view of the NHWC data
        fns["fastdrop"] = lambda: fastdrop.dropout(x, p, noise_shape=(32, 1, 1, 256))
        fns["torch dropout2d"] = lambda: F.dropout2d(tp, p, True)
        fns["np.copyto floor"] = lambda: np.copyto(out, x)
        return "32,28,28,256 NHWC", f"p = {p}, noise (N,1,1,C), NumPy", fns, "torch dropout2d"
    raise ValueError(f"unknown family row {name!r}")


def family(
    rounds: int, threads: int, names=FAMILY, log: Callable[[str], Any] = lambda s: None
) -> List[Dict[str, Any]]:
    """Each row's candidates alternate in every round (the order rotating), one warm-up round
    first; medians of `rounds` rounds. One record per row, the seconds per column in
    "seconds", "speedup" = baseline time / fastdrop time."""
    import torch

    fastdrop.set_num_threads(threads)
    torch.set_num_threads(threads)
    records = []
    for name in names:
        log(f"family: {name}")
        shape, setting, fns, baseline = _family_cases(name)
        labels = list(fns)
        times: Dict[str, List[float]] = {k: [] for k in labels}
        for r in range(rounds + 1):
            k = r % len(labels)
            for label in labels[k:] + labels[:k]:
                t0 = time.perf_counter()
                fns[label]()
                dt = time.perf_counter() - t0
                if r:  # the first round warms up
                    times[label].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        rec: Dict[str, Any] = {
            "variant": name,
            "shape": shape,
            "setting": setting,
            "dtype": "float32",
            "baseline": baseline,
            "seconds": med,
            "speedup": med[baseline] / med["fastdrop"],
            "rounds": rounds,
            "threads": threads,
        }
        floor = [k for k in labels if k.endswith("floor")]
        if floor:
            rec["floor"] = floor[0]
            rec["x_floor"] = med["fastdrop"] / med[floor[0]]
        records.append(rec)
    return records


def family_table(records: List[Dict[str, Any]]) -> str:
    lines = [
        "the family, float32, medians of alternating rounds; speedup = baseline time / "
        "fastdrop time; x floor = fastdrop time / copy floor time",
        f"{'variant':>16} {'shape':>18} {'setting':>31} {'fastdrop ms':>12} "
        f"{'baseline':>20} {'baseline ms':>12} {'speedup':>8} {'x floor':>8}",
    ]
    for r in records:
        sec = r["seconds"]
        xf = f"{r['x_floor']:7.2f}x" if "x_floor" in r else f"{'-':>8}"
        lines.append(
            f"{r['variant']:>16} {r['shape']:>18} {r['setting']:>31} "
            f"{1e3 * sec['fastdrop']:12.2f} {r['baseline']:>20} "
            f"{1e3 * sec[r['baseline']]:12.2f} {r['speedup']:7.2f}x {xf}"
        )
        if "floor" in r:
            lines.append(
                f"{'':>16} {'':>18} {'':>31} {'':>12} {r['floor']:>20} "
                f"{1e3 * sec[r['floor']]:12.2f} {'':>8} {'':>8}"
            )
    return "\n".join(lines)
