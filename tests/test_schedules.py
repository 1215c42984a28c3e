"""Tests for python/fastdrop/schedules.py (loaded by file path, not via the package)."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "python" / "fastdrop" / "schedules.py"
_spec = importlib.util.spec_from_file_location("_fastdrop_schedules_under_test", _PATH)
assert _spec is not None and _spec.loader is not None
sched = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sched
_spec.loader.exec_module(sched)

ConstantSchedule = sched.ConstantSchedule
LinearWarmup = sched.LinearWarmup
CosineSchedule = sched.CosineSchedule
StepSchedule = sched.StepSchedule
calculate_drop_path_rates = sched.calculate_drop_path_rates


def test_all_exports() -> None:
    assert set(sched.__all__) == {
        "Schedule",
        "ConstantSchedule",
        "LinearWarmup",
        "CosineSchedule",
        "StepSchedule",
        "calculate_drop_path_rates",
    }
    for name in sched.__all__:
        assert getattr(sched, name).__doc__


# ---------------------------------------------------------------- ConstantSchedule
def test_constant() -> None:
    s = ConstantSchedule(0.25)
    assert [s(t) for t in (0, 1, 10**12)] == [0.25, 0.25, 0.25]
    assert repr(s) == "ConstantSchedule(rate=0.25)"
    out = ConstantSchedule(1)(3)
    assert out == 1.0 and type(out) is float
    assert ConstantSchedule(0)(0) == 0.0


# ---------------------------------------------------------------- LinearWarmup
def test_linear_warmup_values() -> None:
    s = LinearWarmup(0.5, 4)
    assert [s(t) for t in range(7)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert all(type(s(t)) is float for t in range(7))


def test_linear_warmup_start_rate_and_decay() -> None:
    s = LinearWarmup(0.5, 2, start_rate=0.25)
    assert [s(t) for t in range(4)] == [0.25, 0.375, 0.5, 0.5]
    d = LinearWarmup(0.0, 4, start_rate=1.0)  # start above the target: linear decay
    assert [d(t) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_linear_warmup_endpoints_exact() -> None:
    s = LinearWarmup(0.1, 3, start_rate=0.3)
    assert s(0) == 0.3
    assert s(3) == 0.1
    assert s(1) == pytest.approx(0.3 - 0.2 / 3, abs=1e-15)
    assert s(2) == pytest.approx(0.3 - 0.4 / 3, abs=1e-15)


def test_linear_warmup_zero_steps() -> None:
    s = LinearWarmup(0.3, 0, start_rate=0.9)
    assert s(0) == 0.3 and s(5) == 0.3


def test_linear_warmup_repr() -> None:
    assert repr(LinearWarmup(0.1, 10)) == "LinearWarmup(rate=0.1, warmup_steps=10, start_rate=0.0)"


# ---------------------------------------------------------------- CosineSchedule
def test_cosine_values() -> None:
    s = CosineSchedule(0.2, 4)
    got = [s(t) for t in range(6)]
    expected = [0.2 * (1 - math.cos(math.pi * t / 4)) / 2 for t in range(4)] + [0.2, 0.2]
    assert got == pytest.approx(expected, abs=1e-15)
    assert got[0] == 0.0 and got[2] == pytest.approx(0.1, abs=1e-15) and got[4] == 0.2
    assert all(a <= b for a, b in zip(got, got[1:]))  # monotone increasing


def test_cosine_warmup_hold_and_decreasing() -> None:
    s = CosineSchedule(0.0, 6, start_rate=0.8, warmup_steps=2)
    got = [s(t) for t in range(8)]
    assert got[:3] == [0.8, 0.8, 0.8]  # held, then the ramp starts at start_rate
    assert got[4] == pytest.approx(0.4, abs=1e-15)  # halfway through the 4-step ramp
    assert got[6:] == [0.0, 0.0]
    assert all(a >= b for a, b in zip(got, got[1:]))  # monotone decreasing
    assert all(0.0 <= v <= 0.8 for v in got)


def test_cosine_degenerate() -> None:
    s = CosineSchedule(0.3, 0)
    assert s(0) == 0.3 and s(10) == 0.3
    h = CosineSchedule(0.3, 5, start_rate=0.1, warmup_steps=5)  # pure hold then jump
    assert [h(t) for t in range(7)] == [0.1] * 5 + [0.3, 0.3]


def test_cosine_repr() -> None:
    assert (
        repr(CosineSchedule(0.1, 100, warmup_steps=10))
        == "CosineSchedule(rate=0.1, total_steps=100, start_rate=0.0, warmup_steps=10)"
    )


# ---------------------------------------------------------------- StepSchedule
def test_step_schedule() -> None:
    s = StepSchedule([0.0, 0.1, 0.3], [10, 20])
    assert [s(t) for t in (0, 9, 10, 19, 20, 10**9)] == [0.0, 0.0, 0.1, 0.1, 0.3, 0.3]
    assert repr(s) == "StepSchedule(rates=[0.0, 0.1, 0.3], milestones=[10, 20])"
    one = StepSchedule((0.2,), ())
    assert one(0) == 0.2 and one(99) == 0.2
    assert type(StepSchedule([1, 0], [1])(0)) is float


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [-0.1, 1.0000001, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "make",
    [
        lambda r: ConstantSchedule(r),
        lambda r: LinearWarmup(r, 10),
        lambda r: LinearWarmup(0.1, 10, start_rate=r),
        lambda r: CosineSchedule(r, 10),
        lambda r: CosineSchedule(0.1, 10, start_rate=r),
        lambda r: StepSchedule([0.1, r], [5]),
        lambda r: calculate_drop_path_rates(r, 4),
    ],
)
def test_bad_rate_value(make, bad) -> None:
    with pytest.raises(ValueError):
        make(bad)


@pytest.mark.parametrize("bad", ["0.1", None, True, [0.1], 1j])
@pytest.mark.parametrize(
    "make",
    [
        lambda r: ConstantSchedule(r),
        lambda r: LinearWarmup(r, 10),
        lambda r: LinearWarmup(0.1, 10, start_rate=r),
        lambda r: CosineSchedule(r, 10),
        lambda r: CosineSchedule(0.1, 10, start_rate=r),
        lambda r: StepSchedule([r], []),
        lambda r: calculate_drop_path_rates(r, 4),
    ],
)
def test_bad_rate_type(make, bad) -> None:
    with pytest.raises(TypeError):
        make(bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: LinearWarmup(0.1, n),
        lambda n: CosineSchedule(0.1, n),
        lambda n: CosineSchedule(0.1, 10, warmup_steps=n),
        lambda n: StepSchedule([0.1, 0.2], [n]),
        lambda n: calculate_drop_path_rates(0.1, n),
        lambda n: calculate_drop_path_rates(0.1, [2, n]),
        lambda n: calculate_drop_path_rates(0.1, [2, n], stagewise=True),
    ],
)
def test_bad_counts(make) -> None:
    with pytest.raises(ValueError):
        make(-1)
    for bad_type in (1.5, 2.0, "3", None, True):
        with pytest.raises(TypeError):
            make(bad_type)


def test_cosine_warmup_longer_than_total() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(0.1, 5, warmup_steps=6)


def test_step_schedule_errors() -> None:
    with pytest.raises(ValueError, match="len"):
        StepSchedule([0.1, 0.2], [])
    with pytest.raises(ValueError, match="len"):
        StepSchedule([0.1], [3])
    with pytest.raises(ValueError, match="increasing"):
        StepSchedule([0.1, 0.2, 0.3], [5, 5])
    with pytest.raises(ValueError, match="increasing"):
        StepSchedule([0.1, 0.2, 0.3], [6, 5])
    with pytest.raises(ValueError, match="increasing"):
        StepSchedule([0.1, 0.2], [0])
    with pytest.raises(TypeError):
        StepSchedule("0.1", [])
    with pytest.raises(TypeError):
        StepSchedule([0.1, 0.2], 5)
    with pytest.raises(TypeError):
        StepSchedule({0.1}, [])


@pytest.mark.parametrize(
    "s",
    [
        ConstantSchedule(0.1),
        LinearWarmup(0.1, 5),
        CosineSchedule(0.1, 5),
        StepSchedule([0.1, 0.2], [3]),
    ],
)
def test_call_step_validation(s) -> None:
    with pytest.raises(ValueError):
        s(-1)
    for bad in (1.0, "1", None, True):
        with pytest.raises(TypeError):
            s(bad)


# ---------------------------------------------------------------- calculate_drop_path_rates
def test_drop_path_rates_values() -> None:
    assert calculate_drop_path_rates(0.2, 3) == [0.0, 0.10000000149011612, 0.20000000298023224]
    assert calculate_drop_path_rates(0.1, 0) == []
    assert calculate_drop_path_rates(0.1, 1) == [0.0]
    assert calculate_drop_path_rates(0.0, 4) == [0.0] * 4
    assert calculate_drop_path_rates(1, 3) == [0.0, 0.5, 1.0]
    r = calculate_drop_path_rates(0.1, 5)
    assert r == [
        0.0,
        0.02500000037252903,
        0.05000000074505806,
        0.07500000298023224,
        0.10000000149011612,
    ]
    assert all(type(v) is float for v in r)
    # float32 rounding with the fused multiply-add of PyTorch's AVX2 linspace kernel
    assert calculate_drop_path_rates(0.1, 10)[6] == 0.06666667014360428


def test_drop_path_rates_lists() -> None:
    flat = calculate_drop_path_rates(0.1, [2, 3])
    assert flat == calculate_drop_path_rates(0.1, 5)
    assert calculate_drop_path_rates(0.1, (2, 3)) == flat
    stages = calculate_drop_path_rates(0.1, [2, 3], stagewise=True)
    assert stages == [flat[:2], flat[2:]]
    assert calculate_drop_path_rates(0.1, [2, 0, 3], stagewise=True) == [flat[:2], [], flat[2:]]
    assert calculate_drop_path_rates(0.1, [], stagewise=True) == []
    assert calculate_drop_path_rates(0.1, []) == []
    assert calculate_drop_path_rates(0.1, [1], stagewise=True) == [[0.0]]


def test_drop_path_rates_errors() -> None:
    with pytest.raises(ValueError, match="stagewise=True requires depths to be a list"):
        calculate_drop_path_rates(0.1, 4, stagewise=True)
    with pytest.raises(TypeError):
        calculate_drop_path_rates(0.1, "12")
    with pytest.raises(TypeError):
        calculate_drop_path_rates(0.1, 4.0)
    with pytest.raises(TypeError):
        calculate_drop_path_rates(0.1, {1, 2})


_TIMM_CASES: list[tuple[float, object, bool]] = []
for _rate in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1 / 3, 0.123456789, 1.0):
    for _n in (0, 1, 2, 3, 7, 10, 12, 16, 17, 24, 25, 32, 36, 48, 97, 200):
        _TIMM_CASES.append((_rate, _n, False))
    for _depths in ([2, 2, 6, 2], [3, 3, 9, 3], [3, 3, 27, 3], [2, 2, 18, 2], [1], [0, 4, 0], []):
        _TIMM_CASES.append((_rate, _depths, False))
        _TIMM_CASES.append((_rate, _depths, True))
        _TIMM_CASES.append((_rate, tuple(_depths), True))


def test_drop_path_rates_match_timm() -> None:
    pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from timm.layers.drop import calculate_drop_path_rates as timm_rates

    exact = torch.backends.cpu.get_cpu_capability().startswith("AVX")
    for rate, depths, stagewise in _TIMM_CASES:
        ours = calculate_drop_path_rates(rate, depths, stagewise=stagewise)
        theirs = timm_rates(rate, depths, stagewise=stagewise)
        if exact:
            assert ours == theirs, (rate, depths, stagewise)
        else:  # non-FMA kernel: timm itself differs in the last float32 bit
            flat_o = [v for s in ours for v in s] if stagewise else ours
            flat_t = [v for s in theirs for v in s] if stagewise else theirs
            assert flat_o == pytest.approx(flat_t, rel=2.5e-7, abs=1e-30)
