"""The dropout family as functions: NumPy arrays in, NumPy arrays out (torch tensors in, torch
tensors out). The public functions live here and only here.

Every variant is a *mask granularity* (element, channel, sample, block) and an *application*
(scale the kept elements, an affine map, or noise in the dropped ones). A function here checks
its arguments, describes its call as one `_spec.Spec` (mask and application, typed) and hands it
to the one dispatcher, `_dispatch.run`, which picks the path for the input's type (a call that
drops nothing hands it None). The arithmetic lives in Rust (`fastdrop._core`, reached through
`_core_call.apply`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Optional

import numpy as np

from . import _core, _dispatch, _keyed
from ._checks import NATIVE_FLOATS as _NATIVE_FLOATS
from ._checks import ShapeError, is_torch_tensor
from ._checks import as_array as _as_array
from ._checks import check_bool as _check_bool
from ._checks import check_int as _check_int
from ._checks import check_prob as _check_prob
from ._core_call import apply as _core_apply
from ._dispatch import check_out as _check_out
from ._dispatch import default_generator
from ._dispatch import resolve_generator as _resolve_generator
from ._dispatch import run as _run
from ._spec import Affine, Bernoulli, Blocks, Noise, Scale, ScaleByKept, Spec

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
            _dispatch.torch_module()._check_kind(
                x
            )  # a nested tensor has no shape: a TypeError saying so
        raise


def _check_subclass_kind(x: Any) -> None:
    """A jagged nested tensor (a tensor subclass) has a symbolic shape, which must not reach the
    spec cache: refuse it (and other subclasses fastdrop cannot read) before its shape is read."""
    if type(x) is not np.ndarray and type(x) is not _dispatch.TENSOR and is_torch_tensor(x):
        _dispatch.torch_module()._check_kind(x)


def _shape(x: Any) -> tuple:
    """The shape of an input (of anything else: (), and `_run` raises its TypeError)."""
    _check_subclass_kind(x)
    try:
        return getattr(x, "shape", ())
    except RuntimeError:
        if is_torch_tensor(x):
            _dispatch.torch_module()._check_kind(
                x
            )  # a nested tensor has no shape: a TypeError saying so
        raise


_SPECS: dict = {}


def _cached(build):
    """Caches a spec builder of (mask shape, p) per arguments (specs are never mutated). A plain
    bounded dict rather than functools.lru_cache, which torch.compile warns about when it
    traces a call."""

    def cached(mask_shape: tuple, p: float) -> Spec:
        key = (build, mask_shape, p)
        spec = _SPECS.get(key)
        if spec is None:
            spec = build(mask_shape, p)
            if len(_SPECS) < 1024:
                _SPECS[key] = spec
        return spec

    return cached


def _cached_args(build):
    """`_cached` for a builder of more arguments (a tuple more to make per call)."""

    def cached(*args: Any) -> Spec:
        key = (build, args)
        spec = _SPECS.get(key)
        if spec is None:
            spec = build(*args)
            if len(_SPECS) < 1024:
                _SPECS[key] = spec
        return spec

    return cached


@_cached
def _scale_spec(mask_shape: tuple, p: float) -> Spec:
    """Dropout's spec: kept elements scaled by ``1 / (1 - p)`` (by 0 for p = 1)."""
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return Spec(Bernoulli(mask_shape, 1.0 - p), Scale(scale), scale)


def dropout(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
    noise_shape: Any = None,
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
        noise_shape: the mask's shape, as Keras's ``noise_shape``: a tuple of the input's rank
            whose entries are 1 (one decision shared along that dimension), the dimension's
            size or None (a decision per index). ``(N, 1, 1, C)`` on an (N, H, W, C) input is
            channels-last spatial dropout.

    Returns:
        The result (same shape and dtype), or ``(result, mask)`` with ``return_mask=True``.
    """
    if (
        type(p) is float
        and 0.0 < p < 1.0
        and training is True
        and inplace is False
        and return_mask is False
        and noise_shape is None
    ):
        # The most common call, with defaults (or only out=), goes straight to the kernel: the
        # same spec, output and generator as the general path below, without its checks and
        # dispatch, which cost more than the kernel on small arrays.
        if (
            type(input) is np.ndarray
            and input.dtype in _NATIVE_FLOATS
            and (generator is None or type(generator) is _core.Generator)
        ):
            # The dispatcher's NumPy call, made directly: one Python frame is 8 % of this path.
            if out is None:
                result = _core.empty_like(input)
            else:
                _check_out(out, input, False)
                result = out
            gen = default_generator if generator is None else generator
            _core_apply(input, result, None, _scale_spec(input.shape, p), gen, False)
            return result
        if type(input) is _dispatch.TENSOR and generator is None and out is None:
            # The same for a torch tensor (once fastdrop's torch side is loaded).
            torch_side = _dispatch._TORCH
            try:
                return torch_side.run_plain(input, _scale_spec(input.shape, p))
            except RuntimeError:
                torch_side._check_kind(input)  # a sparse or nested tensor: a TypeError saying so
                raise
    p = _check_prob(p)
    mask_shape = _noise_mask_shape(input, noise_shape)
    if not _check_bool(training, "training") or p == 0.0:
        return _run(input, None, inplace, generator, return_mask, out=out, kept_shape=mask_shape)
    return _run(
        input,
        _scale_spec(_shape(input) if mask_shape is None else mask_shape, p),
        _check_bool(inplace, "inplace"),
        generator,
        return_mask,
        out=out,
    )


@_cached
def _alpha_spec(mask_shape: tuple, p: float) -> Spec:
    """Alpha dropout's spec: kept ``a * x + alpha * a * p``, dropped ``-alpha * a * (1 - p)``
    (zeros for p = 1, as torch gives)."""
    if p == 1.0:
        return Spec(Bernoulli(mask_shape, 0.0), Scale(0.0), 0.0)
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    app = Affine(a, ALPHA * a * p, -ALPHA * a * (1.0 - p))
    return Spec(Bernoulli(mask_shape, 1.0 - p), app, a)


def alpha_dropout(
    input: Any,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
    noise_shape: Any = None,
):
    """Alpha dropout (for SELU networks): keeps zero mean and unit variance.

    With ``alpha = 1.7580993408473766`` and ``a = 1 / sqrt((alpha^2 p + 1)(1 - p))``, a kept
    element becomes ``a * x + alpha * a * p`` and a dropped one ``-alpha * a * (1 - p)``.
    Evaluation mode by default, as in torch. ``p == 1`` gives zeros, as torch does.
    ``noise_shape`` shares decisions along dimensions, as in ``dropout``.
    """
    p = _check_prob(p)
    mask_shape = _noise_mask_shape(input, noise_shape)
    if not _check_bool(training, "training") or p == 0.0:
        return _run(input, None, inplace, generator, return_mask, out=out, kept_shape=mask_shape)
    return _run(
        input,
        _alpha_spec(_shape(input) if mask_shape is None else mask_shape, p),
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
    if inplace is True and spatial != 2 and nd != spatial + 2 and is_torch_tensor(input):
        # torch's dropout1d and dropout3d read an unbatched input through `input.unsqueeze_(0)`,
        # which raises torch's in-place errors whatever p and training are.
        _dispatch.torch_module().check_unsqueeze_(input)
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


def _path_spec(x: Any, drop_prob: float, scale_by_keep: bool) -> Spec:
    nd = _ndim(x)
    if nd < 1:
        if nd < 0:
            raise TypeError(
                f"input must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}"
            )
        raise ShapeError("drop_path: Expected an input with a batch dimension, got a 0D input")
    return _sample_spec(_sample_shape(x.shape), drop_prob, scale_by_keep)


def _sample_shape(shape: Any) -> tuple:
    """drop_path's mask shape for an input of `shape` (at least 1-d): (N, 1, ..., 1)."""
    return (int(shape[0]),) + (1,) * (len(shape) - 1)


@_cached_args
def _sample_spec(mask_shape: tuple, drop_prob: float, scale_by_keep: bool) -> Spec:
    """drop_path's spec: kept samples divided by ``1 - drop_prob`` when `scale_by_keep` (and
    something is kept), as timm's."""
    keep = 1.0 - drop_prob
    scale = 1.0 / keep if (keep > 0.0 and scale_by_keep) else 1.0
    return Spec(Bernoulli(mask_shape, keep), Scale(scale), scale)


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
    if (
        type(drop_prob) is float
        and 0.0 < drop_prob < 1.0
        and training is True
        and type(scale_by_keep) is bool
        and return_mask is False
    ):
        # A training call with the common arguments goes straight to the kernel, as
        # `dropout`'s does: the same spec, output and generator as the general path below,
        # without its checks and dispatch, which cost three times the kernel of a 64K-element
        # input.
        if (
            type(x) is np.ndarray
            and x.ndim > 0
            and x.dtype in _NATIVE_FLOATS
            and (generator is None or type(generator) is _core.Generator)
        ):
            if out is None:
                result = _core.empty_like(x)
            else:
                _check_out(out, x, False)
                result = out
            spec = _sample_spec(_sample_shape(x.shape), drop_prob, scale_by_keep)
            gen = default_generator if generator is None else generator
            _core_apply(x, result, None, spec, gen, False)
            return result
        if type(x) is _dispatch.TENSOR and generator is None and out is None:
            # The same for a torch tensor (once fastdrop's torch side is loaded).
            torch_side = _dispatch._TORCH
            try:
                shape = x.shape
            except RuntimeError:
                torch_side._check_kind(x)  # a nested tensor (it has no sizes): a TypeError
                raise
            if shape:
                spec = _sample_spec(_sample_shape(shape), drop_prob, scale_by_keep)
                return torch_side.run_plain(x, spec)
    drop_prob = _check_prob(drop_prob, "drop_prob")
    scale_by_keep = _check_bool(scale_by_keep, "scale_by_keep")
    active = _check_bool(training, "training") and drop_prob != 0.0
    if not active:
        # timm returns a 0-d input when it drops nothing (and fails on one otherwise).
        kept = () if _ndim(x) == 0 else _path_spec(x, drop_prob, scale_by_keep).mask.shape
        return _run(x, None, False, generator, return_mask, out=out, kept_shape=kept)
    return _run(x, _path_spec(x, drop_prob, scale_by_keep), False, generator, return_mask, out=out)


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
    args = _block_args(
        drop_prob, block_size, gamma_scale, with_noise, couple_channels, scale_by_keep
    )
    drop_prob, couple_channels = args[0], args[4]
    nd = _ndim(x)
    if nd < 0:
        raise TypeError(f"input must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")
    if nd != 4:
        raise ShapeError(
            f"drop_block_2d: Expected 4D (N, C, H, W) input, but received a {nd}D input"
        )
    n, c, h, w = (int(s) for s in x.shape)
    mask_shape = (n, 1 if couple_channels else c, h, w)
    if not _check_bool(training, "training") or drop_prob == 0.0 or n * c * h * w == 0:
        return _run(x, None, inplace, generator, return_mask, out=out, kept_shape=mask_shape)
    spec = _block_spec(mask_shape, *args)
    if (
        type(x) is _dispatch.TENSOR
        and inplace is False
        and generator is None
        and return_mask is False
        and out is None
    ):
        return _dispatch._TORCH.run_plain(x, spec)  # as `dropout`'s plain tensor call
    return _run(x, spec, _check_bool(inplace, "inplace"), generator, return_mask, out=out)


def _block_args(
    drop_prob: Any,
    block_size: Any,
    gamma_scale: Any,
    with_noise: Any,
    couple_channels: Any,
    scale_by_keep: Any,
) -> tuple:
    """timm's DropBlock arguments, checked and normalised: by `drop_block_2d` at each call and
    by `fastdrop.nn.DropBlock2d` at construction."""
    drop_prob = _check_prob(drop_prob, "drop_prob")
    block_size = _check_int(block_size, "block_size", 1)
    if not isinstance(gamma_scale, numbers.Real) or isinstance(gamma_scale, bool):
        raise TypeError(f"gamma_scale must be a real number, got {type(gamma_scale).__name__}")
    if not (float(gamma_scale) >= 0.0 and math.isfinite(gamma_scale)):
        raise ValueError(f"gamma_scale must be finite and non-negative, got {gamma_scale}")
    return (
        drop_prob,
        block_size,
        float(gamma_scale),
        _check_bool(with_noise, "with_noise"),
        _check_bool(couple_channels, "couple_channels"),
        _check_bool(scale_by_keep, "scale_by_keep"),
    )


@_cached_args
def _block_spec(
    mask_shape: tuple,
    drop_prob: float,
    block_size: int,
    gamma_scale: float,
    with_noise: bool,
    couple_channels: bool,
    scale_by_keep: bool,
) -> Spec:
    """DropBlock's spec on an (N, 1 or C, H, W) mask: timm's seed rate and clipped block."""
    h, w = mask_shape[2], mask_shape[3]
    kh, kw = min(block_size, h), min(block_size, w)
    gamma = gamma_scale * drop_prob * h * w / (kh * kw) / ((h - kh + 1) * (w - kw + 1))
    if gamma > 1.0:
        raise ValueError(
            f"drop_block_2d: gamma_scale * drop_prob gives a block seed rate of {gamma:.4g} "
            f"for {h}x{w} maps and {kh}x{kw} blocks; it must be at most 1"
        )
    # Dropped pixels become noise (kept ones unscaled), or 0 with kept ones scaled by the mask's
    # size over its kept count (the core counts them), or 0 with kept ones as they are.
    if with_noise:
        app: Any = Noise(1.0)
    else:
        app = ScaleByKept() if scale_by_keep else Scale(1.0)
    return Spec(
        Blocks(mask_shape, gamma, kh, kw),
        app,
        None if type(app) is ScaleByKept else 1.0,
        # torch's ops off the CPU run timm's own algorithm from the call's arguments.
        origin=dict(
            drop_prob=drop_prob,
            block_size=block_size,
            gamma_scale=gamma_scale,
            with_noise=with_noise,
            couple_channels=couple_channels,
            scale_by_keep=scale_by_keep,
        ),
    )


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
    active = _check_bool(training, "training") and drop_prob != 0.0
    if not active:
        # As drop_path: a 0-d branch is added untouched when nothing is dropped.
        kept = () if _ndim(branch) == 0 else _path_spec(branch, drop_prob, scale_by_keep).mask.shape
        return _run(branch, None, False, generator, return_mask, x, out=out, kept_shape=kept)
    spec = _path_spec(branch, drop_prob, scale_by_keep)
    return _run(branch, spec, False, generator, return_mask, x, out=out)


# === NEW: the rest of the family (issue 16) ==================================================
# noise_shape (used by dropout and alpha_dropout above), locked_dropout, embedding_dropout,
# stochastic_depth, gaussian_dropout, patch_dropout, drop_block_3d. Mask-shaped variants are a
# `Spec` handed to `_run`; the others (Gaussian noise, token selection, torchvision's blocks,
# whose seeds only fit where a whole block does) draw their randomness with `_keyed`, pure
# functions of (seed, stream, offset, index) like every mask, and their torch side (autograd,
# other devices) lives in `_torch` (and `_device`).

__all__ += [
    "locked_dropout",
    "embedding_dropout",
    "stochastic_depth",
    "gaussian_dropout",
    "patch_dropout",
    "drop_block_3d",
]


def _require_array(x: Any) -> int:
    """The rank of an input, or a TypeError for anything that is not an array or tensor."""
    nd = _ndim(x)
    if nd < 0:
        raise TypeError(f"input must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")
    return nd


def _noise_mask_shape(input: Any, noise_shape: Any) -> Optional[tuple]:
    """Keras's ``noise_shape`` as a mask shape (None stays None): a tuple of the input's rank
    whose entries are 1, the dimension's size or None (the dimension's size)."""
    if noise_shape is None:
        return None
    nd = _require_array(input)
    if not isinstance(noise_shape, (tuple, list)):
        raise TypeError(f"noise_shape must be a tuple, got {type(noise_shape).__name__}")
    for e in noise_shape:
        if e is not None and (isinstance(e, bool) or not isinstance(e, numbers.Integral)):
            raise TypeError(
                f"noise_shape entries must be ints or None, got {type(e).__name__} in "
                f"{tuple(noise_shape)}"
            )
    shape = tuple(int(s) for s in input.shape)
    if len(noise_shape) != nd or any(
        e is not None and int(e) != 1 and int(e) != s for e, s in zip(noise_shape, shape)
    ):
        raise ValueError(
            f"noise_shape {tuple(noise_shape)} does not fit an input of shape {shape}: it needs "
            f"{nd} entries, each 1, None or the input's size in that dimension"
        )
    return tuple(s if e is None else int(e) for e, s in zip(noise_shape, shape))


def locked_dropout(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    batch_first: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """Sequence (locked, variational) dropout: one mask per (batch, feature), shared by every
    time step, as fastai's ``RNNDropout`` and AWD-LSTM's ``LockedDropout``.

    ``input`` is (seq, batch, feature ...) or, with ``batch_first``, (batch, seq, feature ...);
    the mask has the input's shape with the time dimension set to 1. Kept values are scaled by
    ``1 / (1 - p)``, dropped ones are 0.
    """
    p = _check_prob(p)
    batch_first = _check_bool(batch_first, "batch_first")
    nd = _require_array(input)
    if nd < 2:
        raise ShapeError(
            f"locked_dropout: Expected an input with a time and a batch dimension (at least "
            f"2D), but received a {nd}D input"
        )
    time = 1 if batch_first else 0
    shape = tuple(int(s) for s in input.shape)
    mask_shape = shape[:time] + (1,) + shape[time + 1 :]
    if not _check_bool(training, "training") or p == 0.0:
        return _run(input, None, False, generator, return_mask, out=out, kept_shape=mask_shape)
    return _run(input, _scale_spec(mask_shape, p), False, generator, return_mask, out=out)


def embedding_dropout(
    weight: Any,
    p: float,
    training: bool = True,
    scale: bool = True,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """Word dropout on an embedding matrix (fastai's ``EmbeddingDropout``): drops whole rows of
    the (num_embeddings, embedding_dim) ``weight`` with probability ``p`` and returns the masked
    weight, for ``torch.nn.functional.embedding``. Kept rows are scaled by ``1 / (1 - p)`` when
    ``scale``, left as they are otherwise. The mask has shape (num_embeddings, 1)."""
    p = _check_prob(p)
    scale = _check_bool(scale, "scale")
    nd = _require_array(weight)
    if nd != 2:
        raise ShapeError(
            f"embedding_dropout: Expected a 2D (num_embeddings, embedding_dim) weight, but "
            f"received a {nd}D input"
        )
    mask_shape = (int(weight.shape[0]), 1)
    if not _check_bool(training, "training") or p == 0.0:
        return _run(weight, None, False, generator, return_mask, out=out, kept_shape=mask_shape)
    spec = _scale_spec(mask_shape, p) if scale else _unscaled_spec(mask_shape, p)
    return _run(weight, spec, False, generator, return_mask, out=out)


@_cached
def _unscaled_spec(mask_shape: tuple, p: float) -> Spec:
    """Kept elements as they are, dropped ones 0."""
    return Spec(Bernoulli(mask_shape, 1.0 - p), Scale(1.0), 1.0)


def _check_mode(mode: Any) -> None:
    """torchvision's stochastic-depth mode check (at each call and at the module's
    construction)."""
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")


def stochastic_depth(
    input: Any,
    p: float,
    mode: str,
    training: bool = True,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """torchvision's ``ops.stochastic_depth``: with ``mode="row"`` each sample (dimension 0) is
    zeroed with probability ``p`` (timm's ``drop_path``), with ``mode="batch"`` the whole input
    at once; survivors are divided by ``1 - p``. The mode is checked even when not training,
    as torchvision does. The mask has shape (N, 1, ..., 1) or (1, ..., 1)."""
    p = _check_prob(p, "drop probability")
    _check_mode(mode)
    nd = _require_array(input)
    if mode == "row":
        if nd == 0:
            raise ShapeError(
                "stochastic_depth: mode='row' expects an input with a batch dimension, got a "
                "0D input"
            )
        mask_shape: tuple = (int(input.shape[0]),) + (1,) * (nd - 1)
    else:
        mask_shape = (1,) * nd
    if not _check_bool(training, "training") or p == 0.0:
        return _run(input, None, False, generator, return_mask, out=out, kept_shape=mask_shape)
    return _run(input, _scale_spec(mask_shape, p), False, generator, return_mask, out=out)


# --- the family members that are not a mask spec ----------------------------------------------
# Their randomness is `_keyed`'s (keyed draws like a mask's); their torch side is `_torch`'s.


def _op_dtype(dtype: Any) -> Any:
    """The type fastdrop computes a dtype in: float64 for float64, float32 otherwise."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _numpy_result(a: np.ndarray, factor: np.ndarray, inplace: bool, out: Any) -> np.ndarray:
    """`a * factor` computed in the factor's type and rounded once to a's dtype."""
    if out is None:
        out = a if inplace else _core.empty_like(a)
    np.multiply(a, factor, out=out, casting="unsafe")
    return out


def _check_numpy_target(a: np.ndarray, inplace: bool, out: Any) -> None:
    if out is not None:
        _check_out(out, a, inplace)
    if inplace and not a.flags.writeable:
        raise ValueError("inplace=True needs a writeable array, but the input is read-only")


def gaussian_dropout(
    input: Any,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Any = None,
    out: Any = None,
):
    """Multiplicative Gaussian noise, ``x * N(1, p / (1 - p))`` (``keras.layers.GaussianDropout``):
    every element is multiplied by ``1 + sigma * z`` with ``sigma = sqrt(p / (1 - p))`` and
    ``z`` a standard normal deviate. ``p`` is in [0, 1); ``training=False`` or ``p == 0``
    returns ``input``.

    The factor is computed in float32 (float64 for float64 input) and the product rounded once
    to the input's dtype. Deviate i is a pure function of the call's key and i, so NumPy and
    torch input agree under the same generator and the backward (``grad * factor``) draws the
    same noise again instead of storing it.
    """
    p = _check_prob(p)
    if p == 1.0:
        raise ValueError(
            "gaussian_dropout: p must be in [0, 1), got 1.0 (the noise variance p / (1 - p) "
            "would be infinite)"
        )
    training = _check_bool(training, "training")
    inplace = _check_bool(inplace, "inplace")
    sigma = math.sqrt(p / (1.0 - p))
    if is_torch_tensor(input):
        if out is not None:
            raise TypeError("out= takes a NumPy array and is not supported for torch tensors")
        if not training or p == 0.0:
            return input
        return _dispatch.torch_module().gaussian_dropout(input, sigma, inplace, generator)
    a = _as_array(input)
    _check_numpy_target(a, inplace, out)
    gen = _resolve_generator(generator)
    if not training or p == 0.0:
        return _run(a, None, inplace, gen, False, out=out)
    factor = _keyed.gaussian_factor(_keyed.call_key(gen), a.shape, _op_dtype(a.dtype), sigma)
    return _numpy_result(a, factor, inplace, out)


def _patch_args(prob: Any, num_prefix_tokens: Any, ordered: Any, return_indices: Any) -> tuple:
    """PatchDropout's arguments, checked and normalised (at each call and at the module's
    construction)."""
    return (
        _check_prob(prob, "prob"),
        _check_int(num_prefix_tokens, "num_prefix_tokens", 0),
        _check_bool(ordered, "ordered"),
        _check_bool(return_indices, "return_indices"),
    )


def patch_dropout(
    x: Any,
    prob: float,
    num_prefix_tokens: int = 1,
    ordered: bool = False,
    return_indices: bool = False,
    *,
    training: bool = True,
    generator: Any = None,
):
    """PatchDropout (timm's ``PatchDropout``): keeps ``num_keep = max(1, int(L * (1 - prob)))``
    random tokens of each sample of a (B, num_prefix_tokens + L, ...) input, behind its prefix
    tokens (class and register tokens, always kept, in front). With ``ordered`` the kept tokens
    stay in their original order; otherwise they come in random order, as timm's do.

    With ``return_indices`` returns ``(out, keep_indices)``, the kept tokens' indices among the
    non-prefix tokens, of shape (B, num_keep) (None when nothing was dropped), like timm's.
    Which tokens are kept is a pure function of the generator's key.
    """
    prob, num_prefix_tokens, ordered, return_indices = _patch_args(
        prob, num_prefix_tokens, ordered, return_indices
    )
    training = _check_bool(training, "training")
    nd = _require_array(x)
    if nd < 2:
        raise ShapeError(
            f"patch_dropout: Expected a (B, L, ...) input of at least 2D, but received a "
            f"{nd}D input"
        )
    if num_prefix_tokens > int(x.shape[1]):
        raise ValueError(
            f"patch_dropout: num_prefix_tokens ({num_prefix_tokens}) exceeds the {int(x.shape[1])} "
            f"tokens of the input"
        )
    if is_torch_tensor(x):
        out, idx = _dispatch.torch_module().patch_dropout(
            x, prob, num_prefix_tokens, ordered, training, generator
        )
        return (out, idx) if return_indices else out
    a = _as_array(x)
    gen = _resolve_generator(generator)
    if not training or prob == 0.0:
        return (a, None) if return_indices else a
    b, tokens = int(a.shape[0]), int(a.shape[1]) - num_prefix_tokens
    keep = _keyed.keep_indices(_keyed.call_key(gen), b, tokens, prob, ordered)
    body = np.take_along_axis(
        a[:, num_prefix_tokens:], keep.reshape(keep.shape + (1,) * (nd - 2)), axis=1
    )
    result = np.concatenate((a[:, :num_prefix_tokens], body), axis=1)
    return (result, keep) if return_indices else result


def drop_block_3d(
    input: Any,
    p: float,
    block_size: int,
    inplace: bool = False,
    eps: float = 1e-6,
    training: bool = True,
    *,
    generator: Any = None,
    return_mask: bool = False,
    out: Any = None,
):
    """DropBlock on (N, C, D, H, W) volumes with torchvision's maths (``ops.drop_block3d``).

    ``block_size`` is clamped to ``b = min(block_size, D, H, W)``; seeds are Bernoulli(gamma)
    with ``gamma = p * D * H * W / (b^3 * (D - b + 1) * (H - b + 1) * (W - b + 1))`` at every
    corner where a whole block fits, one map per (sample, channel); a seed at (d, h, w) drops
    the cube ``[d, d + b) x [h, h + b) x [w, w + b)``. Kept elements are scaled by
    ``numel / (eps + kept)`` (computed in float64 as torchvision's float64 path computes it,
    rounded once to the compute type); dropped ones are 0. Even block sizes are allowed
    (torchvision's pooling refuses them). The mask has the input's shape (one map per channel,
    as torchvision's) and is kept as bits for the backward.
    """
    return _drop_block_torchvision(
        "drop_block_3d",
        3,
        input,
        p,
        block_size,
        inplace,
        eps,
        training,
        generator,
        return_mask,
        out,
    )


def _torchvision_block_args(p: Any, block_size: Any, inplace: Any, eps: Any) -> tuple:
    """torchvision's DropBlock arguments, checked and normalised: at each call and by the
    modules at construction."""
    p = _check_prob(p, "drop probability")
    block_size = _check_int(block_size, "block_size", 1)
    if isinstance(eps, (str, bytes, bool)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and non-negative, got {eps}")
    return p, block_size, _check_bool(inplace, "inplace"), eps


def _drop_block_torchvision(
    name: str,
    spatial: int,
    input: Any,
    p: Any,
    block_size: Any,
    inplace: Any,
    eps: Any,
    training: Any,
    generator: Any,
    return_mask: Any,
    out: Any,
):
    """torchvision's DropBlock over `spatial` (2 or 3) dimensions: drop_block_3d, and the
    module that replaces torchvision's DropBlock2d."""
    p, block_size, inplace, eps = _torchvision_block_args(p, block_size, inplace, eps)
    training = _check_bool(training, "training")
    nd = _require_array(input)
    if nd != spatial + 2:
        dims = "(N, C, H, W)" if spatial == 2 else "(N, C, D, H, W)"
        raise ShapeError(
            f"{name}: Expected {spatial + 2}D {dims} input, but received a {nd}D input"
        )
    if is_torch_tensor(input):
        if out is not None:
            raise TypeError("out= takes a NumPy array and is not supported for torch tensors")
        if not training or p == 0.0 or input.numel() == 0:
            return _run(input, None, inplace, generator, return_mask)
        return _dispatch.torch_module().drop_block_torchvision(
            input, p, block_size, inplace, eps, generator, return_mask
        )
    a = _as_array(input)
    _check_numpy_target(a, inplace, out)
    gen = _resolve_generator(generator)
    if not training or p == 0.0 or a.size == 0:
        return _run(a, None, inplace, gen, return_mask, out=out)
    mask = _keyed.torchvision_block_mask(_keyed.call_key(gen), a.shape, p, block_size, eps)
    if out is None:
        out = a if inplace else _core.empty_like(a)
    _core.mask_apply(mask._words(), a, out, mask.scale)
    return (out, mask) if return_mask else out
