"""fastdrop against torch (and timm) on what a drop-in user passes them: tensor kinds, dtypes,
shapes, argument types and signatures (issue 11, all but the autograd modes)."""

from __future__ import annotations

import warnings

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
