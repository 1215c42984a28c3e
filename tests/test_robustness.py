"""Robustness in real processes (issue 12): integer arguments out of range, the end of a
generator's stream, environment variables, the private `_core` entry points with hostile
arguments, and buffers another thread changes while a kernel runs without the GIL. (Forks and
the thread pool are tested in their own file.)

Anything that crashed the interpreter before its fix runs in a child process, so a regression
fails one test instead of killing the run."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import threading

import fastdrop
import numpy as np
import pytest
from fastdrop import Generator, _core, _spec

END = 2**64  # the first counter block past a stream


def run_python(code: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


# --- integer arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: Generator(1, stream=-1), r"stream must be in \[0, 2\*\*64\), got -1"),
        (lambda: Generator(1, stream=END), r"stream must be in \[0, 2\*\*64\)"),
        (lambda: Generator(1).fork(-1), r"fork index must be in \[0, 2\*\*64\), got -1"),
        (lambda: Generator(1).fork(END), r"fork index must be in \[0, 2\*\*64\)"),
        (lambda: Generator(1).manual_seed(END), r"seed must be in \[-2\*\*63, 2\*\*64\)"),
        (lambda: Generator(1).set_state((-1, 0, 0)), r"state's seed must be in \[0, 2\*\*64\)"),
        (lambda: Generator(1).set_state((1, END, 0)), r"state's stream must be in"),
        (lambda: Generator(1).set_state((1, 0, -5)), r"state's offset must be in"),
        (lambda: Generator(1)._reserve(-1), r"blocks must be in \[0, 2\*\*64\), got -1"),
        (lambda: Generator(1)._reserve(END), r"blocks must be in \[0, 2\*\*64\)"),
        (lambda: _core._generator_from_state((1, 2, -3)), r"state's offset must be in"),
        (lambda: _core.MaskBits.filled([-1, 2], True), r"each in \[0, 2\*\*63\), got \[-1, 2\]"),
        (lambda: _core.MaskBits.filled([2**63], True), r"each in \[0, 2\*\*63\)"),
        (lambda: _core.cached_empty((2, -1), np.dtype(np.float32)), r"each in \[0, 2\*\*63\)"),
        (lambda: _core.cached_empty((1,) * 65, np.dtype(np.float32)), r"at most 64 dimensions"),
    ],
)
def test_integers_out_of_range_are_value_errors_naming_the_range(call, message):
    # PyO3's own conversion raised OverflowError for each of these.
    with pytest.raises(ValueError, match=message):
        call()


def test_integer_arguments_in_range_still_work_and_non_integers_are_type_errors():
    g = Generator(1, stream=END - 1)
    assert g.stream == END - 1
    assert g.fork(END - 1).stream != g.fork(0).stream
    assert Generator(1, stream=np.uint64(3)).stream == 3
    g.set_state((END - 1, END - 1, END - 1))
    assert g.get_state() == (END - 1, END - 1, END - 1)
    for call in [
        lambda: Generator(1, stream=1.0),
        lambda: Generator(1).fork("1"),
        lambda: Generator(1)._reserve(None),
        lambda: Generator(1).set_state((1, 0, 0.5)),
        lambda: _core.MaskBits.filled([2, "3"], True),
        lambda: _core.MaskBits.filled(3, True),
    ]:
        with pytest.raises(TypeError):
            call()


# --- the end of a stream ----------------------------------------------------------------------

X = np.random.default_rng(0).standard_normal((4, 6, 8, 8)).astype(np.float32) + 3

# Every way a call reserves counters: fused element masks (with and without a stored mask),
# drawn channel / sample masks, affine and noise applications, DropBlock with and without noise.
RESERVING = {
    "dropout": lambda x, g, **k: fastdrop.dropout(x, 0.5, generator=g, **k),
    "dropout_mask": lambda x, g, **k: fastdrop.dropout(x, 0.5, generator=g, return_mask=True, **k),
    "dropout2d": lambda x, g, **k: fastdrop.dropout2d(x, 0.5, generator=g, **k),
    "alpha_dropout": lambda x, g, **k: fastdrop.alpha_dropout(x, 0.5, True, generator=g, **k),
    "drop_path": lambda x, g, **k: fastdrop.drop_path(x, 0.5, True, generator=g, **k),
    "drop_block": lambda x, g, **k: fastdrop.drop_block_2d(x, 0.2, 3, generator=g, **k),
    "drop_block_noise": lambda x, g, **k: fastdrop.drop_block_2d(
        x, 0.2, 3, with_noise=True, generator=g, **k
    ),
    "dropout_add": lambda x, g, **k: fastdrop.dropout_add(
        x, np.ones_like(x), 0.5, generator=g, **k
    ),
}


def _blocks(name):
    g = Generator(5)
    RESERVING[name](X, g)
    return g.offset


@pytest.mark.parametrize("name", sorted(RESERVING))
def test_a_call_that_would_reach_the_end_of_the_stream_raises_and_changes_nothing(name):
    blocks = _blocks(name)
    for offset in [END - 64, END - blocks, END - 1]:
        g = Generator(5)
        g.set_state((5, 9, offset))
        x, out = X.copy(), np.full_like(X, 7.0)
        with pytest.raises(ValueError, match="the generator's stream is exhausted"):
            RESERVING[name](x, g, out=out)
        assert g.get_state() == (5, 9, offset)
        np.testing.assert_array_equal(x, X)
        assert (out == 7.0).all(), "nothing is written"
        if name not in ("drop_path", "dropout_add"):
            with pytest.raises(ValueError, match="exhausted"):
                RESERVING[name](x, g, inplace=True)
            np.testing.assert_array_equal(x, X)
            assert g.get_state() == (5, 9, offset)


@pytest.mark.parametrize("name", sorted(RESERVING))
def test_a_call_may_end_on_the_last_block_and_then_the_stream_is_spent(name):
    blocks = _blocks(name)
    g = Generator(5)
    g.set_state((5, 9, END - 1 - blocks))
    last = RESERVING[name](X, g)
    assert g.offset == END - 1, "the offset never wraps to 0"
    # The same call from the same state is the same call: no part of it came from offset 0.
    again = Generator(5)
    again.set_state((5, 9, END - 1 - blocks))
    np.testing.assert_array_equal(_result(RESERVING[name](X, again)), _result(last))
    if name != "drop_path":  # 4 samples: 1 in 16 masks would match by chance
        start = Generator(5)
        start.set_state((5, 9, 0))
        assert not np.array_equal(_result(RESERVING[name](X, start)), _result(last))
    with pytest.raises(ValueError, match="exhausted"):
        RESERVING[name](X, g)
    assert g.offset == END - 1
    # An empty call takes no blocks and still works.
    empty = np.ones((0, 6, 8, 8), np.float32)
    assert _result(RESERVING[name](empty, g)).shape == empty.shape


def _result(r):
    return r[0] if isinstance(r, tuple) else r


def test_the_bits_near_the_end_are_not_those_of_offset_zero():
    # Regression: from 2**64 - 64, a 1,000-element call wrapped and drew elements 256 on from
    # blocks 0.., the bits of a call made at offset 0.
    g = Generator(3)
    g.set_state((3, 0, END - 64))
    with pytest.raises(ValueError, match="exhausted"):
        fastdrop.dropout(np.ones(1000, np.float32), 0.5, generator=g)
    g.set_state((3, 0, END - 1 - 256))
    near_end = fastdrop.dropout(np.ones(1000, np.float32), 0.5, generator=g)
    at_zero = fastdrop.dropout(np.ones(1000, np.float32), 0.5, generator=Generator(3))
    assert not np.array_equal(near_end[256:], at_zero[:744])


def test_reserve_and_threads_sharing_a_generator_at_the_end_of_its_stream():
    g = Generator(1)
    g.set_state((1, 0, END - 64))
    with pytest.raises(ValueError, match="exhausted"):
        g._reserve(64)
    assert g._reserve(63) == END - 64
    assert g._reserve(0) == END - 1
    # 8 threads race for the last 10 calls' worth of blocks: exactly 10 succeed, disjointly.
    g.set_state((1, 0, END - 1 - 10 * 64))
    x = np.ones(256, np.float32)
    ok: list[bytes] = []
    refused: list[int] = []

    def work():
        for _ in range(5):
            try:
                ok.append(fastdrop.dropout(x, 0.5, generator=g).tobytes())
            except ValueError:
                refused.append(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 10 and len(refused) == 30
    assert len(set(ok)) == 10
    assert g.offset == END - 1


def test_torch_calls_reserve_the_same_way():
    torch = pytest.importorskip("torch")
    g = Generator(2)
    g.set_state((2, 0, END - 64))
    x = torch.ones(4, 6, 8, 8)
    before = x.clone()
    with pytest.raises(ValueError, match="exhausted"):
        fastdrop.dropout(x, 0.5, generator=g, inplace=True)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="exhausted"):
        fastdrop.drop_block_2d(x, 0.2, 3, generator=g)
    assert g.offset == END - 64


# --- environment variables --------------------------------------------------------------------

ENV_PROBE = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastdrop
import numpy as np
y = fastdrop.dropout(np.ones((3, 1 << 20), np.float32), 0.5)  # 12 MiB: a cached size
del y
print(repr([str(w.message) for w in caught if w.category is RuntimeWarning]))
print(fastdrop.simd_backend(), fastdrop._core.cached_bytes())
"""


def _probe(env):
    r = run_python(ENV_PROBE, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    messages_line, state = r.stdout.strip().splitlines()[-2:]
    backend, cached = state.split()
    return ast.literal_eval(messages_line), backend, int(cached)


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("FASTDROP_")}


@pytest.fixture(scope="module")
def defaults():
    """What an import without fastdrop variables gives: no warning, the best backend, a cache."""
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ENV_PROBE)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    messages_line, state = r.stdout.strip().splitlines()[-2:]
    assert ast.literal_eval(messages_line) == []
    backend, cached = state.split()
    assert int(cached) > 0
    return backend


@pytest.mark.parametrize("value", ["-1", "abc", "12GB", "1e9", "1.5G", "0x100000"])
def test_a_bad_cache_size_warns_naming_the_variable_and_uses_the_default(value, defaults):
    messages, backend, cached = _probe({"FASTDROP_CACHE_BYTES": value})
    assert len(messages) == 1, messages
    assert messages[0].startswith(f'FASTDROP_CACHE_BYTES="{value}" is not a byte count')
    assert "K, M, G or T suffix" in messages[0] and "using the default 1 GiB" in messages[0]
    assert cached > 0, "the default cache (1 GiB) is in use"
    assert backend == defaults


@pytest.mark.parametrize(
    "value,cached", [("0", False), ("8M", False), ("16M", True), ("16 MiB", True), ("1g", True)]
)
def test_cache_sizes_with_binary_suffixes_are_accepted(value, cached):
    # A 12 MiB output fits a 16 MiB cache and not an 8 MiB one.
    messages, _, held = _probe({"FASTDROP_CACHE_BYTES": value})
    assert messages == []
    assert (held > 0) == cached, (value, held)


def test_a_bad_simd_choice_warns_and_uses_auto(defaults):
    messages, backend, _ = _probe({"FASTDROP_SIMD": "bogus"})
    assert messages == [
        'FASTDROP_SIMD="bogus" is not a SIMD choice: expected auto, portable (or scalar), aesni '
        "or vaes; using auto"
    ]
    assert backend == defaults


@pytest.mark.parametrize(
    "value,portable", [("auto", False), ("portable", True), ("SCALAR", True), ("", False)]
)
def test_the_documented_simd_choices_are_quiet_and_one_switch_covers_both_paths(
    value, portable, defaults
):
    messages, backend, _ = _probe({"FASTDROP_SIMD": value})
    assert messages == []
    assert backend == ("portable" if portable else defaults)


def test_simd_choices_give_the_same_bits():
    code = """
        import hashlib, numpy as np, fastdrop
        x = np.random.default_rng(0).standard_normal((3, 5, 70, 70)).astype(np.float32)
        y = fastdrop.dropout(x, 0.3, generator=fastdrop.Generator(4))
        z = fastdrop.alpha_dropout(x, 0.3, True, generator=fastdrop.Generator(4))
        print(hashlib.sha256(y.tobytes() + z.tobytes()).hexdigest())
    """
    outs = set()
    for value in ["auto", "portable", "aesni"]:
        r = run_python(code, env={"FASTDROP_SIMD": value})
        assert r.returncode == 0, r.stderr[-2000:]
        outs.add(r.stdout.strip())
    assert len(outs) == 1


# --- the private entry points -----------------------------------------------------------------


def test_uninitialised_object_arrays_are_never_handed_out():
    # Before: both returned object arrays over recycled uninitialised memory; printing one
    # dereferenced garbage pointers and killed the interpreter.
    r = run_python("""
        import numpy as np, fastdrop
        from fastdrop import _core
        y = fastdrop.dropout(np.ones((3, 1 << 20), np.float32), 0.5)
        y[...] = np.nan
        del y  # a recycled 12 MiB buffer full of garbage for an object array
        obj = np.dtype(object)
        for call in [
            lambda: _core.cached_empty((3, 1 << 18), obj),
            lambda: _core.empty_like(np.empty((3, 1 << 18), obj)),
            lambda: _core.cached_empty((3, 1 << 18), np.dtype([("a", "f8"), ("b", "O")])),
            lambda: _core.empty_like(np.empty((3, 1 << 18), [("a", "f8"), ("b", "O")])),
            lambda: _core.cached_empty((3, 1 << 18), np.dtype("V8")),
            lambda: _core.cached_empty((3, 1 << 20), np.dtype(np.int64)),
            lambda: _core.empty_like(np.empty((3, 1 << 20), np.longdouble)),
        ]:
            try:
                a = call()
                print("returned", a.dtype, repr(a[:1]))
            except TypeError as e:
                print("TypeError", e)
        print("alive")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split("\n")
    assert lines[-2] == "alive"
    assert all(line.startswith("TypeError") for line in lines[:-2]), r.stdout
    assert "must be float16, float32, float64 or uint16, got dtype object" in lines[0]


def test_the_cache_still_serves_the_dtypes_it_is_for():
    for dt in [np.float16, np.float32, np.float64, np.uint16]:
        a = _core.cached_empty((2, 1 << 21), np.dtype(dt))
        assert a is not None and a.dtype == dt and a.shape == (2, 1 << 21)
        b = _core.empty_like(a)
        assert b.dtype == dt and b.shape == a.shape
    assert _core.cached_empty((2**62, 2**62), np.dtype(np.float32)) is None
    assert _core.cached_empty((), np.dtype(np.float32)) is None  # too small to cache


A = np.ones((4, 8), np.float32)
G = Generator(0)
_BITS = fastdrop.dropout(A, 0.5, return_mask=True)[1]._words()  # a (4, 8) mask's bits
_SCALE, _BY_KEPT = _spec.Scale(1.0), _spec.ScaleByKept()
_Bernoulli, _Blocks = _spec.Bernoulli, _spec.Blocks


def _call_spec(mask, application):
    return _spec.Spec(mask, application, None)


def _capsule(consumed=False):
    torch = pytest.importorskip("torch")
    from torch.utils.dlpack import to_dlpack

    c = to_dlpack(torch.ones(4, 8))
    if consumed:
        torch.from_dlpack(c)
    return c


def _zero_capsule():
    """torch's capsule of a ZeroTensor: a NULL data pointer under a (4, 8) shape."""
    torch = pytest.importorskip("torch")
    from torch.utils.dlpack import to_dlpack

    return to_dlpack(torch._efficientzerotensor(4, 8))


def _read_only(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b.flags.writeable = False
    return b


HOSTILE = [
    # apply(x, out, residual, spec, generator, store_mask): the operands and the spec's fields
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Bernoulli((4, 8), 0.5), _spec.Scale("2")), G, False
        ),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Bernoulli((-4, 8), 0.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(A, A.copy(), None, _call_spec(_Bernoulli((4,), 0.5), _SCALE), G, False),
        ValueError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Bernoulli((4, 8), 1.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(A, A.copy(), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, 0),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A[:2].copy(), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), A[:, :2], _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            A, A.astype(object), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A.astype(object), A.copy(), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A.astype(np.float64), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        TypeError,
    ),
    (
        lambda: _core.apply(A, [1.0], None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A[:, ::2], None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            _zero_capsule(), _capsule(), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (lambda: _core.mask_apply(_BITS, _zero_capsule(), _capsule(), 1.0), ValueError),
    (
        lambda: _core.apply(
            _capsule(True), A, None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        TypeError,
    ),
    # a Blocks spec's block size and seed rate
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), 0.1, -1, 2), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), 0.1, 2**64, 2), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), 0.1, 0, 2), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), 0.1, 9, 2), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), 0.1, 2.0, 2), _BY_KEPT), G, False
        ),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), 0.1, 1, 1), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), -0.1, 1, 1), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    # apply(x, out, residual, spec, generator, store_mask): the spec read by kind and field
    (lambda: _core.apply(A, A.copy(), None, None, G, False), TypeError),
    (
        lambda: _core.apply(A, A.copy(), None, _call_spec(_Bernoulli((4, 8), 0.5), ()), G, False),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Bernoulli((4, 8), "p"), _SCALE), G, False
        ),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Bernoulli((4, 8), 2.0), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Bernoulli((2, 8), 0.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(A, A.copy(), None, _call_spec(_Bernoulli(8, 0.5), _SCALE), G, False),
        TypeError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), 3, False
        ),
        TypeError,
    ),
    (
        lambda: _core.apply(A, A.T, None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False),
        ValueError,
    ),
    (
        lambda: _core.apply(
            A, _read_only(A), None, _call_spec(_Bernoulli((4, 8), 0.5), _SCALE), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 6, 8), 0.1, 1, 1), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 6, 8, 8), 0.1, 9, 1), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            X, X.copy(), None, _call_spec(_Blocks((4, 6, 8, 8), 0.1, 2**64, 1), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (
        lambda: _core.apply(
            A, A.copy(), None, _call_spec(_Blocks((4, 1, 8, 8), 0.1, 1, 1), _BY_KEPT), G, False
        ),
        ValueError,
    ),
    (lambda: _core.Applied(), TypeError),
    # mask_apply(mask, x, out, scale, residual=None)
    (lambda: _core.mask_apply(_core.MaskBits.filled([2], True), A, A.copy(), 1.0), ValueError),
    (lambda: _core.mask_apply(_core.MaskBits.filled([4, 9], True), A, A.copy(), 1.0), ValueError),
    (
        lambda: _core.mask_apply(_core.MaskBits.filled([4, 8], True), A, A.copy()[:3], 1.0),
        ValueError,
    ),
    (lambda: _core.mask_apply(A, A, A.copy(), 1.0), TypeError),
    (
        lambda: _core.mask_apply(_core.MaskBits.filled([4, 8], True), A, A.copy(), 1.0, A.T),
        ValueError,
    ),
    # normal_fill(out, generator): a C-contiguous, writeable float32/float64 array
    (lambda: _core.normal_fill(A.astype(object), G), TypeError),
    (lambda: _core.normal_fill(A.copy().T, G), ValueError),
    (lambda: _core.normal_fill(np.zeros((4, 8), np.float32)[:, ::2], G), ValueError),
    (lambda: _core.normal_fill(_read_only(A), G), ValueError),
    (lambda: _core.normal_fill(A.copy(), 3), TypeError),
    # mask_bits_from_packed(shape, packed)
    (lambda: _core.mask_bits_from_packed([-1], b""), ValueError),
    (lambda: _core.mask_bits_from_packed([4, 8], b"\x00"), ValueError),
    (lambda: _core.mask_bits_from_packed([2**40, 2**40], b"\x00"), ValueError),
    # softmax_dropout_forward(scores, dropped, logit_scale, causal, keep, generator)
    (lambda: _core.softmax_dropout_forward(A.copy(), A[:2].copy(), 1.0, False, 0.9, G), ValueError),
    (lambda: _core.softmax_dropout_forward(A.copy(), A.copy(), 1.0, False, 1.5, G), ValueError),
    (
        lambda: _core.softmax_dropout_forward(A[0].copy(), A[0].copy(), 1.0, False, 0.5, G),
        ValueError,
    ),
    (lambda: _core.softmax_dropout_forward(A.copy(), A.copy().T, 1.0, False, 0.5, G), ValueError),
    (
        lambda: _core.softmax_dropout_forward(A.copy(), A.astype(object), 1.0, False, 0.5, G),
        TypeError,
    ),
    # softmax_dropout_backward(probs, grad, dropped, mask, keep_scale)
    (
        lambda: _core.softmax_dropout_backward(
            A.copy(), A.copy(), A.copy(), _core.MaskBits.filled([2], True), 1.0
        ),
        ValueError,
    ),
    (
        lambda: _core.softmax_dropout_backward(
            A.copy(), A.copy(), A.astype(np.float64), _core.MaskBits.filled([4, 8], True), 1.0
        ),
        ValueError,
    ),
    # the rest
    (lambda: _core.MaskBits(), TypeError),
    (lambda: _core.MaskBits.filled([2**40, 2**40], True), ValueError),
    (lambda: _core.empty_like([1.0]), TypeError),
    (lambda: _core.cached_empty("abc", np.dtype(np.float32)), TypeError),
    (lambda: _core.cached_empty((4,), np.float32), TypeError),
    (lambda: _core._generator_from_state(None), TypeError),
    (lambda: _core._generator_from_state((1, 2)), TypeError),
    (lambda: _core.share_openmp(None), TypeError),
    (lambda: _core.share_openmp(b"libgomp.so.1"), TypeError),
]


@pytest.mark.parametrize("call,exc", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_arguments_to_the_private_entry_points_are_clean_errors(call, exc):
    before = A.copy(), X.copy(), G.get_state()
    with pytest.raises(exc):
        call()
    np.testing.assert_array_equal(A, before[0])
    np.testing.assert_array_equal(X, before[1])
    assert G.get_state() == before[2], "a refused call takes no counters"


def test_every_core_function_is_covered_by_a_hostile_call():
    import inspect

    covered = "".join(inspect.getsource(c) for c, _ in HOSTILE)
    covered += inspect.getsource(test_uninitialised_object_arrays_are_never_handed_out)
    public = [n for n in dir(_core) if not n.startswith("__")]
    exempt = {
        "Generator",  # its arguments: the integer tests above
        "CachedBuffer",
        "set_num_threads",  # its arguments: tests/test_threads.py
        "get_num_threads",
        "MAX_THREADS",  # a constant
        "simd_backend",
        "empty_cache",
        "cached_bytes",
        "_env_warnings",
        "unshare_openmp",  # no arguments; sharing is tests/test_team.py's
        "shares_openmp",
    }
    missing = [n for n in public if n not in exempt and f"_core.{n}" not in covered]
    assert not missing, missing


# --- buffers that change under a released GIL -------------------------------------------------

# A second thread resizes (frees) the memory of the arrays the main thread's calls run on, as
# fast as it can. Before the fix every mode segfaulted within a second; bounded in time and
# calls either way. A fixed mmap threshold makes glibc unmap every freed large block, so a use
# after free faults instead of passing silently on memory the allocator kept.
UNMAP_ON_FREE = {"MALLOC_MMAP_THRESHOLD_": "131072"}
RESIZE_HAMMER = """
import sys, threading, time
import numpy as np, fastdrop

mode = sys.argv[1]
N = 1 << 21  # 8 MiB float32: well above the size at which kernels release the GIL
box = {}
stop = time.monotonic() + 1.5
resized = 0

def resizer():
    global resized
    while time.monotonic() < stop:
        a = box.get("owner")
        if a is not None:
            try:
                a.resize(0, refcheck=False)
                resized += 1
            except ValueError:
                pass

t = threading.Thread(target=resizer)
t.start()
calls = refused = 0
# The operand is made in its final shape: a view made by the caller (a.reshape(...)) before the
# call would dangle as soon as the other thread resizes its owner with refcheck=False, which no
# callee can prevent (NumPy's own functions would read freed memory too).
SHAPES = {"dropout2d": (N // 256, 4, 8, 8), "drop_block": (N // 1024, 4, 16, 16)}
while time.monotonic() < stop and calls < 300:
    a = np.ones(SHAPES.get(mode, (N,)), np.float32)
    box["owner"] = a
    try:
        if mode == "inplace":
            fastdrop.dropout(a, 0.5, inplace=True)
        elif mode == "out":
            fastdrop.dropout(np.ones(a.shape, np.float32), 0.5, out=a)
        elif mode == "dropout2d":
            fastdrop.dropout2d(a, 0.5, inplace=True)
        elif mode == "drop_block":
            fastdrop.drop_block_2d(a, 0.1, 3)
        else:
            fastdrop.dropout(a, 0.5)
    except (ValueError, RuntimeError):
        refused += 1  # resized before the call: a shape error, never a crash
    calls += 1
t.join()
print("alive", calls, refused, resized)
"""


@pytest.mark.parametrize("mode", ["inplace", "out", "plain", "dropout2d", "drop_block"])
def test_resizing_an_array_while_a_kernel_runs_on_it_cannot_free_its_memory(mode, tmp_path):
    script = tmp_path / "hammer.py"
    script.write_text(RESIZE_HAMMER)
    r = subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **UNMAP_ON_FREE},
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("alive"), r.stdout


def test_the_owner_of_a_views_memory_is_pinned_while_the_kernel_runs():
    # A view cannot be resized, but the array that owns its memory can: the pin is on the owner
    # (the end of the `base` chain), for out= arrays too. Watched from a second thread, which
    # runs while the kernel has released the GIL. (A resize hammer cannot test views: between
    # calls a resized owner leaves the view dangling, which crashes NumPy itself.)
    import weakref

    owner = np.ones(1 << 23, np.float32)  # 32 MiB: milliseconds per call
    out_owner = np.ones(1 << 23, np.float32)
    x, out = owner[64:], out_owner[64:]
    done = threading.Event()
    seen = {"x": 0, "out": 0}

    def watch():
        while not done.is_set():
            seen["x"] += weakref.getweakrefcount(owner) > 0
            seen["out"] += weakref.getweakrefcount(out_owner) > 0

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(20):
            fastdrop.dropout(x, 0.5, out=out)
            if seen["x"] and seen["out"]:
                break
    finally:
        done.set()
        t.join()
    assert seen["x"] > 0 and seen["out"] > 0, seen
    assert weakref.getweakrefcount(owner) == weakref.getweakrefcount(out_owner) == 0


def test_the_pin_lasts_only_for_the_call():
    x = np.ones(1 << 20, np.float32)
    v = x[1:]
    fastdrop.dropout(v, 0.5, inplace=True)
    fastdrop.dropout(x, 0.5, out=np.empty_like(x))
    del v
    x.resize(10, refcheck=False)  # no weak reference is left behind
    assert x.shape == (10,)


SET_HAMMER = """
import sys, threading, time
import torch, fastdrop

N = 1 << 24  # 64 MiB: the kernel runs for milliseconds without the GIL
box = {}
go, acted = threading.Event(), threading.Event()
main = threading.main_thread().ident

def mutator():
    while True:
        go.wait()
        go.clear()
        a = box.pop("a", None)
        if a is None:
            return
        # Wait until the main thread is in fastdrop's call into the core, past making the
        # capsules: with the GIL in this thread, that means inside the kernel.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main)
            if frame is not None and frame.f_code.co_name == "_apply":
                break
            time.sleep(0)
        a.set_(torch.empty(0))
        acted.set()

fastdrop.dropout(torch.ones(4096), 0.5)  # loads fastdrop's torch side first
t = threading.Thread(target=mutator)
t.start()
for i in range(12):
    a = torch.ones(N)
    box["a"] = a
    acted.clear()
    go.set()
    fastdrop.dropout(a, 0.5, inplace=bool(i % 2))
    acted.wait()
box.clear()
go.set()
t.join()
print("alive")
"""


def test_set_on_a_torch_source_while_a_kernel_runs_cannot_free_its_memory(tmp_path):
    # A second thread calls set_() on the tensor once the main thread is inside fastdrop's call
    # into the core (seen from its frame), i.e. while the kernel runs without the GIL. Before the
    # fix: a segfault in each of 4 runs (the capsule shared the tensor, so set_() freed the
    # storage the kernel was using); after it, 12 of 12 runs survive. (A set_() racing with
    # torch's own detach() of the tensor, before the call reaches the core, is a data race in
    # torch, as for any torch operation on a tensor another thread mutates; not tested.)
    pytest.importorskip("torch")
    script = tmp_path / "hammer.py"
    script.write_text(SET_HAMMER)
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **UNMAP_ON_FREE},
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("alive"), r.stdout
