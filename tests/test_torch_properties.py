"""Property tests over torch tensors with hypothesis: every dtype torch's dropout takes (half,
bfloat16, float, double, complex), every kind of tensor a drop-in user passes (permuted, stepped,
expanded, channels-last, conjugate and negative views, leaves that require grad and views of
them, inference tensors, empty ones), in place or not, at the edges of p.

Invariants:
- the call raises when torch's (or timm's) raises, an exception of torch's class, and succeeds
  when torch's succeeds, but for the differences the README lists;
- the values are the formula's given the returned mask, and an out-of-place call leaves the
  input as it was;
- the gradient is the formula's given the mask;
- the fused adds (`dropout_add`, `drop_path_add`), which torch has no function for, give the
  formula's sum and both gradients.

`check_torch_call` is shared with `tests/fuzz_api.py`, which runs it for a time budget.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import fastdrop  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import timm.layers as _timm
except ImportError:  # timm's functions are then checked for values and gradients only
    _timm = None
try:
    import torchvision.ops as _tv  # timm's dependency
except ImportError:
    _tv = None

ALPHA = 1.7580993408473766
DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]
KINDS = [
    "contiguous",
    "permuted",
    "stepped",
    "expanded",
    "channels last",
    "conj",
    "neg view",
    "leaf",
    "view of a leaf",
    "inference",
]


def make_tensor(kind: str, dtype, shape: tuple, seed: int, perm: list, dim: int):
    """A fresh tensor of `kind` with the values of `seed`: each call builds a new one, so that
    torch's call and fastdrop's start from the same state."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(size, dtype=dtype, generator=g)

    nd = len(shape)
    if kind == "permuted" and nd > 1:
        return randn(*[shape[i] for i in perm]).permute(*[perm.index(i) for i in range(nd)])
    if kind == "stepped" and nd:
        return randn(*[2 * n for n in shape])[(slice(None, None, 2),) * nd]
    if kind == "expanded" and nd:
        one = list(shape)
        one[dim] = 1
        return randn(*one).expand(*shape)
    if kind == "channels last" and nd == 4:
        return randn(*shape).to(memory_format=torch.channels_last)
    if kind == "conj" and dtype.is_complex:
        return randn(*shape).conj()
    if kind == "neg view":
        return torch._neg_view(randn(*shape))
    if kind == "leaf":
        return randn(*shape).requires_grad_()
    if kind == "view of a leaf" and nd:
        return randn(*shape).requires_grad_()[(slice(None),) * nd]
    if kind == "inference":
        with torch.inference_mode():
            return randn(*shape)
    return randn(*shape)


@st.composite
def torch_inputs(draw, ranks: Callable[[int], bool]) -> Callable[[], Any]:
    """A maker of fresh tensors of one random kind, dtype and shape."""
    dtype = draw(st.sampled_from(DTYPES))
    nd = draw(st.integers(0, 5).filter(ranks) if draw(st.integers(0, 4)) else st.integers(0, 5))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=nd, max_size=nd)))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**31))
    perm = draw(st.permutations(range(nd)))
    dim = draw(st.integers(0, max(nd - 1, 0)))
    return lambda: make_tensor(kind, dtype, shape, seed, perm, dim)


# --- the functions, torch's beside them, and their maths --------------------------------------


def _timm_drop_path(x, p, training, inplace):
    return _timm.drop_path(x, p, training)


def _timm_drop_block(x, p, training, inplace):
    return _timm.drop_block_2d(x, p, 3, inplace=inplace)


def _tv_drop_block_3d(x, p, training, inplace):
    return _tv.drop_block3d(x, p, 3, inplace, training=training)


@dataclass
class Fn:
    name: str
    call: Callable
    theirs: Optional[Callable]
    ranks: Callable[[int], bool]
    inplace: bool = True
    alpha: bool = False
    # torch's errors are its API; timm's on bad input are accidents (an IndexError on a 0-d
    # tensor, a ZeroDivisionError on an empty one): there both must only raise.
    exact_errors: bool = True


def _plain(name):
    f = getattr(fastdrop, name)
    return lambda x, p, training, inplace, **kw: f(x, p, training, inplace, **kw)


FUNCTIONS = {
    f.name: f
    for f in [
        Fn("dropout", _plain("dropout"), F.dropout, lambda nd: True),
        Fn("alpha_dropout", _plain("alpha_dropout"), F.alpha_dropout, lambda nd: True, alpha=True),
        Fn(
            "feature_alpha_dropout",
            _plain("feature_alpha_dropout"),
            F.feature_alpha_dropout,
            lambda nd: nd >= 2,
            alpha=True,
        ),
        Fn("dropout1d", _plain("dropout1d"), F.dropout1d, lambda nd: nd in (2, 3)),
        Fn("dropout2d", _plain("dropout2d"), F.dropout2d, lambda nd: nd in (3, 4)),
        Fn("dropout3d", _plain("dropout3d"), F.dropout3d, lambda nd: nd in (4, 5)),
        Fn(
            "drop_path",
            lambda x, p, training, inplace, **kw: fastdrop.drop_path(x, p, training, **kw),
            _timm_drop_path if _timm else None,
            lambda nd: nd >= 1,
            inplace=False,
            exact_errors=False,
        ),
        Fn(
            "drop_block_2d",
            lambda x, p, training, inplace, **kw: fastdrop.drop_block_2d(
                x, p, 3, inplace=inplace, training=training, **kw
            ),
            _timm_drop_block if _timm else None,
            lambda nd: nd == 4,
            exact_errors=False,
        ),
        Fn(
            "drop_block_3d",
            lambda x, p, training, inplace, **kw: fastdrop.drop_block_3d(
                x, p, 3, inplace, training=training, **kw
            ),
            _tv_drop_block_3d if _tv else None,
            lambda nd: nd == 5,
            exact_errors=False,
        ),
    ]
}


def _not_compared(fn: Fn, x, p: float, training: bool) -> bool:
    """Calls whose outcome is fastdrop's own by design: the README's differences from timm."""
    if fn.name in ("drop_path", "drop_block_2d") and x.dtype.is_complex:
        return True  # timm's drop_path cannot; fastdrop's drop_block_2d refuses with a TypeError
    # timm's drop_block_2d has no `training` (its module does not call it in evaluation), runs
    # its ops even at p = 0 (its module does not call it then either), and divides by zero on
    # an empty input.
    if fn.name == "drop_block_3d":
        # torchvision's has no complex form, fails on an empty input, and refuses the even
        # block size that a small input clips 3 to (fastdrop takes even sizes).
        even = x.dim() == 5 and min([3, *x.shape[2:]]) % 2 == 0
        return x.dtype.is_complex or x.numel() == 0 or even
    return fn.name == "drop_block_2d" and (not training or p == 0.0 or x.numel() == 0)


def _outcome(call: Callable[[], Any]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings are test_parity's
        try:
            return call(), None
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            return None, e


def _op(dtype):
    """The type fastdrop computes in: float32 for half and bfloat16, the dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _real(dtype):
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _expected(fn: Fn, x, keep, scale: float, p: float):
    """Values of `fn` on `x` (resolved, detached) given the mask's keep bits and scale."""
    op, real = _op(x.dtype), _real(x.dtype)
    xs = x.to(op)
    if fn.alpha:
        if p == 1.0:
            return torch.zeros_like(x)
        a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
        kept = xs * torch.tensor(a, dtype=real) + torch.tensor(ALPHA * a * p, dtype=real)
        dropped = torch.tensor(-ALPHA * a * (1.0 - p), dtype=real).to(op)
        return torch.where(keep, kept, dropped).to(x.dtype)
    zero = torch.zeros((), dtype=op)
    return torch.where(keep, xs * torch.tensor(scale, dtype=real), zero).to(x.dtype)


def _grad_scale(fn: Fn, p: float, scale: float) -> float:
    if fn.alpha:
        return 0.0 if p == 1.0 else 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    return scale


def check_torch_call(data, name: Optional[str] = None) -> None:
    """One random call of one function on a torch tensor, with every invariant checked."""
    fn = FUNCTIONS[name or data.draw(st.sampled_from(sorted(FUNCTIONS)), "function")]
    make = data.draw(torch_inputs(fn.ranks), "input")
    p = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), "p")
    if fn.name == "drop_block_2d":
        p = p / 10  # gamma above 1 is test_parity's
    training = data.draw(st.booleans(), "training")
    inplace = fn.inplace and data.draw(st.booleans(), "inplace")
    seed = data.draw(st.integers(0, 2**64 - 1), "seed")
    x = make()
    theirs: tuple[Any, Optional[BaseException]] = (None, None)
    if fn.theirs is not None:
        theirs = _outcome(lambda: fn.theirs(make(), p, training, inplace))
    before = x.detach().resolve_conj().resolve_neg().clone()
    got, error = _outcome(
        lambda: fn.call(
            x, p, training, inplace, generator=fastdrop.Generator(seed), return_mask=True
        )
    )
    if fn.theirs is not None and not _not_compared(fn, x, p, training):
        their_error = theirs[1]
        if their_error is None:
            assert error is None, f"{fn.name} raised {error!r} where theirs ran"
        else:
            assert error is not None, f"{fn.name} ran where theirs raised {their_error!r}"
            if fn.exact_errors:
                assert isinstance(error, type(their_error)), (error, their_error)
    if error is not None:
        # A refusal writes nothing.
        assert torch.equal(x.detach().resolve_conj().resolve_neg(), before)
        return
    y, mask = got
    assert y.shape == x.shape and y.dtype == x.dtype
    if inplace:
        assert y is x
    else:
        assert torch.equal(x.detach().resolve_conj().resolve_neg(), before)
    keep = torch.from_numpy(mask.numpy()).expand(x.shape)
    active = training and p > 0.0 and x.numel() > 0
    if not active:
        assert bool(keep.all())
        assert torch.equal(y.detach().resolve_conj().resolve_neg(), before)
        return
    scale = mask.scale
    if fn.name not in ("drop_path", "drop_block_2d", "drop_block_3d"):
        scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    want = _expected(fn, before, keep, scale, p)
    assert torch.equal(y.detach().resolve_conj().resolve_neg(), want)
    if x.requires_grad and not inplace:
        g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
        (grad,) = torch.autograd.grad(y, x, g)
        op, real = _op(x.dtype), _real(x.dtype)
        factor = torch.tensor(_grad_scale(fn, p, scale), dtype=real)
        want_grad = torch.where(keep, g.to(op) * factor, torch.zeros((), dtype=op)).to(x.dtype)
        assert torch.equal(grad.resolve_conj().resolve_neg(), want_grad)


#: The fused adds: `residual + dropout(x)` and `x + drop_path(branch)`; no torch function to
#: compare errors with, so only the values and gradients.
FUSED = {
    "dropout_add": (
        lambda dropped, residual, p, training, **kw: fastdrop.dropout_add(
            dropped, residual, p, training, **kw
        ),
        lambda nd: True,
    ),
    "drop_path_add": (
        lambda dropped, residual, p, training, **kw: fastdrop.drop_path_add(
            residual, dropped, p, training, **kw
        ),
        lambda nd: nd >= 1,
    ),
}


def check_fused_call(data, name: str) -> None:
    """One random fused add on torch tensors: the sum as the formula gives it (the dropped
    term rounded to the dtype first, then added), and both gradients."""
    call, ranks = FUSED[name]
    make = data.draw(torch_inputs(ranks), "input")
    p = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), "p")
    training = data.draw(st.booleans(), "training")
    seed = data.draw(st.integers(0, 2**64 - 1), "seed")
    x = make()
    g = torch.Generator().manual_seed(3)
    residual = torch.randn(x.shape, dtype=x.dtype, generator=g)
    if data.draw(st.booleans(), "residual requires grad"):
        residual.requires_grad_()
    before = x.detach().resolve_conj().resolve_neg().clone()
    if name == "drop_path_add" and x.dim() == 0 and training and p > 0.0:
        # A 0-d input has no sample to drop (the inputs' other ranks are drawn sometimes too).
        with pytest.raises(fastdrop.ShapeError, match="batch dimension"):
            call(x, residual, p, training, generator=fastdrop.Generator(seed))
        return
    y, mask = call(x, residual, p, training, generator=fastdrop.Generator(seed), return_mask=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    keep = torch.from_numpy(mask.numpy()).expand(x.shape)
    scale = mask.scale if name == "drop_path_add" else (0.0 if p == 1.0 else 1.0 / (1.0 - p))
    if not (training and p > 0.0):
        scale = 1.0
    op, real = _op(x.dtype), _real(x.dtype)
    zero = torch.zeros((), dtype=op)
    dropped = torch.where(keep, before.to(op) * torch.tensor(scale, dtype=real), zero)
    want = residual.detach() + dropped.to(x.dtype)
    assert torch.equal(y.detach().resolve_conj().resolve_neg(), want)
    inputs = [t for t in (x, residual) if t.requires_grad]
    if inputs and y.requires_grad:
        go = torch.randn(x.shape, dtype=x.dtype, generator=g)
        grads = dict(zip(map(id, inputs), torch.autograd.grad(y, inputs, go)))
        if x.requires_grad:
            factor = torch.tensor(scale, dtype=real)
            want_x = torch.where(keep, go.to(op) * factor, zero).to(x.dtype)
            assert torch.equal(grads[id(x)].resolve_conj().resolve_neg(), want_x)
        if residual.requires_grad:
            assert torch.equal(grads[id(residual)], go)


def _key() -> fastdrop.Generator:
    return fastdrop.Generator(5)


#: The family members whose CPU path is not a mask spec run by the kernels (a mask or factor
#: decided outside them, torch's ops around it), which must read a tensor by its values
#: whatever its kind: (call(x, inplace), ranks, takes inplace). drop_block_3d read a negative
#: view's storage and crashed on a ZeroTensor; gaussian_dropout dropped complex imaginary parts.
FAMILY = {
    "stochastic_depth row": (
        lambda x, ip: fastdrop.stochastic_depth(x, 0.5, "row", generator=_key()),
        lambda nd: nd >= 1,
        False,
    ),
    "stochastic_depth batch": (
        lambda x, ip: fastdrop.stochastic_depth(x, 0.5, "batch", generator=_key()),
        lambda nd: True,
        False,
    ),
    "locked_dropout": (
        lambda x, ip: fastdrop.locked_dropout(x, 0.5, generator=_key()),
        lambda nd: nd >= 2,
        False,
    ),
    "embedding_dropout": (
        lambda x, ip: fastdrop.embedding_dropout(x, 0.5, generator=_key()),
        lambda nd: nd == 2,
        False,
    ),
    "gaussian_dropout": (
        lambda x, ip: fastdrop.gaussian_dropout(x, 0.5, True, ip, generator=_key()),
        lambda nd: True,
        True,
    ),
    "patch_dropout": (
        lambda x, ip: fastdrop.patch_dropout(x, 0.5, 1, generator=_key()),
        lambda nd: nd == 3,
        False,
    ),
    "drop_block_3d": (
        lambda x, ip: fastdrop.drop_block_3d(x, 0.5, 2, ip, generator=_key()),
        lambda nd: nd == 5,
        True,
    ),
    "noise_shape": (
        lambda x, ip: fastdrop.dropout(
            x, 0.5, True, ip, generator=_key(), noise_shape=(None,) + (1,) * (x.dim() - 1)
        ),
        lambda nd: nd >= 1,
        True,
    ),
}


def _values(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of t's values: the bits resolved, a ZeroTensor as zeros."""
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype)
    return t.detach().resolve_conj().resolve_neg().clone()


def check_family_call(data, name: str) -> None:
    """One family call on a random kind of tensor gives what it gives on a plain tensor of the
    same values (same key), writes through the view in place, and differentiates alike."""
    call, ranks, takes_inplace = FAMILY[name]
    x = data.draw(torch_inputs(ranks), "input")()
    inplace = takes_inplace and data.draw(st.booleans(), "inplace")
    plain = _values(x)
    want, error = _outcome(lambda: call(plain, False))
    if error is not None:
        return  # refused on plain values too: the rank and shape checks are test_family's
    want = want[0] if isinstance(want, tuple) else want
    got, error = _outcome(lambda: call(x, inplace))
    if error is not None:
        # Only in place, on what torch's in-place ops refuse too.
        assert inplace and isinstance(error, RuntimeError), error
        return
    y = got[0] if isinstance(got, tuple) else got
    assert torch.equal(_values(y), want)
    if inplace:
        assert y is x and torch.equal(_values(x), want)
    elif x.requires_grad:
        g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
        (grad,) = torch.autograd.grad(y, x, g)
        leaf = plain.clone().requires_grad_()
        (want_grad,) = torch.autograd.grad(call(leaf, False), leaf, g)
        assert torch.equal(_values(grad), want_grad)


PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@PROPERTY
@given(data=st.data())
def test_torch_calls_match_torch_and_the_formulas(name, data):
    check_torch_call(data, name)


@pytest.mark.parametrize("name", sorted(FUSED))
@PROPERTY
@given(data=st.data())
def test_fused_adds_on_torch_tensors_equal_the_formulas(name, data):
    check_fused_call(data, name)


@pytest.mark.parametrize("name", sorted(FAMILY))
@PROPERTY
@given(data=st.data())
def test_family_calls_read_every_tensor_kind_by_its_values(name, data):
    check_family_call(data, name)
