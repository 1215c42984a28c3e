"""The one door from Python into the Rust core: `apply(x, out, residual, spec, generator,
store_mask)`, which runs a `_spec.Spec` and returns an `Applied` (``bits``, ``first_block``,
``scale``). Every masked call of every path (NumPy, torch CPU, the compiled ops, a Mask's own
redraw) goes through it; nothing else in Python names the core's apply functions.

ADAPTER, to be replaced at merge: the core's single binding `_core.apply` (same arguments, same
result) is being written on another branch. Until it lands, `apply` below translates a `Spec` to
today's two bindings, `_core.bernoulli_apply` and `_core.drop_block_apply`. At merge this whole
module becomes ``from ._core import Applied, apply``.
"""

from __future__ import annotations

from typing import Any, Optional

from . import _core
from ._spec import Affine, Bernoulli, Blocks, Noise, Scale, ScaleByKept, Spec


class Applied:
    """What one core call did: the mask's ``bits`` (a `MaskBits`, or None when not stored),
    the ``first_block`` of the counter range it reserved (a generator set to (seed, stream,
    first_block) redraws the same mask) and the ``scale`` it applied to kept elements."""

    __slots__ = ("bits", "first_block", "scale")

    def __init__(self, bits: Optional[_core.MaskBits], first_block: int, scale: float):
        self.bits = bits
        self.first_block = first_block
        self.scale = scale


def apply(
    x: Any, out: Any, residual: Any, spec: Spec, generator: _core.Generator, store_mask: bool
) -> Applied:
    """Runs `spec` from `x` (plus `residual`) into `out` (which may be `x`): NumPy arrays or CPU
    DLPack capsules. The bits come back when `store_mask`, and always for `Blocks` masks."""
    mask, app = spec.mask, spec.application
    if type(mask) is Bernoulli:
        t = type(app)
        if t is Scale:
            legacy: tuple = ("scale", app.scale)  # type: ignore[union-attr]
        elif t is Affine:
            legacy = ("affine", app.a, app.shift, app.dropped)  # type: ignore[union-attr]
        else:
            raise TypeError(f"a Bernoulli mask takes a Scale or Affine application, not {app!r}")
        if store_mask:
            first = generator.offset
            bits = _core.bernoulli_apply(
                x, out, residual, mask.shape, legacy, mask.keep, generator, True
            )
            return Applied(bits, first, legacy[1])
        first = _core.bernoulli_apply(
            x, out, residual, mask.shape, legacy, mask.keep, generator, False
        )
        return Applied(None, first, legacy[1])
    if type(mask) is Blocks:
        if residual is not None:
            raise ValueError("a block mask takes no residual")
        t = type(app)
        if t not in (ScaleByKept, Scale, Noise):
            raise TypeError(f"a Blocks mask takes ScaleByKept, Scale or Noise, not {app!r}")
        couple = mask.shape[1] == 1
        first = generator.offset
        bits, scale = _core.drop_block_apply(
            x, out, mask.gamma, mask.kh, mask.kw, couple, t is Noise, t is ScaleByKept, generator
        )
        return Applied(bits, first, scale if t is ScaleByKept else app.scale)  # type: ignore[union-attr]
    raise TypeError(f"not a fastdrop mask: {mask!r}")
