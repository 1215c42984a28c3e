"""A bounded fuzz run over fastdrop's Python API (issue 6), hypothesis-based, runnable standalone:

    python tests/fuzz_api.py [SECONDS]      # default 60

Two campaigns share the time budget until it runs out, each round with fresh random seeds:
- the property check of `tests/test_properties.py` (`check_call`) over every public function,
  with far more examples than the test suite runs;
- wild arguments: any object for every argument (ints, floats incl. NaN and inf, strings, None,
  lists, arrays of every dtype and rank, broadcast and read-only views). The only acceptable
  outcomes are a result or a TypeError / ValueError / MemoryError; any other exception fails,
  and a crash of the interpreter is a crash of this script;
- with torch installed, the torch property checks of `tests/test_torch_properties.py`:
  `check_torch_call` (torch's outcome, error class or success, the formula's values and
  gradients, over every kind of tensor) and `check_family_call` (the other family members
  give on every kind of tensor what they give on a plain tensor of its values).

A failure prints hypothesis's minimal example; turn it into a regression test in
tests/test_hardening.py.
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import fastdrop  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_properties import FUNCTIONS, check_call  # noqa: E402

ACCEPTABLE = (TypeError, ValueError, MemoryError)

SIGNATURES = {
    "dropout": ["p", "training", "inplace"],
    "alpha_dropout": ["p", "training", "inplace"],
    "feature_alpha_dropout": ["p", "training", "inplace"],
    "dropout1d": ["p", "training", "inplace"],
    "dropout2d": ["p", "training", "inplace"],
    "dropout3d": ["p", "training", "inplace"],
    "drop_path": ["drop_prob", "training", "scale_by_keep"],
    "drop_block_2d": [
        "drop_prob",
        "block_size",
        "gamma_scale",
        "with_noise",
        "inplace",
        "couple_channels",
        "scale_by_keep",
        "training",
    ],
    "dropout_add": ["residual", "p", "training"],
    "drop_path_add": ["branch", "drop_prob", "training", "scale_by_keep"],
}


@st.composite
def wild_arrays(draw):
    dtype = draw(
        st.sampled_from(
            [np.float16, np.float32, np.float64, np.int32, np.bool_, np.complex64, ">f4", np.uint16]
        )
    )
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=6)))
    x = np.ones(shape, dtype)
    kind = draw(st.sampled_from(["plain", "broadcast", "read-only", "reversed", "0-d scalar"]))
    if kind == "broadcast" and x.ndim:
        x = np.broadcast_to(x[(slice(0, 1),) * x.ndim], shape)
    elif kind == "read-only":
        x.flags.writeable = False
    elif kind == "reversed" and x.ndim:
        x = x[::-1]
    elif kind == "0-d scalar":
        return x.dtype.type(1) if x.dtype.kind != "c" else np.complex64(1)
    return x


WILD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.floats(), max_size=3),
    wild_arrays(),
    st.sampled_from([0.0, 0.5, 1.0, 7, -1]),
    st.just(np.random.default_rng(0)),
    st.builds(fastdrop.Generator, st.integers(0, 9)),
)


def wild_call(data) -> None:
    name = data.draw(st.sampled_from(sorted(SIGNATURES)), "function")
    f = getattr(fastdrop, name)
    x = data.draw(st.one_of(wild_arrays(), WILD), "input")
    kwargs = {k: data.draw(WILD, k) for k in SIGNATURES[name] if data.draw(st.booleans())}
    if data.draw(st.booleans()):
        kwargs["generator"] = data.draw(WILD, "generator")
    kwargs["return_mask"] = data.draw(st.booleans(), "return_mask")
    try:
        f(x, **kwargs)
    except ACCEPTABLE:
        pass


FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


@FUZZ
@given(st.data())
def fuzz_properties(data):
    check_call(data, data.draw(st.sampled_from(sorted(FUNCTIONS)), "function"))


@FUZZ
@given(st.data())
def fuzz_wild_arguments(data):
    wild_call(data)


CAMPAIGNS = [fuzz_properties, fuzz_wild_arguments]
try:
    import torch  # noqa: F401
except ImportError:  # no torch: the NumPy campaigns only
    pass
else:
    from test_torch_properties import FAMILY, check_family_call, check_torch_call

    @FUZZ
    @given(st.data())
    def fuzz_torch(data):
        check_torch_call(data)

    @FUZZ
    @given(st.data())
    def fuzz_torch_family(data):
        check_family_call(data, data.draw(st.sampled_from(sorted(FAMILY)), "function"))

    CAMPAIGNS += [fuzz_torch, fuzz_torch_family]


def main(seconds: float) -> int:
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        for campaign in CAMPAIGNS:
            campaign()
        rounds += 1
    print(
        f"fuzz_api: {rounds} rounds of {len(CAMPAIGNS) * FUZZ.max_examples} examples in "
        f"{seconds:.0f}s, no failures"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0))
