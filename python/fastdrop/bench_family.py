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
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import fastdrop

from .bench_train import alternate

ATTENTION_P = 0.1
ATTENTION_SHAPES: List[Tuple[str, Tuple[int, int, int, int]]] = [
    ("ViT-S", (16, 6, 197, 64)),
    ("BERT-base", (8, 12, 512, 64)),
]
#: The --family rows in table order.
FAMILY = (
    "gaussian_dropout",
    "drop_block_3d",
    "patch_dropout",
    "locked_dropout",
    "noise_shape",
    "embedding_dropout",
    "stochastic_depth_row",
    "stochastic_depth_batch",
    "weight_dropout",
    "mc_sample",
)


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


def stochastic_depth_reference(input, p: float, mode: str):
    """torchvision.ops.stochastic_depth's maths (training mode, p < 1), written out from
    torchvision/ops/stochastic_depth.py since torchvision is not a dependency."""
    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = input.new_empty(size).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


def fastai_weight_dropout(module, p: float):
    """fastai's ``WeightDropout`` (fastai/text/models/awdlstm.py) on a module's ``weight``,
    reduced to what a training forward does: the raw weight is a parameter of the wrapper and
    each forward gives the module ``F.dropout(weight_raw, p, training=True)``."""
    import torch
    import torch.nn.functional as F

    class FastaiWeightDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module
            w = module.weight
            del module._parameters["weight"]
            self.weight_raw = torch.nn.Parameter(w.detach())
            module.weight = w.detach().clone()

        def forward(self, *args):
            self.module.weight = F.dropout(self.weight_raw, p=p, training=self.training)
            return self.module(*args)

    return FastaiWeightDropout()


def _mlp(dropout, width: int = 256, out: int = 10):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), dropout, nn.Linear(width, out))


def _family_cases(name: str) -> Tuple[str, str, Dict[str, Callable[[], Any]], str]:
    """(shape text, setting, {column: callable}, baseline column) of one --family row. The
    columns are "fastdrop", the baseline's name, and for noise_shape also the copy floor."""
    import torch
    import torch.nn.functional as F

    from .nn import Dropout, WeightDropout

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
    if name == "embedding_dropout":
        p = 0.1
        w = torch.randn(50000, 512, generator=gen)

        def fastai_emb():
            mask = w.new_empty((w.size(0), 1)).bernoulli_(1 - p).expand_as(w) / (1 - p)
            return mask * w

        fns["fastdrop"] = lambda: fastdrop.embedding_dropout(w, p)
        fns["fastai maths"] = fastai_emb
        return "50000,512", f"p = {p}, (V, D) weight", fns, "fastai maths"
    if name in ("stochastic_depth_row", "stochastic_depth_batch"):
        p, mode = 0.1, name.rsplit("_", 1)[1]
        t = torch.randn(64, 197, 384, generator=gen)
        fns["fastdrop"] = lambda: fastdrop.stochastic_depth(t, p, mode)
        fns["torchvision maths"] = lambda: stochastic_depth_reference(t, p, mode)
        return "64,197,384", f"p = {p}, mode {mode!r}", fns, "torchvision maths"
    if name == "weight_dropout":
        p = 0.5
        lin = torch.nn.Linear(1024, 1024)
        ref = torch.nn.Linear(1024, 1024)
        ref.load_state_dict(lin.state_dict())
        fd_wd = WeightDropout(lin, p).train()
        fa_wd = fastai_weight_dropout(ref, p).train()
        batch = torch.randn(256, 1024, generator=gen)
        grad = torch.randn(256, 1024, generator=gen)
        fns["fastdrop"] = lambda: fd_wd(batch).backward(grad)
        fns["fastai F.dropout"] = lambda: fa_wd(batch).backward(grad)
        return "256,1024", f"p = {p}, Linear(1024,1024) fwd+bwd", fns, "fastai F.dropout"
    if name == "mc_sample":
        p, n = 0.2, 20
        fd_model = _mlp(Dropout(p))
        t_model = _mlp(torch.nn.Dropout(p))
        t_model.load_state_dict(fd_model.state_dict())
        t_model.train()
        inputs = torch.randn(64, 256, generator=gen)

        def fd_mc():
            with torch.no_grad():
                return fastdrop.mc_sample(fd_model, inputs, n)

        def torch_mc():
            with torch.no_grad():
                return torch.stack([t_model(inputs) for _ in range(n)])

        fns["fastdrop"] = fd_mc
        fns["torch loop"] = torch_mc
        return "64,256", f"{n} passes, MLP 256-256-10, p = {p}", fns, "torch loop"
    raise ValueError(f"unknown family row {name!r}")


def family(
    rounds: int, threads: int, names=FAMILY, log: Callable[[str], Any] = lambda s: None
) -> List[Dict[str, Any]]:
    """Each row's candidates alternate in every round (`bench_train.balanced_orders` by
    turns), one warm-up round first; medians of `rounds` rounds. One record per row, the
    seconds per column in "seconds", "speedup" = baseline time / fastdrop time."""
    import torch

    fastdrop.set_num_threads(threads)
    torch.set_num_threads(threads)
    records = []
    for name in names:
        log(f"family: {name}")
        shape, setting, fns, baseline = _family_cases(name)
        labels = list(fns)
        med = alternate(fns, rounds)
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
        f"{'variant':>22} {'shape':>18} {'setting':>34} {'fastdrop ms':>12} "
        f"{'baseline':>20} {'baseline ms':>12} {'speedup':>8} {'x floor':>8}",
    ]
    for r in records:
        sec = r["seconds"]
        xf = f"{r['x_floor']:7.2f}x" if "x_floor" in r else f"{'-':>8}"
        lines.append(
            f"{r['variant']:>22} {r['shape']:>18} {r['setting']:>34} "
            f"{1e3 * sec['fastdrop']:12.2f} {r['baseline']:>20} "
            f"{1e3 * sec[r['baseline']]:12.2f} {r['speedup']:7.2f}x {xf}"
        )
        if "floor" in r:
            lines.append(
                f"{'':>22} {'':>18} {'':>34} {'':>12} {r['floor']:>20} "
                f"{1e3 * sec[r['floor']]:12.2f} {'':>8} {'':>8}"
            )
    return "\n".join(lines)
