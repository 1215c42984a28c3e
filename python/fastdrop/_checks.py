"""Argument checks every layer shares: the bottom floor, beside `_spec`.

One probability check (one message family: "<name> has to be between 0 and 1, but got p"),
the bool and int checks, the input-array check and `ShapeError`. Nothing here imports
fastdrop's other modules (nor torch: a tensor is recognised only when torch is already loaded),
so every module may import this one.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any

import numpy as np


class ShapeError(ValueError, RuntimeError):
    """A wrong number of dimensions. A ValueError, and a RuntimeError as torch raises it."""


def is_torch_tensor(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch when the caller never did."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_prob(p: Any, name: str = "dropout probability") -> float:
    """`p` as a float in [0, 1]: a real number, or a 0-d real tensor that does not require
    grad (torch's functions and modules take one); a TypeError or ValueError otherwise."""
    if type(p) is float and 0.0 <= p <= 1.0:
        # The common case, without the ABC isinstance below (half a microsecond a call).
        return p
    if is_torch_tensor(p):
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


def check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


def check_int(v: Any, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v}")
    return int(v)


#: The dtypes the kernels read from NumPy.
NATIVE_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def as_array(x: Any, name: str = "input") -> np.ndarray:
    """The NumPy view of `x`: an ndarray as is, another CPU DLPack producer through DLPack."""
    if type(x) is np.ndarray and x.dtype in NATIVE_FLOATS:
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
