"""Every variant but plain dropout (issue 4): alpha and feature-alpha dropout, dropout1d/2d/3d,
drop_path, drop_block_2d and the fused dropout_add / drop_path_add, against torch's and timm's
maths: exact values per dtype, keep rates, granularity, block placement, layouts, threads,
Mask.backward, the fused ops bit for bit, and every error path."""

from __future__ import annotations

import math

import fastdrop
import numpy as np
import pytest
from conftest import FLOATS, assert_binomial, expected_scaled, op_type
from fastdrop import Generator, ShapeError

ALPHA = 1.7580993408473766


def randn(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def positive(shape, dtype=np.float32, seed=0):
    """Values in [1, 3): no zeros, so a zero in an output means dropped."""
    return (np.random.default_rng(seed).random(shape) * 2 + 1).astype(dtype)


def alpha_constants(p: float) -> tuple[float, float, float]:
    """(a, shift, dropped) in float64, evaluated as the issue writes them."""
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    return a, ALPHA * a * p, -ALPHA * a * (1.0 - p)


def expected_alpha(x: np.ndarray, p: float) -> tuple[np.ndarray, np.generic]:
    """Kept values (a * x + shift, each constant rounded once to the compute type, two roundings)
    and the dropped value, both in x's dtype."""
    ot = op_type(x.dtype)
    a, shift, dropped = alpha_constants(p)
    kept = (x.astype(ot) * ot(a) + ot(shift)).astype(x.dtype)
    return kept, x.dtype.type(ot(dropped))


def broadcast_mask(mask, shape):
    return np.broadcast_to(mask.numpy(), shape)


# --- alpha dropout ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_alpha_dropout_values_are_exactly_the_formula(dtype, p):
    x = randn((50, 201), dtype)
    y, mask = fastdrop.alpha_dropout(x, p, training=True, generator=Generator(1), return_mask=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mask.shape == x.shape
    keep = mask.numpy()
    kept, dropped = expected_alpha(x, p)
    np.testing.assert_array_equal(y[keep], kept[keep])
    assert np.all(y[~keep] == dropped)
    a, _, _ = alpha_constants(p)
    assert mask.scale == pytest.approx(a, rel=1e-15)
    assert_binomial(int(keep.sum()), x.size, 1 - p)


def test_alpha_dropout_is_eval_by_default_and_p_zero_is_identity():
    x = randn(100)
    assert fastdrop.alpha_dropout(x) is x
    assert fastdrop.alpha_dropout(x, 0.0, training=True) is x
    x2 = randn((2, 3))
    assert fastdrop.feature_alpha_dropout(x2, 0.5) is x2


@pytest.mark.parametrize("dtype", FLOATS)
def test_alpha_dropout_p_one_gives_zeros(dtype):
    x = randn((31, 17), dtype)
    for f in (fastdrop.alpha_dropout, fastdrop.feature_alpha_dropout):
        y, mask = f(x, 1.0, training=True, return_mask=True)
        assert y.dtype == dtype and not np.any(y), f.__name__
        assert mask.count_kept() == 0


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.8])
def test_alpha_dropout_keeps_zero_mean_and_unit_variance(p):
    n = 1 << 21
    x = randn(n, np.float64, seed=3)
    y = fastdrop.alpha_dropout(x, p, training=True, generator=Generator(2))
    a, shift, d = alpha_constants(p)
    q = 1 - p
    # Exact moments of one output for x ~ N(0, 1): E y = 0, E y^2 = 1 by construction, and
    # E y^4 = q E(a x + shift)^4 + p d^4.
    m4 = q * (3 * a**4 + 6 * a**2 * shift**2 + shift**4) + p * d**4
    assert abs(q * shift + p * d) < 1e-12 and abs(q * (a * a + shift**2) + p * d * d - 1) < 1e-12
    # Six standard errors for the sample mean (sd 1) and the sample second moment (sd
    # sqrt(m4 - 1)); the second moment about the sample mean differs by mean^2 ~ 1/n.
    mean, second = float(y.mean()), float(np.mean(y * y))
    assert abs(mean) <= 6 / math.sqrt(n), mean
    assert abs(second - 1) <= 6 * math.sqrt((m4 - 1) / n), second
    assert abs(float(y.var()) - 1) <= 6 * math.sqrt((m4 - 1) / n) + 36 / n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_alpha_dropout_matches_torch_values(dtype, p):
    """torch's F.alpha_dropout gives exactly {a x + alpha a p} for kept elements (the same two
    roundings) and -alpha a (1 - p) for dropped ones up to its own rounding of b."""
    torch = pytest.importorskip("torch")
    x = positive(100_000, dtype)  # far from x = -alpha, where kept and dropped values meet
    torch.manual_seed(0)
    yt = torch.nn.functional.alpha_dropout(torch.from_numpy(x), p, training=True).numpy()
    kept, dropped = expected_alpha(x, p)
    is_kept = yt == kept
    eps = np.finfo(dtype).eps
    assert np.allclose(yt[~is_kept], dropped, rtol=4 * eps, atol=0)
    ours = fastdrop.alpha_dropout(x, p, training=True, generator=Generator(3))
    ours_kept = ours != dropped
    np.testing.assert_array_equal(ours[ours_kept], kept[ours_kept])
    for k in (int(is_kept.sum()), int(ours_kept.sum())):
        assert_binomial(k, x.size, 1 - p)


# --- feature alpha dropout --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(7, 5), (4, 6, 9), (3, 5, 4, 6), (2, 3, 4, 3, 5), (1, 1, 1)])
def test_feature_alpha_dropout_values_and_whole_channels(dtype, shape):
    x = randn(shape, dtype)
    p = 0.4
    y, mask = fastdrop.feature_alpha_dropout(
        x, p, training=True, generator=Generator(4), return_mask=True
    )
    assert mask.shape == shape[:2] + (1,) * (len(shape) - 2)
    keep = broadcast_mask(mask, shape)
    kept, dropped = expected_alpha(x, p)
    np.testing.assert_array_equal(y[keep], kept[keep])
    assert np.all(y[~keep] == dropped)


def test_feature_alpha_dropout_rate_and_torch_structure():
    torch = pytest.importorskip("torch")
    n, c = 64, 128
    x = positive((n, c, 5), np.float32)
    _, mask = fastdrop.feature_alpha_dropout(
        x, 0.3, training=True, generator=Generator(5), return_mask=True
    )
    assert_binomial(mask.count_kept(), n * c, 0.7)
    torch.manual_seed(1)
    yt = torch.nn.functional.feature_alpha_dropout(torch.from_numpy(x), 0.3, True).numpy()
    kept, dropped = expected_alpha(x, 0.3)
    is_kept = yt == kept
    # torch decides per (n, c) too, and its dropped channels are the constant.
    assert np.all(is_kept.all(axis=2) | ~is_kept.any(axis=2))
    assert np.allclose(yt[~is_kept], dropped, rtol=4 * np.finfo(np.float32).eps, atol=0)
    assert_binomial(int(is_kept[:, :, 0].sum()), n * c, 0.7)


# --- dropout1d / 2d / 3d ----------------------------------------------------------------------

CHANNEL = [
    (fastdrop.dropout1d, (6, 7, 11)),
    (fastdrop.dropout1d, (7, 11)),
    (fastdrop.dropout2d, (5, 6, 4, 7)),
    (fastdrop.dropout2d, (6, 4, 7)),
    (fastdrop.dropout3d, (3, 5, 2, 3, 4)),
    (fastdrop.dropout3d, (5, 2, 3, 4)),
]


def strict(f) -> dict:
    """The documented reading of shapes (torch's deprecated one is tested in test_parity)."""
    return {} if f is fastdrop.dropout1d else {"strict_shapes": True}


def channel_mask_shape(f, shape):
    unbatched = {fastdrop.dropout1d: 2, fastdrop.dropout2d: 3, fastdrop.dropout3d: 4}[f]
    lead = 1 if len(shape) == unbatched else 2
    return shape[:lead] + (1,) * (len(shape) - lead)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("f,shape", CHANNEL, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("p", [0.25, 0.5])
def test_channel_dropout_values_and_mask_shape(f, shape, dtype, p):
    x = positive(shape, dtype)
    y, mask = f(x, p, generator=Generator(6), return_mask=True, **strict(f))
    assert y.shape == shape and y.dtype == dtype
    assert mask.shape == channel_mask_shape(f, shape)
    keep = broadcast_mask(mask, shape)
    np.testing.assert_array_equal(y[keep], expected_scaled(x[keep], 1 / (1 - p)))
    assert np.all(y[~keep] == 0)
    assert mask.scale == 1 / (1 - p)


@pytest.mark.parametrize(
    "f,nd", [(fastdrop.dropout1d, 3), (fastdrop.dropout2d, 4), (fastdrop.dropout3d, 5)]
)
def test_channel_dropout_rate_and_bit_packed_mask(f, nd):
    n, c = 100, 300
    x = np.ones((n, c) + (2,) * (nd - 2), np.float32)
    y, mask = f(x, 0.3, generator=Generator(7), return_mask=True)
    assert mask.nbytes <= math.ceil(n * c / 64) * 8
    assert_binomial(mask.count_kept(), n * c, 0.7)
    # Whole channels: every element of a channel agrees.
    flat = y.reshape(n, c, -1)
    assert np.all((flat == flat[:, :, :1]).all(axis=2))


@pytest.mark.parametrize(
    "f,bad",
    [
        (fastdrop.dropout1d, [(), (4,), (2, 3, 4, 5)]),
        (fastdrop.dropout2d, [(), (4,), (3, 4), (1, 2, 3, 4, 5)]),
        (fastdrop.dropout3d, [(4,), (2, 3, 4), (1, 2, 3, 4, 5, 6)]),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_channel_dropout_wrong_dims_is_a_shape_error(f, bad, training):
    allowed = {
        fastdrop.dropout1d: "2D or 3D",
        fastdrop.dropout2d: "3D or 4D",
        fastdrop.dropout3d: "4D or 5D",
    }[f]
    for shape in bad:
        with pytest.raises(ShapeError) as e:
            f(np.ones(shape, np.float32), 0.5, training=training, **strict(f))
        assert isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)
        msg = str(e.value)
        assert f"received a {len(shape)}D input" in msg and allowed in msg, msg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout2d_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    x = positive((64, 96, 3, 3), dtype)
    torch.manual_seed(2)
    yt = torch.nn.functional.dropout2d(torch.from_numpy(x), 0.4, True).numpy()
    tk = yt != 0
    assert np.all(tk.all(axis=(2, 3)) | ~tk.any(axis=(2, 3)))
    # torch scales by 1 / (1 - p) computed in the tensor's type: equal up to one rounding of
    # the scale for float32, exactly for float64.
    want = expected_scaled(x[tk], 1 / 0.6)
    if dtype == np.float64:
        np.testing.assert_array_equal(yt[tk], want)
    else:
        np.testing.assert_allclose(yt[tk], want, rtol=3 * np.finfo(dtype).eps, atol=0)
    assert_binomial(int(tk[:, :, 0, 0].sum()), 64 * 96, 0.6)
    ours = fastdrop.dropout2d(x, 0.4, generator=Generator(8))
    assert_binomial(int((ours[:, :, 0, 0] != 0).sum()), 64 * 96, 0.6)


# --- drop_path --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(37,), (16, 5), (8, 3, 4), (6, 2, 3, 4, 2)])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_values_and_mask_shape(dtype, shape, scale_by_keep):
    x = positive(shape, dtype)
    y, mask = fastdrop.drop_path(
        x, 0.3, True, scale_by_keep, generator=Generator(9), return_mask=True
    )
    assert mask.shape == (shape[0],) + (1,) * (len(shape) - 1)
    keep = broadcast_mask(mask, shape)
    scale = 1 / 0.7 if scale_by_keep else 1.0
    np.testing.assert_array_equal(y[keep], expected_scaled(x[keep], scale))
    assert np.all(y[~keep] == 0)
    assert mask.scale == scale


def test_drop_path_defaults_rate_and_edges():
    x = positive((4, 3))
    assert fastdrop.drop_path(x, 0.5) is x  # eval by default, as timm
    assert fastdrop.drop_path(x, 0.0, True) is x
    y = fastdrop.drop_path(x, 1.0, True)
    assert not np.any(y)
    n = 200_000
    _, mask = fastdrop.drop_path(
        np.ones((n, 2), np.float32), 0.2, True, generator=Generator(10), return_mask=True
    )
    assert_binomial(mask.count_kept(), n, 0.8)
    with pytest.raises(ShapeError, match="0D"):
        fastdrop.drop_path(np.ones((), np.float32), 0.5, True)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_fast_path_gives_the_general_paths_result(dtype, scale_by_keep):
    # A plain float rate on a NumPy array takes the direct path; a NumPy float (or
    # return_mask) takes the general one: same spec, same generator, same bits.
    x = randn((64, 3, 5, 7), dtype) + dtype(1)
    fast = fastdrop.drop_path(x, 0.3, True, scale_by_keep, generator=Generator(4))
    general, mask = fastdrop.drop_path(
        x, np.float64(0.3), True, scale_by_keep, generator=Generator(4), return_mask=True
    )
    np.testing.assert_array_equal(fast, general)
    assert fast.dtype == x.dtype and fast.shape == x.shape
    assert 0 < mask.count_kept() < 64
    buf = np.full_like(x, 9)
    assert fastdrop.drop_path(x, 0.3, True, scale_by_keep, generator=Generator(4), out=buf) is buf
    np.testing.assert_array_equal(buf, general)
    # out= is checked on the direct path as on the general one, before any write.
    with pytest.raises(ValueError, match="shape and dtype"):
        fastdrop.drop_path(x, 0.3, True, out=np.empty((64, 3, 5), x.dtype))
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastdrop.drop_path(x, 0.3, True, out=ro)


def test_drop_path_matches_timm():
    torch = pytest.importorskip("torch")
    timm_drop = pytest.importorskip("timm.layers.drop")
    x = positive((4000, 3, 2), np.float64)
    torch.manual_seed(3)
    yt = timm_drop.drop_path(torch.from_numpy(x), 0.25, True, True).numpy()
    tk = yt != 0
    assert np.all(tk.all(axis=(1, 2)) | ~tk.any(axis=(1, 2)))
    np.testing.assert_array_equal(yt[tk], expected_scaled(x[tk], 1 / 0.75))
    assert_binomial(int(tk[:, 0, 0].sum()), 4000, 0.75)


# --- drop_block_2d ----------------------------------------------------------------------------


def gamma_of(drop_prob, block_size, h, w, gamma_scale=1.0):
    kh, kw = min(block_size, h), min(block_size, w)
    return gamma_scale * drop_prob * h * w / (kh * kw) / ((h - kh + 1) * (w - kw + 1)), kh, kw


def seeds_for(state, seed_shape, gamma):
    """The Bernoulli(gamma) block seeds a drop_block_2d call from generator state `state` draws.

    The design's contract is that decision i of any mask is a pure function of (seed, offset, i)
    and the probability, so an element-wise mask of the seed map's shape drawn with keep
    probability gamma from the same state holds exactly the seeds (kept = seed).
    """
    g = Generator()
    g.set_state(state)
    _, m = fastdrop.dropout(
        np.ones(seed_shape, np.float32), 1.0 - gamma, generator=g, return_mask=True
    )
    return m.numpy()


def numpy_block_keep(seeds, kh, kw):
    """timm's placement, re-derived: a seed at (r, c) drops rows r - kh//2 .. r - kh//2 + kh - 1
    and columns c - kw//2 .. c - kw//2 + kw - 1, clipped at the borders."""
    h, w = seeds.shape[-2:]
    dropped = np.zeros(seeds.shape, bool)
    for idx in np.argwhere(seeds):
        *lead, r, c = idx
        r0, c0 = r - kh // 2, c - kw // 2
        dropped[(*lead, slice(max(r0, 0), min(r0 + kh, h)), slice(max(c0, 0), min(c0 + kw, w)))] = (
            True
        )
    return ~dropped


def timm_block_keep(seeds, kh, kw):
    """timm's own max-pool placement applied to the seed map."""
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(seeds.astype(np.float32))
    bm = torch.nn.functional.max_pool2d(
        t, kernel_size=(kh, kw), stride=1, padding=(kh // 2, kw // 2)
    )
    if kh % 2 == 0 or kw % 2 == 0:
        bm = bm[..., (kh + 1) % 2 :, (kw + 1) % 2 :]
    return bm.numpy() == 0


BLOCK_CASES = [
    # (N, C, H, W), drop_prob, block_size: odd and even blocks, H != W, blocks larger than a side
    ((2, 3, 16, 16), 0.2, 7),
    ((2, 3, 15, 21), 0.15, 4),
    ((3, 2, 9, 12), 0.1, 2),
    ((2, 4, 5, 30), 0.2, 7),
    ((2, 2, 6, 6), 0.3, 6),
    ((2, 2, 7, 5), 0.2, 1),
    ((1, 2, 3, 4), 0.4, 10),
]


@pytest.mark.parametrize("shape,drop_prob,block_size", BLOCK_CASES)
@pytest.mark.parametrize("couple_channels", [True, False])
def test_drop_block_placement_is_timms(shape, drop_prob, block_size, couple_channels):
    n, c, h, w = shape
    x = positive(shape, np.float64)
    gamma, kh, kw = gamma_of(drop_prob, block_size, h, w)
    g = Generator(11)
    state = g.get_state()
    y, mask = fastdrop.drop_block_2d(
        x, drop_prob, block_size, couple_channels=couple_channels, generator=g, return_mask=True
    )
    seed_shape = (n, 1 if couple_channels else c, h, w)
    assert mask.shape == seed_shape
    seeds = seeds_for(state, seed_shape, gamma)
    keep = mask.numpy()
    np.testing.assert_array_equal(keep, numpy_block_keep(seeds, kh, kw))
    np.testing.assert_array_equal(keep, timm_block_keep(seeds, kh, kw))
    kept = int(keep.sum())
    scale = keep.size / kept if kept else 1.0
    assert mask.scale == scale
    full = np.broadcast_to(keep, shape)
    np.testing.assert_array_equal(y[full], expected_scaled(x[full], scale))
    assert np.all(y[~full] == 0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_drop_block_values_per_dtype_and_coupled_channels(dtype):
    x = positive((3, 5, 20, 17), dtype)
    y, mask = fastdrop.drop_block_2d(x, 0.25, 5, generator=Generator(12), return_mask=True)
    keep = mask.numpy()
    assert mask.shape == (3, 1, 20, 17)
    full = np.broadcast_to(keep, x.shape)
    np.testing.assert_array_equal(y[full], expected_scaled(x[full], keep.size / keep.sum()))
    # Coupled: every channel of a sample has the same zeros.
    assert np.all((y == 0) == (y[:, :1] == 0))
    _, m2 = fastdrop.drop_block_2d(
        x, 0.25, 5, couple_channels=False, generator=Generator(12), return_mask=True
    )
    assert m2.shape == x.shape


def test_drop_block_scale_by_keep_off_leaves_kept_pixels_alone():
    x = positive((2, 3, 12, 12), np.float32)
    y, mask = fastdrop.drop_block_2d(
        x, 0.3, 3, scale_by_keep=False, generator=Generator(13), return_mask=True
    )
    full = np.broadcast_to(mask.numpy(), x.shape)
    np.testing.assert_array_equal(y[full], x[full])
    assert np.all(y[~full] == 0) and mask.scale == 1.0


def test_drop_block_full_drop_and_gamma_above_one():
    x = positive((2, 3, 5, 6), np.float32)
    # block_size >= H and W: gamma = gamma_scale * drop_prob, so 1 drops everything.
    y, mask = fastdrop.drop_block_2d(x, 0.5, 9, gamma_scale=2.0, return_mask=True)
    assert not np.any(y) and mask.count_kept() == 0
    with pytest.raises(ValueError, match="at most 1"):
        fastdrop.drop_block_2d(x, 0.5, 9, gamma_scale=2.5)
    with pytest.raises(ValueError, match="at most 1"):
        fastdrop.drop_block_2d(positive((1, 1, 8, 8)), 0.9, 7, gamma_scale=4.0)


def _expected_dropped_fraction_and_variance(h, w, kh, kw, gamma):
    """Exact mean and variance of the dropped pixel count of one plane: pixel (i, j) is covered
    by the seeds in R_i x C_j (separable), so P(kept) = (1 - gamma)^(|R_i| |C_j|) and
    Cov = P(both kept) - P(kept) P(kept) with |R_i n R_i'| |C_j n C_j'| shared seeds."""

    def axis(n, k):
        before, after = k - 1 - k // 2, k // 2
        cover = np.zeros((n, n), bool)  # cover[i, r]: a seed at r drops i
        for i in range(n):
            cover[i, max(0, i - before) : min(n - 1, i + after) + 1] = True
        return cover.sum(1).astype(np.float64), (cover[:, None, :] & cover[None]).sum(2)

    nr, orow = axis(h, kh)
    nc, ocol = axis(w, kw)
    lq = math.log1p(-gamma)
    size = np.outer(nr, nc)  # |S_ij|
    kept = np.exp(lq * size)
    mean = float(size.size - kept.sum())
    var = 0.0
    for i in range(h):
        for i2 in range(h):
            if orow[i, i2] == 0:
                continue
            shared = orow[i, i2] * ocol  # (w, w)
            both = kept[i][:, None] * kept[i2][None, :]
            var += float((both * np.expm1(-lq * shared)).sum())
    return mean, var


@pytest.mark.parametrize("couple_channels", [True, False])
def test_drop_block_dropped_fraction_matches_timm_statistics(couple_channels):
    """timm's own check ((32, 16, 56, 56), block 7, drop_prob 0.1: within 0.03), plus an exact
    bound: the dropped count's mean and variance computed from gamma, six standard deviations,
    for both fastdrop and timm."""
    torch = pytest.importorskip("torch")
    timm_drop = pytest.importorskip("timm.layers.drop")
    shape = (32, 16, 56, 56)
    n, c, h, w = shape
    x = np.ones(shape, np.float32)
    gamma, kh, kw = gamma_of(0.1, 7, h, w)
    mean, var = _expected_dropped_fraction_and_variance(h, w, kh, kw, gamma)
    planes = n * (1 if couple_channels else c)
    bound = 6 * math.sqrt(planes * var)
    y = fastdrop.drop_block_2d(x, 0.1, 7, couple_channels=couple_channels, generator=Generator(14))
    ours = float((y == 0).mean())
    assert abs(ours - 0.1) < 0.03
    assert abs(ours * x.size - mean * n * c) <= bound * (c if couple_channels else 1)
    torch.manual_seed(4)
    yt = timm_drop.drop_block_2d(
        torch.from_numpy(x), 0.1, 7, couple_channels=couple_channels
    ).numpy()
    theirs = float((yt == 0).mean())
    assert abs(theirs - 0.1) < 0.03
    assert abs(theirs * x.size - mean * n * c) <= bound * (c if couple_channels else 1)


@pytest.mark.parametrize("couple_channels", [True, False])
def test_drop_block_with_noise_fills_dropped_pixels_with_standard_normals(couple_channels):
    x = positive((8, 4, 40, 40), np.float64)
    g = Generator(15)
    state = g.get_state()
    y, mask = fastdrop.drop_block_2d(
        x, 0.3, 5, with_noise=True, couple_channels=couple_channels, generator=g, return_mask=True
    )
    full = np.broadcast_to(mask.numpy(), x.shape)
    np.testing.assert_array_equal(y[full], x[full])  # kept pixels are not scaled with noise
    if couple_channels:
        # timm draws noise in the mask's shape: the channels of a sample share it.
        assert np.array_equal(np.where(full, 0, y), np.where(full, 0, y[:, :1]))
        z = y[:, 0][~full[:, 0]]
    else:
        z = y[~full]
    m = z.size
    assert m > 2000
    assert abs(float(z.mean())) <= 6 / math.sqrt(m)
    assert abs(float(np.mean(z * z)) - 1) <= 6 * math.sqrt(2 / m)
    assert_binomial(int((np.abs(z) < 1).sum()), m, math.erf(1 / math.sqrt(2)), "|z| < 1")
    # Reproducible from the state, fresh on the next call.
    g.set_state(state)
    again = fastdrop.drop_block_2d(
        x, 0.3, 5, with_noise=True, couple_channels=couple_channels, generator=g
    )
    np.testing.assert_array_equal(again, y)
    nxt = fastdrop.drop_block_2d(
        x, 0.3, 5, with_noise=True, couple_channels=couple_channels, generator=g
    )
    assert not np.array_equal(nxt, y)


@pytest.mark.parametrize("dtype", FLOATS)
def test_drop_block_noise_is_the_same_for_every_dtype_up_to_rounding(dtype):
    x = positive((2, 3, 16, 16), np.float64)
    ref = fastdrop.drop_block_2d(x, 0.3, 3, with_noise=True, generator=Generator(16))
    y = fastdrop.drop_block_2d(x.astype(dtype), 0.3, 3, with_noise=True, generator=Generator(16))
    np.testing.assert_array_equal(y, ref.astype(op_type(dtype)).astype(dtype))


def test_drop_block_eval_zero_prob_and_empty_inputs_are_identity():
    x = positive((2, 3, 8, 8))
    assert fastdrop.drop_block_2d(x, 0.2, 3, training=False) is x
    assert fastdrop.drop_block_2d(x, 0.0, 3) is x
    for shape in [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)]:
        e = np.empty(shape, np.float32)
        assert fastdrop.drop_block_2d(e, 0.2, 3).shape == shape


# --- reproducibility: threads and layouts -----------------------------------------------------

VARIANTS = {
    "alpha_dropout": lambda x, **k: fastdrop.alpha_dropout(x, 0.3, True, **k),
    "feature_alpha_dropout": lambda x, **k: fastdrop.feature_alpha_dropout(x, 0.3, True, **k),
    "dropout2d": lambda x, **k: fastdrop.dropout2d(x, 0.3, **k),
    "dropout3d": lambda x, **k: fastdrop.dropout3d(x, 0.3, **k),  # unbatched (C, D, H, W)
    "drop_path": lambda x, **k: fastdrop.drop_path(x, 0.3, True, **k),
    "drop_block_2d": lambda x, **k: fastdrop.drop_block_2d(x, 0.2, 5, **k),
    "drop_block_2d_uncoupled": lambda x, **k: fastdrop.drop_block_2d(
        x, 0.2, 4, couple_channels=False, **k
    ),
    "drop_block_2d_noise": lambda x, **k: fastdrop.drop_block_2d(x, 0.2, 3, with_noise=True, **k),
}
INPLACE = {
    "alpha_dropout",
    "feature_alpha_dropout",
    "dropout2d",
    "dropout3d",
    "drop_block_2d",
    "drop_block_2d_uncoupled",
    "drop_block_2d_noise",
}


def layouts(base):
    yield "c", base
    yield "fortran", np.asfortranarray(base)
    big = np.zeros(tuple(2 * s for s in base.shape), base.dtype)
    view = big[::2, :, ::2, 1::2]
    view = view[:, : base.shape[1]]
    view[...] = base
    yield "strided", view
    yield "negative strides", np.ascontiguousarray(base[::-1, :, ::-1, ::-1])[::-1, :, ::-1, ::-1]
    yield "channels last", np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_is_independent_of_threads_and_layout(name):
    f = VARIANTS[name]
    base = positive((8, 16, 36, 36), np.float32)  # 165888 elements: above the parallel cut-off
    fastdrop.set_num_threads(1)
    ref, mask = f(base, generator=Generator(17), return_mask=True)
    for threads in (2, 5):
        fastdrop.set_num_threads(threads)
        np.testing.assert_array_equal(f(base, generator=Generator(17)), ref, err_msg=threads)
    fastdrop.set_num_threads(2)
    for lname, x in layouts(base):
        np.testing.assert_array_equal(x, base)
        y, m2 = f(x, generator=Generator(17), return_mask=True)
        np.testing.assert_array_equal(y, ref, err_msg=lname)
        np.testing.assert_array_equal(m2.numpy(), mask.numpy(), err_msg=lname)
        if name in INPLACE:
            z = x.copy(order="K")
            assert f(z, generator=Generator(17), inplace=True) is z
            np.testing.assert_array_equal(z, ref, err_msg=f"{lname}, in place")


# --- Mask.backward ----------------------------------------------------------------------------

BACKWARD = {
    "alpha_dropout": ((4, 30), lambda x, **k: fastdrop.alpha_dropout(x, 0.3, True, **k)),
    "feature_alpha_dropout": (
        (4, 5, 6),
        lambda x, **k: fastdrop.feature_alpha_dropout(x, 0.4, True, **k),
    ),
    "dropout1d": ((4, 5, 6), lambda x, **k: fastdrop.dropout1d(x, 0.4, **k)),
    "dropout2d": ((3, 4, 3, 3), lambda x, **k: fastdrop.dropout2d(x, 0.4, **k)),
    "dropout3d": ((4, 2, 3, 4), lambda x, **k: fastdrop.dropout3d(x, 0.4, **k)),
    "drop_path": ((10, 3, 4), lambda x, **k: fastdrop.drop_path(x, 0.4, True, **k)),
    "drop_path_unscaled": ((10, 12), lambda x, **k: fastdrop.drop_path(x, 0.4, True, False, **k)),
    "drop_block_2d": ((2, 3, 5, 5), lambda x, **k: fastdrop.drop_block_2d(x, 0.3, 2, **k)),
    "drop_block_2d_noise": (
        (2, 3, 5, 5),
        lambda x, **k: fastdrop.drop_block_2d(x, 0.3, 2, with_noise=True, **k),
    ),
}


@pytest.mark.parametrize("name", sorted(BACKWARD))
def test_mask_backward_matches_finite_differences(name):
    shape, f = BACKWARD[name]
    x = randn(shape, np.float64, seed=5)
    g = Generator(18)
    state = g.get_state()
    _, mask = f(x, generator=g, return_mask=True)
    w = randn(shape, np.float64, seed=6)
    analytic = mask.backward(w)
    eps = 1e-6
    numeric = np.empty(x.size)
    for i in range(x.size):
        vals = []
        for sign in (1, -1):
            xp = x.copy().reshape(-1)
            xp[i] += sign * eps
            g.set_state(state)
            vals.append(float(np.sum(f(xp.reshape(shape), generator=g) * w)))
        numeric[i] = (vals[0] - vals[1]) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric.reshape(shape), rtol=1e-6, atol=1e-7)


def test_mask_backward_refuses_a_wrong_shape_and_keeps_dtype():
    _, mask = fastdrop.dropout2d(np.ones((2, 3, 4, 4), np.float16), 0.5, return_mask=True)
    assert mask.backward(np.ones((2, 3, 4, 4), np.float16)).dtype == np.float16
    with pytest.raises(ValueError, match="shape"):
        mask.backward(np.ones((2, 3, 4), np.float32))


# --- fused ops --------------------------------------------------------------------------------


def assert_same_bits(a, b, msg=""):
    assert a.dtype == b.dtype and a.shape == b.shape
    u = f"u{a.dtype.itemsize}"
    np.testing.assert_array_equal(a.view(u), b.view(u), err_msg=msg)


def fused_layouts(shape, dtype):
    base = randn(shape, dtype, seed=7)
    yield "c", base
    yield "fortran", np.asfortranarray(base)
    yield "negative", np.ascontiguousarray(base[::-1])[::-1]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1000,), (33, 65), (4, 3, 50, 41)])
def test_dropout_add_is_residual_plus_dropout_bit_for_bit(dtype, p, shape):
    residual = randn(shape, dtype, seed=8)
    for name, x in fused_layouts(shape, dtype):
        g1, g2 = Generator(19), Generator(19)
        fused, m1 = fastdrop.dropout_add(x, residual, p, generator=g1, return_mask=True)
        y, m2 = fastdrop.dropout(x, p, generator=g2, return_mask=True)
        unfused = residual + y
        assert fused.dtype == dtype and fused.shape == shape
        assert_same_bits(fused, unfused, name)
        np.testing.assert_array_equal(m1.numpy(), m2.numpy())
        assert g1.offset == g2.offset


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("shape", [(64,), (40, 7), (16, 3, 9, 9)])
def test_drop_path_add_is_x_plus_drop_path_bit_for_bit(dtype, scale_by_keep, shape):
    x = randn(shape, dtype, seed=9)
    branch = randn(shape, dtype, seed=10)
    g1, g2 = Generator(20), Generator(20)
    fused, m1 = fastdrop.drop_path_add(
        x, branch, 0.4, True, scale_by_keep, generator=g1, return_mask=True
    )
    unfused = x + fastdrop.drop_path(branch, 0.4, True, scale_by_keep, generator=g2)
    assert_same_bits(fused, unfused)
    np.testing.assert_array_equal(
        m1.numpy(),
        fastdrop.drop_path(
            branch, 0.4, True, scale_by_keep, generator=Generator(20), return_mask=True
        )[1].numpy(),
    )


def test_fused_ops_in_eval_are_plain_sums_and_refuse_mismatched_operands():
    x, r = randn(10, np.float32), randn(10, np.float32, seed=1)
    np.testing.assert_array_equal(fastdrop.dropout_add(x, r, 0.5, False), x + r)
    np.testing.assert_array_equal(fastdrop.drop_path_add(x, r, 0.5, False), x + r)
    with pytest.raises(ValueError, match="residual"):
        fastdrop.dropout_add(x, randn(11, np.float32), 0.5)
    with pytest.raises(ValueError, match="residual"):
        fastdrop.dropout_add(x, r.astype(np.float64), 0.5)


def test_fused_ops_do_not_modify_their_inputs():
    x, r = randn((20, 30)), randn((20, 30), seed=1)
    xb, rb = x.copy(), r.copy()
    fastdrop.dropout_add(x, r, 0.5)
    fastdrop.drop_path_add(x, r, 0.5, True)
    np.testing.assert_array_equal(x, xb)
    np.testing.assert_array_equal(r, rb)


# --- errors -----------------------------------------------------------------------------------

X4 = np.ones((2, 3, 8, 8), np.float32)

CALLS = {
    "alpha_dropout": (X4, lambda x, **k: fastdrop.alpha_dropout(x, **{"training": True, **k})),
    "feature_alpha_dropout": (
        X4,
        lambda x, **k: fastdrop.feature_alpha_dropout(x, **{"training": True, **k}),
    ),
    "dropout1d": (X4[0], fastdrop.dropout1d),
    "dropout2d": (X4, fastdrop.dropout2d),
    "dropout3d": (X4[None], fastdrop.dropout3d),
    "dropout_add": (X4, lambda x, **k: fastdrop.dropout_add(x, X4, **k)),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("p", [-0.1, 1.0000001, float("nan"), float("inf")])
def test_p_out_of_range_is_a_value_error(name, p):
    x, call = CALLS[name]
    with pytest.raises(ValueError, match="between 0 and 1"):
        call(x, p=p)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_bad_argument_types_are_type_errors(name):
    x, call = CALLS[name]
    for kwargs in [{"p": "0.5"}, {"p": None}, {"training": "yes"}, {"generator": 3}]:
        with pytest.raises(TypeError):
            call(x, **kwargs)
    for bad in [x.tolist(), 3.0, None, x.astype(np.int32), x.astype(np.complex64)]:
        with pytest.raises(TypeError):
            call(bad)


def test_drop_path_and_drop_block_argument_errors():
    x = X4
    cases = [
        (lambda: fastdrop.drop_path(x, -0.5, True), ValueError, "between 0 and 1"),
        (lambda: fastdrop.drop_path(x, 1.5, True), ValueError, "between 0 and 1"),
        (lambda: fastdrop.drop_path(x, 0.5, True, "yes"), TypeError, "scale_by_keep"),
        (lambda: fastdrop.drop_path([1.0], 0.5, True), TypeError, "list"),
        (lambda: fastdrop.drop_path_add(x, np.ones(()), 0.5, True), ShapeError, "0D"),
        (lambda: fastdrop.drop_block_2d(x, 1.5), ValueError, "between 0 and 1"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 0), ValueError, "block_size must be at least 1"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, -3), ValueError, "got -3"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 2.5), TypeError, "block_size must be an int"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, True), TypeError, "block_size"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 3, -1.0), ValueError, "gamma_scale"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 3, float("inf")), ValueError, "gamma_scale"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 3, float("nan")), ValueError, "gamma_scale"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 3, "1"), TypeError, "gamma_scale"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 3, with_noise=1), TypeError, "with_noise"),
        (
            lambda: fastdrop.drop_block_2d(x, 0.1, 3, couple_channels=None),
            TypeError,
            "couple_channels",
        ),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 3, training="x"), TypeError, "training"),
        (lambda: fastdrop.drop_block_2d(x, 0.1, 3, inplace=1), TypeError, "inplace"),
        (lambda: fastdrop.drop_block_2d(x[0], 0.1, 3), ShapeError, "received a 3D input"),
        (
            lambda: fastdrop.drop_block_2d(x[None], 0.1, 3, training=False),
            ShapeError,
            "received a 5D input",
        ),
        (lambda: fastdrop.drop_block_2d("x", 0.1, 3), TypeError, "str"),
        (
            lambda: fastdrop.feature_alpha_dropout(np.ones(3), 0.5, True),
            ShapeError,
            "at least 2 dimensions",
        ),
        (
            lambda: fastdrop.feature_alpha_dropout(np.ones(()), 0.5, True),
            ShapeError,
            "received a 0D input",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_an_untouched_call_returns_an_all_kept_mask_of_the_variants_shape():
    x = np.ones((2, 3, 4, 5), np.float32)
    cases = {
        "dropout": (lambda **k: fastdrop.dropout(x, 0.5, False, **k), x.shape),
        "dropout2d": (lambda **k: fastdrop.dropout2d(x, 0.5, False, **k), (2, 3, 1, 1)),
        "feature_alpha": (lambda **k: fastdrop.feature_alpha_dropout(x, 0.5, **k), (2, 3, 1, 1)),
        "drop_path": (lambda **k: fastdrop.drop_path(x, 0.5, **k), (2, 1, 1, 1)),
        "drop_block": (lambda **k: fastdrop.drop_block_2d(x, 0.0, 3, **k), (2, 1, 4, 5)),
        "drop_path_add": (lambda **k: fastdrop.drop_path_add(x, x, 0.5, **k), (2, 1, 1, 1)),
    }
    for name, (call, shape) in cases.items():
        y, mask = call(return_mask=True)
        assert mask.shape == shape, name
        assert mask.numpy().all() and mask.scale == 1.0, name
        np.testing.assert_array_equal(mask.backward(np.full_like(x, 3)), np.full_like(x, 3))
    torch = pytest.importorskip("torch")
    _, mask = fastdrop.dropout2d(torch.ones(2, 3, 4, 5), 0.5, training=False, return_mask=True)
    assert mask.shape == (2, 3, 1, 1)
