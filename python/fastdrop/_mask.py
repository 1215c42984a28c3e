"""`Mask`: the bit-packed keep decisions of one call, and the backward pass they define."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core


class Mask:
    """The keep decisions of one fastdrop call, one bit per decision.

    ``shape`` is the mask's own broadcastable shape: the input's shape for element dropout,
    ``(N, C, 1, 1)`` for ``dropout2d``, ``(N, 1, ..., 1)`` for ``drop_path``, ``(N, 1, H, W)``
    for a channel-coupled ``drop_block_2d``. A mask never holds a tensor of the input's size.

    ``scale`` is what a kept element's gradient is multiplied by (``1 / (1 - p)`` for dropout,
    ``a`` for alpha dropout); dropped elements get zero gradient.
    """

    __slots__ = ("_bits", "_scale", "_input_shape")

    def __init__(self, bits: _core.MaskBits, scale: float, input_shape: tuple[int, ...]):
        self._bits = bits
        self._scale = float(scale)
        self._input_shape = tuple(input_shape)

    @classmethod
    def _full(
        cls, input_shape: tuple[int, ...], mask_shape: tuple[int, ...], keep: bool, scale: float
    ) -> Mask:
        return cls(_core.MaskBits.filled(list(mask_shape), keep), scale, input_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """The mask's broadcastable shape."""
        # A complex tensor's mask is drawn over its (..., 2) float pairs with a trailing 1, which
        # is not part of the shape it broadcasts to over the complex elements.
        return tuple(self._bits.shape)[: len(self._input_shape)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of the input the mask was drawn for."""
        return self._input_shape

    @property
    def scale(self) -> float:
        """The factor a kept element's gradient is multiplied by."""
        return self._scale

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed bits (about one bit per decision)."""
        return int(self._bits.nbytes)

    def count_kept(self) -> int:
        """How many decisions keep their elements."""
        return int(self._bits.count_kept())

    def numpy(self) -> np.ndarray:
        """The decisions as a bool array of ``shape``, True where kept."""
        n = int(np.prod(self.shape, dtype=np.int64))
        packed = np.frombuffer(self._bits.to_bytes(), dtype=np.uint8)
        return np.unpackbits(packed, count=n, bitorder="little").astype(bool).reshape(self.shape)

    def backward(self, grad_output: Any) -> Any:
        """The gradient with respect to the input: ``grad_output * mask * scale``.

        Takes and returns a NumPy array, or a torch tensor of the input's shape.
        """
        from ._dispatch import is_torch_tensor

        on_torch = is_torch_tensor(grad_output)
        if not on_torch:
            from .functional import _as_array

            grad_output = _as_array(grad_output, "grad_output")
        shape = tuple(grad_output.shape)
        if shape != self._input_shape:
            raise ValueError(
                f"grad_output has shape {shape}, but the mask was drawn for an input of "
                f"shape {self._input_shape}"
            )
        if on_torch:
            from . import _torch

            return _torch.mask_backward(self, grad_output)
        out = _core.empty_like(grad_output)
        if len(self._bits.shape) > len(shape):  # drawn for a complex tensor's float pairs
            _core.mask_apply(self._bits, grad_output[..., None], out[..., None], self._scale)
        else:
            _core.mask_apply(self._bits, grad_output, out, self._scale)
        return out

    def __repr__(self) -> str:
        return f"Mask(shape={self.shape}, input_shape={self._input_shape}, scale={self._scale!r})"
