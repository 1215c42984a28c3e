"""`_core.apply`, the one entry point a typed `fastdrop._spec.Spec` goes through (issue 15):
outputs that are each application of the mask the call's first block redraws, every
application kind, stored and keyed masks, block masks, and errors that come before any write
and leave the generator as it was."""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import assert_binomial, expected_scaled
from fastdrop import Generator, _core
from fastdrop._spec import Affine, Bernoulli, Blocks, Noise, Scale, ScaleByKept, Spec

X = np.random.default_rng(1).standard_normal((4, 6, 9, 10)).astype(np.float32)

APPLICATIONS = [Scale(2.0), Affine(1.5, -0.25, 0.75), Noise(1.25)]
# element (fused into the kernel), channel, sample and a broadcast last axis (drawn first)
MASK_SHAPES = [X.shape, (4, 6, 1, 1), (4, 1, 1, 1), (1, 1, 1, 10)]


def _spec(mask, application, grad_scale=None):
    return Spec(mask, application, grad_scale)


def _bits_equal(a, b):
    return a.shape == b.shape and a.to_bytes() == b.to_bytes()


def _expected(x, keep, app, residual):
    """What an application makes of `x` where `keep` (broadcast) says kept; NaN where the
    dropped value is noise (checked separately)."""
    if isinstance(app, Affine):
        y = np.where(keep, x * np.float32(app.a) + np.float32(app.shift), np.float32(app.dropped))
    elif isinstance(app, Noise):
        y = np.where(keep, x * np.float32(app.scale), np.nan)
    else:
        y = np.where(keep, x * np.float32(app.scale), np.float32(0.0))
    y = y.astype(np.float32)
    return y if residual is None else y + residual


def _check_output(out, x, keep, app, residual):
    want = _expected(x, keep, app, residual)
    kept = np.broadcast_to(keep, x.shape)
    np.testing.assert_allclose(out[kept], want[kept], rtol=1e-6, atol=1e-6)
    if isinstance(app, Noise):
        noise = out[~kept] - (0.0 if residual is None else residual[~kept])
        # one deviate per dropped decision, shared by the elements the decision covers
        assert np.isfinite(noise).all()
        assert np.unique(noise).size == np.count_nonzero(~np.asarray(keep))
    else:
        np.testing.assert_allclose(out[~kept], want[~kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("app", APPLICATIONS, ids=lambda a: a.kind)
@pytest.mark.parametrize("store_mask", [False, True])
def test_apply_writes_its_application_of_the_mask_its_first_block_redraws(
    mask_shape, app, store_mask
):
    residual = np.full_like(X, 0.5)
    for r in [None, residual]:
        g = Generator(7).fork(3)
        g.set_state((7, g.stream, 1234))
        out = np.full_like(X, np.nan)
        got = _core.apply(X, out, r, _spec(Bernoulli(mask_shape, 0.6), app), g, store_mask)
        assert got.first_block == 1234
        # The redraw: the same key and first block, stored this time.
        again = Generator(7).fork(3)
        again.set_state((7, again.stream, 1234))
        redrawn = _core.apply(
            X, np.empty_like(X), r, _spec(Bernoulli(mask_shape, 0.6), app), again, True
        )
        assert g.get_state() == again.get_state()  # the same counter range, taken whole
        if store_mask:
            assert _bits_equal(got.bits, redrawn.bits)
        else:
            assert got.bits is None
        _check_output(out, X, _keep_of(redrawn.bits), app, r)
        assert got.scale == (app.a if isinstance(app, Affine) else app.scale)


@pytest.mark.parametrize("couple", [False, True])
@pytest.mark.parametrize("app", [ScaleByKept(), Scale(1.0), Noise(1.0)], ids=lambda a: a.kind)
@pytest.mark.parametrize("store_mask", [False, True])
def test_a_block_mask_always_returns_its_bits_and_applies_them(couple, app, store_mask):
    n, c, h, w = X.shape
    mask = Blocks((n, 1 if couple else c, h, w), 0.08, 3, 2)
    g = Generator(11)
    out = np.full_like(X, np.nan)
    got = _core.apply(X, out, None, _spec(mask, app), g, store_mask)
    assert got.first_block == 0 and g.offset > 0
    # DropBlock's dilated bits are kept whatever store_mask says: they are not redrawn.
    keep = _keep_of(got.bits)
    assert keep.shape == mask.shape and 0 < keep.sum() < keep.size
    if isinstance(app, ScaleByKept):
        assert got.scale == keep.size / got.bits.count_kept()
        _check_output(out, X, keep, Scale(got.scale), None)
    else:
        assert got.scale == 1.0
        _check_output(out, X, keep, app, None)
    # The same state draws the same blocks.
    again = _core.apply(X, np.empty_like(X), None, _spec(mask, app), Generator(11), store_mask)
    assert _bits_equal(got.bits, again.bits)


def _keep_of(bits: _core.MaskBits) -> np.ndarray:
    n = int(np.prod(bits.shape))
    raw = np.frombuffer(bits.to_bytes(), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].reshape(bits.shape).astype(bool)


def test_scale_by_kept_on_a_bernoulli_mask_scales_by_numel_over_kept():
    g = Generator(3)
    out = np.empty_like(X)
    got = _core.apply(X, out, None, _spec(Bernoulli((4, 6, 1, 1), 0.5), ScaleByKept()), g, True)
    keep = _keep_of(got.bits)
    assert 0 < keep.sum() < keep.size
    assert got.scale == keep.size / keep.sum()
    want = np.where(keep, expected_scaled(X, got.scale), 0.0)
    np.testing.assert_array_equal(out, want)
    # Without store_mask the bits are drawn, counted and dropped, and the scale is the same.
    g.set_state((3, 0, got.first_block))
    again = _core.apply(X, out, None, _spec(Bernoulli((4, 6, 1, 1), 0.5), ScaleByKept()), g, False)
    assert again.bits is None and again.scale == got.scale


def test_a_keyed_mask_is_redrawn_from_its_first_block_and_in_place_is_the_same_call():
    spec = _spec(Bernoulli(X.shape, 0.3), Scale(1 / 0.3))
    g = Generator(5)
    _core.apply(X, np.empty_like(X), None, spec, g, False)
    out = np.empty_like(X)
    keyed = _core.apply(X, out, None, spec, g, False)
    assert keyed.bits is None and keyed.first_block > 0
    g2 = Generator(5)
    g2.set_state((5, 0, keyed.first_block))
    x = X.copy()
    stored = _core.apply(x, x, None, spec, g2, True)
    np.testing.assert_array_equal(x, out)
    np.testing.assert_array_equal(
        out, np.where(_keep_of(stored.bits), expected_scaled(X, 1 / 0.3), 0)
    )
    assert_binomial(int(_keep_of(stored.bits).sum()), X.size, 0.3, "kept")
    # The backward replays the stored bits.
    grad = np.empty_like(X)
    _core.mask_apply(stored.bits, X, grad, 1 / 0.3)
    np.testing.assert_array_equal(grad, out)


def test_applied_is_read_only_and_says_what_it_holds():
    got = _core.apply(
        X, np.empty_like(X), None, _spec(Bernoulli(X.shape, 0.5), Scale(2.0)), Generator(1), True
    )
    assert isinstance(got, _core.Applied) and isinstance(got.bits, _core.MaskBits)
    assert repr(got) == "Applied(bits=MaskBits, first_block=0, scale=2.0)"
    with pytest.raises(AttributeError):
        got.scale = 3.0  # type: ignore[misc]


def test_specs_are_read_by_kind_and_field_names_not_by_class():
    """Any object with the right `kind` and fields is a spec part: the Rust side reads names."""
    ns = types.SimpleNamespace
    duck = ns(
        mask=ns(kind="bernoulli", shape=(4, 6, 1, 1), keep=0.5),
        application=ns(kind="scale", scale=2.0),
    )
    out1, out2 = np.empty_like(X), np.empty_like(X)
    a = _core.apply(X, out1, None, duck, Generator(2), True)
    b = _core.apply(
        X, out2, None, _spec(Bernoulli((4, 6, 1, 1), 0.5), Scale(2.0)), Generator(2), True
    )
    np.testing.assert_array_equal(out1, out2)
    assert _bits_equal(a.bits, b.bits)
    # numpy scalars and ints are numbers; a list is a shape.
    c = _core.apply(
        X, out1, None, _spec(Bernoulli([4, 6, 1, 1], np.float64(0.5)), Scale(2)), Generator(2), True
    )
    np.testing.assert_array_equal(out1, out2)
    assert _bits_equal(c.bits, b.bits)


ns = types.SimpleNamespace
BAD = [
    # (spec, exception, message)
    (_spec(ns(kind="gaussian", shape=X.shape, keep=0.5), Scale(1.0)), TypeError, "kind 'gaussian'"),
    (_spec(Bernoulli(X.shape, 0.5), ns(kind="dropconnect")), TypeError, "kind 'dropconnect'"),
    (_spec(ns(shape=X.shape, keep=0.5), Scale(1.0)), TypeError, r"spec.mask must be a Bernoulli"),
    (_spec(ns(kind="bernoulli", shape=X.shape), Scale(1.0)), TypeError, "no field 'keep'"),
    (_spec(Bernoulli(X.shape, 0.5), ns(kind="affine", a=1.0, shift=0.0)), TypeError, "'dropped'"),
    (ns(mask=Bernoulli(X.shape, 0.5)), TypeError, "no field 'application'"),
    (3, TypeError, "no field 'mask'"),
    (_spec(Bernoulli(X.shape, "0.5"), Scale(1.0)), TypeError, r"spec.mask.keep must be a float"),
    (_spec(Bernoulli(X.shape, 0.5), Scale(None)), TypeError, r"spec.application.scale"),
    (_spec(Bernoulli((4, -6, 1, 1), 0.5), Scale(1.0)), ValueError, r"spec.mask.shape"),
    (_spec(Bernoulli(X.shape, 1.5), Scale(1.0)), ValueError, "keep probability has to be between"),
    (_spec(Bernoulli(X.shape, float("nan")), Scale(1.0)), ValueError, "between 0 and 1"),
    (_spec(Bernoulli((4, 6, 2, 1), 0.5), Scale(1.0)), ValueError, "does not broadcast"),
    (_spec(Bernoulli((4, 6), 0.5), Scale(1.0)), ValueError, "does not broadcast"),
    (
        _spec(Blocks((4, 6, 9, 10), 0.1, 10, 2), ScaleByKept()),
        ValueError,
        "block 10x2 does not fit",
    ),
    (_spec(Blocks((4, 6, 9, 10), 0.1, 0, 2), ScaleByKept()), ValueError, "does not fit"),
    (_spec(Blocks((4, 6, 9, 10), -0.1, 1, 1), ScaleByKept()), ValueError, "gamma"),
    (_spec(Blocks((4, 6, 9, 10), 0.1, -1, 1), ScaleByKept()), ValueError, r"spec.mask.kh"),
    (_spec(Blocks((4, 6, 9, 10), 0.1, 2.0, 1), ScaleByKept()), TypeError, r"spec.mask.kh"),
    (_spec(Blocks((4, 6, 90), 0.1, 1, 1), ScaleByKept()), ValueError, r"\(N, C or 1, H, W\)"),
    (_spec(Blocks((4, 6, 9, 11), 0.1, 1, 1), ScaleByKept()), ValueError, "does not broadcast"),
]


@pytest.mark.parametrize("spec,exc,message", BAD, ids=[str(i) for i in range(len(BAD))])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_bad_spec_raises_before_writing_and_takes_no_counters(spec, exc, message, inplace):
    g = Generator(9)
    g.set_state((9, 1, 640))
    x = X.copy()
    out = x if inplace else np.full_like(X, 7.0)
    with pytest.raises(exc, match=message):
        _core.apply(x, out, None, spec, g, True)
    assert g.get_state() == (9, 1, 640)
    np.testing.assert_array_equal(x, X)
    if not inplace:
        assert (out == 7.0).all()


def test_bad_operands_and_an_exhausted_stream_raise_before_writing():
    spec = _spec(Bernoulli(X.shape, 0.5), Noise(1.0))
    ro = X.copy()
    ro.flags.writeable = False
    g = Generator(1)
    for x, out, r, exc in [
        (X, ro, None, ValueError),
        (X, X.astype(np.float64), None, TypeError),
        (X, np.empty_like(X)[:2], None, ValueError),
        (X, np.empty_like(X), X[:, :2], ValueError),
        (X.tolist(), np.empty_like(X), None, TypeError),
    ]:
        with pytest.raises(exc):
            _core.apply(x, out, r, spec, g, False)
    assert g.get_state() == (g.seed, 0, 0)
    g.set_state((1, 0, 2**64 - 10))
    out = np.full_like(X, 7.0)
    with pytest.raises(ValueError, match="exhausted"):
        _core.apply(X, out, None, spec, g, False)
    assert g.get_state() == (1, 0, 2**64 - 10) and (out == 7.0).all()


def test_torch_tensors_arrive_as_dlpack_capsules():
    torch = pytest.importorskip("torch")
    from torch.utils.dlpack import to_dlpack

    for dtype in [torch.float32, torch.bfloat16]:
        t = torch.from_numpy(X).to(dtype)
        out = torch.empty_like(t)
        spec = _spec(Blocks((4, 1, 9, 10), 0.1, 3, 3), ScaleByKept())
        got = _core.apply(to_dlpack(t), to_dlpack(out), None, spec, Generator(4), False)
        keep = torch.from_numpy(_keep_of(got.bits))
        # The kernel's arithmetic: in float32, the scale rounded once to it, then to the dtype.
        want = torch.where(keep, t.float() * np.float32(got.scale), 0.0).to(dtype)
        assert torch.equal(out, want)
