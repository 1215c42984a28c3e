"""What one call does, as one typed value: the bottom floor of the package.

A public function checks its arguments and describes its call as a `Spec`: a mask (which
decisions are drawn, and how many) and an application (what a kept and a dropped element
become), plus the scale its backward multiplies kept gradients by. The dispatcher, the torch
paths and the Rust core (`_core.apply`, which reads these classes by their ``kind`` and field
names) all read this one value; nothing decodes a tuple by position.

This module imports nothing from fastdrop, so every other module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Union

# --- masks: which keep decisions a call draws ---------------------------------------------------


@dataclass(frozen=True)
class Bernoulli:
    """One Bernoulli(``keep``) decision per element of ``shape``, broadcast to the input: the
    input's shape for element dropout, (N, C, 1, 1) for ``dropout2d``, (N, 1, ..., 1) for
    ``drop_path``; any broadcastable shape (``noise_shape``)."""

    kind: ClassVar[str] = "bernoulli"
    shape: tuple[int, ...]
    keep: float


@dataclass(frozen=True)
class Blocks:
    """DropBlock: seeds Bernoulli(``gamma``) at every position of an (N, C or 1, H, W) ``shape``,
    each grown to a ``kh`` x ``kw`` block of dropped positions (timm's placement)."""

    kind: ClassVar[str] = "blocks"
    shape: tuple[int, int, int, int]
    gamma: float
    kh: int
    kw: int


Granularity = Union[Bernoulli, Blocks]

# --- applications: what a kept and a dropped element become -------------------------------------


@dataclass(frozen=True)
class Scale:
    """Kept elements times ``scale``, dropped ones 0 (dropout: ``scale = 1 / (1 - p)``)."""

    kind: ClassVar[str] = "scale"
    scale: float


@dataclass(frozen=True)
class ScaleByKept:
    """Kept elements times (mask size / kept decisions), dropped ones 0: DropBlock's
    ``scale_by_keep``. The core counts the kept decisions after drawing them."""

    kind: ClassVar[str] = "scale_by_kept"


@dataclass(frozen=True)
class Affine:
    """Kept elements become ``a * x + shift``, dropped ones ``dropped`` (alpha dropout)."""

    kind: ClassVar[str] = "affine"
    a: float
    shift: float
    dropped: float


@dataclass(frozen=True)
class Noise:
    """Kept elements times ``scale``, dropped ones N(0, 1) noise, drawn from the call's own
    counter range after the mask's (DropBlock's ``with_noise``)."""

    kind: ClassVar[str] = "noise"
    scale: float


Application = Union[Scale, ScaleByKept, Affine, Noise]

# --- the call -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One call: its mask, its application, and ``grad_scale``, what the backward multiplies
    kept gradients by (None: the scale the core computed, for `ScaleByKept`).

    ``origin`` keeps the public function's own arguments where a path needs them unchanged
    (torch's ops for tensors off the CPU run timm's DropBlock from them); it takes no part in
    equality or hashing."""

    mask: Granularity
    application: Application
    grad_scale: Optional[float]
    origin: Optional[Mapping[str, Any]] = field(default=None, compare=False, hash=False)

    def with_leading(self, n: int) -> Spec:
        """The same call with one more leading mask dimension of size `n` (a batch drawn at
        once: `n` independent masks, or one broadcast over the batch for ``n == 1``)."""
        return self.reshaped((n,) + tuple(self.mask.shape))

    def with_trailing_one(self) -> Spec:
        """The same call over an input with one more trailing dimension that shares each
        decision (a complex tensor read as its (..., 2) float pairs)."""
        return self.reshaped(tuple(self.mask.shape) + (1,))

    def reshaped(self, shape: tuple[int, ...]) -> Spec:
        """The same call with a Bernoulli mask of another shape (same keep probability)."""
        mask = self.mask
        if type(mask) is not Bernoulli:
            raise TypeError(f"only a Bernoulli mask can be reshaped, not a {mask.kind} mask")
        return Spec(Bernoulli(shape, mask.keep), self.application, self.grad_scale, self.origin)


# --- a flat encoding, for torch.compile's custom ops (whose schemas take no classes) -------------


def application_args(application: Application) -> tuple[str, list[float]]:
    """`application` as its ``kind`` and its numbers, in field order; a TypeError for anything
    that is not one of the applications above."""
    t = type(application)
    if t is Scale or t is Noise:
        return application.kind, [float(application.scale)]  # type: ignore[union-attr]
    if t is Affine:
        a: Any = application
        return Affine.kind, [float(a.a), float(a.shift), float(a.dropped)]
    if t is ScaleByKept:
        return ScaleByKept.kind, []
    raise TypeError(f"not a fastdrop application: {application!r}")


_APPLICATIONS: dict[str, Any] = {c.kind: c for c in (Scale, ScaleByKept, Affine, Noise)}


def application_from_args(kind: str, args: list[float]) -> Application:
    """The inverse of `application_args`; a ValueError for an unknown kind."""
    cls = _APPLICATIONS.get(kind)
    if cls is None:
        raise ValueError(f"unknown fastdrop application kind {kind!r}")
    return cls(*args)  # type: ignore[no-any-return]
