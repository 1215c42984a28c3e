"""Drop-rate schedules for dropout, DropBlock and stochastic depth.

This module is plain Python (no NumPy, no PyTorch) and every schedule returns
a Python ``float``.

A *schedule* is a callable object mapping a non-negative integer training step
to a drop rate in ``[0, 1]``::

    >>> sched = LinearWarmup(0.5, warmup_steps=4)
    >>> [sched(s) for s in range(6)]
    [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]

All schedules validate their arguments when constructed:

* ``TypeError`` for arguments of the wrong type (rates must be real numbers,
  ``bool`` excluded; step counts must be integers, ``bool`` excluded);
* ``ValueError`` for rates outside ``[0, 1]`` (NaN included) and for negative
  step counts.

Calling a schedule with a negative step raises ``ValueError``; a non-integer
step raises ``TypeError``.

:func:`calculate_drop_path_rates` reproduces ``timm.layers.calculate_drop_path_rates``
(the per-block / stage-wise stochastic-depth rate helper) bit for bit without
needing PyTorch.
"""

from __future__ import annotations

import bisect
import math
import numbers
import operator
import struct
from collections.abc import Sequence

__all__ = [
    "Schedule",
    "ConstantSchedule",
    "LinearWarmup",
    "CosineSchedule",
    "StepSchedule",
    "calculate_drop_path_rates",
]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------
def _check_rate(value: object, name: str) -> float:
    """Validate a drop rate and return it as a ``float``.

    Parameters
    ----------
    value : object
        Candidate rate.
    name : str
        Argument name used in error messages.

    Returns
    -------
    float
        ``float(value)``.

    Raises
    ------
    TypeError
        If ``value`` is not a real number, or is a ``bool``.
    ValueError
        If ``value`` is NaN or outside ``[0, 1]``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    rate = float(value)
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
    return rate


def _check_count(value: object, name: str) -> int:
    """Validate a non-negative integer count (steps, depths) and return it.

    Parameters
    ----------
    value : object
        Candidate count; anything supporting ``operator.index`` except ``bool``.
    name : str
        Argument name used in error messages.

    Returns
    -------
    int
        The count as a Python ``int``.

    Raises
    ------
    TypeError
        If ``value`` is not an integer, or is a ``bool``.
    ValueError
        If ``value`` is negative.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        count = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    return count


# --------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------
class Schedule:
    """Base class of drop-rate schedules.

    Subclasses implement :meth:`_rate`; :meth:`__call__` validates the step
    and converts the result to ``float``.
    """

    __slots__ = ()

    def __call__(self, step: int) -> float:
        """Return the drop rate at ``step``.

        Parameters
        ----------
        step : int
            Training step, ``>= 0``.

        Returns
        -------
        float
            The drop rate, in ``[0, 1]``.

        Raises
        ------
        TypeError
            If ``step`` is not an integer (``bool`` is rejected).
        ValueError
            If ``step`` is negative.
        """
        return float(self._rate(_check_count(step, "step")))

    def _rate(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class ConstantSchedule(Schedule):
    """The same rate at every step.

    Parameters
    ----------
    rate : float
        Drop rate in ``[0, 1]``.
    """

    __slots__ = ("rate",)

    def __init__(self, rate: float) -> None:
        self.rate: float = _check_rate(rate, "rate")

    def _rate(self, step: int) -> float:
        return self.rate

    def __repr__(self) -> str:
        return f"ConstantSchedule(rate={self.rate!r})"


class LinearWarmup(Schedule):
    """Linear ramp from ``start_rate`` to ``rate``, then constant.

    This is the linear scheme of the DropBlock paper (Ghiasi et al., 2018,
    "DropBlock: A regularization method for convolutional networks"), which
    ramps the drop rate up from 0 instead of using the target rate from the
    first step::

        r(t) = start_rate + (rate - start_rate) * t / warmup_steps   if t < warmup_steps
        r(t) = rate                                                   if t >= warmup_steps

    so ``r(0) == start_rate`` and ``r(warmup_steps) == rate`` exactly. With
    ``warmup_steps == 0`` the schedule is constant at ``rate``. ``start_rate``
    may exceed ``rate`` (a linear decay).

    Parameters
    ----------
    rate : float
        Final drop rate in ``[0, 1]``.
    warmup_steps : int
        Number of steps of the ramp, ``>= 0``.
    start_rate : float, optional
        Drop rate at step 0, in ``[0, 1]``. Default 0.0.
    """

    __slots__ = ("rate", "warmup_steps", "start_rate")

    def __init__(self, rate: float, warmup_steps: int, start_rate: float = 0.0) -> None:
        self.rate: float = _check_rate(rate, "rate")
        self.warmup_steps: int = _check_count(warmup_steps, "warmup_steps")
        self.start_rate: float = _check_rate(start_rate, "start_rate")

    def _rate(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.rate
        return self.start_rate + (self.rate - self.start_rate) * step / self.warmup_steps

    def __repr__(self) -> str:
        return (
            f"LinearWarmup(rate={self.rate!r}, warmup_steps={self.warmup_steps!r}, "
            f"start_rate={self.start_rate!r})"
        )


class CosineSchedule(Schedule):
    """Half-cosine ramp from ``start_rate`` to ``rate``, then constant.

    The rate is held at ``start_rate`` for the first ``warmup_steps`` steps,
    then follows half a cosine period from ``start_rate`` (at step
    ``warmup_steps``) to ``rate`` (at step ``total_steps``), and stays at
    ``rate`` afterwards::

        r(t) = start_rate                                     if t < warmup_steps
        r(t) = start_rate + (rate - start_rate) * (1 - cos(pi * p)) / 2
               with p = (t - warmup_steps) / (total_steps - warmup_steps)
                                                              if warmup_steps <= t < total_steps
        r(t) = rate                                           if t >= total_steps

    The ramp is monotone, has zero slope at both ends, and goes *towards*
    ``rate``: increasing when ``rate > start_rate`` (the usual case: start
    without regularisation, end at the target drop rate), decreasing
    otherwise. ``r(warmup_steps) == start_rate`` and ``r(total_steps) == rate``
    exactly.

    Parameters
    ----------
    rate : float
        Final drop rate in ``[0, 1]``.
    total_steps : int
        Step at which ``rate`` is reached, ``>= warmup_steps``.
    start_rate : float, optional
        Initial drop rate in ``[0, 1]``. Default 0.0.
    warmup_steps : int, optional
        Number of initial steps held at ``start_rate`` before the cosine ramp
        begins, ``0 <= warmup_steps <= total_steps``. Default 0.

    Raises
    ------
    ValueError
        If ``warmup_steps > total_steps`` (besides the common checks).
    """

    __slots__ = ("rate", "total_steps", "start_rate", "warmup_steps")

    def __init__(
        self,
        rate: float,
        total_steps: int,
        start_rate: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        self.rate: float = _check_rate(rate, "rate")
        self.total_steps: int = _check_count(total_steps, "total_steps")
        self.start_rate: float = _check_rate(start_rate, "start_rate")
        self.warmup_steps: int = _check_count(warmup_steps, "warmup_steps")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be <= total_steps ({self.total_steps})"
            )

    def _rate(self, step: int) -> float:
        if step >= self.total_steps:
            return self.rate
        if step < self.warmup_steps:
            return self.start_rate
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        ramp = 0.5 * (1.0 - math.cos(math.pi * progress))
        # clamp against rounding so the result never leaves [min, max] of the endpoints
        value = self.start_rate + (self.rate - self.start_rate) * ramp
        lo, hi = sorted((self.start_rate, self.rate))
        return min(max(value, lo), hi)

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(rate={self.rate!r}, total_steps={self.total_steps!r}, "
            f"start_rate={self.start_rate!r}, warmup_steps={self.warmup_steps!r})"
        )


class StepSchedule(Schedule):
    """Piecewise-constant schedule.

    ``rates[0]`` is used for steps ``< milestones[0]``, ``rates[i]`` for
    ``milestones[i-1] <= step < milestones[i]``, and ``rates[-1]`` from
    ``milestones[-1]`` on. A step equal to a milestone already uses the next
    rate.

    Parameters
    ----------
    rates : sequence of float
        ``len(milestones) + 1`` drop rates, each in ``[0, 1]``.
    milestones : sequence of int
        Strictly increasing positive steps at which the rate changes. May be
        empty (then ``rates`` has one element and the schedule is constant).

    Raises
    ------
    TypeError
        If ``rates`` or ``milestones`` is not a sequence (a ``str`` is
        rejected), or an element has the wrong type.
    ValueError
        If the lengths do not match, a rate is outside ``[0, 1]``, or the
        milestones are not strictly increasing positive integers.
    """

    __slots__ = ("rates", "milestones")

    def __init__(self, rates: Sequence[float], milestones: Sequence[int]) -> None:
        for arg, name in ((rates, "rates"), (milestones, "milestones")):
            if isinstance(arg, (str, bytes)) or not isinstance(arg, Sequence):
                raise TypeError(f"{name} must be a sequence, got {type(arg).__name__}")
        self.rates: tuple[float, ...] = tuple(
            _check_rate(r, f"rates[{i}]") for i, r in enumerate(rates)
        )
        self.milestones: tuple[int, ...] = tuple(
            _check_count(m, f"milestones[{i}]") for i, m in enumerate(milestones)
        )
        if len(self.rates) != len(self.milestones) + 1:
            raise ValueError(
                f"need len(rates) == len(milestones) + 1, got {len(self.rates)} rates "
                f"and {len(self.milestones)} milestones"
            )
        prev = 0
        for i, m in enumerate(self.milestones):
            if m <= prev:
                raise ValueError(
                    f"milestones must be strictly increasing positive integers, "
                    f"got milestones[{i}] = {m} after {prev}"
                )
            prev = m

    def _rate(self, step: int) -> float:
        return self.rates[bisect.bisect_right(self.milestones, step)]

    def __repr__(self) -> str:
        return f"StepSchedule(rates={list(self.rates)!r}, milestones={list(self.milestones)!r})"


# --------------------------------------------------------------------------
# stochastic-depth rates (timm compatible)
# --------------------------------------------------------------------------
_F32 = struct.Struct("<f")


def _to_f32(value: float) -> float:
    """Round a Python float to the nearest IEEE-754 binary32 value."""
    return _F32.unpack(_F32.pack(value))[0]


def _linspace_f32(end: float, steps: int) -> list[float]:
    """Reproduce ``torch.linspace(0, end, steps).tolist()`` (float32, CPU).

    PyTorch's CPU kernel computes, in float32, ``step = (end - 0) / (steps - 1)``
    and element ``i`` as ``0 + step * i`` for ``i < steps // 2`` and
    ``end - step * (steps - 1 - i)`` otherwise. The x86-64 AVX2/AVX512
    builds of that kernel fuse the multiply-add (one rounding), which is
    what is reproduced here: for ``steps < 2**24`` the product and the
    difference are exact in binary64, so a single final rounding to binary32
    matches the fused operation.

    Parameters
    ----------
    end : float
        End value (already validated, in ``[0, 1]``).
    steps : int
        Number of points, ``>= 0``.

    Returns
    -------
    list of float
        The binary32 values as Python floats.
    """
    if steps == 0:
        return []
    if steps == 1:
        return [0.0]
    end32 = _to_f32(end)
    step = _to_f32(end32 / (steps - 1))
    half = steps // 2
    return [
        _to_f32(step * i) if i < half else _to_f32(end32 - step * (steps - 1 - i))
        for i in range(steps)
    ]


def calculate_drop_path_rates(
    drop_path_rate: float,
    depths: int | Sequence[int],
    stagewise: bool = False,
) -> list[float] | list[list[float]]:
    """Per-block stochastic-depth (drop path) rates, as ``timm`` computes them.

    Same signature and results as ``timm.layers.calculate_drop_path_rates``
    (timm >= 1.0.20; checked against timm 1.0.31 / git main 1.0.29.dev0):
    the rates rise linearly from 0 at the first block to ``drop_path_rate``
    at the last one (``torch.linspace(0, drop_path_rate, total_depth)``).

    * ``depths`` an int ``n``: a flat list of ``n`` rates. ``stagewise=True``
      is an error.
    * ``depths`` a sequence of stage depths, ``stagewise=False``: the flat
      list of ``sum(depths)`` rates.
    * ``depths`` a sequence, ``stagewise=True``: the *same* flat ramp split
      into one list per stage (``len(depths)`` lists, the ``i``-th of length
      ``depths[i]``, possibly empty). Despite timm's docstring, the rate is
      not constant within a stage: it keeps rising block by block.

    The values are float32 numbers (as produced by ``torch.linspace`` in the
    default dtype) returned as Python floats, e.g. ``0.1`` comes back as
    ``0.10000000149011612``. They are reproduced here without PyTorch; they
    match timm exactly on x86-64 builds of PyTorch with the AVX2/AVX512 CPU
    kernels (whose fused multiply-add this code emulates). On a build using
    the non-vectorised ``DEFAULT`` kernel, or with a float64 default dtype,
    timm's own values differ in the last float32 bit.

    Parameters
    ----------
    drop_path_rate : float
        Rate of the last block, in ``[0, 1]``.
    depths : int or sequence of int
        Total number of blocks, or the number of blocks per stage (each
        ``>= 0``).
    stagewise : bool, optional
        Return one list per stage (requires a sequence ``depths``).
        Default False.

    Returns
    -------
    list of float or list of list of float
        Flat list of rates, or one list of rates per stage when
        ``stagewise`` is true.

    Raises
    ------
    ValueError
        If ``stagewise`` is true and ``depths`` is an int (same message as
        timm), if ``drop_path_rate`` is outside ``[0, 1]`` or NaN, or if a
        depth is negative. (timm itself does not validate the rate, and
        raises ``RuntimeError`` from torch for negative depths.)
    TypeError
        If ``drop_path_rate`` is not a real number or a depth is not an
        integer (``bool`` rejected).

    Examples
    --------
    >>> calculate_drop_path_rates(0.2, 3)
    [0.0, 0.10000000149011612, 0.20000000298023224]
    >>> calculate_drop_path_rates(0.2, [1, 2], stagewise=True)
    [[0.0], [0.10000000149011612, 0.20000000298023224]]
    """
    rate = _check_rate(drop_path_rate, "drop_path_rate")
    if not isinstance(depths, bool) and isinstance(depths, numbers.Integral):
        if stagewise:
            raise ValueError("stagewise=True requires depths to be a list of stage depths")
        return _linspace_f32(rate, _check_count(depths, "depths"))
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence):
        raise TypeError(f"depths must be an int or a sequence of ints, got {type(depths).__name__}")
    stage_depths = [_check_count(d, f"depths[{i}]") for i, d in enumerate(depths)]
    flat = _linspace_f32(rate, sum(stage_depths))
    if not stagewise:
        return flat
    stages: list[list[float]] = []
    start = 0
    for d in stage_depths:
        stages.append(flat[start : start + d])
        start += d
    return stages
