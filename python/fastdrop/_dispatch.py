"""The one dispatcher: every masked public function hands its `_spec.Spec` to `run`, which
picks the input's path and runs it there.

- NumPy arrays (and other CPU DLPack producers): here, through `_mask.apply_spec` into Rust;
- torch tensors: `fastdrop._torch` (imported on the first tensor, so `import fastdrop` never
  imports torch) checks them and names their path: the CPU kernels (`_torch.run_host`), the
  compiled custom ops (`_torch.run_compiled`), or torch's own ops on another device
  (`_torch.run_device`, over `_device`).

A call that drops nothing (``spec`` None: ``training=False`` or p = 0) is answered here, once,
for every path: the input itself (plus the residual), with an all-kept mask when asked.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._checks import as_array, is_torch_tensor
from ._mask import Mask, apply_spec
from ._spec import Spec

default_generator = _core.Generator()

_TORCH: Any = None
#: `torch.Tensor` once `fastdrop._torch` is loaded (by the first tensor seen); until then a
#: class nothing is an instance of, so `type(x) is TENSOR` is a one-step test either way.
TENSOR: Any = type("_NoTensorYet", (), {})


def torch_module():
    """`fastdrop._torch`, imported on first use (it imports torch); cached, as an import
    statement costs a microsecond a call."""
    global _TORCH, TENSOR
    if _TORCH is None:
        from . import _torch

        _TORCH = _torch
        TENSOR = _torch.torch.Tensor
    return _TORCH


def run(
    x: Any,
    spec: Optional[Spec],
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
        path = torch_module().path_for(x, residual, generator, return_mask)
        if spec is None:
            return _identity(x, residual, None, return_mask, kept_shape)
        if inplace and x.numel() == 0:
            # torch's dropouts return an empty input before any in-place check (a leaf that
            # requires grad, an inference tensor): there is nothing to write.
            return _identity(x, residual, None, return_mask, tuple(spec.mask.shape))
        return path(x, spec, inplace, generator, return_mask, residual)
    a = as_array(x)
    r = None if residual is None else as_array(residual, "residual")
    if r is not None and (r.shape != a.shape or r.dtype != a.dtype):
        raise ValueError(
            f"residual must match the input: got {r.shape} {r.dtype} for input {a.shape} {a.dtype}"
        )
    if out is not None:
        check_out(out, a, inplace)
    gen = resolve_generator(generator)
    if spec is None:
        return _identity(a, r, out, return_mask, kept_shape)
    if inplace and not a.flags.writeable:
        raise ValueError("inplace=True needs a writeable array, but the input is read-only")
    if out is None:
        # _core.empty_like is np.empty_like, with large outputs reused from freed ones.
        out = a if inplace else _core.empty_like(a if r is None else r)
    mask = apply_spec(a, out, r, spec, gen, return_mask, a.shape)
    return (out, mask) if return_mask else out


def _identity(x: Any, residual: Any, out: Any, return_mask: bool, kept_shape: Optional[tuple]):
    """A call that drops nothing: `x` itself (`residual + x` when fused; into `out` when
    given), and with `return_mask` a mask that keeps everything."""
    if out is not None:
        if residual is None:
            np.copyto(out, x)
        else:
            np.add(x, residual, out=out)
        result = out
    else:
        result = x if residual is None else x + residual
    if not return_mask:
        return result
    shape = tuple(x.shape)
    return result, Mask._full(shape, kept_shape or shape, True, 1.0)


def check_out(out: Any, a: np.ndarray, inplace: bool) -> None:
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


def resolve_generator(generator: Any) -> _core.Generator:
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
