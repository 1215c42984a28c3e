"""fastdrop against torch (and timm) on what a drop-in user passes them: tensor kinds, dtypes,
shapes, argument types and signatures (issue 11, all but the autograd modes)."""

from __future__ import annotations

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
