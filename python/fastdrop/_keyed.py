"""Randomness that is not a mask the kernel applies: normal deviates, token choices and
torchvision's DropBlock seeds, each a pure function of a call's key and an index, as a mask is.

`gaussian_dropout`, `patch_dropout` and `drop_block_3d` (and torchvision's DropBlock2d) draw
from here, for NumPy input (in `functional`) and torch input on the CPU (in `_torch`) alike, so
both agree under one generator. Plain NumPy; sits above `_mask`, below the public functions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _core
from ._core_call import apply
from ._mask import Mask
from ._spec import Bernoulli, Scale, Spec


def call_key(gen: _core.Generator) -> tuple[int, int, int]:
    """Reserves one counter block of `gen` for a call and returns (seed, stream, block): the
    call's values are drawn on the stream forked from that block, so they are a pure function
    of the key and an index, whatever their number, and a backward can draw them again."""
    seed, stream, _ = gen.get_state()
    return seed, stream, gen._reserve(1)


def keyed_generator(key: tuple[int, int, int]) -> _core.Generator:
    seed, stream, block = key
    g = _core.Generator(seed)
    g.set_state((seed, stream, 0))
    return g.fork(block)


def normals(key: tuple[int, int, int], shape: tuple, dtype: Any) -> np.ndarray:
    """Standard normal deviates of `shape` (float32 or float64), deviate i a pure function of
    (key, i), as DropBlock's noise is."""
    out = np.empty(shape, dtype)
    if out.size:
        _core.normal_fill(out, keyed_generator(key))
    return out


def seed_map(key: tuple[int, int, int], shape: tuple, rate: float) -> np.ndarray:
    """Bernoulli(rate) decisions of `shape` as a bool array, decision i a pure function of
    (key, i): the kernel's scale application on ones writes each decision as 1 or 0."""
    out = np.empty(shape, np.float16)
    if out.size:
        ones = np.broadcast_to(np.float16(1.0), shape)
        spec = Spec(Bernoulli(tuple(shape), rate), Scale(1.0), 1.0)
        apply(ones, out, None, spec, keyed_generator(key), False)
    return out != 0


def gaussian_factor(key: tuple[int, int, int], shape: tuple, dtype: Any, sigma: float):
    """``1 + sigma * z`` in `dtype`, with `sigma` rounded once to it."""
    factor = normals(key, shape, dtype)
    factor *= dtype(sigma)
    factor += dtype(1.0)
    return factor


def keep_indices(
    key: tuple[int, int, int], batch: int, tokens: int, prob: float, ordered: bool
) -> np.ndarray:
    """timm's token choice: the first ``max(1, int(L * (1 - prob)))`` of a random permutation
    per sample (argsort of normal deviates; a stable sort breaks any tie by index)."""
    num_keep = max(1, int(tokens * (1.0 - prob)))
    if tokens == 0:
        return np.zeros((batch, 0), np.int64)
    order = np.argsort(normals(key, (batch, tokens), np.float64), axis=-1, kind="stable")
    idx = order[:, :num_keep].astype(np.int64)
    if ordered:
        idx.sort(axis=-1)
    return idx


def torchvision_block_seed_rate(spatial: tuple, p: float, block_size: int) -> tuple[int, float]:
    """torchvision's clamped block size and seed rate for maps of shape `spatial`. The rate is
    at most p: b * (n - b + 1) >= n for 1 <= b <= n, along each axis."""
    b = min((block_size,) + spatial)
    gamma = p * math.prod(spatial) / (b ** len(spatial) * math.prod(s - b + 1 for s in spatial))
    return b, gamma


def torchvision_block_mask(
    key: tuple[int, int, int], shape: tuple, p: float, block_size: int, eps: float
) -> Mask:
    """The keep map of torchvision's DropBlock (the input's shape) and its scale, as a Mask."""
    spatial = tuple(int(s) for s in shape[2:])
    b, gamma = torchvision_block_seed_rate(spatial, p, block_size)
    corners = tuple(s - b + 1 for s in spatial)
    dropped = seed_map(key, tuple(int(s) for s in shape[:2]) + corners, gamma)
    for axis, size in enumerate(spatial, start=2):
        # Grow each seed along this axis: index i is dropped by seeds at i - b + 1 .. i.
        grown_shape = list(dropped.shape)
        grown_shape[axis] = size
        grown = np.zeros(grown_shape, bool)
        span = dropped.shape[axis]
        for j in range(b):
            sl = [slice(None)] * dropped.ndim
            sl[axis] = slice(j, j + span)
            grown[tuple(sl)] |= dropped
        dropped = grown
    keep = ~dropped
    # torchvision's `numel / (eps + sum)` on a tensor is evaluated as `reciprocal(...) * numel`.
    scale = (1.0 / (eps + int(np.count_nonzero(keep)))) * keep.size
    packed = np.packbits(keep, axis=None, bitorder="little").tobytes()
    return Mask(_core.mask_bits_from_packed(keep.shape, packed), scale, keep.shape)
