"""The dropout family as functions: NumPy arrays in, NumPy arrays out (torch tensors in, torch
tensors out).

Every variant is a *mask granularity* (element, channel, sample, block) and an *application*
(scale the kept elements, an affine map, or noise in the dropped ones). A function here checks
its arguments, works out those two things as a `_Spec`, and hands it to `_run`, which picks the
path for the input's type. The arithmetic lives in Rust (`fastdrop._core`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Optional

import numpy as np

from . import _core
from ._dispatch import is_torch_tensor
from ._mask import Mask

__all__ = [
    "dropout",
    "alpha_dropout",
    "feature_alpha_dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "drop_path",
    "drop_block_2d",
    "dropout_add",
    "drop_path_add",
]

#: SELU's alpha * scale... torch's constant for alpha dropout (ATen Dropout.cpp).
ALPHA = 1.7580993408473766

default_generator = _core.Generator()


class ShapeError(ValueError, RuntimeError):
    """A wrong number of dimensions. A ValueError, and a RuntimeError as torch raises it."""


class _Spec:
    """What a call does: its mask shape, application, keep probability and backward scale, or
    the parameters of a block mask (``block`` is not None). ``args`` keeps a block call's own
    arguments: torch's path for tensors off the CPU hands them to timm's algorithm unchanged.
    Specs are never mutated, so the common ones are cached per (mask shape, p)."""

    __slots__ = ("mask_shape", "application", "keep", "grad_scale", "block", "args")

    def __init__(self, mask_shape, application, keep, grad_scale, block=None, args=None):
        self.mask_shape = mask_shape
        self.application = application
        self.keep = keep
        self.grad_scale = grad_scale
        self.block = block
        self.args = args


# --- argument checks --------------------------------------------------------------------------


def _check_prob(p: Any, name: str = "dropout probability") -> float:
    if type(p) is float and 0.0 <= p <= 1.0:
        # The common case, without the ABC isinstance below (half a microsecond a call).
        return p
    if is_torch_tensor(p):
        # torch's functions and modules take a 0-d tensor as p (and refuse one that needs grad).
        if p.ndim != 0 or p.requires_grad or p.is_complex():
            what = "a tensor that requires grad" if p.requires_grad else f"a {p.ndim}-d tensor"
            raise TypeError(
                f"{name} must be a real number or a 0-d real tensor that does not require "
                f"grad, got {what}"
            )
        p = p.item()
    if isinstance(p, (str, bytes)) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"{name} has to be between 0 and 1, but got {p}")
    return p


def _check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


_NATIVE_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def _as_array(x: Any, name: str = "input") -> np.ndarray:
    """The NumPy view of `x`: an ndarray as is, another CPU DLPack producer through DLPack."""
    if type(x) is np.ndarray and x.dtype in _NATIVE_FLOATS:
        return x  # the common case, in one set lookup
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__dlpack__") and not isinstance(x, np.generic):
            try:
                x = np.from_dlpack(x)
            except (BufferError, TypeError, RuntimeError, ValueError) as e:
                raise TypeError(f"{name}: cannot read this DLPack object on the CPU ({e})") from e
        else:
            raise TypeError(
                f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}"
            )
    if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got dtype {x.dtype}")
    if not x.dtype.isnative:
        raise TypeError(
            f"{name} has non-native byte order ({x.dtype.str}); convert it with "
            f"x.astype(x.dtype.newbyteorder('='))"
        )
    return x


def _resolve_generator(generator: Any) -> _core.Generator:
    """A fastdrop Generator for a NumPy call."""
    if generator is None:
        return default_generator
    if isinstance(generator, _core.Generator):
        return generator
    if isinstance(generator, np.random.Generator):
        # One 64-bit draw keys this call, so the NumPy generator's own stream stays the source.
        return _core.Generator(int(generator.bit_generator.random_raw()))
    raise TypeError(
        "generator must be a fastdrop.Generator, a numpy.random.Generator (for NumPy input) or "
        f"a torch.Generator (for torch input), got {type(generator).__name__}"
    )


def _torch_module():
    """`fastdrop._torch`, imported on first use (it imports torch); cached, as an import
    statement costs a microsecond a call."""
    global _TORCH, _TENSOR
    if _TORCH is None:
        from . import _torch

        _TORCH = _torch
        _TENSOR = _torch.torch.Tensor
    return _TORCH


_TORCH: Any = None
#: `torch.Tensor` once `fastdrop._torch` is loaded (by the first tensor seen); until then a
#: class nothing is an instance of, so `type(x) is _TENSOR` is a one-step test either way.
_TENSOR: Any = type("_NoTensorYet", (), {})


# --- the one path every variant takes ---------------------------------------------------------


def _run(
    x: Any,
    spec: Optional[_Spec],
    inplace: bool,
    generator: Any,
    return_mask: bool,
    residual: Any = None,
    out: Any = None,
    kept_shape: Optional[tuple] = None,
):
    """Applies `spec` to `x` (plus `residual`), or returns `x` untouched when `spec` is None;
    into `out` when given (NumPy only). An untouched call's mask keeps everything and has the
    variant's mask shape, `kept_shape` (default: the input's)."""
    if is_torch_tensor(x) or (residual is not None and is_torch_tensor(residual)):
        if out is not None:
            raise TypeError(
                "out= takes a NumPy array and is not supported for torch tensors, as torch's "
                "dropout has none; use inplace=True or the returned tensor"
            )
        return _torch_module().run(x, spec, inplace, generator, return_mask, residual, kept_shape)
    a = _as_array(x)
    r = None if residual is None else _as_array(residual, "residual")
    if r is not None and (r.shape != a.shape or r.dtype != a.dtype):
        raise ValueError(
            f"residual must match the input: got {r.shape} {r.dtype} for input {a.shape} {a.dtype}"
        )
    if out is not None:
        _check_out(out, a, inplace)
    gen = _resolve_generator(generator)
    if spec is None:
        if out is not None:
            if r is None:
                np.copyto(out, a)
            else:
                np.add(a, r, out=out)
            result = out
        else:
            result = a if r is None else a + r
        if not return_mask:
            return result
        return result, Mask._full(a.shape, kept_shape or a.shape, True, 1.0)
    if inplace and not a.flags.writeable:
        raise ValueError("inplace=True needs a writeable array, but the input is read-only")
    if out is None:
        # _core.empty_like is np.empty_like, with large outputs reused from freed ones.
        out = a if inplace else _core.empty_like(a if r is None else r)
    mask = _apply(a, out, r, spec, gen, return_mask, a.shape)
    return (out, mask) if return_mask else out


def _check_out(out: Any, a: np.ndarray, inplace: bool) -> None:
    """`out=` must be a writeable array of the input's shape and dtype, and not with inplace."""
    if inplace:
        raise ValueError("pass either inplace=True or out=, not both")
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != a.shape or out.dtype != a.dtype:
        raise ValueError(
            f"out must have the input's shape and dtype {a.shape} {a.dtype}, got "
            f"{out.shape} {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")


def _apply(
    a: Any,
    out: Any,
    r: Any,
    spec: _Spec,
    gen: _core.Generator,
    want_mask: Any,
    shape: tuple[int, ...],
) -> Optional[Mask]:
    """Runs `spec` from `a` (plus `r`) into `out` (which may be `a`) in Rust. The operands are
    NumPy arrays or CPU DLPack capsules (torch tensors), of `shape`. The mask is returned when
    wanted (block masks always: they carry their scale); `want_mask="key"` returns it as its key
    alone, holding no bits (autograd's backward redraws them)."""
    if spec.block is not None:
        bits, scale = _core.drop_block_apply(a, out, *spec.block, gen)
        return Mask(bits, scale if spec.grad_scale is None else spec.grad_scale, shape)
    if want_mask == "key":
        seed, stream, _ = gen.get_state()
        first = _core.bernoulli_apply(
            a, out, r, spec.mask_shape, spec.application, spec.keep, gen, False
        )
        key = (seed, stream, first)
        return Mask._from_key(key, tuple(spec.mask_shape), spec.keep, spec.grad_scale, shape)
    bits = _core.bernoulli_apply(
        a, out, r, spec.mask_shape, spec.application, spec.keep, gen, want_mask
    )
    return Mask(bits, spec.grad_scale, shape) if want_mask else None


# --- the variants -----------------------------------------------------------------------------


def _ndim(x: Any) -> int:
    """The rank of an array or tensor; -1 for anything else (a NumPy scalar or a memoryview has a
    shape but is not an input), so the caller raises a TypeError rather than a ShapeError."""
    if isinstance(x, np.generic) or not (isinstance(x, np.ndarray) or hasattr(x, "__dlpack__")):
        return -1
    _check_subclass_kind(x)
    try:
        return len(x.shape) if hasattr(x, "shape") else -1
    except RuntimeError:
        if is_torch_tensor(x):
            _torch_module()._check_kind(x)  # a nested tensor has no shape: a TypeError saying so
        raise


def _check_subclass_kind(x: Any) -> None:
    """A jagged nested tensor (a tensor subclass) has a symbolic shape, which must not reach the
    spec cache: refuse it (and other subclasses fastdrop cannot read) before its shape is read."""
    if type(x) is not np.ndarray and type(x) is not _TENSOR and is_torch_tensor(x):
        _torch_module()._check_kind(x)


def _shape(x: Any) -> tuple:
    """The shape of an input (of anything else: (), and `_run` raises its TypeError)."""
    _check_subclass_kind(x)
    try:
        return getattr(x, "shape", ())
    except RuntimeError:
        if is_torch_tensor(x):
            _torch_module()._check_kind(x)  # a nested tensor has no shape: a TypeError saying so
        raise


_SPECS: dict = {}


def _cached(build):
    """Caches a spec builder per arguments (specs are never mutated). A plain bounded dict
    rather than functools.lru_cache, which torch.compile warns about when it traces a call."""

    def cached(mask_shape: tuple, p: float) -> _Spec:
        key = (build, mask_shape, p)
        spec = _SPECS.get(key)
        if spec is None:
            spec = build(mask_shape, p)
            if len(_SPECS) < 1024:
                _SPECS[key] = spec
        return spec

    return cached


@_cached
def _scale_spec(mask_shape: tuple, p: float) -> _Spec:
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return _Spec(mask_shape, ("scale", scale), 1.0 - p, scale)


def dropout(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """Zeroes each element with probability ``p`` and scales the rest by ``1 / (1 - p)``.

    ``torch.nn.functional.dropout``'s maths: a kept element becomes ``x * s`` with
    ``s = 1 / (1 - p)`` rounded to the element's compute type (float32 for float16), a dropped
    one 0. ``p == 0`` or ``training=False`` returns ``input`` itself; ``p == 1`` gives zeros.

    Args:
        input: a float16/float32/float64 NumPy array (any shape and strides) or torch tensor
            (also bfloat16, complex64 and complex128: one decision per complex element).
        p: probability of an element being zeroed, in [0, 1].
        training: apply dropout if True, else return ``input``.
        inplace: write into ``input`` and return it.
        generator: a ``fastdrop.Generator`` (default: ``fastdrop.default_generator``), a
            ``numpy.random.Generator`` or, for torch input, a ``torch.Generator``.
        return_mask: also return the ``Mask`` (for ``mask.backward(grad)``).
        out: a preallocated NumPy array of the input's shape and dtype to write the result
            into (and return); every function takes it. Not for torch tensors.

    Returns:
        The result (same shape and dtype), or ``(result, mask)`` with ``return_mask=True``.
    """
    if (
        type(p) is float
        and 0.0 < p < 1.0
        and training is True
        and inplace is False
        and return_mask is False
        and out is None
    ):
        # The most common call, with defaults, goes straight to the kernel: the same spec,
        # output and generator as the general path below, without its checks and dispatch,
        # which cost more than the kernel on small arrays.
        if (
            type(input) is np.ndarray
            and input.dtype in _NATIVE_FLOATS
            and (generator is None or type(generator) is _core.Generator)
        ):
            # _apply's element-mask call, made directly: one Python frame is 8 % of this path.
            spec = _scale_spec(input.shape, p)
            result = _core.empty_like(input)
            gen = default_generator if generator is None else generator
            _core.bernoulli_apply(
                input, result, None, spec.mask_shape, spec.application, spec.keep, gen, False
            )
            return result
        if type(input) is _TENSOR and generator is None:
            # The same for a torch tensor (once fastdrop's torch side is loaded).
            try:
                return _TORCH.dropout_plain(input, p)
            except RuntimeError:
                _TORCH._check_kind(input)  # a sparse or nested tensor: a TypeError that says so
                raise
    p = _check_prob(p)
    if not _check_bool(training, "training") or p == 0.0:
        return _run(input, None, inplace, generator, return_mask, out=out)
    return _run(
        input,
        _scale_spec(_shape(input), p),
        _check_bool(inplace, "inplace"),
        generator,
        return_mask,
        out=out,
    )


@_cached
def _alpha_spec(mask_shape: tuple, p: float) -> _Spec:
    if p == 1.0:
        return _Spec(mask_shape, ("scale", 0.0), 0.0, 0.0)
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    return _Spec(mask_shape, ("affine", a, ALPHA * a * p, -ALPHA * a * (1.0 - p)), 1.0 - p, a)


def alpha_dropout(
    input: Any,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """Alpha dropout (for SELU networks): keeps zero mean and unit variance.

    With ``alpha = 1.7580993408473766`` and ``a = 1 / sqrt((alpha^2 p + 1)(1 - p))``, a kept
    element becomes ``a * x + alpha * a * p`` and a dropped one ``-alpha * a * (1 - p)``.
    Evaluation mode by default, as in torch. ``p == 1`` gives zeros, as torch does.
    """
    p = _check_prob(p)
    if not _check_bool(training, "training") or p == 0.0:
        return _run(input, None, inplace, generator, return_mask, out=out)
    return _run(
        input,
        _alpha_spec(_shape(input), p),
        _check_bool(inplace, "inplace"),
        generator,
        return_mask,
        out=out,
    )


def _rank(input: Any) -> int:
    nd = _ndim(input)
    if nd < 0:
        raise TypeError(
            f"input must be a numpy.ndarray or a torch.Tensor, got {type(input).__name__}"
        )
    return nd


def _strict_channel_mask_shape(name: str, spatial: int, nd: int, shape: tuple) -> tuple[int, ...]:
    """The (N, C, 1, ...) mask shape of channel dropout over `spatial` dimensions, or (C, 1, ...)
    for an unbatched input, for the ranks torch documents; any other rank is a ShapeError in
    torch's words."""
    if nd not in (spatial + 1, spatial + 2):
        dims = "dimension" if spatial == 1 else "dimensions"
        ranks = f"{spatial + 1}D or {spatial + 2}D"
        raise ShapeError(
            f"{name}: Expected {ranks} input, but received a {nd}D input. {name} exists to "
            f"provide channel-wise dropout on inputs with {spatial} spatial {dims}, a channel "
            f"dimension, and an optional batch dimension (i.e. {ranks} inputs)."
        )
    if nd == spatial + 1:
        return (shape[0],) + (1,) * (nd - 1)
    return (shape[0], shape[1]) + (1,) * (nd - 2)


#: torch's warnings, word for word (torch.nn.functional.dropout2d / dropout3d).
_DEPRECATED_RANK = (
    "{name}: Received a {nd}-D input to {name}, which is deprecated and will result in an error "
    "in a future release. To retain the behavior and silence this warning, please use dropout "
    "instead. Note that {name} exists to provide channel-wise dropout on inputs with {spatial} "
    "spatial dimensions, a channel dimension, and an optional batch dimension (i.e. {lo}D or "
    "{hi}D inputs)."
)
_DROPOUT2D_3D_AS_1D = (
    "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout "
    "behavior is desired - input is interpreted as shape (N, C, L), where C is the channel dim. "
    "This behavior will change in a future release to interpret the input as one without a batch "
    "dimension, i.e. shape (C, H, W). To maintain the 1D channel-wise dropout behavior, please "
    "switch to using dropout1d instead."
)


def _torch_channel_mask_shape(name: str, spatial: int, nd: int, shape: tuple):
    """The mask shape torch's dropout2d/dropout3d read today, with torch's warnings: dropout2d
    reads every rank as batched (N, C, ...), a 3-D input as (N, C, L); dropout3d reads every rank
    but 5 as unbatched (C, ...). None where that reading has no channel dimension (torch then
    returns the input untouched, zeros for p = 1, and raises otherwise)."""
    lo, hi = spatial + 1, spatial + 2
    if nd not in (lo, hi):
        msg = _DEPRECATED_RANK.format(name=name, nd=nd, spatial=spatial, lo=lo, hi=hi)
        warnings.warn(msg, UserWarning, stacklevel=4)
    if spatial == 2 and nd == 3:
        warnings.warn(_DROPOUT2D_3D_AS_1D, UserWarning, stacklevel=4)
    batched = spatial == 2 or nd == hi
    if nd < (2 if batched else 1):
        return None
    if batched:
        return (shape[0], shape[1]) + (1,) * (nd - 2)
    return (shape[0],) + (1,) * (nd - 1)


def _feature(
    name, input, nd, mask_shape, spec_for, p, training, inplace, generator, return_mask, out
):
    """Runs a feature (channel) variant with `mask_shape`, or, where the input has no channel
    dimension (`mask_shape` None), does what torch's feature dropout does: returns the input when
    nothing would be dropped (training off, p = 0, no elements), zeros for p = 1, and raises
    otherwise."""
    training = _check_bool(training, "training")
    if mask_shape is None:
        shape = tuple(input.shape)
        if training and p != 0.0 and p != 1.0 and math.prod(shape) != 0:
            raise ShapeError(
                f"{name}: Feature dropout requires at least 2 dimensions in the input, but "
                f"received a {nd}D input"
            )
        mask_shape = shape
    if not training or p == 0.0:
        return _run(input, None, inplace, generator, return_mask, out=out, kept_shape=mask_shape)
    return _run(
        input,
        spec_for(mask_shape, p),
        _check_bool(inplace, "inplace"),
        generator,
        return_mask,
        out=out,
    )


def _channel(spatial: int, input, p, training, inplace, generator, return_mask, out, strict):
    """dropout1d/2d/3d: one decision per (sample, channel) over `spatial` dimensions."""
    p = _check_prob(p)
    name = f"dropout{spatial}d"
    nd = _rank(input)
    shape = tuple(input.shape)
    if strict or spatial == 1:  # torch's dropout1d takes only the ranks it documents
        mask_shape = _strict_channel_mask_shape(name, spatial, nd, shape)
    else:
        mask_shape = _torch_channel_mask_shape(name, spatial, nd, shape)
    return _feature(
        name, input, nd, mask_shape, _scale_spec, p, training, inplace, generator, return_mask, out
    )


def dropout1d(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """Zeroes whole channels of an (N, C, L) or unbatched (C, L) input with probability ``p``
    and scales the rest by ``1 / (1 - p)``. The mask has shape (N, C, 1): N*C bits. Any other
    rank is a ``ShapeError`` (a ValueError and a RuntimeError), as in torch."""
    return _channel(1, input, p, training, inplace, generator, return_mask, out, True)


def dropout2d(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
    strict_shapes: bool = False,
):
    """Zeroes whole channels of an (N, C, H, W) input with probability ``p`` and scales the rest
    by ``1 / (1 - p)``: one decision per (sample, channel), mask shape (N, C, 1, 1).

    Shapes are read as torch reads them today, with torch's warnings: a 3-D input is (N, C, L)
    (a ``UserWarning``), and any other rank is (N, C, ...) with a ``UserWarning`` that it is
    deprecated (a 0-D or 1-D input, which has no channel, is returned untouched when nothing
    would be dropped, zeroed for ``p == 1``, and otherwise a ``ShapeError``).

    ``strict_shapes=True`` takes the reading torch documents and announces instead: a 3-D input
    is unbatched (C, H, W), and any rank but 3 or 4 is a ``ShapeError`` (a ValueError and a
    RuntimeError); no warnings.
    """
    strict = _check_bool(strict_shapes, "strict_shapes")
    return _channel(2, input, p, training, inplace, generator, return_mask, out, strict)


def dropout3d(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
    strict_shapes: bool = False,
):
    """Zeroes whole channels of an (N, C, D, H, W) or unbatched (C, D, H, W) input with
    probability ``p`` and scales the rest by ``1 / (1 - p)``.

    As torch today, any rank but 5 is read as unbatched (C, ...), with a deprecation
    ``UserWarning`` for ranks other than 4 (a 0-D input, which has no channel, is returned
    untouched when nothing would be dropped, zeroed for ``p == 1``, and otherwise a
    ``ShapeError``). ``strict_shapes=True`` makes any rank but 4 or 5 a ``ShapeError``, with no
    warnings.
    """
    strict = _check_bool(strict_shapes, "strict_shapes")
    return _channel(3, input, p, training, inplace, generator, return_mask, out, strict)


def feature_alpha_dropout(
    input: Any,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """Alpha dropout with one decision per (sample, channel): mask shape (N, C, 1, ..., 1).
    Evaluation mode by default, as in torch. As in torch, a 0-D or 1-D input (no channel) is
    returned untouched when nothing would be dropped (``training=False``, ``p == 0``, no
    elements), zeroed for ``p == 1``, and otherwise a ``ShapeError``."""
    p = _check_prob(p)
    nd = _rank(input)
    shape = tuple(input.shape)
    mask_shape = (shape[0], shape[1]) + (1,) * (nd - 2) if nd >= 2 else None
    return _feature(
        "feature_alpha_dropout",
        input,
        nd,
        mask_shape,
        _alpha_spec,
        p,
        training,
        inplace,
        generator,
        return_mask,
        out,
    )


def _path_spec(x: Any, drop_prob: float, scale_by_keep: bool) -> _Spec:
    nd = _ndim(x)
    if nd < 1:
        if nd < 0:
            raise TypeError(
                f"input must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}"
            )
        raise ShapeError("drop_path: Expected an input with a batch dimension, got a 0D input")
    keep = 1.0 - drop_prob
    scale = 1.0 / keep if (keep > 0.0 and scale_by_keep) else 1.0
    return _Spec((int(x.shape[0]),) + (1,) * (nd - 1), ("scale", scale), keep, scale)


def drop_path(
    x: Any,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """Stochastic depth (timm's ``drop_path``): drops whole samples with probability
    ``drop_prob`` (one decision per sample, mask shape (N, 1, ..., 1)) and divides the kept ones
    by ``1 - drop_prob`` when ``scale_by_keep``. Evaluation mode by default, as in timm."""
    drop_prob = _check_prob(drop_prob, "drop_prob")
    scale_by_keep = _check_bool(scale_by_keep, "scale_by_keep")
    spec = _path_spec(x, drop_prob, scale_by_keep)
    if not _check_bool(training, "training") or drop_prob == 0.0:
        return _run(x, None, False, generator, return_mask, out=out, kept_shape=spec.mask_shape)
    return _run(x, spec, False, generator, return_mask, out=out)


def drop_block_2d(
    x: Any,
    drop_prob: float = 0.1,
    block_size: int = 7,
    gamma_scale: float = 1.0,
    with_noise: bool = False,
    inplace: bool = False,
    couple_channels: bool = True,
    scale_by_keep: bool = True,
    *,
    training: bool = True,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """DropBlock (timm's ``drop_block_2d``) on an (N, C, H, W) input.

    Block seeds are Bernoulli(gamma) at every position of an (N, 1, H, W) map (or (N, C, H, W)
    with ``couple_channels=False``), ``gamma = gamma_scale * drop_prob * H * W / (kh * kw) /
    ((H - kh + 1) * (W - kw + 1))`` with ``kh = min(block_size, H)``, ``kw = min(block_size,
    W)``. A seed at (r, c) drops rows ``r - kh//2 .. r - kh//2 + kh - 1`` and the columns alike,
    clipped at the borders (timm's placement for odd and even sizes). Dropped pixels become 0,
    or N(0, 1) noise with ``with_noise``; otherwise kept pixels are scaled by
    ``mask.numel / kept`` when ``scale_by_keep``.
    """
    drop_prob = _check_prob(drop_prob, "drop_prob")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if not isinstance(gamma_scale, numbers.Real) or isinstance(gamma_scale, bool):
        raise TypeError(f"gamma_scale must be a real number, got {type(gamma_scale).__name__}")
    if not (float(gamma_scale) >= 0.0 and math.isfinite(gamma_scale)):
        raise ValueError(f"gamma_scale must be finite and non-negative, got {gamma_scale}")
    with_noise = _check_bool(with_noise, "with_noise")
    couple_channels = _check_bool(couple_channels, "couple_channels")
    scale_by_keep = _check_bool(scale_by_keep, "scale_by_keep")
    nd = _ndim(x)
    if nd < 0:
        raise TypeError(f"input must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")
    if nd != 4:
        raise ShapeError(
            f"drop_block_2d: Expected 4D (N, C, H, W) input, but received a {nd}D input"
        )
    n, c, h, w = (int(s) for s in x.shape)
    if not _check_bool(training, "training") or drop_prob == 0.0 or n * c * h * w == 0:
        kept = (n, 1 if couple_channels else c, h, w)
        return _run(x, None, inplace, generator, return_mask, out=out, kept_shape=kept)
    kh, kw = min(block_size, h), min(block_size, w)
    gamma = float(gamma_scale) * drop_prob * h * w / (kh * kw) / ((h - kh + 1) * (w - kw + 1))
    if gamma > 1.0:
        raise ValueError(
            f"drop_block_2d: gamma_scale * drop_prob gives a block seed rate of {gamma:.4g} "
            f"for {h}x{w} maps and {kh}x{kw} blocks; it must be at most 1"
        )
    spec = _Spec(
        (n, 1 if couple_channels else c, h, w),
        None,
        None,
        1.0 if with_noise else None,
        block=(gamma, kh, kw, couple_channels, with_noise, scale_by_keep),
        args=dict(
            drop_prob=drop_prob,
            block_size=int(block_size),
            gamma_scale=float(gamma_scale),
            with_noise=with_noise,
            couple_channels=couple_channels,
            scale_by_keep=scale_by_keep,
        ),
    )
    return _run(x, spec, _check_bool(inplace, "inplace"), generator, return_mask, out=out)


def dropout_add(
    input: Any,
    residual: Any,
    p: float = 0.5,
    training: bool = True,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """``residual + dropout(input, p, training)`` in one pass over memory, with the mask the
    unfused ``dropout`` call would draw from the same generator state, and its exact values."""
    p = _check_prob(p)
    if not _check_bool(training, "training") or p == 0.0:
        return _run(input, None, False, generator, return_mask, residual, out=out)
    return _run(
        input,
        _scale_spec(_shape(input), p),
        False,
        generator,
        return_mask,
        residual,
        out=out,
    )


def drop_path_add(
    x: Any,
    branch: Any,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """``x + drop_path(branch, ...)`` in one pass; a dropped sample's branch is never read."""
    drop_prob = _check_prob(drop_prob, "drop_prob")
    scale_by_keep = _check_bool(scale_by_keep, "scale_by_keep")
    spec = _path_spec(branch, drop_prob, scale_by_keep)
    if not _check_bool(training, "training") or drop_prob == 0.0:
        return _run(
            branch, None, False, generator, return_mask, x, out=out, kept_shape=spec.mask_shape
        )
    return _run(branch, spec, False, generator, return_mask, x, out=out)
