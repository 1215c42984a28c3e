"""`Mask`: the bit-packed keep decisions of one call, and the backward pass they define."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._checks import as_array, is_torch_tensor
from ._core_call import apply
from ._spec import Bernoulli, Scale, Spec


class Mask:
    """The keep decisions of one fastdrop call, one bit per decision.

    ``shape`` is the mask's own broadcastable shape: the input's shape for element dropout,
    ``(N, C, 1, 1)`` for ``dropout2d``, ``(N, 1, ..., 1)`` for ``drop_path``, ``(N, 1, H, W)``
    for a channel-coupled ``drop_block_2d``. A mask never holds a tensor of the input's size.

    ``scale`` is what a kept element's gradient is multiplied by (``1 / (1 - p)`` for dropout,
    ``a`` for alpha dropout); dropped elements get zero gradient.

    Inside autograd a mask may be kept as its key alone, ``(seed, stream, first block)`` and the
    keep probability, from which the same bits are redrawn when needed (DESIGN.md: "a mask is its
    key"); such a mask holds no bits until asked for them.
    """

    __slots__ = ("_bits", "_scale", "_input_shape", "_key", "_keep", "_shape")

    def __init__(self, bits: _core.MaskBits, scale: float, input_shape: tuple[int, ...]):
        self._bits: Optional[_core.MaskBits] = bits
        self._scale = float(scale)
        self._input_shape = tuple(input_shape)
        self._key: Optional[tuple[int, int, int]] = None
        self._keep = 0.0
        self._shape = tuple(bits.shape)

    @classmethod
    def _from_key(
        cls,
        key: tuple[int, int, int],
        mask_shape: tuple[int, ...],
        keep: float,
        scale: float,
        input_shape: tuple[int, ...],
    ) -> Mask:
        """The mask a Bernoulli(`keep`) call of `mask_shape` drew from a generator at `key`."""
        m = cls.__new__(cls)
        m._bits, m._key, m._keep = None, key, keep
        m._scale, m._input_shape, m._shape = float(scale), input_shape, tuple(mask_shape)
        return m

    def _with_shape(self, mask_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> Mask:
        """The same decisions under another shape of as many elements (size-1 dimensions added
        for a batch the mask broadcasts over): free for a keyed mask, as the bits are a
        function of the C-order index alone."""
        if self._key is None:
            raise ValueError("only a mask kept as its key can be reshaped")
        return Mask._from_key(self._key, mask_shape, self._keep, self._scale, input_shape)

    def _words(self) -> _core.MaskBits:
        """The packed bits, redrawn from the key the first time a keyed mask is asked for them."""
        if self._bits is None:
            assert self._key is not None
            ones = np.broadcast_to(np.float16(1.0), self._shape)
            scratch = np.empty(self._shape, np.float16)
            spec = _redraw_spec(self._shape, self._keep, 1.0)
            gen = _core._generator_from_state(self._key)
            bits = apply(ones, scratch, None, spec, gen, True).bits
            assert bits is not None  # asked for with store_mask
            self._bits = bits
        return self._bits

    def _apply(self, x: Any, out: Any) -> None:
        """``out = x * mask * scale``; `x` and `out` are NumPy arrays or CPU DLPack capsules.
        A keyed mask redraws its bits inside the kernel (the forward's own fused pass, with the
        gradient's factor), so a backward keeps and reads no mask at all."""
        if self._bits is not None:
            _core.mask_apply(self._bits, x, out, self._scale)
        else:
            assert self._key is not None
            spec = _redraw_spec(self._shape, self._keep, self._scale)
            apply(x, out, None, spec, _core._generator_from_state(self._key), False)

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
        return self._shape[: len(self._input_shape)]

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
        """Bytes held by the packed bits (about one bit per decision); 0 for a mask kept as its
        key that has not been asked for its bits."""
        return 0 if self._bits is None else int(self._bits.nbytes)

    def count_kept(self) -> int:
        """How many decisions keep their elements."""
        return int(self._words().count_kept())

    def numpy(self) -> np.ndarray:
        """The decisions as a bool array of ``shape``, True where kept."""
        n = int(np.prod(self.shape, dtype=np.int64))
        packed = np.frombuffer(self._words().to_bytes(), dtype=np.uint8)
        return np.unpackbits(packed, count=n, bitorder="little").astype(bool).reshape(self.shape)

    def backward(self, grad_output: Any) -> Any:
        """The gradient with respect to the input: ``grad_output * mask * scale``.

        Takes and returns a NumPy array, or a torch tensor of the input's shape.
        """
        on_torch = is_torch_tensor(grad_output)
        if not on_torch:
            grad_output = as_array(grad_output, "grad_output")
        shape = tuple(grad_output.shape)
        if shape != self._input_shape:
            raise ValueError(
                f"grad_output has shape {shape}, but the mask was drawn for an input of "
                f"shape {self._input_shape}"
            )
        if on_torch:
            # Loaded at call time (it imports torch, and this module): a tensor's gradient
            # takes the torch side's masked product, differentiable as the forward is.
            from . import _torch

            return _torch.mask_backward(self, grad_output)
        out = _core.empty_like(grad_output)
        if len(self._shape) > len(shape):  # drawn for a complex tensor's float pairs
            self._apply(grad_output[..., None], out[..., None])
        else:
            self._apply(grad_output, out)
        return out

    def __repr__(self) -> str:
        return f"Mask(shape={self.shape}, input_shape={self._input_shape}, scale={self._scale!r})"


_REDRAW_SPECS: dict = {}


def _redraw_spec(shape: tuple[int, ...], keep: float, scale: float) -> Spec:
    """The spec that redraws a keyed mask's decisions and scales kept elements by `scale`,
    cached (a backward of a given layer asks for the same one every step; a Spec costs 2 us)."""
    key = (shape, keep, scale)
    spec = _REDRAW_SPECS.get(key)
    if spec is None:
        spec = Spec(Bernoulli(shape, keep), Scale(scale), scale)
        if len(_REDRAW_SPECS) < 1024:
            _REDRAW_SPECS[key] = spec
    return spec


def apply_spec(
    x: Any,
    out: Any,
    residual: Any,
    spec: Spec,
    generator: _core.Generator,
    want_mask: Any,
    input_shape: tuple[int, ...],
) -> Optional[Mask]:
    """Runs `spec` from `x` (plus `residual`) into `out` (which may be `x`; NumPy arrays or CPU
    DLPack capsules) and returns its `Mask` over an input of `input_shape` when wanted (a block
    mask always: its bits are kept, not redrawn). ``want_mask="key"`` returns a Bernoulli mask
    as its key alone, holding no bits (autograd's backward redraws them)."""
    mask = spec.mask
    if want_mask == "key" and type(mask) is Bernoulli:
        seed, stream, _ = generator.get_state()
        done = apply(x, out, residual, spec, generator, False)
        key = (seed, stream, done.first_block)
        return Mask._from_key(key, tuple(mask.shape), mask.keep, spec.grad_scale, input_shape)  # type: ignore[arg-type]
    done = apply(x, out, residual, spec, generator, bool(want_mask))
    if done.bits is None:
        return None
    scale = done.scale if spec.grad_scale is None else spec.grad_scale
    return Mask(done.bits, scale, input_shape)
