"""fastdrop against torch (and timm) on what a drop-in user passes them: tensor kinds, dtypes,
shapes, argument types and signatures (issue 11, all but the autograd modes)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastdrop  # noqa: E402
import fastdrop.nn as fnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# --- timm's signatures --------------------------------------------------------------------------


def test_drop_path_and_drop_block_take_timms_argument_name_x():
    t = torch.randn(4, 3, 8, 8)
    g = fastdrop.Generator(1)
    a = fastdrop.drop_path(x=t, drop_prob=0.5, training=True, generator=g.fork(0))
    b = fastdrop.drop_path(t, 0.5, True, generator=g.fork(0))
    assert torch.equal(a, b)
    a = fastdrop.drop_block_2d(x=t, drop_prob=0.2, block_size=3, generator=g.fork(1))
    b = fastdrop.drop_block_2d(t, 0.2, 3, generator=g.fork(1))
    assert torch.equal(a, b)


def test_calculate_drop_path_rates_is_exported_at_the_top_level():
    timm_layers = pytest.importorskip("timm.layers")
    assert "calculate_drop_path_rates" in fastdrop.__all__
    assert fastdrop.calculate_drop_path_rates is fastdrop.schedules.calculate_drop_path_rates
    assert fastdrop.calculate_drop_path_rates(0.2, 4) == pytest.approx(
        timm_layers.calculate_drop_path_rates(0.2, 4), abs=1e-7
    )


def test_drop_path_returns_a_0d_input_when_it_drops_nothing_as_timm_does():
    # Regression: fastdrop refused a 0-d input even in evaluation, where timm returns it.
    timm_layers = pytest.importorskip("timm.layers")
    x = torch.tensor(2.0)
    for p, training in [(0.5, False), (0.0, True)]:
        assert timm_layers.drop_path(x, p, training) is x
        assert fastdrop.drop_path(x, p, training) is x
        assert torch.equal(fastdrop.drop_path_add(x, x, p, training), x + x)
    with pytest.raises(fastdrop.ShapeError, match="batch dimension"):
        fastdrop.drop_path(x, 0.5, True)


# --- p as a 0-d tensor --------------------------------------------------------------------------

_P_CALLS = [
    ("dropout", lambda x, p: fastdrop.dropout(x, p, True), 2),
    ("alpha_dropout", lambda x, p: fastdrop.alpha_dropout(x, p, True), 2),
    ("feature_alpha_dropout", lambda x, p: fastdrop.feature_alpha_dropout(x, p, True), 4),
    ("dropout1d", lambda x, p: fastdrop.dropout1d(x, p, True), 3),
    ("dropout2d", lambda x, p: fastdrop.dropout2d(x, p, True), 4),
    ("dropout3d", lambda x, p: fastdrop.dropout3d(x, p, True), 5),
    ("drop_path", lambda x, p: fastdrop.drop_path(x, p, True), 2),
    ("drop_block_2d", lambda x, p: fastdrop.drop_block_2d(x, p, 3), 4),
    ("dropout_add", lambda x, p: fastdrop.dropout_add(x, x, p, True), 2),
    ("drop_path_add", lambda x, p: fastdrop.drop_path_add(x, x, p, True), 2),
]


@pytest.mark.parametrize("name, call, nd", _P_CALLS, ids=[c[0] for c in _P_CALLS])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float64, torch.int64])
def test_p_may_be_a_0d_tensor(name, call, nd, p_dtype):
    x = torch.randn(*[4] * nd)
    p = 1 if p_dtype == torch.int64 else 0.3
    pt = torch.tensor(p, dtype=p_dtype)
    torch.manual_seed(0)
    a = call(x, pt)
    torch.manual_seed(0)
    b = call(x, pt.item())  # torch too reads a float32 p as the double it holds
    assert torch.equal(a, b)


def test_p_as_a_tensor_torch_refuses_is_a_type_error():
    x = torch.randn(4, 4)
    for p in (torch.tensor([0.3]), torch.tensor(0.3, requires_grad=True)):
        with pytest.raises(TypeError):
            F.dropout(x, p, True)
        with pytest.raises(TypeError, match="0-d real tensor"):
            fastdrop.dropout(x, p, True)


@pytest.mark.parametrize(
    "cls",
    [fnn.Dropout, fnn.Dropout2d, fnn.AlphaDropout, fnn.FeatureAlphaDropout, fnn.DropPath],
)
def test_modules_take_p_as_a_0d_tensor(cls):
    m = cls(torch.tensor(0.25))
    x = torch.randn(4, 3, 8, 8)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(0)
    b = cls(0.25).train()(x)
    assert torch.equal(a, b)
    assert "0.25" in repr(m)


# --- torch.compile on empty tensors -------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, call",
    [
        ((0, 3), lambda t: fastdrop.dropout(t, 0.5)),
        ((0, 3), lambda t: fastdrop.alpha_dropout(t, 0.5, True)),
        ((2, 0, 4, 4), lambda t: fastdrop.dropout2d(t, 0.5)),
        ((2, 0, 4, 4), lambda t: fastdrop.drop_block_2d(t, 0.5, 3)),
    ],
)
def test_compiled_call_on_an_empty_tensor(shape, call):
    torch._dynamo.reset()
    x = torch.empty(shape, requires_grad=True)
    y = torch.compile(call, fullgraph=True, backend="aot_eager")(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# --- shapes as torch reads them today -----------------------------------------------------------


def _torch_channel_cells(name: str, shape: tuple) -> tuple:
    """The mask shape torch's dropout2d / dropout3d use today (read from torch's code: dropout2d
    is feature dropout on the input as given, dropout3d on it unsqueezed unless it is 5-D)."""
    nd = len(shape)
    if name == "dropout2d" or nd == 5:
        return shape[:2] + (1,) * (nd - 2)
    return shape[:1] + (1,) * (nd - 1)


def _constant_within(y: torch.Tensor, cells: tuple) -> bool:
    """Every cell of the broadcast mask shape `cells` is all kept or all dropped in `y`."""
    y = (y != 0).to(torch.int8)
    dims = [d for d, c in enumerate(cells) if c == 1 and y.shape[d] > 1]
    return not dims or torch.equal(y.amax(dims), y.amin(dims))


def _outcome(call):
    """(result or exception, [(warning category, text)]) of a call."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            r = call()
        except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
            r = e
    return r, [(x.category, str(x.message)) for x in w]


@pytest.mark.parametrize("name", ["dropout2d", "dropout3d"])
@pytest.mark.parametrize("nd", range(0, 7))
@pytest.mark.parametrize("p, training", [(0.5, True), (0.5, False), (1.0, True), (0.0, True)])
def test_channel_dropout_reads_every_rank_as_torch_does(name, nd, p, training):
    shape = (6, 5, 3, 2, 2, 2)[:nd]
    x = torch.rand(shape) + 1.0  # no zeros, so a zero is a dropped element
    ours, ours_warned = _outcome(lambda: getattr(fastdrop, name)(x, p, training, return_mask=True))
    torch.manual_seed(0)
    theirs, theirs_warned = _outcome(lambda: getattr(F, name)(x, p, training))
    assert ours_warned == theirs_warned
    if isinstance(theirs, Exception):
        assert isinstance(ours, type(theirs)), ours
        assert str(theirs) in str(ours)
        return
    y, mask = ours
    if not training or p == 0.0:
        assert y is x and torch.equal(theirs, x)
        return
    if p == 1.0:
        assert torch.equal(y, theirs) and not y.any()
        return
    cells = _torch_channel_cells(name, shape)
    assert mask.shape == cells
    assert _constant_within(theirs, cells) and _constant_within(y, cells)
    keep = torch.from_numpy(mask.numpy())
    assert torch.equal(y, torch.where(keep, x * 2.0, torch.zeros(())))


@pytest.mark.parametrize("cls, nd", [(fnn.Dropout2d, 3), (fnn.Dropout2d, 5), (fnn.Dropout3d, 3)])
def test_channel_modules_warn_as_torchs_do(cls, nd):
    x = torch.randn((4, 3, 2, 2, 2)[:nd])
    torch_cls = getattr(torch.nn, cls.__name__)
    _, ours = _outcome(lambda: cls(0.5)(x))
    _, theirs = _outcome(lambda: torch_cls(0.5)(x))
    assert ours == theirs and ours and all(c is UserWarning for c, _ in ours)


def test_dropout2d_reads_a_3d_input_as_n_c_l_unless_strict():
    x = torch.ones(4, 3, 5)
    with pytest.warns(UserWarning, match=r"interpreted as shape \(N, C, L\)"):
        _, mask = fastdrop.dropout2d(x, 0.5, return_mask=True)
    assert mask.shape == (4, 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, mask = fastdrop.dropout2d(x, 0.5, return_mask=True, strict_shapes=True)
        assert mask.shape == (4, 1, 1)  # unbatched (C, H, W)
        y = fnn.Dropout2d(0.5, strict_shapes=True)(x)
        assert _constant_within(y, (4, 1, 1))
        with pytest.raises(fastdrop.ShapeError, match="received a 6D input"):
            fastdrop.dropout3d(torch.ones(1, 2, 3, 4, 5, 6), strict_shapes=True)
        with pytest.raises(fastdrop.ShapeError, match="received a 5D input"):
            fnn.Dropout2d(0.5, strict_shapes=True)(torch.ones(1, 2, 3, 4, 5))


@pytest.mark.parametrize("shape", [(), (3,), (0,)])
@pytest.mark.parametrize("p, training", [(0.5, False), (0.0, True), (1.0, True), (0.5, True)])
def test_feature_alpha_dropout_without_a_channel_does_what_torch_does(shape, p, training):
    x = torch.randn(shape)
    ours, _ = _outcome(lambda: fastdrop.feature_alpha_dropout(x, p, training))
    theirs, _ = _outcome(lambda: F.feature_alpha_dropout(x, p, training))
    if isinstance(theirs, Exception):
        assert isinstance(ours, RuntimeError) and str(theirs) in str(ours)
    else:
        assert torch.equal(ours, theirs)


# --- complex tensors ----------------------------------------------------------------------------

COMPLEX = [torch.complex64, torch.complex128]
_EPS = {torch.complex64: 2.0**-23, torch.complex128: 2.0**-52}
ALPHA = 1.7580993408473766


def _crandn(*shape, dtype=torch.complex64):
    x = torch.randn(*shape, dtype=dtype)
    return x + (x == 0)  # no zero parts, so a zero part is a dropped element


def _torch_recipe(x, keep, p, alpha):
    """ATen's _dropout_impl on a complex input, with `keep` as its Bernoulli noise: a real
    noise tensor, divided by 1 - p (or alpha's a and shift), times the complex input."""
    noise = keep.to(x.real.dtype)
    if not alpha:
        return x * noise.div_(1 - p)
    a = 1.0 / np.sqrt((ALPHA * ALPHA * p + 1) * (1 - p))
    b = noise.add(-1).mul_(ALPHA * a).add_(ALPHA * a * p)
    return x * noise.mul_(a) + b


_COMPLEX_CALLS = [
    ("dropout", lambda x, g: fastdrop.dropout(x, 0.3, generator=g, return_mask=True), 0.3, False),
    (
        "alpha_dropout",
        lambda x, g: fastdrop.alpha_dropout(x, 0.3, True, generator=g, return_mask=True),
        0.3,
        True,
    ),
    (
        "feature_alpha_dropout",
        lambda x, g: fastdrop.feature_alpha_dropout(x, 0.3, True, generator=g, return_mask=True),
        0.3,
        True,
    ),
    (
        "dropout2d",
        lambda x, g: fastdrop.dropout2d(x, 0.4, generator=g, return_mask=True),
        0.4,
        False,
    ),
    (
        "dropout3d",
        lambda x, g: fastdrop.dropout3d(x, 0.4, generator=g, return_mask=True),
        0.4,
        False,
    ),
    (
        "drop_path",
        lambda x, g: fastdrop.drop_path(x, 0.5, True, generator=g, return_mask=True),
        0.5,
        False,
    ),
]


@pytest.mark.filterwarnings("ignore:dropout2d. Received a 5-D input")
@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("name, call, p, alpha", _COMPLEX_CALLS, ids=[c[0] for c in _COMPLEX_CALLS])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_complex_values_are_torchs_recipe_with_one_decision_per_element(
    dtype, name, call, p, alpha, layout
):
    x = _crandn(6, 5, 4, 3, 2, dtype=dtype)
    if layout == "permuted":
        x = x.permute(0, 1, 4, 3, 2)
    y, mask = call(x, fastdrop.Generator(11))
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    keep = torch.from_numpy(mask.numpy())
    assert len(mask.shape) == x.dim()
    assert 0 < mask.count_kept() < keep.numel()
    want = _torch_recipe(x, keep.expand(x.shape), p, alpha)
    torch.testing.assert_close(y, want, rtol=2 * _EPS[dtype], atol=0)
    dropped = ~keep.expand(x.shape)
    if alpha:  # a dropped element is alpha's constant, a real number
        assert torch.all(y.imag[dropped] == 0)
    else:  # both parts of a dropped element are zero, of a kept one scaled
        assert torch.all(y[dropped] == 0) and torch.all(y.real[~dropped] != 0)
        assert torch.all(y.imag[~dropped] != 0)


@pytest.mark.parametrize("dtype", COMPLEX)
def test_complex_parts_are_the_real_kernels_values(dtype):
    """Both parts of a kept element are exactly what the real kernel gives for them (which
    test_variants checks against torch's), and the mask is the real call's."""
    x = _crandn(40, 30, dtype=dtype)
    g = fastdrop.Generator(4)
    y, mask = fastdrop.dropout(x, 0.3, generator=g.fork(0), return_mask=True)
    for part, got in ((x.real, y.real), (x.imag, y.imag)):
        want, real_mask = fastdrop.dropout(
            part.contiguous(), 0.3, generator=g.fork(0), return_mask=True
        )
        np.testing.assert_array_equal(mask.numpy(), real_mask.numpy())
        assert torch.equal(got, want)
    y, mask = fastdrop.alpha_dropout(x, 0.3, True, generator=g.fork(1), return_mask=True)
    want_re = fastdrop.alpha_dropout(x.real.contiguous(), 0.3, True, generator=g.fork(1))
    assert torch.equal(y.real, want_re)
    keep = torch.from_numpy(mask.numpy())
    a = torch.tensor(mask.scale, dtype=x.real.dtype)
    assert torch.equal(y.imag, torch.where(keep, x.imag * a, torch.zeros((), dtype=a.dtype)))


@pytest.mark.parametrize("dtype", COMPLEX)
def test_complex_fused_adds_and_inplace(dtype):
    x, r = _crandn(8, 6, dtype=dtype), _crandn(8, 6, dtype=dtype)
    g = fastdrop.Generator(9)
    y, mask = fastdrop.dropout_add(x, r, 0.5, generator=g.fork(0), return_mask=True)
    assert torch.equal(y, r + fastdrop.dropout(x, 0.5, generator=g.fork(0)))
    y = fastdrop.drop_path_add(r, x, 0.5, True, generator=g.fork(1))
    assert torch.equal(y, r + fastdrop.drop_path(x, 0.5, True, generator=g.fork(1)))
    for f in (fastdrop.dropout, fastdrop.alpha_dropout):
        want = f(x, 0.5, True, generator=g.fork(2))
        xi = x.clone()
        ptr = xi.data_ptr()
        assert f(xi, 0.5, True, True, generator=g.fork(2)) is xi
        assert xi.data_ptr() == ptr and torch.equal(xi, want)


@pytest.mark.parametrize("dtype", COMPLEX)
def test_complex_mask_backward_takes_complex_and_real_grads(dtype):
    x = _crandn(5, 4, 3, 2, dtype=dtype)
    for call in (
        lambda t: fastdrop.dropout2d(t, 0.5, return_mask=True),
        lambda t: fastdrop.alpha_dropout(t, 0.5, True, return_mask=True),
    ):
        _, mask = call(x)
        keep = torch.from_numpy(mask.numpy())
        for grad in (_crandn(5, 4, 3, 2, dtype=dtype), torch.randn(5, 4, 3, 2, dtype=x.real.dtype)):
            s = torch.tensor(mask.scale, dtype=grad.dtype)
            want = torch.where(keep, grad * s, torch.zeros((), dtype=grad.dtype))
            assert torch.equal(mask.backward(grad), want)
        g = np.random.default_rng(0).standard_normal((5, 4, 3, 2)).astype(np.float32)
        np.testing.assert_array_equal(
            mask.backward(g), np.where(mask.numpy(), g * np.float32(mask.scale), 0)
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda t, g: fastdrop.dropout(t, 0.4, generator=g),
        lambda t, g: fastdrop.alpha_dropout(t, 0.4, True, generator=g),
        lambda t, g: fastdrop.feature_alpha_dropout(t, 0.4, True, generator=g),
        lambda t, g: fastdrop.dropout2d(t, 0.4, generator=g),
        lambda t, g: fastdrop.drop_path(t, 0.4, True, generator=g),
        lambda t, g: fastdrop.dropout_add(t, t * 2, 0.4, generator=g),
    ],
    ids=["dropout", "alpha", "feature_alpha", "dropout2d", "drop_path", "dropout_add"],
)
def test_complex128_gradcheck_and_gradgradcheck(call):
    x = _crandn(3, 4, 2, 2, dtype=torch.complex128).requires_grad_()
    g = fastdrop.Generator(2)

    def f(t):
        return call(t, g.fork(0))  # the same mask at every evaluation

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_drop_block_on_a_complex_tensor_is_a_type_error_and_writes_nothing():
    x = _crandn(2, 3, 8, 8)
    before = x.clone()
    with pytest.raises(TypeError, match="real tensors"):
        fastdrop.drop_block_2d(x, 0.2, 3, inplace=True)
    assert torch.equal(x, before)


# --- tensors with the negative or conjugate bit -------------------------------------------------


def _bit_views():
    c = _crandn(6, 5)
    return {
        "neg view": torch._neg_view(torch.randn(6, 5)),
        "conj().imag": c.conj().imag,
        "conj()": c.conj(),
        "neg view of conj": torch._neg_view(c.conj()),
    }


@pytest.mark.parametrize("kind", list(_bit_views()))
@pytest.mark.parametrize(
    "call",
    [
        lambda t, g: fastdrop.dropout(t, 0.5, generator=g),
        lambda t, g: fastdrop.alpha_dropout(t, 0.5, True, generator=g),
        lambda t, g: fastdrop.dropout1d(t, 0.5, generator=g),
        lambda t, g: fastdrop.drop_path(t, 0.5, True, generator=g),
    ],
    ids=["dropout", "alpha_dropout", "dropout1d", "drop_path"],
)
def test_a_tensor_with_a_bit_gives_what_its_resolved_values_give(kind, call):
    v = _bit_views()[kind]
    assert v.is_neg() or v.is_conj()
    resolved = v.resolve_conj().resolve_neg()
    g = fastdrop.Generator(8)
    assert torch.equal(call(v, g.fork(0)), call(resolved, g.fork(0)))


@pytest.mark.parametrize("kind", ["neg view", "conj().imag"])
def test_the_plain_call_reads_a_view_with_a_bit_by_value(kind):
    v = _bit_views()[kind]
    torch.manual_seed(5)
    a = fastdrop.dropout(v, 0.5)  # the fast path for default arguments
    torch.manual_seed(5)
    assert torch.equal(a, fastdrop.dropout(v.resolve_neg(), 0.5))


@pytest.mark.parametrize("kind", list(_bit_views()))
def test_a_residual_and_a_grad_with_a_bit_are_read_by_value(kind):
    v = _bit_views()[kind]
    resolved = v.resolve_conj().resolve_neg()
    x = torch.randn(v.shape, dtype=v.dtype)
    g = fastdrop.Generator(8)
    y, mask = fastdrop.dropout_add(x, v, 0.5, generator=g.fork(0), return_mask=True)
    assert torch.equal(y, fastdrop.dropout_add(x, resolved, 0.5, generator=g.fork(0)))
    assert torch.equal(mask.backward(v), mask.backward(resolved))


@pytest.mark.parametrize("kind", list(_bit_views()))
@pytest.mark.parametrize("name", ["dropout", "alpha_dropout"])
def test_in_place_on_a_view_with_a_bit_writes_through_it_as_torch_does(kind, name):
    """torch's in-place ops on such a view leave the view showing the result (its storage then
    holds the result with the bit applied)."""
    v = _bit_views()[kind]
    g = fastdrop.Generator(8)
    want = getattr(fastdrop, name)(v.resolve_conj().resolve_neg(), 0.5, True, generator=g.fork(0))
    assert getattr(fastdrop, name)(v, 0.5, True, True, generator=g.fork(0)) is v
    assert torch.equal(v.resolve_conj().resolve_neg(), want)


# torchvision's DropBlock (drop_block_3d and the 2-D module) applies a mask decided outside the
# kernels: complex tensors, views with a bit and ZeroTensors were handed to the kernel as their
# storage: a TypeError for complex, the storage's sign for a negative view, and a segmentation
# fault for a ZeroTensor (no storage at all).
def _tv_block_kinds(shape):
    c = _crandn(*shape)
    return {
        "complex": _crandn(*shape),
        "neg view": torch._neg_view(torch.randn(shape)),
        "conj()": c.conj(),
        "conj().imag": c.conj().imag,
        "neg view of conj": torch._neg_view(_crandn(*shape).conj()),
        "zero tensor": torch._efficientzerotensor(shape),
    }


_TV_BLOCKS = {
    "drop_block_3d": (
        (2, 3, 4, 4, 4),
        lambda t, g, ip: fastdrop.drop_block_3d(t, 0.5, 2, ip, generator=g),
    ),
    "TorchvisionDropBlock2d": (
        (2, 3, 6, 6),
        lambda t, g, ip: fnn.TorchvisionDropBlock2d(0.5, 2, ip, generator=g)(t),
    ),
}


@pytest.mark.parametrize("kind", list(_tv_block_kinds((1,))))
@pytest.mark.parametrize("name", list(_TV_BLOCKS))
def test_torchvision_blocks_read_any_tensor_by_its_values(name, kind):
    shape, call = _TV_BLOCKS[name]
    v = _tv_block_kinds(shape)[kind]
    resolved = (
        torch.zeros(shape, dtype=v.dtype) if v._is_zerotensor() else v.resolve_conj().resolve_neg()
    )
    g = fastdrop.Generator(8)
    want = call(resolved, g.fork(0), False)
    assert 0 < int((want != 0).sum()) < want.numel() or v._is_zerotensor()
    assert torch.equal(call(v, g.fork(0), False), want)
    if v._is_zerotensor():
        with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
            call(v, g.fork(0), True)
        return
    # In place the view shows the result afterwards, as after torch's in-place ops.
    assert call(v, g.fork(0), True) is v
    assert torch.equal(v.resolve_conj().resolve_neg(), want)


@pytest.mark.parametrize("name", list(_TV_BLOCKS))
def test_torchvision_blocks_differentiate_complex_inputs(name):
    shape, call = _TV_BLOCKS[name]
    x = _crandn(*shape, dtype=torch.complex128).requires_grad_()
    g = fastdrop.Generator(4)
    y = call(x, g.fork(0), False)
    keep_scale = call(torch.ones(shape, dtype=torch.complex128), g.fork(0), False)
    assert torch.equal(y.detach(), x.detach() * keep_scale)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(grad, keep_scale)  # the masked gradient (conj of a real factor)
    torch.autograd.gradcheck(lambda t: call(t, g.fork(1), False), (x,))


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("view", ["plain", "conj()", "permuted"])
def test_gaussian_dropout_scales_both_parts_of_a_complex_element_by_its_real_factor(dtype, view):
    """It cast complex input to the factor's real type, dropping the imaginary parts (with only
    torch's UserWarning), and computed complex128 in float32."""
    x = _crandn(4, 5, 3, dtype=dtype)
    x[0, 0, 0] = complex(float("inf"), 1.0)  # an infinite part stays inf times its factor
    v = {"plain": x, "conj()": x.conj(), "permuted": x.permute(2, 0, 1)}[view]
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    factor = fastdrop.gaussian_dropout(
        torch.ones(v.shape, dtype=real), 0.4, generator=fastdrop.Generator(3)
    )
    values = v.resolve_conj()
    want = torch.complex(values.real * factor, values.imag * factor)
    leaf = v.detach().clone().requires_grad_()
    y = fastdrop.gaussian_dropout(leaf, 0.4, generator=fastdrop.Generator(3))
    assert y.dtype == dtype and torch.equal(y.detach(), want)
    g = _crandn(*v.shape, dtype=dtype)
    (grad,) = torch.autograd.grad(y, leaf, g)
    assert torch.equal(grad, torch.complex(g.real * factor, g.imag * factor))
    if dtype == torch.complex128:
        gen = fastdrop.Generator(5)
        finite = _crandn(4, 5, 3, dtype=dtype).requires_grad_()
        torch.autograd.gradcheck(
            lambda t: fastdrop.gaussian_dropout(t, 0.4, generator=gen.fork(0)), (finite,)
        )
    # The device path (torch's own ops; a meta tensor here) keeps the dtype too.
    assert fastdrop.gaussian_dropout(v.to("meta"), 0.4).dtype == dtype


# --- tensors with no storage and other kinds ----------------------------------------------------


@pytest.mark.parametrize(
    "name, call",
    [
        ("dropout", lambda t: F.dropout(t, 0.5, True)),
        ("alpha_dropout", lambda t: F.alpha_dropout(t, 0.5, True)),
        ("dropout2d", lambda t: F.dropout2d(t, 0.5, True)),
    ],
)
def test_a_zero_tensor_gives_torchs_values_and_in_place_torchs_error(name, call):
    z = torch._efficientzerotensor(4, 3, 5, 5)
    assert z._is_zerotensor()
    ours = getattr(fastdrop, name)(z, 0.5, True)
    if name == "alpha_dropout":
        # torch's adds alpha's shift in place to its product with the ZeroTensor, and so raises;
        # fastdrop gives the values alpha dropout has on zeros: the kept and dropped constants.
        with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
            call(z)
        a = 1.0 / np.sqrt((ALPHA * ALPHA * 0.5 + 1) * 0.5)
        consts = torch.tensor([ALPHA * a * 0.5, -ALPHA * a * 0.5], dtype=torch.float32)
        assert set(ours.unique().tolist()) == set(consts.tolist())
    else:
        torch.manual_seed(0)
        theirs = call(z)
        assert torch.equal(ours, theirs) and not ours.any()
    with pytest.raises(RuntimeError) as e:
        getattr(F, name)(z, 0.5, True, True)
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable") as ours_e:
        getattr(fastdrop, name)(z, 0.5, True, True)
    assert str(ours_e.value) == str(e.value)


def test_a_zero_tensor_grad_and_residual():
    x = torch.randn(10, 3)
    z = torch._efficientzerotensor(10, 3)
    g = fastdrop.Generator(6)
    y, mask = fastdrop.dropout_add(x, z, 0.5, generator=g.fork(0), return_mask=True)
    assert torch.equal(y, fastdrop.dropout(x, 0.5, generator=g.fork(0)))
    grad = mask.backward(z)
    assert grad.shape == z.shape and not grad._is_zerotensor() and not grad.any()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 4).to_sparse(),
        lambda: torch.randn(4, 4).to_sparse_csr(),
        lambda: torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)]),
        lambda: torch.nested.nested_tensor(
            [torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged
        ),
    ],
    ids=["sparse_coo", "sparse_csr", "nested", "jagged"],
)
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
@pytest.mark.parametrize(
    "call",
    [
        lambda t: fastdrop.dropout(t, 0.5),
        lambda t: fastdrop.dropout(t, 0.5, generator=fastdrop.Generator(0)),
        lambda t: fastdrop.alpha_dropout(t, 0.5, True),
        lambda t: fastdrop.dropout1d(t, 0.5),
        lambda t: fastdrop.drop_path(t, 0.5, True),
        lambda t: fastdrop.dropout_add(t, t, 0.5),
    ],
    ids=["dropout", "dropout_generator", "alpha", "dropout1d", "drop_path", "dropout_add"],
)
def test_sparse_and_nested_tensors_are_a_type_error(make, call):
    with pytest.raises(TypeError, match="dense \\(strided\\) tensors"):
        call(make())


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(6).reshape(2, 3),
        lambda: torch.ones(2, 3, dtype=torch.bool),
        lambda: torch.ones(2, 3, dtype=torch.uint8),
        lambda: torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 0, torch.quint8),
    ],
    ids=["int64", "bool", "uint8", "quint8"],
)
def test_integer_bool_and_quantized_tensors_are_a_type_error(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors
        t = make()
    with pytest.raises(RuntimeError):
        F.dropout(t, 0.5, True)
    for call in (fastdrop.dropout, fastdrop.alpha_dropout, fastdrop.dropout1d):
        with pytest.raises(TypeError, match="complex64 or complex128 tensor, got torch"):
            call(t, 0.5, True)


def test_a_wrapper_tensor_subclass_gets_torchs_ops():
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    t = two_tensor.TwoTensor(a, b)
    for call in (
        lambda u: fastdrop.dropout(u, 0.5),
        lambda u: fastdrop.dropout2d(u.view(2, 4, 2, 3), 0.5),
        lambda u: fastdrop.alpha_dropout(u, 0.5, True),
    ):
        y = call(t)
        assert type(y) is two_tensor.TwoTensor
        assert y.a.shape == y.b.shape and y.a.numel() == 48
    with pytest.raises(ValueError, match="return_mask"):
        fastdrop.dropout(t, 0.5, return_mask=True)


def test_a_parameter_is_an_ordinary_tensor():
    w = torch.nn.Parameter(torch.randn(6, 4))
    g = fastdrop.Generator(1)
    y = fastdrop.dropout(w, 0.5, generator=g.fork(0))
    assert type(y) is torch.Tensor and y.requires_grad
    assert torch.equal(y, fastdrop.dropout(w.detach(), 0.5, generator=g.fork(0)))


# --- in place on views torch forbids writing ----------------------------------------------------


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g


def _forbidden_views():
    x = torch.randn(4, 6, 3, requires_grad=True)
    with torch.no_grad():
        no_grad_view = x[0]
    y = x * 1
    with torch.inference_mode():
        inference_view = y[1:]
    return {
        "unbind": lambda: (x * 1).unbind(0)[1],
        "split": lambda: (x * 1).split(2)[1],
        "chunk": lambda: (x * 1).chunk(2, dim=1)[0],
        "slice of unbind": lambda: (x * 1).unbind(0)[0][1:],
        "custom Function": lambda: _Identity.apply(x * 1),
        "no_grad view of a leaf": lambda: no_grad_view,
        "inference view": lambda: inference_view,
        "leaf": lambda: x,
        "view of a leaf": lambda: x[1],
    }


_INPLACE = [
    (
        "dropout",
        lambda t: F.dropout(t, 0.5, True, True),
        lambda t: fastdrop.dropout(t, 0.5, True, True),
    ),
    (
        "alpha_dropout",
        lambda t: F.alpha_dropout(t, 0.5, True, True),
        lambda t: fastdrop.alpha_dropout(t, 0.5, True, True),
    ),
    (
        "dropout1d",
        lambda t: F.dropout1d(t, 0.5, True, True),
        lambda t: fastdrop.dropout1d(t, 0.5, True, True),
    ),
]


@pytest.mark.parametrize("kind", list(_forbidden_views()))
@pytest.mark.parametrize("name, theirs, ours", _INPLACE, ids=[c[0] for c in _INPLACE])
def test_in_place_on_a_view_torch_forbids_is_torchs_error_before_any_write(
    kind, name, theirs, ours
):
    with pytest.raises(RuntimeError) as want:
        theirs(_forbidden_views()[kind]())
    v = _forbidden_views()[kind]()
    before = v.detach().clone()
    with pytest.raises(RuntimeError) as got:
        ours(v)
    assert str(got.value) == str(want.value)
    assert torch.equal(v.detach(), before)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_in_place_on_an_inference_tensor_outside_inference_mode_writes_nothing(grad_mode):
    with torch.inference_mode():
        t = torch.randn(50)
    with pytest.raises(RuntimeError) as want, torch.set_grad_enabled(grad_mode):
        F.dropout(t, 0.5, True, True)
    with torch.inference_mode():
        t = torch.randn(50)
    before = t.clone()
    with torch.set_grad_enabled(grad_mode):
        for call in (fastdrop.dropout, fastdrop.alpha_dropout):
            with pytest.raises(RuntimeError) as got:
                call(t, 0.5, True, True)
            assert str(got.value) == str(want.value)
    assert torch.equal(t, before)
    with torch.inference_mode():  # inside inference mode it is allowed, as in torch
        assert fastdrop.dropout(t, 0.5, True, True) is t


def test_in_place_on_allowed_views_still_works_with_grads():
    x = torch.randn(4, 6, requires_grad=True)
    h = x * 1
    v = h[1:]
    g = fastdrop.Generator(3)
    y, mask = fastdrop.dropout(v, 0.5, True, True, generator=g, return_mask=True)
    assert y is v
    h.sum().backward()
    keep = torch.from_numpy(mask.numpy())
    want = torch.ones(4, 6)
    want[1:] = torch.where(keep, torch.tensor(2.0), torch.tensor(0.0))
    assert torch.equal(x.grad, want)


def test_complex_tensors_off_the_cpu_take_torchs_route_with_real_noise():
    # No GPU in CI: the meta device runs the same torch-ops route as CUDA, shapes and dtypes.
    x = torch.empty(2, 3, 4, 4, dtype=torch.complex64, device="meta")
    for call in (
        lambda t: fastdrop.alpha_dropout(t, 0.5, True),
        lambda t: fastdrop.dropout2d(t, 0.5),
        lambda t: fastdrop.dropout(t, 0.5, generator=fastdrop.Generator(1)),
    ):
        y = call(x)
        assert y.dtype == x.dtype and y.device == x.device and y.shape == x.shape


def test_a_compiled_call_on_a_complex_tensor_matches_eager():
    torch._dynamo.reset()
    c = _crandn(4, 6)
    f = torch.compile(lambda t: fastdrop.dropout(t, 0.5), backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    y = f(c)
    torch.manual_seed(0)
    assert torch.equal(y, fastdrop.dropout(c, 0.5))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_a_refused_jagged_tensor_leaves_no_symbolic_shape_in_the_spec_cache():
    jagged = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)
    for call in (lambda t: fastdrop.dropout(t, 0.5), lambda t: fastdrop.dropout2d(t, 0.5)):
        with pytest.raises(TypeError, match="nested tensor"):
            call(jagged)
    torch._dynamo.reset()
    f = torch.compile(lambda t: fastdrop.dropout(t, 0.5), backend="aot_eager", fullgraph=True)
    assert f(torch.randn(4, 6)).shape == (4, 6)


# --- in place: what torch refuses, and what it lets through ---------------------------------------

# Every in-place call on a torch tensor, with torch's (or timm's, torchvision's) own beside it.
_INPLACE_CALLS = [
    ("dropout", 3, F.dropout, fastdrop.dropout),
    ("alpha_dropout", 3, F.alpha_dropout, fastdrop.alpha_dropout),
    ("feature_alpha_dropout", 3, F.feature_alpha_dropout, fastdrop.feature_alpha_dropout),
    ("dropout1d", 3, F.dropout1d, fastdrop.dropout1d),
    ("dropout2d", 4, F.dropout2d, fastdrop.dropout2d),
    ("dropout3d", 5, F.dropout3d, fastdrop.dropout3d),
]


def _inplace(call):
    return lambda t, p=0.5, training=True: call(t, p, training, True)


def _error(call, x):
    try:
        call(x)
    except Exception as e:  # noqa: BLE001 - the class and words are what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize(
    "name, nd, torch_call, call", _INPLACE_CALLS, ids=[c[0] for c in _INPLACE_CALLS]
)
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_in_place_on_an_expanded_tensor_is_torchs_runtime_error_and_writes_nothing(
    name, nd, torch_call, call, p
):
    # Regression: fastdrop raised its NumPy ValueError ("zero stride") where torch raises a
    # RuntimeError from its internal-overlap check.
    base = torch.randn((1,) + (3,) * (nd - 1))
    want = _error(lambda t: _inplace(torch_call)(t, p), base.expand((2,) + (3,) * (nd - 1)))
    before = base.clone()
    got = _error(lambda t: _inplace(call)(t, p), base.expand((2,) + (3,) * (nd - 1)))
    assert want is not None and want[0] is RuntimeError
    assert got == want
    assert torch.equal(base, before)


def test_in_place_drop_blocks_on_an_expanded_tensor_are_runtime_errors():
    timm_layers = pytest.importorskip("timm.layers")
    x = torch.randn(1, 2, 6, 6).expand(3, 2, 6, 6)
    want = _error(lambda t: timm_layers.drop_block_2d(t, 0.2, 3, inplace=True), x)
    assert want is not None and want[0] is RuntimeError
    assert _error(lambda t: fastdrop.drop_block_2d(t, 0.2, 3, inplace=True), x) == want
    v = torch.randn(1, 2, 4, 4, 4).expand(3, 2, 4, 4, 4)
    assert _error(lambda t: fastdrop.drop_block_3d(t, 0.2, 3, inplace=True), v) == want


def test_in_place_drop_block_3d_refuses_an_inference_tensor_as_torchvision_does():
    # Regression: torchvision's form of DropBlock wrote into an inference tensor outside
    # inference mode, where torchvision's `mul_` raises.
    # torch raises it only after its kernel wrote (when it bumps the version counter);
    # fastdrop raises before.
    ops = pytest.importorskip("torchvision.ops")
    with torch.inference_mode():
        x = torch.randn(2, 3, 4, 4, 4)
        y = x.clone()
    want = _error(lambda t: ops.drop_block3d(t, 0.5, 3, inplace=True), y)
    assert want is not None and want[0] is RuntimeError
    before = x.clone()
    assert _error(lambda t: fastdrop.drop_block_3d(t, 0.5, 3, inplace=True), x) == want
    assert torch.equal(x, before)


def _kinds_that_refuse_in_place(shape):
    leaf = torch.randn(shape, requires_grad=True)
    with torch.inference_mode():
        inference = torch.randn(shape)
    return {"leaf": leaf, "view of a leaf": leaf.view(shape), "inference": inference}


@pytest.mark.filterwarnings("ignore:dropout[23]d. Received a")
@pytest.mark.parametrize(
    "name, nd, torch_call, call", _INPLACE_CALLS, ids=[c[0] for c in _INPLACE_CALLS]
)
@pytest.mark.parametrize("kind", ["leaf", "view of a leaf", "inference"])
def test_in_place_on_an_empty_tensor_returns_it_unchecked_as_torch_does(
    name, nd, torch_call, call, kind
):
    # Regression: fastdrop raised autograd's and inference mode's in-place errors on an empty
    # tensor, which torch returns before any check (there is nothing to write).
    shape = (0,) + (2,) * (nd - 1)
    want = _error(_inplace(torch_call), _kinds_that_refuse_in_place(shape)[kind])
    x = _kinds_that_refuse_in_place(shape)[kind]
    got = _error(_inplace(call), x)
    assert got == want
    if want is None:
        assert _inplace(call)(x) is x
        y, mask = call(x, 0.5, True, True, return_mask=True)
        assert y is x and mask.count_kept() == mask.numpy().size


@pytest.mark.filterwarnings("ignore:dropout3d. Received a")
@pytest.mark.parametrize(
    "name, shape, torch_call, call",
    [
        ("dropout1d (C, L)", (3, 4), F.dropout1d, fastdrop.dropout1d),
        ("dropout3d (C, D, H, W)", (2, 3, 4, 4), F.dropout3d, fastdrop.dropout3d),
        ("dropout3d 2-D", (3, 4), F.dropout3d, fastdrop.dropout3d),
        ("dropout3d empty", (0, 4), F.dropout3d, fastdrop.dropout3d),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.parametrize("kind", ["leaf", "view of a leaf", "inference"])
@pytest.mark.parametrize("p, training", [(0.5, False), (0.0, True), (0.5, True)])
def test_unbatched_in_place_channel_dropout_raises_what_torchs_unsqueeze_raises(
    name, shape, torch_call, call, kind, p, training
):
    # Regression: torch's dropout1d and dropout3d read an unbatched input through
    # `input.unsqueeze_(0)`, which raises autograd's in-place errors even when nothing is
    # dropped (training off, p = 0); fastdrop returned the input.
    want = _error(
        lambda t: torch_call(t, p, training, True), _kinds_that_refuse_in_place(shape)[kind]
    )
    assert want is not None and want[0] is RuntimeError
    x = _kinds_that_refuse_in_place(shape)[kind]
    assert _error(lambda t: call(t, p, training, True), x) == want


@pytest.mark.parametrize(
    "call, torch_call", [(fastdrop.dropout1d, F.dropout1d), (fastdrop.dropout3d, F.dropout3d)]
)
@pytest.mark.parametrize("training", [False, True])
def test_unbatched_in_place_channel_dropout_under_func_grad_raises_as_torch(
    call, torch_call, training
):
    # Regression: under torch.func.grad (whose input is a leaf that requires grad) fastdrop
    # skipped the check in evaluation and returned, where torch's unsqueeze_ raises.
    x = torch.randn(3, 4) if call is fastdrop.dropout1d else torch.randn(2, 3, 4, 4)

    def grad_of(f):
        return lambda t: torch.func.grad(lambda u: f(u, 0.5, training, True).sum())(t)

    want = _error(grad_of(torch_call), x)
    assert want is not None and want[0] is RuntimeError
    assert _error(grad_of(call), x) == want


def test_unbatched_in_place_channel_dropout_under_no_grad_is_allowed():
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        assert fastdrop.dropout1d(x, 0.5, False, True) is x
        assert F.dropout1d(x, 0.5, False, True) is x


@pytest.mark.parametrize(
    "name, nd, torch_call, call", _INPLACE_CALLS, ids=[c[0] for c in _INPLACE_CALLS]
)
def test_in_place_on_self_overlapping_elements_is_refused_where_torch_writes(
    name, nd, torch_call, call
):
    # A documented difference (README): torch writes shared elements more than once, in an
    # order its kernel picks; fastdrop refuses before writing.
    shape, strides = (2,) + (3,) * (nd - 1), (1,) * nd
    _inplace(torch_call)(torch.arange(1.0, 40.0).as_strided(shape, strides))  # no error
    storage = torch.arange(1.0, 40.0)
    x = storage.as_strided(shape, strides)
    with pytest.raises(ValueError, match="overlap"):
        _inplace(call)(x)
    assert torch.equal(storage, torch.arange(1.0, 40.0))
