"""Tests for python/fastdrop/_device.py: torch's own ops, the path for tensors off the CPU.

Its functions run on any device, so their values are checked here on CPU tensors against timm
and torch; the public functions on ``meta`` (and CUDA, when present) tensors take this path.
"""

from __future__ import annotations

import itertools
import struct

import pytest

torch = pytest.importorskip("torch")
import fastdrop  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastdrop import _device as dev  # noqa: E402
from fastdrop import functional as fd  # noqa: E402

try:
    from timm.layers import drop as timm_drop
except ImportError:  # pragma: no cover - timm is in the dev venv
    timm_drop = None

needs_timm = pytest.mark.skipif(timm_drop is None, reason="timm not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(-1).view(ints[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    assert a.device == b.device
    assert torch.equal(_bits(a), _bits(b))


# ======================================================================== drop_path
# The device path of `fastdrop.drop_path` / `dropout_add` / `drop_path_add`: the public
# function's spec run by `_device.run` on a CPU tensor (the public function answers a call that
# drops nothing itself, before any path).


def _drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True, generator=None, add=None):
    if not training or drop_prob == 0.0:
        if add is None:
            return fastdrop.drop_path(x, drop_prob, training, scale_by_keep)
        return fastdrop.drop_path_add(add, x, drop_prob, training, scale_by_keep)
    return dev.run(x, fd._path_spec(x, drop_prob, scale_by_keep), False, generator, add)


def _dropout_add(inp, res, p, training, generator=None):
    if not training or p == 0.0:
        return fastdrop.dropout_add(inp, res, p, training)
    return dev.run(inp, fd._scale_spec(tuple(inp.shape), p), False, generator, res)


@needs_timm
@pytest.mark.parametrize("shape", [(8,), (8, 5), (16, 3, 4, 4), (6, 2, 3, 4, 5)])
@pytest.mark.parametrize("drop_prob", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_path_matches_timm(shape, drop_prob, scale_by_keep, dtype) -> None:
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1234)
    ref = timm_drop.drop_path(x, drop_prob, True, scale_by_keep)
    torch.manual_seed(1234)
    out = _drop_path(x, drop_prob, True, scale_by_keep)
    assert_bitwise_equal(out, ref)


def test_drop_path_identity_cases() -> None:
    for x in (torch.randn(4, 3), torch.empty(4, 3, device="meta")):
        assert fastdrop.drop_path(x, 0.5, training=False) is x
        assert fastdrop.drop_path(x, 0.0, training=True) is x
        assert fastdrop.drop_path(x) is x  # timm defaults: drop_prob=0, training=False


def test_drop_path_structure() -> None:
    x = torch.ones(64, 3, 5)
    out = _drop_path(x, 0.25, training=True)
    per_sample = out.reshape(64, -1)
    for row in per_sample:
        assert torch.all(row == row[0])
        assert row[0].item() == 0.0 or row[0].item() == pytest.approx(1 / 0.75)
    out = _drop_path(x, 0.25, training=True, scale_by_keep=False)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(_drop_path(x, 1.0, training=True) == 0)


def test_drop_path_generator() -> None:
    x = torch.randn(32, 4)
    state = torch.random.get_rng_state()
    a = _drop_path(x, 0.5, True, generator=torch.Generator().manual_seed(7))
    b = _drop_path(x, 0.5, True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert_bitwise_equal(a, b)
    torch.manual_seed(7)
    assert_bitwise_equal(a, _drop_path(x, 0.5, True))  # fresh generator == manual_seed stream


def test_drop_path_errors() -> None:
    for x in (torch.randn(4, 3), torch.empty(4, 3, device="meta")):
        for p in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError):
                fastdrop.drop_path(x, p, True)
    with pytest.raises(ValueError):
        fastdrop.drop_path(torch.empty((), device="meta"), 0.5, True)


# ======================================================================== drop_block_2d
_SHAPES = [(2, 3, 8, 8), (2, 3, 7, 13), (3, 2, 12, 5), (1, 2, 3, 5), (2, 4, 16, 16)]
_BLOCKS = [1, 2, 3, 4, 5, 6, 7, 20]


@needs_timm
@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("block_size", _BLOCKS)
@pytest.mark.parametrize(
    "couple_channels,with_noise,scale_by_keep",
    list(itertools.product([True, False], repeat=3)),
)
def test_drop_block_matches_timm(
    shape, block_size, couple_channels, with_noise, scale_by_keep
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    kwargs = dict(
        drop_prob=0.3,
        block_size=block_size,
        with_noise=with_noise,
        couple_channels=couple_channels,
        scale_by_keep=scale_by_keep,
    )
    torch.manual_seed(99)
    ref = timm_drop.drop_block_2d(x.clone(), **kwargs)
    torch.manual_seed(99)
    out = dev.drop_block_2d(x.clone(), **kwargs)
    assert_bitwise_equal(out, ref)
    # in-place variant: same values, same object
    torch.manual_seed(99)
    y = x.clone()
    out_inplace = dev.drop_block_2d(y, inplace=True, **kwargs)
    assert out_inplace is y
    assert_bitwise_equal(out_inplace, ref)


@needs_timm
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [3, 4])
def test_drop_block_matches_timm_dtypes(dtype, block_size) -> None:
    x = torch.randn(2, 3, 10, 9).to(dtype)
    for gamma_scale in (0.5, 1.0):
        torch.manual_seed(5)
        ref = timm_drop.drop_block_2d(x, 0.2, block_size, gamma_scale)
        torch.manual_seed(5)
        out = dev.drop_block_2d(x, 0.2, block_size, gamma_scale)
        assert_bitwise_equal(out, ref)


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _reference_drop_block(x, seeds, kh, kw, scale_by_keep):
    """Plain-Python rendering of the docstring's algorithm, from a given seed mask."""
    B, Cm, H, W = seeds.shape
    s = seeds.tolist()
    drop = [[[[0] * W for _ in range(H)] for _ in range(Cm)] for _ in range(B)]
    for b, c, i, j in itertools.product(range(B), range(Cm), range(H), range(W)):
        if s[b][c][i][j]:
            for r in range(max(0, i - kh // 2), min(H, i - kh // 2 + kh)):
                for q in range(max(0, j - kw // 2), min(W, j - kw // 2 + kw)):
                    drop[b][c][r][q] = 1
    keep = torch.tensor(drop, dtype=torch.float64).neg_().add_(1)
    if scale_by_keep:
        n = keep.numel()
        k = int(keep.sum().item())
        scale = _f32(_f32(1.0 / _f32(_f32(float(k)) + _f32(1e-7))) * _f32(float(n)))
        keep = keep * scale
    return x * keep.to(x.dtype)


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 2, 4, 6), (2, 1, 2, 3)])
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 5, 6, 7, 12])
@pytest.mark.parametrize("couple_channels", [True, False])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_block_matches_documented_algorithm(
    shape, block_size, couple_channels, scale_by_keep
) -> None:
    """The docstring is the spec for the Rust port: check it reproduces the output bit for bit."""
    B, C, H, W = shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    drop_prob = 0.4
    kh, kw = dev.drop_block_kernel(H, W, block_size)
    assert (kh, kw) == (min(block_size, H), min(block_size, W))
    gamma = dev.drop_block_gamma(H, W, block_size, drop_prob)
    assert gamma == float(drop_prob * H * W) / float(kh * kw) / float((H - kh + 1) * (W - kw + 1))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        seeds = torch.empty((B, 1 if couple_channels else C, H, W)).bernoulli_(gamma, generator=g)
        out = dev.drop_block_2d(
            x,
            drop_prob,
            block_size,
            couple_channels=couple_channels,
            scale_by_keep=scale_by_keep,
            generator=torch.Generator().manual_seed(seed),
        )
        assert_bitwise_equal(out, _reference_drop_block(x, seeds, kh, kw, scale_by_keep))


@pytest.mark.parametrize(
    "k,expected_rows",
    [(1, [5]), (2, [4, 5]), (3, [4, 5, 6]), (4, [3, 4, 5, 6]), (5, [3, 4, 5, 6, 7])],
)
def test_single_seed_footprint(k, expected_rows) -> None:
    """A lone seed at (5, 5) drops rows/cols i - k//2 .. i - k//2 + k - 1 (the documented rule)."""
    seeds = torch.zeros(1, 1, 11, 11)
    seeds[0, 0, 5, 5] = 1
    pooled = F.max_pool2d(seeds, kernel_size=(k, k), stride=1, padding=(k // 2, k // 2))
    pooled = pooled[..., (k + 1) % 2 :, (k + 1) % 2 :]
    rows = pooled[0, 0].amax(dim=1).nonzero().flatten().tolist()
    cols = pooled[0, 0].amax(dim=0).nonzero().flatten().tolist()
    assert rows == expected_rows and cols == expected_rows
    assert int(pooled.sum().item()) == k * k


def test_drop_block_fraction() -> None:
    torch.manual_seed(123)
    x = torch.ones((32, 16, 56, 56))
    drop_prob = 0.1
    out = dev.drop_block_2d(x, drop_prob=drop_prob, block_size=7, scale_by_keep=False)
    frac = (out == 0).sum().item() / out.numel()
    assert abs(frac - drop_prob) < 0.03
    out = dev.drop_block_2d(
        x, drop_prob=drop_prob, block_size=7, couple_channels=False, scale_by_keep=False
    )
    frac = (out == 0).sum().item() / out.numel()
    assert abs(frac - drop_prob) < 0.03


def test_drop_block_structure() -> None:
    x = torch.ones(2, 4, 16, 16)
    out = dev.drop_block_2d(x, 0.3, 5, generator=torch.Generator().manual_seed(0))
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # coupled: same mask for every channel
    kept = out[~zero]
    assert torch.all(kept == kept[0]) and kept[0] > 1  # one scale factor, > 1
    n, k = 2 * 16 * 16, int((~zero[:, 0]).sum())
    assert kept[0].item() == pytest.approx(n / k, rel=1e-6)
    out = dev.drop_block_2d(
        x, 0.3, 5, couple_channels=False, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(out[0, 0] == 0, out[0, 1] == 0)
    noisy = dev.drop_block_2d(
        x, 0.3, 5, with_noise=True, generator=torch.Generator().manual_seed(0)
    )
    plain = dev.drop_block_2d(
        x, 0.3, 5, scale_by_keep=False, generator=torch.Generator().manual_seed(0)
    )
    dropped = plain == 0
    assert torch.all(noisy[~dropped] == 1)  # kept pixels unchanged, no scaling with noise
    assert noisy[dropped].std() > 0.5


def test_drop_block_everything_dropped() -> None:
    x = torch.randn(1, 2, 3, 3)
    out = dev.drop_block_2d(x, 1.0, 3, gamma_scale=1.0, generator=torch.Generator().manual_seed(0))
    # gamma = 1 for a block covering the map: every pixel is a seed
    assert torch.all(out == 0) and not torch.isnan(out).any()


def test_drop_block_identity_cases() -> None:
    x = torch.randn(2, 3, 8, 8)
    state = torch.random.get_rng_state()
    assert dev.drop_block_2d(x, 0.5, 3, training=False) is x
    assert dev.drop_block_2d(x, 0.0, 3) is x
    empty = torch.randn(0, 3, 8, 8)
    assert dev.drop_block_2d(empty, 0.5, 3) is empty
    assert torch.equal(torch.random.get_rng_state(), state)


def test_drop_block_generator() -> None:
    x = torch.randn(2, 3, 12, 12)
    state = torch.random.get_rng_state()
    for noise in (False, True):
        a = dev.drop_block_2d(
            x, 0.3, 4, with_noise=noise, generator=torch.Generator().manual_seed(21)
        )
        b = dev.drop_block_2d(
            x, 0.3, 4, with_noise=noise, generator=torch.Generator().manual_seed(21)
        )
        assert_bitwise_equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_drop_block_grad() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = dev.drop_block_2d(x, 0.3, 3, generator=torch.Generator().manual_seed(1))
    out.sum().backward()
    expected = dev.drop_block_2d(
        torch.ones(2, 3, 8, 8), 0.3, 3, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(x.grad, expected)


def test_drop_block_errors() -> None:
    x = torch.randn(2, 3, 8, 8)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            dev.drop_block_2d(x, p)
    with pytest.raises(ValueError):
        dev.drop_block_2d(x, 0.1, 0)
    with pytest.raises(TypeError):
        dev.drop_block_2d(x, 0.1, 3.0)
    with pytest.raises(ValueError):
        dev.drop_block_2d(x, 0.1, 3, gamma_scale=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        dev.drop_block_2d(x, 1.0, 3, gamma_scale=100.0)
    with pytest.raises(ValueError):
        dev.drop_block_2d(torch.randn(3, 8, 8), 0.1)
    with pytest.raises(TypeError):
        dev.drop_block_2d(torch.ones(2, 3, 8, 8, dtype=torch.int64), 0.1)


# ======================================================================== add variants
def test_dropout_add_matches_expression() -> None:
    inp, res = torch.randn(16, 32), torch.randn(16, 32)
    for p, training in [(0.0, True), (0.3, True), (1.0, True), (0.3, False)]:
        torch.manual_seed(2)
        ref = res + F.dropout(inp, p, training)
        torch.manual_seed(2)
        assert_bitwise_equal(_dropout_add(inp, res, p, training), ref)
        # with a generator: same values as F.dropout seeded identically (CPU, non-fused path)
        out = _dropout_add(inp, res, p, training, generator=torch.Generator().manual_seed(2))
        assert_bitwise_equal(out, ref)


def test_dropout_add_errors() -> None:
    inp = torch.empty(4, device="meta")
    for p in (-0.5, 1.5):
        with pytest.raises(ValueError):
            fastdrop.dropout_add(inp, inp, p, True)
        with pytest.raises(ValueError):
            fastdrop.dropout_add(inp, inp, p, True, generator=torch.Generator())


def test_drop_path_add() -> None:
    x, branch = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
    for p, training, sbk in [
        (0.0, True, True),
        (0.4, True, True),
        (0.4, True, False),
        (0.4, False, True),
    ]:
        torch.manual_seed(3)
        ref = x + _drop_path(branch, p, training, sbk)
        torch.manual_seed(3)
        assert_bitwise_equal(_drop_path(branch, p, training, sbk, add=x), ref)
        g_out = _drop_path(branch, p, training, sbk, torch.Generator().manual_seed(3), add=x)
        assert_bitwise_equal(g_out, ref)


# ======================================================================== meta tensors
def test_meta_tensors() -> None:
    x = torch.empty(4, 3, 10, 7, device="meta")
    r = torch.empty(4, 3, 10, 7, device="meta")
    outs = [
        fastdrop.drop_path(x, 0.2, True),
        fastdrop.drop_path_add(r, x, 0.2, True),
        fastdrop.dropout_add(x, r, 0.2, True),
    ]
    for bs in (3, 4, 12):
        for cc, noise, sbk in itertools.product([True, False], repeat=3):
            outs.append(
                dev.drop_block_2d(
                    x, 0.2, bs, with_noise=noise, couple_channels=cc, scale_by_keep=sbk
                )
            )
    outs.append(dev.drop_block_2d(x.clone(), 0.2, 4, inplace=True))
    for o in outs:
        assert o.device.type == "meta"
        assert o.shape == x.shape
        assert o.dtype == x.dtype


# ======================================================================== CUDA
@needs_cuda
def test_cuda_device_paths() -> None:
    dev = torch.device("cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        x = torch.ones(8, 4, 16, 16, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)
        dp = fastdrop.drop_path(x, 0.5, True, generator=g)
        db = dev.drop_block_2d(x, 0.3, 5, generator=g)
        dbn = dev.drop_block_2d(x, 0.3, 4, with_noise=True, couple_channels=False, generator=g)
        da = fastdrop.dropout_add(x, x, 0.5, True, generator=g)
        da0 = fastdrop.dropout_add(x, x, 0.5, True)
        dpa = fastdrop.drop_path_add(x, x, 0.5, True, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for o in (dp, db, dbn, da, da0, dpa):
        assert o.device.type == "cuda" and o.shape == x.shape
    # drop_path: per-sample constant 0 or 2
    per = dp.reshape(8, -1)
    assert torch.all(per == per[:, :1]) and set(per[:, 0].tolist()) <= {0.0, 2.0}
    # drop_block: coupled mask, one scale factor > 1
    zero = db == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))
    kept = db[~zero]
    assert torch.all(kept == kept[0]) and kept[0] > 1
    # dropout_add: 1 + {0, 2}
    assert set(da.unique().tolist()) <= {1.0, 3.0}
    assert set(da0.unique().tolist()) <= {1.0, 3.0}
    assert set(dpa.unique().tolist()) <= {1.0, 3.0}
    # reproducible with a CUDA generator
    a = dev.drop_block_2d(x, 0.3, 5, generator=torch.Generator(device=dev).manual_seed(1))
    b = dev.drop_block_2d(x, 0.3, 5, generator=torch.Generator(device=dev).manual_seed(1))
    assert torch.equal(a, b)
    if timm_drop is not None:
        torch.manual_seed(4)
        ref = timm_drop.drop_block_2d(x, 0.3, 6, couple_channels=False)
        torch.manual_seed(4)
        assert torch.equal(dev.drop_block_2d(x, 0.3, 6, couple_channels=False), ref)
