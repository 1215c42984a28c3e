"""Property tests (issue 6) over every public function with hypothesis: random shapes (0-d,
empty, up to 6 dims), dtypes, strides (permuted, stepped, negative, zero-stride broadcast reads),
misaligned buffers, p in [0, 1] with its edges, training and in-place on and off.

Invariants: the output's shape and dtype; the caller's buffer untouched out of place and, in
place, untouched outside the strided view; values exactly as the formulas say given the returned
mask; the same mask and values for the same generator state on a contiguous copy; refusals
(wrong rank, in-place broadcast views, gamma > 1) raise before any byte is written.

`check_call` is shared with `tests/fuzz_api.py`, which runs it for a time budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import fastdrop
import numpy as np
from conftest import FLOATS, op_type
from fastdrop import Generator, ShapeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALPHA = 1.7580993408473766


# --- inputs: a strided view into a raw byte buffer --------------------------------------------


@dataclass
class Strided:
    raw: np.ndarray  # the whole uint8 buffer
    x: np.ndarray  # the view under test
    covered: np.ndarray  # bool per byte of raw: inside some element of x
    broadcast: bool  # some stride is zero on a dimension longer than 1


@st.composite
def strided_arrays(draw, shape=None, dtype=None, allow_broadcast=True) -> Strided:
    dtype = np.dtype(draw(st.sampled_from(FLOATS)) if dtype is None else dtype)
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=6)))
    item = dtype.itemsize
    nd = len(shape)
    order = draw(st.permutations(range(nd))) if nd else []
    strides = [0] * nd
    span = item
    broadcast = False
    for d in order:  # innermost first
        step = draw(st.integers(0 if allow_broadcast else 1, 3))
        if step == 0 and shape[d] > 1:
            broadcast = True
        sign = draw(st.sampled_from([1, -1]))
        strides[d] = sign * step * span
        if step:
            span *= step * max(shape[d], 1)
    empty = 0 in shape
    lo = sum(s * (n - 1) for s, n in zip(strides, shape) if s < 0) if not empty else 0
    hi = sum(s * (n - 1) for s, n in zip(strides, shape) if s > 0) if not empty else 0
    misalign = draw(st.integers(0, item - 1))
    pad = draw(st.integers(0, 2 * item))
    offset = pad - lo + misalign
    size = offset + hi + item + pad
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    raw = rng.integers(0, 256, size, dtype=np.uint8)
    x = np.ndarray(shape, dtype, buffer=raw, offset=offset, strides=tuple(strides))
    covered = np.zeros(size, bool)
    if x.size:
        starts = offset + sum(
            np.arange(n).reshape((-1,) + (1,) * (nd - 1 - d)) * s
            for d, (n, s) in enumerate(zip(shape, strides))
        )
        for k in range(item):
            covered[np.asarray(starts).reshape(-1) + k] = True
        values = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e-3, 100.0]))
        x[...] = values.astype(dtype) if not broadcast else values.astype(dtype).flat[0]
    return Strided(raw, x, covered, broadcast)


# --- the functions and their maths -----------------------------------------------------------


def alpha_constants(p: float) -> tuple[float, float, float]:
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    return a, ALPHA * a * p, -ALPHA * a * (1.0 - p)


def scaled(x: np.ndarray, scale: float) -> np.ndarray:
    ot = op_type(x.dtype)
    return (x.astype(ot) * ot(scale)).astype(x.dtype)


def alpha_kept(x: np.ndarray, p: float) -> tuple[np.ndarray, Any]:
    ot = op_type(x.dtype)
    a, shift, dropped = alpha_constants(p)
    return (x.astype(ot) * ot(a) + ot(shift)).astype(x.dtype), x.dtype.type(ot(dropped))


@dataclass
class Fn:
    name: str
    ranks: Callable[[int], bool]
    has_inplace: bool = True
    fused: bool = False


FUNCTIONS = {
    f.name: f
    for f in [
        Fn("dropout", lambda nd: True),
        Fn("alpha_dropout", lambda nd: True),
        Fn("feature_alpha_dropout", lambda nd: nd >= 2),
        Fn("dropout1d", lambda nd: nd in (2, 3)),
        Fn("dropout2d", lambda nd: nd in (3, 4)),
        Fn("dropout3d", lambda nd: nd in (4, 5)),
        Fn("drop_path", lambda nd: nd >= 1, has_inplace=False),
        Fn("drop_block_2d", lambda nd: nd == 4),
        Fn("dropout_add", lambda nd: True, has_inplace=False, fused=True),
        Fn("drop_path_add", lambda nd: nd >= 1, has_inplace=False, fused=True),
    ]
}

P = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-9, 1 - 1e-9]), st.floats(0.0, 1.0))


def _call(fn: Fn, x, other, p, training, inplace, seed, block):
    kw: dict[str, Any] = {"generator": Generator(seed), "return_mask": True}
    if fn.has_inplace:
        kw["inplace"] = inplace
    if fn.name in ("dropout2d", "dropout3d"):
        kw["strict_shapes"] = True  # the documented ranks; torch's reading is in test_parity
    f = getattr(fastdrop, fn.name)
    if fn.name == "drop_block_2d":
        block_size, gamma_scale, with_noise, couple, sbk = block
        return f(
            x,
            p,
            block_size,
            gamma_scale,
            with_noise,
            couple_channels=couple,
            scale_by_keep=sbk,
            training=training,
            **kw,
        )
    if fn.name == "dropout_add":
        return f(x, other, p, training, **kw)
    if fn.name == "drop_path_add":
        return f(other, x, p, training, **kw)
    return f(x, p, training, **kw)


def _expected(fn: Fn, xc: np.ndarray, other, p, mask, block) -> tuple[np.ndarray, np.ndarray]:
    """(expected values, which elements to compare) given the returned mask."""
    keep = np.broadcast_to(mask.numpy(), xc.shape)
    every = np.ones(xc.shape, bool)
    with np.errstate(all="ignore"):
        if fn.name in ("alpha_dropout", "feature_alpha_dropout"):
            if p == 1.0:
                return np.zeros_like(xc), every
            kept, dropped = alpha_kept(xc, p)
            return np.where(keep, kept, dropped), every
        if fn.name == "drop_block_2d":
            with_noise = block[2]
            if with_noise:
                return xc, keep  # dropped pixels are noise
            return np.where(keep, scaled(xc, mask.scale), xc.dtype.type(0)), every
        if fn.name in ("drop_path", "drop_path_add"):
            y = np.where(keep, scaled(xc, mask.scale), xc.dtype.type(0))
        else:
            scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
            y = np.where(keep, scaled(xc, scale), xc.dtype.type(0))
        if fn.fused:
            y = (other + y).astype(xc.dtype)
        return y, every


def _block_args(draw_or_data, shape):
    data = draw_or_data
    return (
        data.draw(st.integers(1, 6), "block_size"),
        data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]), "gamma_scale"),
        data.draw(st.booleans(), "with_noise"),
        data.draw(st.booleans(), "couple"),
        data.draw(st.booleans(), "scale_by_keep"),
    )


def _gamma(shape, p, block) -> float:
    _, _, h, w = shape
    kh, kw = min(block[0], h), min(block[0], w)
    if 0 in shape:
        return 0.0
    return block[1] * p * h * w / (kh * kw) / ((h - kh + 1) * (w - kw + 1))


def check_call(data, name: Optional[str] = None) -> None:
    """One random call of one public function, with every invariant checked."""
    fn = FUNCTIONS[name or data.draw(st.sampled_from(sorted(FUNCTIONS)), "function")]
    inplace = fn.has_inplace and data.draw(st.booleans(), "inplace")
    shape = None
    if data.draw(st.integers(0, 3), "rank that fits") > 0:
        # Mostly a rank the function takes, so its maths runs rather than its rank check.
        nd = data.draw(st.integers(0, 6).filter(fn.ranks), "rank")
        shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=nd, max_size=nd), "shape"))
    s = data.draw(strided_arrays(shape=shape), "input")
    x = s.x
    nd = x.ndim
    p = data.draw(P, "p")
    training = data.draw(st.booleans(), "training")
    seed = data.draw(st.integers(0, 2**64 - 1), "seed")
    other = np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype)
    block = _block_args(data, x.shape) if fn.name == "drop_block_2d" else None
    raw_before = s.raw.copy()
    xc = np.array(x)

    def untouched():
        np.testing.assert_array_equal(s.raw, raw_before)

    # torch's feature dropout returns an input with no channel when nothing is dropped (zeros
    # for p = 1): only an active call on such an input is an error.
    no_channel_ok = fn.name == "feature_alpha_dropout" and not (training and 0 < p < 1 and x.size)
    # timm's drop_path returns a 0-d input when it drops nothing.
    no_batch_ok = fn.name in ("drop_path", "drop_path_add") and not (training and p > 0)
    if not fn.ranks(nd) and not no_channel_ok and not no_batch_ok:
        try:
            _call(fn, x, other, p, training, inplace, seed, block)
        except ShapeError:
            untouched()
            return
        raise AssertionError(f"{fn.name} accepted a {nd}D input")
    active = training and p > 0.0
    if fn.name == "drop_block_2d" and active and x.size and _gamma(x.shape, p, block) > 1.0:
        try:
            _call(fn, x, other, p, training, inplace, seed, block)
        except ValueError as e:
            assert "at most 1" in str(e)
            untouched()
            return
        raise AssertionError("gamma > 1 was accepted")
    if inplace and active and s.broadcast and x.size:
        try:
            _call(fn, x, other, p, training, inplace, seed, block)
        except ValueError as e:
            assert "zero stride" in str(e)
            untouched()
            return
        raise AssertionError("in-place write to a broadcast view was accepted")

    y, mask = _call(fn, x, other, p, training, inplace, seed, block)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not fn.fused and (not active or x.size == 0 and fn.name == "drop_block_2d"):
        assert y is x
        untouched()
        assert mask.count_kept() == int(np.prod(mask.shape))
        return
    if inplace:
        assert y is x
        changed = s.raw != raw_before
        assert not np.any(changed & ~s.covered), "a byte outside the view changed"
    else:
        untouched()
    if not active:  # fused in eval: the plain sum
        want = other + xc if fn.name == "dropout_add" else xc + other
        np.testing.assert_array_equal(y, want.astype(x.dtype))
        return
    want, where = _expected(fn, xc, other, p, mask, block)
    np.testing.assert_array_equal(y[where], want[where])
    # The same generator state on a contiguous copy: the same values and mask.
    y2, mask2 = _call(fn, np.array(xc, order="C"), other, p, training, False, seed, block)
    np.testing.assert_array_equal(y2, y if not inplace else np.array(x))
    np.testing.assert_array_equal(mask2.numpy(), mask.numpy())


PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(st.data())
def test_dropout_properties(data):
    check_call(data, "dropout")


@PROPERTY
@given(st.data())
def test_alpha_dropout_properties(data):
    check_call(data, "alpha_dropout")


@PROPERTY
@given(st.data())
def test_feature_alpha_dropout_properties(data):
    check_call(data, "feature_alpha_dropout")


@PROPERTY
@given(st.data())
def test_channel_dropout_properties(data):
    check_call(data, data.draw(st.sampled_from(["dropout1d", "dropout2d", "dropout3d"])))


@PROPERTY
@given(st.data())
def test_drop_path_properties(data):
    check_call(data, "drop_path")


@PROPERTY
@given(st.data())
def test_fused_properties(data):
    check_call(data, data.draw(st.sampled_from(["dropout_add", "drop_path_add"])))


@st.composite
def four_d(draw):
    return tuple(draw(st.lists(st.integers(0, 6), min_size=4, max_size=4)))


@PROPERTY
@given(st.data())
def test_drop_block_properties(data):
    check_call(data, "drop_block_2d")


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_masks_are_reproducible_across_layouts(data):
    """The same seed gives the same mask and values for any layout of the same values."""
    fn = data.draw(st.sampled_from(["dropout", "alpha_dropout", "dropout2d", "drop_block_2d"]))
    a = data.draw(strided_arrays(shape=data.draw(four_d()), allow_broadcast=False))
    f = getattr(fastdrop, fn)
    args = (0.3, 2) if fn == "drop_block_2d" else (0.3,)
    kw: dict[str, Any] = {"training": True} if fn == "alpha_dropout" else {}
    y1, m1 = f(np.ascontiguousarray(a.x), *args, generator=Generator(3), return_mask=True, **kw)
    y2, m2 = f(a.x, *args, generator=Generator(3), return_mask=True, **kw)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(m1.numpy(), m2.numpy())
