"""The rest of the family (issue 16): noise_shape, locked and embedding dropout, stochastic
depth modes, Gaussian dropout, PatchDropout, DropBlock3d, WeightDropout, MC dropout and
replace_dropout's new conversions. Values per dtype against the reference maths, statistics
against binomial / normal bounds, NumPy == torch under one generator, threads and layouts,
gradients (gradcheck on float64), reproducibility and errors before writes."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import fastdrop
import numpy as np
import pytest
from conftest import FLOATS, SIGMAS, assert_binomial, expected_scaled, op_type
from fastdrop import Generator, ShapeError, _core

torch = pytest.importorskip("torch")
import fastdrop.nn as fnn  # noqa: E402
from torch import nn  # noqa: E402

ALPHA = 1.7580993408473766
TORCH_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def positive(shape, dtype=np.float32, seed=0):
    """Values in [1, 3): no zeros, so a zero in an output means dropped."""
    return (np.random.default_rng(seed).random(shape) * 2 + 1).astype(dtype)


def randn(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_normal_mean(sample: np.ndarray, mean: float, sd: float, what: str) -> None:
    bound = SIGMAS * sd / math.sqrt(sample.size)
    assert abs(float(sample.mean()) - mean) <= bound, (what, float(sample.mean()), mean, bound)


# --- noise_shape ------------------------------------------------------------------------------

NOISE_SHAPES = [(None, 1, 7), (6, 1, 1), (1, 5, None), (1, 1, 1), (None, None, None)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("noise_shape", NOISE_SHAPES)
def test_noise_shape_shares_decisions_as_keras_does(dtype, noise_shape):
    x = positive((6, 5, 7), dtype)
    y, mask = fastdrop.dropout(
        x, 0.4, generator=Generator(1), return_mask=True, noise_shape=noise_shape
    )
    want_shape = tuple(s if e is None else e for e, s in zip(noise_shape, x.shape))
    assert mask.shape == want_shape and y.dtype == dtype and y.shape == x.shape
    keep = np.broadcast_to(mask.numpy(), x.shape)
    np.testing.assert_array_equal(y[keep], expected_scaled(x, 1 / 0.6)[keep])
    assert not np.any(y[~keep])


def test_noise_shape_of_the_full_shape_is_plain_dropout_and_rates_are_binomial():
    x = positive((4, 3, 5))
    a = fastdrop.dropout(x, 0.3, generator=Generator(2), noise_shape=(4, 3, 5))
    np.testing.assert_array_equal(a, fastdrop.dropout(x, 0.3, generator=Generator(2)))
    big = positive((400, 50, 3))
    _, mask = fastdrop.dropout(
        big, 0.3, generator=Generator(3), return_mask=True, noise_shape=(None, None, 1)
    )
    assert_binomial(mask.count_kept(), 400 * 50, 0.7)


def keras_on_torch(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    return keras


@pytest.mark.parametrize("noise_shape", NOISE_SHAPES)
def test_noise_shape_means_what_keras_means(noise_shape, monkeypatch):
    keras = keras_on_torch(monkeypatch)
    x = torch.from_numpy(positive((6, 5, 7), np.float32))  # keras's default float32
    theirs = keras.layers.Dropout(0.4, noise_shape=noise_shape)(x, training=True).cpu()
    ours = fastdrop.dropout(x, 0.4, noise_shape=noise_shape)
    for y in (theirs, ours):
        dropped = (y == 0).numpy()
        for axis, e in enumerate(noise_shape):
            if e == 1:  # shared along this axis: the same decision at every index
                assert np.all(dropped == dropped.take([0], axis=axis)), (axis, noise_shape)
        kept = ~dropped
        np.testing.assert_allclose(y.numpy()[kept], x.numpy()[kept] / 0.6, rtol=1e-6)


def test_gaussian_dropout_has_kerass_distribution(monkeypatch):
    keras = keras_on_torch(monkeypatch)
    p = 0.3
    x = torch.ones(400, 500, dtype=torch.float64)
    layer = keras.layers.GaussianDropout(p, dtype="float64")
    theirs = layer(x, training=True).cpu().numpy().ravel()
    ours = fastdrop.gaussian_dropout(x, p).numpy().ravel()
    sigma2 = p / (1 - p)
    for f in (theirs, ours):
        assert_normal_mean(f, 1.0, math.sqrt(sigma2), "mean")
        assert abs(float(f.var(ddof=1)) - sigma2) <= SIGMAS * sigma2 * math.sqrt(2 / (f.size - 1))


@pytest.mark.parametrize("dtype", FLOATS)
def test_alpha_dropout_noise_shape_values(dtype):
    x = randn((8, 4, 6), dtype)
    p = 0.3
    y, mask = fastdrop.alpha_dropout(
        x, p, True, generator=Generator(4), return_mask=True, noise_shape=(None, 1, None)
    )
    assert mask.shape == (8, 1, 6)
    keep = np.broadcast_to(mask.numpy(), x.shape)
    ot = op_type(dtype)
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    kept = (x.astype(ot) * ot(a) + ot(ALPHA * a * p)).astype(dtype)
    np.testing.assert_array_equal(y[keep], kept[keep])
    assert np.all(y[~keep] == dtype(ot(-ALPHA * a * (1 - p))))


def test_noise_shape_numpy_and_torch_agree_and_gradients_flow():
    x = randn((5, 4, 3), np.float64)
    for f in (fastdrop.dropout, lambda *a, **k: fastdrop.alpha_dropout(*a, training=True, **k)):
        a = f(x, 0.5, generator=Generator(5), noise_shape=(1, 4, None))
        t = f(torch.from_numpy(x), 0.5, generator=Generator(5), noise_shape=(1, 4, None))
        np.testing.assert_array_equal(t.numpy(), a)
    xt = torch.from_numpy(x).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: fastdrop.dropout(t, 0.5, generator=Generator(6), noise_shape=(None, 1, 1)),
        (xt,),
    )


@pytest.mark.parametrize(
    "bad,exc",
    [
        ((5, 4), ValueError),  # wrong rank
        ((5, 2, 3), ValueError),  # neither 1 nor the size
        ((0, 4, 3), ValueError),
        ((5, 4.0, 3), TypeError),
        ((5, "4", 3), TypeError),
        ((True, 4, 3), TypeError),
        ("543", TypeError),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_bad_noise_shape_raises_before_writing(bad, exc, training):
    x = randn((5, 4, 3))
    before = x.copy()
    for f in (fastdrop.dropout, fastdrop.alpha_dropout):
        with pytest.raises(exc):
            f(x, 0.5, training=training, inplace=True, noise_shape=bad)
        np.testing.assert_array_equal(x, before)
    t = torch.from_numpy(x)
    with pytest.raises(exc):
        fastdrop.dropout(t, 0.5, inplace=True, noise_shape=bad)
    np.testing.assert_array_equal(t.numpy(), before)


# --- locked (variational) dropout -------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_locked_dropout_shares_one_mask_across_time(dtype, batch_first):
    x = positive((9, 5, 6), dtype)  # (seq, batch, feat) or (batch, seq, feat)
    y, mask = fastdrop.locked_dropout(
        x, 0.4, batch_first=batch_first, generator=Generator(7), return_mask=True
    )
    assert mask.shape == ((9, 1, 6) if batch_first else (1, 5, 6))
    keep = np.broadcast_to(mask.numpy(), x.shape)
    np.testing.assert_array_equal(y[keep], expected_scaled(x, 1 / 0.6)[keep])
    assert not np.any(y[~keep])
    time = 1 if batch_first else 0
    zeros = y == 0
    assert np.all(zeros == zeros.take([0], axis=time))  # every step drops the same units


def test_locked_dropout_rate_module_torch_and_gradients():
    _, mask = fastdrop.locked_dropout(positive((3, 300, 40)), 0.25, return_mask=True)
    assert_binomial(mask.count_kept(), 300 * 40, 0.75)
    x = randn((4, 3, 5), np.float64)
    a = fastdrop.locked_dropout(x, 0.5, generator=Generator(8))
    t = fastdrop.locked_dropout(torch.from_numpy(x), 0.5, generator=Generator(8))
    np.testing.assert_array_equal(t.numpy(), a)
    m = fnn.LockedDropout(0.5, batch_first=True, generator=Generator(8))
    np.testing.assert_array_equal(
        m(torch.from_numpy(x)).numpy(),
        fastdrop.locked_dropout(x, 0.5, batch_first=True, generator=Generator(8)),
    )
    m.eval()
    xt = torch.from_numpy(x)
    assert m(xt) is xt
    xg = torch.from_numpy(x).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: fastdrop.locked_dropout(t, 0.5, generator=Generator(9)), (xg,)
    )


def test_locked_dropout_errors():
    with pytest.raises(ShapeError, match="received a 1D input"):
        fastdrop.locked_dropout(randn(5), 0.5)
    with pytest.raises(ValueError):
        fastdrop.locked_dropout(randn((3, 4, 5)), 1.5)
    with pytest.raises(TypeError):
        fastdrop.locked_dropout(randn((3, 4, 5)), 0.5, batch_first="yes")
    with pytest.raises(TypeError):
        fastdrop.locked_dropout([[1.0]], 0.5)
    with pytest.raises(ValueError):
        fnn.LockedDropout(-0.1)


# --- embedding dropout ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale", [True, False])
def test_embedding_dropout_drops_whole_rows(dtype, scale):
    w = positive((50, 8), dtype)
    y, mask = fastdrop.embedding_dropout(
        w, 0.3, scale=scale, generator=Generator(10), return_mask=True
    )
    assert mask.shape == (50, 1)
    keep = mask.numpy()[:, 0]
    want = expected_scaled(w, 1 / 0.7) if scale else w
    np.testing.assert_array_equal(y[keep], want[keep])
    assert not np.any(y[~keep])


def test_embedding_dropout_rate_torch_and_errors():
    _, mask = fastdrop.embedding_dropout(positive((20000, 2)), 0.4, return_mask=True)
    assert_binomial(mask.count_kept(), 20000, 0.6)
    w = randn((7, 3), np.float64)
    np.testing.assert_array_equal(
        fastdrop.embedding_dropout(torch.from_numpy(w), 0.5, generator=Generator(11)).numpy(),
        fastdrop.embedding_dropout(w, 0.5, generator=Generator(11)),
    )
    with pytest.raises(ShapeError, match="2D"):
        fastdrop.embedding_dropout(randn((2, 3, 4)), 0.5)
    with pytest.raises(TypeError):
        fastdrop.embedding_dropout(w, 0.5, scale=1)
    assert fastdrop.embedding_dropout(w, 0.5, training=False) is w


def test_embedding_dropout_module_is_fastais_and_trains_the_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(12, 4, padding_idx=0)
    m = fnn.EmbeddingDropout(emb, 0.5, generator=Generator(12))
    words = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 11]])
    out = m(words)
    weight = fastdrop.embedding_dropout(emb.weight.detach(), 0.5, generator=Generator(12))
    assert torch.equal(out, nn.functional.embedding(words, weight, 0))
    assert [n for n, _ in m.named_parameters()] == ["emb.weight"]
    out.sum().backward()
    kept = weight.abs().sum(1) > 0
    grad_rows = emb.weight.grad.abs().sum(1) > 0
    used = torch.zeros(12, dtype=torch.bool)
    used[words.flatten()] = True
    used[0] = False  # padding_idx gets no gradient
    assert torch.equal(grad_rows, kept & used)
    m.eval()
    assert torch.equal(m(words), emb(words))
    with pytest.raises(TypeError):
        fnn.EmbeddingDropout(nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="dense embedding"):
        fnn.EmbeddingDropout(nn.Embedding(3, 2, sparse=True), 0.5)


# --- stochastic depth -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_stochastic_depth_row_mode_is_drop_path(dtype):
    x = positive((40, 3, 4), dtype)
    a, ma = fastdrop.stochastic_depth(x, 0.3, "row", generator=Generator(13), return_mask=True)
    b = fastdrop.drop_path(x, 0.3, True, generator=Generator(13))
    np.testing.assert_array_equal(a, b)
    assert ma.shape == (40, 1, 1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_stochastic_depth_batch_mode_is_one_decision(dtype):
    x = positive((6, 3, 4), dtype)
    kept = 0
    for seed in range(400):
        y, mask = fastdrop.stochastic_depth(
            x, 0.3, "batch", generator=Generator(seed), return_mask=True
        )
        assert mask.shape == (1, 1, 1)
        if mask.count_kept():
            kept += 1
            np.testing.assert_array_equal(y, expected_scaled(x, 1 / 0.7))
        else:
            assert not np.any(y)
    assert_binomial(kept, 400, 0.7)


def test_stochastic_depth_matches_torchvision_maths_and_checks():
    tv = pytest.importorskip("torchvision.ops")
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    for mode in ("row", "batch"):
        y, mask = fastdrop.stochastic_depth(x, 0.4, mode, generator=Generator(14), return_mask=True)
        # torchvision: noise = bernoulli(survival) / survival; input * noise.
        noise = torch.from_numpy(mask.numpy().astype(np.float64)).div_(0.6)
        assert torch.equal(y, x * noise)
        torch.manual_seed(0)
        assert tv.stochastic_depth(x, 0.4, mode).shape == y.shape
    for args in [(1.5, "row", True), (-0.1, "batch", False), (0.5, "rows", False)]:
        with pytest.raises(ValueError) as theirs:
            tv.stochastic_depth(x, *args)
        with pytest.raises(ValueError) as ours:
            fastdrop.stochastic_depth(x, *args)
        assert str(ours.value) == str(theirs.value)
    assert fastdrop.stochastic_depth(x, 0.5, "row", training=False) is x
    assert repr(fnn.StochasticDepth(0.2, "batch")) == repr(tv.StochasticDepth(0.2, "batch"))
    with pytest.raises(ShapeError):
        fastdrop.stochastic_depth(np.zeros((), np.float32), 0.5, "row")


def test_stochastic_depth_module_and_gradients():
    x = torch.randn(6, 4, dtype=torch.float64)
    m = fnn.StochasticDepth(0.5, "row", generator=Generator(15))
    assert torch.equal(m(x), fastdrop.stochastic_depth(x, 0.5, "row", generator=Generator(15)))
    m.eval()
    assert m(x) is x
    xg = x.clone().requires_grad_()
    for mode in ("row", "batch"):
        assert torch.autograd.gradcheck(
            lambda t, mode=mode: fastdrop.stochastic_depth(t, 0.5, mode, generator=Generator(16)),
            (xg,),
        )


# --- Gaussian dropout -------------------------------------------------------------------------


def factor_of(shape, p, seed, dtype=np.float32):
    """The multiplicative factor a call draws: the call on ones, which is exact in float32 and
    float64."""
    return fastdrop.gaussian_dropout(np.ones(shape, dtype), p, generator=Generator(seed))


@pytest.mark.parametrize("dtype", FLOATS)
def test_gaussian_dropout_values_per_dtype(dtype):
    x = randn((30, 41), dtype)
    y = fastdrop.gaussian_dropout(x, 0.3, generator=Generator(20))
    assert y.dtype == dtype and y.shape == x.shape
    ot = op_type(dtype)
    factor = factor_of(x.shape, 0.3, 20, ot)
    np.testing.assert_array_equal(y, (x.astype(ot) * factor).astype(dtype))
    f64 = factor_of(x.shape, 0.3, 20, np.float64)
    np.testing.assert_allclose(factor, f64, rtol=1e-6, atol=1e-6)  # the same deviates


def test_gaussian_dropout_noise_is_normal_with_kerass_variance():
    p = 0.4
    sigma2 = p / (1 - p)
    f = factor_of((500, 400), p, 21, np.float64).ravel()
    assert_normal_mean(f, 1.0, math.sqrt(sigma2), "mean")
    var_sd = sigma2 * math.sqrt(2.0 / (f.size - 1))
    assert abs(float(f.var(ddof=1)) - sigma2) <= SIGMAS * var_sd
    z = (f - 1.0) / math.sqrt(sigma2)
    assert_binomial(int(np.sum(z < 0)), z.size, 0.5, "below the mean")
    assert_binomial(int(np.sum(np.abs(z) < 1)), z.size, math.erf(1 / math.sqrt(2)), "1 sigma")
    assert_binomial(int(np.sum(np.abs(z) < 2)), z.size, math.erf(2 / math.sqrt(2)), "2 sigma")


def standard_normals(n: int, dtype, seed: int) -> np.ndarray:
    """The deviates Gaussian dropout's noise is made of, as the core fills them."""
    out = np.empty(n, dtype)
    _core.normal_fill(out, Generator(seed))
    return out


def normal_cdf(z: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * (1.0 + erf(z / math.sqrt(2.0)))


# Kolmogorov-Smirnov: P(sqrt(n) D > t) <= 2 exp(-2 t^2) (Dvoretzky-Kiefer-Wolfowitz-Massart),
# 1e-9 at t = 3.27; the same 1e-9 level as SIGMAS.
KS_BOUND = math.sqrt(math.log(2e9) / 2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_deviates_pass_kolmogorov_smirnov_and_the_tails(dtype):
    n = 1 << 18
    z = np.sort(standard_normals(n, dtype, 40).astype(np.float64))
    cdf = normal_cdf(z)
    i = np.arange(1, n + 1)
    d = max(float(np.max(i / n - cdf)), float(np.max(cdf - (i - 1) / n)))
    assert math.sqrt(n) * d <= KS_BOUND, (math.sqrt(n) * d, KS_BOUND)
    assert_normal_mean(z, 0.0, 1.0, "mean")
    assert abs(float(z.var(ddof=1)) - 1.0) <= SIGMAS * math.sqrt(2.0 / (n - 1))
    # The tails, which a KS distance hardly sees: |z| > 3 and > 4 as often as N(0, 1) has them.
    for t in (3.0, 4.0):
        q = 1.0 - math.erf(t / math.sqrt(2.0))
        assert_binomial(int(np.sum(np.abs(z) > t)), n, q, f"|z| > {t}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_two_deviates_of_a_pair_are_independent_normals(dtype):
    # Deviates 2k and 2k + 1 are one Box-Muller pair (cosine and sine of one angle, one radius):
    # their squares sum to an exponential of mean 2, and their signs are independent.
    n = 1 << 18
    z = standard_normals(n, dtype, 41).astype(np.float64)
    a, b = z[0::2], z[1::2]
    pairs = a.size
    assert_binomial(int(np.sum(a * a + b * b < 2.0 * math.log(2.0))), pairs, 0.5, "r^2 < 2 ln 2")
    assert_binomial(int(np.sum((a > 0) & (b > 0))), pairs, 0.25, "both positive")
    assert abs(float(np.mean(a * b))) <= SIGMAS / math.sqrt(pairs), "pair correlation"
    # Neighbouring pairs are independent too.
    assert abs(float(np.mean(a[1:] * b[:-1]))) <= SIGMAS / math.sqrt(pairs - 1)


def test_normal_deviates_are_one_function_of_the_index():
    # Any length, any thread count, float32 or float64: deviate i is the same number, rounded.
    n = 3 * (1 << 14) + 5  # several of the fill's chunks and an odd tail
    fastdrop.set_num_threads(1)
    one = standard_normals(n, np.float64, 42)
    fastdrop.set_num_threads(2)
    np.testing.assert_array_equal(standard_normals(n, np.float64, 42), one)
    np.testing.assert_array_equal(standard_normals(7, np.float64, 42), one[:7])
    f32 = standard_normals(n, np.float32, 42)
    np.testing.assert_array_equal(standard_normals(19, np.float32, 42), f32[:19])
    # float32 is computed in float32: within 5 of its units in the last place of float64's.
    spacing = np.spacing(np.abs(one).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(f32 - one) <= 5 * spacing)


@pytest.mark.parametrize("tdtype", TORCH_FLOATS)
def test_gaussian_dropout_torch_agrees_with_numpy(tdtype):
    x = torch.randn(20, 33).to(tdtype)
    y = fastdrop.gaussian_dropout(x, 0.25, generator=Generator(22))
    assert y.dtype == tdtype and y.shape == x.shape
    ot = torch.float64 if tdtype == torch.float64 else torch.float32
    factor = torch.from_numpy(
        factor_of((20, 33), 0.25, 22, np.float64 if ot == torch.float64 else np.float32)
    )
    assert torch.equal(y, (x.to(ot) * factor).to(tdtype))
    if tdtype != torch.bfloat16:
        a = fastdrop.gaussian_dropout(x.numpy(), 0.25, generator=Generator(22))
        np.testing.assert_array_equal(y.numpy(), a)


def test_gaussian_dropout_is_independent_of_threads_layout_and_inplace():
    base = randn((8, 16, 36, 36))
    fastdrop.set_num_threads(1)
    ref = fastdrop.gaussian_dropout(base, 0.5, generator=Generator(23))
    fastdrop.set_num_threads(3)
    np.testing.assert_array_equal(
        fastdrop.gaussian_dropout(base, 0.5, generator=Generator(23)), ref
    )
    f = np.asfortranarray(base)
    np.testing.assert_array_equal(fastdrop.gaussian_dropout(f, 0.5, generator=Generator(23)), ref)
    z = base.copy()
    assert fastdrop.gaussian_dropout(z, 0.5, True, True, generator=Generator(23)) is z
    np.testing.assert_array_equal(z, ref)
    buf = np.empty_like(base)
    assert fastdrop.gaussian_dropout(base, 0.5, generator=Generator(23), out=buf) is buf
    np.testing.assert_array_equal(buf, ref)
    t = torch.from_numpy(base.copy())
    assert fastdrop.gaussian_dropout(t, 0.5, inplace=True, generator=Generator(23)) is t
    np.testing.assert_array_equal(t.numpy(), ref)


def test_gaussian_dropout_draws_fresh_noise_per_call_and_reproduces_per_seed():
    x = np.ones((100,), np.float32)
    g = Generator(24)
    a, b = (
        fastdrop.gaussian_dropout(x, 0.5, generator=g),
        fastdrop.gaussian_dropout(x, 0.5, generator=g),
    )
    assert not np.array_equal(a, b)
    g.manual_seed(24)
    np.testing.assert_array_equal(fastdrop.gaussian_dropout(x, 0.5, generator=g), a)
    torch.manual_seed(3)
    c = fastdrop.gaussian_dropout(torch.ones(100), 0.5)
    torch.manual_seed(3)
    assert torch.equal(fastdrop.gaussian_dropout(torch.ones(100), 0.5), c)


def test_gaussian_dropout_backward_recomputes_the_noise():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def f(t):
        return fastdrop.gaussian_dropout(t, 0.3, generator=Generator(25))

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    y = f(x)
    assert y.grad_fn.saved_tensors == ()  # nothing of the input's size is kept
    y.backward(torch.ones_like(y))
    np.testing.assert_array_equal(x.grad.numpy(), factor_of((5, 6), 0.3, 25, np.float64))
    m = fnn.GaussianDropout(0.3, generator=Generator(25))
    assert torch.equal(m(x), f(x))
    m.eval()
    assert m(x) is x


def test_gaussian_dropout_errors_and_identities():
    x = randn((3, 4))
    before = x.copy()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fastdrop.gaussian_dropout(x, 1.0, inplace=True)
    with pytest.raises(ValueError):
        fastdrop.gaussian_dropout(x, -0.5, inplace=True)
    with pytest.raises(TypeError):
        fastdrop.gaussian_dropout(x, "0.5")
    with pytest.raises(TypeError):
        fastdrop.gaussian_dropout(x, 0.5, inplace=1)
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastdrop.gaussian_dropout(ro, 0.5, inplace=True)
    with pytest.raises(ValueError):
        fastdrop.gaussian_dropout(x, 0.5, out=np.empty((4, 3), np.float32))
    np.testing.assert_array_equal(x, before)
    assert fastdrop.gaussian_dropout(x, 0.5, training=False) is x
    assert fastdrop.gaussian_dropout(x, 0.0) is x
    with pytest.raises(ValueError):
        fnn.GaussianDropout(1.0)
    leaf = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        fastdrop.gaussian_dropout(leaf, 0.5, inplace=True)
    assert torch.equal(leaf.detach(), torch.ones(3))


def test_gaussian_dropout_on_meta_tensors_stays_on_the_device():
    x = torch.empty(4, 5, device="meta")
    y = fastdrop.gaussian_dropout(x, 0.5)
    assert y.device.type == "meta" and y.shape == x.shape


# --- PatchDropout -----------------------------------------------------------------------------


def check_patches(x, out, idx, npt, num_keep, ordered):
    x, out, idx = (np.asarray(v) for v in (x, out, idx))
    assert idx.shape == (x.shape[0], num_keep) and out.shape[1] == npt + num_keep
    np.testing.assert_array_equal(out[:, :npt], x[:, :npt])
    for b in range(x.shape[0]):
        assert len(set(idx[b].tolist())) == num_keep
        np.testing.assert_array_equal(out[b, npt:], x[b, npt + idx[b]])
        if ordered:
            assert list(idx[b]) == sorted(idx[b])


@pytest.mark.parametrize("npt", [0, 1, 4])
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("prob", [0.1, 0.5, 0.95])
def test_patch_dropout_matches_timms_shapes_and_prefix_handling(npt, ordered, prob):
    timm_layers = pytest.importorskip("timm.layers")
    x = torch.randn(3, npt + 13, 8)
    out, idx = fastdrop.patch_dropout(x, prob, npt, ordered, True, generator=Generator(30))
    torch.manual_seed(0)
    theirs, their_idx = timm_layers.PatchDropoutWithIndices(prob, npt, ordered).train()(x)
    assert out.shape == theirs.shape and idx.shape == their_idx.shape
    assert idx.dtype == their_idx.dtype
    check_patches(x, out, idx, npt, their_idx.shape[1], ordered)
    a, ia = fastdrop.patch_dropout(x.numpy(), prob, npt, ordered, True, generator=Generator(30))
    np.testing.assert_array_equal(a, out.numpy())
    np.testing.assert_array_equal(ia, idx.numpy())


def test_patch_dropout_keeps_each_token_equally_often_and_in_random_order():
    x = np.arange(1 + 10, dtype=np.float32).reshape(1, 11, 1).repeat(2000, axis=0)
    out, idx = fastdrop.patch_dropout(x, 0.3, return_indices=True, generator=Generator(31))
    assert idx.shape == (2000, 7)
    counts = np.bincount(idx.ravel(), minlength=10)
    for c in counts:
        assert_binomial(int(c), 2000, 0.7, "token kept")
    first = idx[:, 0]
    assert_binomial(int(np.sum(first == 3)), 2000, 0.1, "first kept token")


def test_patch_dropout_eval_module_and_gradients():
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    assert fastdrop.patch_dropout(x, 0.5, training=False) is x
    assert fastdrop.patch_dropout(x, 0.5, return_indices=True, training=False) == (x, None)
    assert fastdrop.patch_dropout(x, 0.0) is x
    m = fnn.PatchDropout(0.5, 1, generator=Generator(32))
    assert torch.equal(m(x), fastdrop.patch_dropout(x, 0.5, generator=Generator(32)))
    assert fnn.PatchDropout(0.5, 1, return_indices=True)(x)[1].shape == (2, 4)
    m.eval()
    assert m(x) is x
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: fastdrop.patch_dropout(t, 0.5, generator=Generator(33)), (xg,)
    )


def test_patch_dropout_errors():
    x = randn((2, 5, 3))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        fastdrop.patch_dropout(x, 0.5, 6)
    with pytest.raises(ValueError):
        fastdrop.patch_dropout(x, 0.5, -1)
    with pytest.raises(TypeError):
        fastdrop.patch_dropout(x, 0.5, 1.0)
    with pytest.raises(ShapeError):
        fastdrop.patch_dropout(randn(5), 0.5)
    with pytest.raises(ValueError):
        fastdrop.patch_dropout(x, 1.5)
    with pytest.raises(ValueError):
        fnn.PatchDropout(1.0)  # timm asserts 0 <= prob < 1


# --- DropBlock3d ------------------------------------------------------------------------------


def torchvision_from_seeds(x, seeds, b, eps):
    """torchvision's drop_block3d after its Bernoulli draw, written from ops/drop_block.py, with
    the seeds given (odd block sizes; for even ones the seed's cube starts at the seed)."""
    noise = torch.from_numpy(seeds.astype(np.float64))
    if b % 2:
        noise = nn.functional.pad(noise, [b // 2] * 6, value=0)
        noise = nn.functional.max_pool3d(noise, stride=(1, 1, 1), kernel_size=b, padding=b // 2)
    else:
        noise = nn.functional.max_pool3d(nn.functional.pad(noise, [b - 1] * 6), b, stride=1)
    noise = 1 - noise
    normalize_scale = noise.numel() / (eps + noise.sum())
    return x * noise * normalize_scale


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 20])
@pytest.mark.parametrize("shape", [(2, 3, 7, 8, 9), (1, 2, 4, 4, 6)])
def test_drop_block_3d_is_torchvisions_maths(block_size, shape):
    x = torch.randn(shape, dtype=torch.float64)
    p = 0.2
    y = fastdrop.drop_block_3d(x, p, block_size, generator=Generator(40))
    d, h, w = shape[2:]
    b = min(block_size, d, h, w)
    gamma = p * d * h * w / (b**3 * (d - b + 1) * (h - b + 1) * (w - b + 1))
    # The seeds this call drew: the first key block of Generator(40), as the call reserved it.
    seeds = fastdrop._keyed.seed_map(
        (40, 0, 0), shape[:2] + (d - b + 1, h - b + 1, w - b + 1), gamma
    )
    assert torch.equal(y, torchvision_from_seeds(x, seeds, b, 1e-6))


@pytest.mark.parametrize("spatial", [2, 3])
@pytest.mark.parametrize("block_size", [1, 3, 5, 11])
def test_drop_block_equals_torchvisions_own_function_given_the_same_seeds(
    spatial, block_size, monkeypatch
):
    tv = pytest.importorskip("torchvision.ops")
    shape = (2, 3, 7, 8, 9) if spatial == 3 else (2, 3, 9, 10)
    x = torch.randn(shape, dtype=torch.float64)
    p = 0.25
    if spatial == 3:
        ours = fastdrop.drop_block_3d(x, p, block_size, generator=Generator(46))
    else:
        ours = fnn.TorchvisionDropBlock2d(p, block_size, generator=Generator(46))(x)
    b = min((block_size,) + shape[2:])
    corners = tuple(s - b + 1 for s in shape[2:])
    gamma = p * math.prod(shape[2:]) / (b**spatial * math.prod(corners))
    seeds = fastdrop._keyed.seed_map((46, 0, 0), shape[:2] + corners, gamma)

    def bernoulli_(self, rate, *args, **kwargs):
        # torchvision's only random draw, answered with the seeds fastdrop drew
        assert rate == pytest.approx(gamma, rel=1e-14) and tuple(self.shape) == seeds.shape
        return self.copy_(torch.from_numpy(seeds))

    monkeypatch.setattr(torch.Tensor, "bernoulli_", bernoulli_)
    theirs = (tv.drop_block3d if spatial == 3 else tv.drop_block2d)(x, p, block_size)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 7])
def test_torchvision_drop_block_2d_module_is_torchvisions_maths(block_size):
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64)
    p = 0.3
    y = fnn.TorchvisionDropBlock2d(p, block_size, generator=Generator(44))(x)
    b = min(block_size, 6, 9)
    gamma = p * 6 * 9 / (b**2 * (6 - b + 1) * (9 - b + 1))
    seeds = fastdrop._keyed.seed_map((44, 0, 0), (2, 3, 6 - b + 1, 9 - b + 1), gamma)
    # torchvision's drop_block2d after its Bernoulli draw (odd sizes; even: the cube after it)
    noise = torch.from_numpy(seeds.astype(np.float64))
    if b % 2:
        noise = nn.functional.pad(noise, [b // 2] * 4, value=0)
        noise = nn.functional.max_pool2d(noise, stride=(1, 1), kernel_size=b, padding=b // 2)
    else:
        noise = nn.functional.max_pool2d(nn.functional.pad(noise, [b - 1] * 4), b, stride=1)
    noise = 1 - noise
    assert torch.equal(y, x * noise * (noise.numel() / (1e-6 + noise.sum())))
    a = fnn.TorchvisionDropBlock2d(p, block_size, generator=Generator(44))(x.numpy())
    np.testing.assert_array_equal(a, y.numpy())
    tv = pytest.importorskip("torchvision.ops")
    assert repr(fnn.TorchvisionDropBlock2d(0.1, 3)) == repr(tv.DropBlock2d(0.1, 3)).replace(
        "DropBlock2d", "TorchvisionDropBlock2d"
    )
    with pytest.raises(ShapeError, match="4D"):
        fnn.TorchvisionDropBlock2d(0.1, 3)(torch.ones(1, 2, 3, 4, 5))


@pytest.mark.parametrize("dtype", FLOATS)
def test_drop_block_3d_values_per_dtype_numpy_torch_and_threads(dtype):
    x = positive((2, 3, 8, 9, 10), dtype)
    y = fastdrop.drop_block_3d(x, 0.3, 3, generator=Generator(41))
    keep = y != 0
    scale = (1.0 / (1e-6 + keep.sum())) * keep.size
    np.testing.assert_array_equal(y[keep], expected_scaled(x, scale)[keep])
    np.testing.assert_array_equal(
        fastdrop.drop_block_3d(torch.from_numpy(x), 0.3, 3, generator=Generator(41)).numpy(), y
    )
    fastdrop.set_num_threads(1)
    np.testing.assert_array_equal(fastdrop.drop_block_3d(x, 0.3, 3, generator=Generator(41)), y)
    z = x.copy()
    assert fastdrop.drop_block_3d(z, 0.3, 3, inplace=True, generator=Generator(41)) is z
    np.testing.assert_array_equal(z, y)


def test_drop_block_3d_mask_backward_and_dropped_nans():
    x = positive((2, 2, 5, 6, 7), np.float64)
    x[0, 0] = np.nan  # a dropped NaN is exactly 0, as every variant's
    y, mask = fastdrop.drop_block_3d(x, 0.4, 2, generator=Generator(47), return_mask=True)
    assert mask.shape == x.shape and mask.input_shape == x.shape
    keep = mask.numpy()
    assert 0 < keep.sum() < keep.size
    assert mask.scale == (1.0 / (1e-6 + keep.sum())) * keep.size
    assert not np.any(y[~keep]) and not np.isnan(y[~keep]).any()
    np.testing.assert_array_equal(y[keep], x[keep] * mask.scale)
    g = randn(x.shape, np.float64, seed=3)
    np.testing.assert_array_equal(mask.backward(g), np.where(keep, g * mask.scale, 0.0))
    t, tmask = fastdrop.drop_block_3d(
        torch.from_numpy(x), 0.4, 2, generator=Generator(47), return_mask=True
    )
    np.testing.assert_array_equal(t.numpy(), y)
    np.testing.assert_array_equal(tmask.numpy(), keep)
    xt = torch.from_numpy(x).requires_grad_()
    out = fastdrop.drop_block_3d(xt, 0.4, 2, generator=Generator(47))
    out.backward(torch.from_numpy(g))
    np.testing.assert_array_equal(xt.grad.numpy(), mask.backward(g))
    untouched, full = fastdrop.drop_block_3d(x, 0.4, 2, training=False, return_mask=True)
    assert untouched is x and full.count_kept() == x.size


def test_drop_block_3d_drops_the_target_fraction():
    # gamma is chosen so that the expected dropped fraction of the *valid* seeds region is p;
    # on a volume much larger than the block, overlaps make the dropped fraction
    # 1 - (1 - gamma)^(b^3) at interior voxels.
    x = np.ones((4, 4, 20, 20, 20), np.float32)
    p, b = 0.1, 3
    y = fastdrop.drop_block_3d(x, p, b, generator=Generator(42))
    gamma = p * 20**3 / (b**3 * 18**3)
    inner = y[:, :, 2:-2, 2:-2, 2:-2] == 0
    q = 1 - (1 - gamma) ** (b**3)
    # Interior voxels are dependent through shared seeds; test the mean over independent ones
    # (every 3rd voxel per axis shares no seed with another).
    sample = inner[:, :, ::3, ::3, ::3]
    assert_binomial(int(sample.sum()), sample.size, q, "dropped interior voxels")


def test_drop_block_3d_gradients_module_and_errors():
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: fastdrop.drop_block_3d(t, 0.3, 2, generator=Generator(43)), (x,)
    )
    assert torch.autograd.gradgradcheck(
        lambda t: fastdrop.drop_block_3d(t, 0.3, 2, generator=Generator(43)), (x,)
    )
    leaf = torch.ones(1, 1, 3, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        fastdrop.drop_block_3d(leaf, 0.3, 2, inplace=True)
    assert torch.equal(leaf.detach(), torch.ones(1, 1, 3, 3, 3))
    m = fnn.DropBlock3d(0.3, 2, generator=Generator(43))
    assert torch.equal(m(x), fastdrop.drop_block_3d(x, 0.3, 2, generator=Generator(43)))
    m.eval()
    assert m(x) is x
    tv = pytest.importorskip("torchvision.ops")
    assert repr(fnn.DropBlock3d(0.1, 3)) == repr(tv.DropBlock3d(0.1, 3))
    v = np.ones((1, 1, 4, 4, 4), np.float32)
    with pytest.raises(ShapeError):
        fastdrop.drop_block_3d(np.ones((1, 4, 4, 4)), 0.1, 3)
    with pytest.raises(ValueError, match="drop probability has to be between 0 and 1"):
        fastdrop.drop_block_3d(v, 1.5, 3, inplace=True)
    with pytest.raises(ValueError):
        fastdrop.drop_block_3d(v, 0.1, 0, inplace=True)
    with pytest.raises(TypeError):
        fastdrop.drop_block_3d(v, 0.1, 2.0)
    with pytest.raises(ValueError):
        fastdrop.drop_block_3d(v, 0.1, 3, eps=-1.0)
    np.testing.assert_array_equal(v, 1.0)
    meta = torch.empty(1, 2, 5, 5, 5, device="meta")
    assert fastdrop.drop_block_3d(meta, 0.1, 3).shape == meta.shape


# --- WeightDropout ----------------------------------------------------------------------------


def test_weight_dropout_on_linear():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    raw = lin.weight.detach().clone()
    m = fnn.WeightDropout(lin, 0.5, generator=Generator(50))
    assert sorted(n for n, _ in m.named_parameters()) == ["module.bias", "weight_raw"]
    x = torch.randn(3, 6)
    y = m(x)
    w = fastdrop.dropout(raw, 0.5, generator=Generator(50))
    assert torch.equal(y, nn.functional.linear(x, w, lin.bias))
    assert not torch.equal(m(x), y)  # a fresh mask each forward
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    m(x).sum().backward()
    assert m.weight_raw.grad is not None and m.weight_raw.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(m.weight_raw.detach(), raw)
    m.eval()
    assert torch.equal(m(x), nn.functional.linear(x, m.weight_raw, lin.bias))


def test_weight_dropout_on_lstm():
    torch.manual_seed(1)
    lstm = nn.LSTM(5, 7)
    ref = nn.LSTM(5, 7)
    ref.load_state_dict(lstm.state_dict())
    m = fnn.WeightDropout(lstm, 0.5, names=("weight_hh_l0",))
    assert "weight_hh_l0_raw" in dict(m.named_parameters())
    x = torch.randn(4, 2, 5)
    out, _ = m(x)
    out.sum().backward()
    assert m.weight_hh_l0_raw.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(out, ref(x)[0])
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x)[0], ref(x)[0])
    with pytest.raises(ValueError, match="no parameter"):
        fnn.WeightDropout(nn.Linear(2, 2), 0.5, names=("nope",))


# --- MC dropout -------------------------------------------------------------------------------


def mc_model():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(5, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        fnn.Dropout(0.5),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
    )


def test_mc_dropout_samples_dropout_only_and_restores_modes():
    pytest.importorskip("timm")
    from timm.layers import DropPath

    model = mc_model().train()
    model.append(DropPath(0.2))
    model[1].eval()  # a mixed state, to be restored exactly
    modes = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    x = torch.randn(8, 5)
    with fnn.mc_dropout(model) as m:
        assert m is model
        assert [mm.training for mm in model] == [False, False, False, True, True, False, True]
        a, b = model(x), model(x)
        assert not torch.equal(a, b)
    assert torch.equal(model[1].running_mean, stats)  # BatchNorm used its running statistics
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(KeyError):
        with fnn.mc_dropout(model):
            raise KeyError
    assert [m.training for m in model.modules()] == modes
    rnn = nn.Sequential(nn.LSTM(3, 4, num_layers=2, dropout=0.5), nn.LSTM(4, 4)).eval()
    with fnn.mc_dropout(rnn):
        assert [m.training for m in rnn] == [True, False]  # only the one with dropout


def test_mc_sample_is_reproducible_and_passes_are_forks():
    model = mc_model().eval()
    x = torch.randn(4, 5)
    s = fastdrop.mc_sample(model, x, 6, generator=Generator(60))
    assert s.shape == (6, 4, 3)
    assert torch.equal(s, fastdrop.mc_sample(model, x, 6, generator=Generator(60)))
    assert not torch.equal(s, fastdrop.mc_sample(model, x, 6, generator=Generator(61)))
    assert len({tuple(v.flatten().tolist()) for v in s}) == 6
    assert not model.training and not model[3].training
    # pass 2 alone, keyed by fork(2): the same fastdrop mask as the fork drawn directly
    fd = nn.Sequential(fnn.Dropout(0.5))
    samples = fastdrop.mc_sample(fd, torch.ones(50), 3, generator=Generator(62))
    want = fastdrop.dropout(torch.ones(50), 0.5, generator=Generator(62).fork(2))
    assert torch.equal(samples[2], want)
    batched = fastdrop.mc_sample(model, x, 5, generator=Generator(60), passes_per_batch=2)
    assert batched.shape == (5, 4, 3)


def test_mc_sample_errors():
    # batching, the memory budget, the progress bar and the other errors: tests/test_mc.py
    model = mc_model()
    with pytest.raises(ValueError):
        fastdrop.mc_sample(model, torch.randn(2, 5), 0)
    with pytest.raises(TypeError):
        fastdrop.mc_sample(model, torch.randn(2, 5), 2.0)
    with pytest.raises(TypeError):
        fastdrop.mc_sample(model, torch.randn(2, 5), 2, generator=3)


# --- replace_dropout --------------------------------------------------------------------------


def test_replace_dropout_converts_timm_patch_dropout_and_torchvision_modules():
    timm_layers = pytest.importorskip("timm.layers")
    tv = pytest.importorskip("torchvision.ops")
    model = nn.Sequential(
        timm_layers.PatchDropout(0.3, 2, ordered=True),
        timm_layers.PatchDropoutWithIndices(0.2, 0),
        tv.StochasticDepth(0.1, "batch"),
        tv.DropBlock3d(0.2, 3, inplace=False, eps=1e-5),
        tv.DropBlock2d(0.25, 5),
    )
    model[2].eval()
    replaced = fnn.replace_dropout(model)
    assert replaced == {
        "0": "timm.layers.patch_dropout.PatchDropout",
        "1": "timm.layers.patch_dropout.PatchDropoutWithIndices",
        "2": "torchvision.ops.stochastic_depth.StochasticDepth",
        "3": "torchvision.ops.drop_block.DropBlock3d",
        "4": "torchvision.ops.drop_block.DropBlock2d",
    }
    a, b, c, d, e = model
    assert isinstance(a, fnn.PatchDropout) and (a.prob, a.num_prefix_tokens, a.ordered) == (
        0.3,
        2,
        True,
    )
    assert isinstance(b, fnn.PatchDropout) and b.return_indices and b.num_prefix_tokens == 0
    assert isinstance(c, fnn.StochasticDepth) and (c.p, c.mode, c.training) == (0.1, "batch", False)
    assert isinstance(d, fnn.DropBlock3d) and (d.p, d.block_size, d.eps) == (0.2, 3, 1e-5)
    assert isinstance(e, fnn.TorchvisionDropBlock2d) and (e.p, e.block_size) == (0.25, 5)


def stand_in(path: str, **attrs) -> nn.Module:
    """A module of a class named as timm's or torchvision's, with their attributes: what
    replace_dropout reads, so the conversions are tested where neither library is installed."""
    where, _, name = path.rpartition(".")
    module = type(name, (nn.Module,), {"__module__": where, "__qualname__": name})()
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def test_replace_dropout_converts_by_qualified_name_and_forwards_every_argument():
    model = nn.Sequential(
        stand_in(
            "timm.layers.patch_dropout.PatchDropout", prob=0.3, num_prefix_tokens=2, ordered=True
        ),
        # timm 0.9's PatchDropout took return_indices itself
        stand_in(
            "timm.layers.patch_dropout.PatchDropout",
            prob=0.5,
            num_prefix_tokens=0,
            ordered=False,
            return_indices=True,
        ),
        stand_in(
            "timm.layers.patch_dropout.PatchDropoutWithIndices",
            prob=0.2,
            num_prefix_tokens=1,
            ordered=False,
        ),
        stand_in("torchvision.ops.stochastic_depth.StochasticDepth", p=0.4, mode="batch"),
        stand_in(
            "torchvision.ops.drop_block.DropBlock2d", p=0.3, block_size=4, inplace=True, eps=1e-3
        ),
        stand_in(
            "torchvision.ops.drop_block.DropBlock3d", p=0.2, block_size=3, inplace=False, eps=0.5
        ),
    )
    model[3].eval()
    replaced = fnn.replace_dropout(model)
    assert list(replaced) == [str(i) for i in range(6)]
    kinds = [fnn.PatchDropout] * 3 + [
        fnn.StochasticDepth,
        fnn.TorchvisionDropBlock2d,
        fnn.DropBlock3d,
    ]
    assert [type(m) for m in model] == kinds
    assert [m.training for m in model] == [True, True, True, False, True, True]

    tokens = torch.randn(2, 9, 4)
    a, b, c, sd, tv2, tv3 = model
    for m in model:
        m.generator = Generator(3)
    out = a(tokens)
    assert torch.equal(out, fastdrop.patch_dropout(tokens, 0.3, 2, True, generator=Generator(3)))
    out, idx = b(tokens)
    want = fastdrop.patch_dropout(tokens, 0.5, 0, False, True, generator=Generator(3))
    assert torch.equal(out, want[0]) and torch.equal(idx, want[1]) and idx.shape == (2, 4)
    out, idx = c(tokens)
    assert out.shape == (2, 1 + 6, 4) and idx.shape == (2, 6)

    x = torch.randn(2, 3, 8, 8)
    assert sd(x) is x  # eval mode carried over
    sd.train()
    want = fastdrop.stochastic_depth(x, 0.4, "batch", generator=Generator(3))
    assert torch.equal(sd(x), want)
    want = fnn.TorchvisionDropBlock2d(0.3, 4, False, 1e-3, generator=Generator(3))(x)
    y = x.clone()
    assert tv2(y) is y and torch.equal(y, want)  # in place, eps 1e-3
    v = torch.randn(2, 2, 5, 5, 5)
    want = fastdrop.drop_block_3d(v, 0.2, 3, eps=0.5, generator=Generator(3))
    assert torch.equal(tv3(v), want)


def test_replace_dropout_in_torchvision_and_timm_models():
    models = pytest.importorskip("torchvision.models")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = models.efficientnet_b0(weights=None).eval()
    depth = [m.p for m in net.modules() if type(m).__name__ == "StochasticDepth"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
        replaced = fnn.replace_dropout(net)
        assert torch.equal(net(x), before)  # eval outputs unchanged
    converted = [m for m in net.modules() if isinstance(m, fnn.StochasticDepth)]
    assert len(converted) == len(depth) == 16
    assert [m.p for m in converted] == depth and {m.mode for m in converted} == {"row"}
    assert (
        sum(v == "torchvision.ops.stochastic_depth.StochasticDepth" for v in replaced.values())
        == 16
    )
    # converted, the schedulers and MC dropout see them
    fnn.DropRateScheduler(net, lambda step: 0.3)
    assert {m.p for m in converted} == {0.3}
    with torch.no_grad():
        s = fastdrop.mc_sample(net, x, 2, generator=Generator(4))
    assert not torch.equal(s[0], s[1])

    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, patch_drop_rate=0.25
    ).eval()
    with torch.no_grad():
        before = vit(x)
        assert fnn.replace_dropout(vit)["patch_drop"] == "timm.layers.patch_dropout.PatchDropout"
        assert torch.equal(vit(x), before)
    pd = vit.patch_drop
    assert isinstance(pd, fnn.PatchDropout)
    assert (pd.prob, pd.num_prefix_tokens, pd.ordered, pd.return_indices) == (0.25, 1, False, False)


def test_drop_rate_scheduler_drives_torchvisions_drop_block_2d_once_converted():
    model = nn.Sequential(fnn.TorchvisionDropBlock2d(0.1, 3), fnn.DropBlock3d(0.1, 3))
    sched = fnn.DropRateScheduler(model, lambda step: 0.05 * (step + 1))
    sched.step()
    assert [m.p for m in model] == [pytest.approx(0.1)] * 2
    fnn.DropRateScheduler(model, lambda step: 0.2, select=fnn.TorchvisionDropBlock2d)
    assert [m.p for m in model] == [0.2, pytest.approx(0.1)]


# --- errors: the README's table -----------------------------------------------------------------

_x = np.ones((2, 3), np.float32)
_x4 = np.ones((2, 3, 8, 8), np.float32)
FAMILY_ERRORS = [
    (
        "fastdrop.dropout(x, 0.5, noise_shape=(2, 2))",
        lambda: fastdrop.dropout(_x, 0.5, noise_shape=(2, 2)),
        ValueError,
        "noise_shape (2, 2) does not fit an input of shape (2, 3): it needs 2 entries, each 1, "
        "None or the input's size in that dimension",
    ),
    (
        "fastdrop.dropout(x, 0.5, noise_shape=(2, 3.0))",
        lambda: fastdrop.dropout(_x, 0.5, noise_shape=(2, 3.0)),
        TypeError,
        "noise_shape entries must be ints or None, got float in (2, 3.0)",
    ),
    (
        "fastdrop.locked_dropout(np.ones(3), 0.5)",
        lambda: fastdrop.locked_dropout(np.ones(3), 0.5),
        ShapeError,
        "locked_dropout: Expected an input with a time and a batch dimension (at least 2D), but "
        "received a 1D input",
    ),
    (
        "fastdrop.embedding_dropout(np.ones(3), 0.5)",
        lambda: fastdrop.embedding_dropout(np.ones(3), 0.5),
        ShapeError,
        "embedding_dropout: Expected a 2D (num_embeddings, embedding_dim) weight, but received a "
        "1D input",
    ),
    (
        'fastdrop.stochastic_depth(x, 0.5, "rows", training=False)',
        lambda: fastdrop.stochastic_depth(_x, 0.5, "rows", training=False),
        ValueError,
        "mode has to be either 'batch' or 'row', but got rows",
    ),
    (
        "fastdrop.gaussian_dropout(x, 1.0)",
        lambda: fastdrop.gaussian_dropout(_x, 1.0),
        ValueError,
        "gaussian_dropout: p must be in [0, 1), got 1.0 (the noise variance p / (1 - p) would be "
        "infinite)",
    ),
    (
        "fastdrop.patch_dropout(np.ones((2, 3, 4)), 0.5, 4)",
        lambda: fastdrop.patch_dropout(np.ones((2, 3, 4)), 0.5, 4),
        ValueError,
        "patch_dropout: num_prefix_tokens (4) exceeds the 3 tokens of the input",
    ),
    (
        "fastdrop.drop_block_3d(x4, 0.1, 3)",
        lambda: fastdrop.drop_block_3d(_x4, 0.1, 3),
        ShapeError,
        "drop_block_3d: Expected 5D (N, C, D, H, W) input, but received a 4D input",
    ),
]


@pytest.mark.parametrize("shown,call,exc,message", FAMILY_ERRORS, ids=[e[0] for e in FAMILY_ERRORS])
def test_family_errors_are_the_readmes(shown, call, exc, message):
    with pytest.raises(exc) as e:
        call()
    assert str(e.value) == message
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = f"| `{shown}` | `{exc.__name__}` | {message.replace('|', chr(92) + '|')} |"
    assert row in readme, f"README.md lacks the row:\n{row}"


def test_threads_sharing_a_generator_get_disjoint_noise():
    """Each Gaussian call reserves its key block atomically, so 6 threads x 10 calls give, as a
    multiset, exactly the 60 results of sequential calls."""
    x = np.ones((64, 64), np.float32)
    g = Generator(70)
    results: list = []
    errors: list = []
    lock = threading.Lock()

    def work():
        try:
            for _ in range(10):
                y = fastdrop.gaussian_dropout(x, 0.3, generator=g)
                with lock:
                    results.append(y.tobytes())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    g2 = Generator(70)
    want = [fastdrop.gaussian_dropout(x, 0.3, generator=g2).tobytes() for _ in range(60)]
    assert sorted(results) == sorted(want)


def test_mask_shaped_members_trace_under_torch_compile():
    def f(x):
        y = fastdrop.locked_dropout(x, 0.3)
        y = fastdrop.stochastic_depth(y, 0.2, "batch")
        w = fastdrop.embedding_dropout(y[0], 0.2)
        return fastdrop.dropout(x, 0.5, noise_shape=(1, None, None)).sum() + w.sum()

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(4, 5, 6)
    torch.manual_seed(0)
    a = compiled(x)
    torch.manual_seed(0)
    assert torch.allclose(a, f(x))  # the same masks as eager under the same seed


MASK_SHAPED = {
    "noise_shape": lambda x, **k: fastdrop.dropout(x, 0.4, noise_shape=(None, 1, None, 1), **k),
    "alpha_noise_shape": lambda x, **k: fastdrop.alpha_dropout(
        x, 0.4, True, noise_shape=(1, None, None, 1), **k
    ),
    "locked_dropout": lambda x, **k: fastdrop.locked_dropout(x, 0.4, **k),
    "stochastic_depth_row": lambda x, **k: fastdrop.stochastic_depth(x, 0.4, "row", **k),
    "embedding_dropout": lambda x, **k: fastdrop.embedding_dropout(x[0, 0], 0.4, **k),
    "gaussian_dropout": lambda x, **k: fastdrop.gaussian_dropout(x, 0.4, **k),
    "drop_block_3d": lambda x, **k: fastdrop.drop_block_3d(x[..., None], 0.3, 3, **k),
}


@pytest.mark.parametrize("name", sorted(MASK_SHAPED))
def test_results_do_not_depend_on_threads_or_layout(name):
    f = MASK_SHAPED[name]
    base = positive((8, 16, 36, 36), np.float32)  # above the parallel cut-off
    fastdrop.set_num_threads(1)
    ref = f(base, generator=Generator(80))
    fastdrop.set_num_threads(3)
    np.testing.assert_array_equal(f(base, generator=Generator(80)), ref)
    big = np.zeros((16, 32, 72, 72), np.float32)
    strided = big[::2, ::2, ::2, ::2]
    strided[...] = base
    negative = np.ascontiguousarray(base[::-1, :, ::-1])[::-1, :, ::-1]
    assert negative.strides[0] < 0
    for layout in (np.asfortranarray(base), strided, negative):
        np.testing.assert_array_equal(f(layout, generator=Generator(80)), ref, err_msg=name)
    channels_last = torch.from_numpy(base).to(memory_format=torch.channels_last)
    np.testing.assert_array_equal(f(channels_last, generator=Generator(80)).numpy(), ref)


def test_drop_rate_scheduler_drives_the_new_modules():
    model = nn.Sequential(
        fnn.LockedDropout(0.1),
        fnn.GaussianDropout(0.1),
        fnn.PatchDropout(0.1),
        fnn.StochasticDepth(0.1, "row"),
        fnn.DropBlock3d(0.1, 3),
        fnn.EmbeddingDropout(nn.Embedding(4, 2), 0.1),
        fnn.WeightDropout(nn.Linear(2, 2), 0.1),
    )
    sched = fnn.DropRateScheduler(model, lambda step: 0.05 * (step + 1))
    sched.step()
    rates = [m.prob if isinstance(m, fnn.PatchDropout) else m.p for m in model]
    assert rates == [pytest.approx(0.1)] * len(model)


def test_in_place_calls_on_non_leaf_tensors_differentiate_correctly():
    ones = torch.ones(2, 1, 4, 4, 4, dtype=torch.float64)
    for call in (
        lambda t, **k: fastdrop.gaussian_dropout(t, 0.3, generator=Generator(90), **k),
        lambda t, **k: fastdrop.drop_block_3d(t, 0.3, 2, generator=Generator(90), **k),
    ):
        a = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        h = a * 2
        assert call(h, inplace=True) is h
        h.sum().backward()
        # d/da sum(f(2a)) = 2 * factor, and the factor is the call's output on ones
        assert torch.allclose(a.grad, 2 * call(ones))


# --- torch.func on the members that draw their own randomness ---------------------------------
# Gaussian and patch dropout and torchvision's DropBlock draw one noise, token choice or block
# map per call outside the kernels. Under torch.func they wrote the reused key tensor in place
# (torch.func refuses that), and drop_block_3d handed a batched tensor to the kernel.

TF_MEMBERS = {
    "gaussian_dropout": (lambda t, g: fastdrop.gaussian_dropout(t, 0.3, generator=g), (4, 6)),
    "patch_dropout": (lambda t, g: fastdrop.patch_dropout(t, 0.5, generator=g), (3, 5, 4)),
    "drop_block_3d": (lambda t, g: fastdrop.drop_block_3d(t, 0.3, 3, generator=g), (2, 3, 5, 5, 5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(TF_MEMBERS))
def test_members_with_their_own_randomness_under_torch_func_grad_and_jvp(name, dtype):
    call, shape = TF_MEMBERS[name]
    x = torch.randn(shape, dtype=dtype)
    want = call(x, Generator(1))
    g = torch.randn(want.shape, dtype=dtype)
    leaf = x.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(call(leaf, Generator(1)), leaf, g)
    got = torch.func.grad(lambda t: (call(t, Generator(1)) * g).sum())(x)
    torch.testing.assert_close(got, want_grad, rtol=0, atol=0)
    out, tangent = torch.func.jvp(lambda t: call(t, Generator(1)), (x,), (torch.ones_like(x),))
    assert torch.equal(out, want)
    (ones_grad,) = torch.autograd.grad(call(leaf, Generator(1)), leaf, torch.ones_like(want))
    if name != "patch_dropout":  # elementwise: the tangent of ones is the gradient of ones
        assert torch.equal(tangent, ones_grad)


@pytest.mark.parametrize("name", list(TF_MEMBERS))
def test_members_with_their_own_randomness_under_vmap_draw_once_for_the_batch(name):
    call, shape = TF_MEMBERS[name]
    xb = torch.randn((3,) + shape)
    y = torch.func.vmap(lambda t: call(t, Generator(1)), randomness="same")(xb)
    for i in range(3):
        assert torch.equal(y[i], call(xb[i], Generator(1)))
    with pytest.raises(RuntimeError, match="supports randomness='same' only"):
        torch.func.vmap(lambda t: call(t, Generator(1)), randomness="different")(xb)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(lambda t: call(t, Generator(1)))(xb)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", ["drop_block_3d", "TorchvisionDropBlock2d"])
def test_torchvision_blocks_carry_a_forward_mode_tangent(name, inplace):
    """A dual tensor that does not require grad went to the kernel alone: the output had no
    tangent, a silently wrong (missing) derivative."""
    import torch.autograd.forward_ad as fwAD

    shape = (2, 3, 5, 5, 5) if name == "drop_block_3d" else (2, 3, 6, 6)

    def call(t, ip=False):
        if name == "drop_block_3d":
            return fastdrop.drop_block_3d(t, 0.3, 3, ip, generator=Generator(3))
        return fnn.TorchvisionDropBlock2d(0.3, 3, ip, generator=Generator(3))(t)

    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    want, want_t = call(x), call(t)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.clone(), t.clone())
        y, tangent = fwAD.unpack_dual(call(dual, inplace))
    assert torch.equal(y, want) and tangent is not None and torch.equal(tangent, want_t)
    leaf = x.clone().requires_grad_()
    torch.autograd.gradcheck(lambda a: call(a), (leaf,), check_forward_ad=True)


def test_drop_block_3d_refuses_return_mask_under_torch_func():
    x = torch.randn(2, 3, 5, 5, 5)
    with pytest.raises(ValueError, match="return_mask is not supported under torch.func"):
        torch.func.grad(lambda t: fastdrop.drop_block_3d(t, 0.3, 3, return_mask=True)[0].sum())(x)
