"""fastdrop.dropout on NumPy: values, keep rates, reproducibility, masks and every error path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import fastdrop
import numpy as np
import pytest
from conftest import FLOATS, assert_binomial, expected_scaled
from fastdrop import Generator


def randn(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_elements_are_scaled_exactly_and_dropped_are_zero(dtype, p):
    x = randn(10_000, dtype) + dtype(3)  # no zeros in the input, so zeros mean dropped
    y, mask = fastdrop.dropout(x, p, generator=Generator(1), return_mask=True)
    kept = mask.numpy()
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y[kept], expected_scaled(x[kept], 1.0 / (1.0 - p)))
    assert np.all(y[~kept] == 0)
    assert 0 < kept.sum() < x.size


def test_p_zero_and_eval_return_the_input_itself():
    x = randn(100)
    assert fastdrop.dropout(x, 0.0) is x
    assert fastdrop.dropout(x, 0.7, training=False) is x
    y, mask = fastdrop.dropout(x, 0.0, return_mask=True)
    assert y is x and mask.numpy().all()


@pytest.mark.parametrize("dtype", FLOATS)
def test_p_one_gives_zeros(dtype):
    x = randn((7, 9), dtype)
    y = fastdrop.dropout(x, 1.0)
    assert y.dtype == dtype and not np.any(y)


@pytest.mark.parametrize("dtype", FLOATS)
def test_zero_dim_and_empty_arrays(dtype):
    x0 = np.array(2.0, dtype=dtype)
    y0 = fastdrop.dropout(x0, 0.5, generator=Generator(3))
    assert y0.shape == () and y0.dtype == dtype and float(y0) in (0.0, 4.0)
    for shape in [(0,), (3, 0, 2), (0, 0)]:
        e = np.empty(shape, dtype)
        ye = fastdrop.dropout(e, 0.5)
        assert ye.shape == shape and ye.dtype == dtype


def test_inplace_writes_the_callers_buffer_and_out_of_place_never_does():
    x = randn(5000) + 3
    before = x.copy()
    y = fastdrop.dropout(x, 0.5, generator=Generator(4))
    np.testing.assert_array_equal(x, before)
    z = fastdrop.dropout(x, 0.5, inplace=True, generator=Generator(4))
    assert z is x
    np.testing.assert_array_equal(x, y)


# --- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_is_binomial(p):
    n = 1 << 20
    _, mask = fastdrop.dropout(np.ones(n, np.float32), p, generator=Generator(11), return_mask=True)
    assert_binomial(mask.count_kept(), n, 1 - p)


def test_small_p_is_honoured_exactly():
    # p = 1e-4 on 4M elements, as the issue asks: rounding p to 1/256 or 1/65536 steps would
    # give 0 or 1/65536 (= 1.5e-5) and fail the bound.
    n = 1 << 22
    _, mask = fastdrop.dropout(
        np.ones(n, np.float32), 1e-4, generator=Generator(5), return_mask=True
    )
    assert_binomial(n - mask.count_kept(), n, 1e-4, "dropped")


def test_p_resolution_is_finer_than_2_to_minus_24():
    # p = 3 * 2^-22: with 2^26 decisions about 48 are dropped. A generator rounding p to
    # 2^-16 steps would drop 0 or 1024.
    n = 1 << 26
    p = 3 * 2.0**-22
    _, mask = fastdrop.dropout(np.zeros(n, np.float16), p, generator=Generator(6), return_mask=True)
    assert_binomial(n - mask.count_kept(), n, p, "dropped")


@pytest.mark.parametrize("lag", [1, 2, 4, 31, 32, 33, 63, 64, 65, 128])
def test_neighbouring_decisions_are_independent(lag):
    n = 1 << 20
    _, mask = fastdrop.dropout(
        np.ones(n, np.float32), 0.5, generator=Generator(7), return_mask=True
    )
    k = mask.numpy()
    both = int(np.count_nonzero(k[:-lag] & k[lag:]))
    assert_binomial(both, n - lag, 0.25, f"pairs at lag {lag}")


def test_whole_words_are_independent():
    # Popcounts of consecutive 64-bit words must not be correlated.
    n = 1 << 22
    _, mask = fastdrop.dropout(
        np.ones(n, np.float32), 0.5, generator=Generator(8), return_mask=True
    )
    words = mask.numpy().reshape(-1, 64).sum(axis=1).astype(np.float64)
    r = np.corrcoef(words[:-1], words[1:])[0, 1]
    # Under independence r ~ N(0, 1/m).
    assert abs(r) < 6 / np.sqrt(words.size), r
    assert_binomial(int(words.sum()), n, 0.5)


# --- reproducibility --------------------------------------------------------------------------


def test_same_seed_same_mask_and_each_call_draws_fresh_bits():
    x = np.ones(10_000, np.float32)
    g = Generator(42)
    a = fastdrop.dropout(x, 0.5, generator=g)
    b = fastdrop.dropout(x, 0.5, generator=g)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, fastdrop.dropout(x, 0.5, generator=Generator(42)))
    fastdrop.manual_seed(9)
    c = fastdrop.dropout(x, 0.5)
    fastdrop.manual_seed(9)
    np.testing.assert_array_equal(c, fastdrop.dropout(x, 0.5))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mask_does_not_depend_on_thread_count(threads):
    x = np.ones(3_000_001, np.float32)
    fastdrop.set_num_threads(1)
    ref = fastdrop.dropout(x, 0.3, generator=Generator(12))
    fastdrop.set_num_threads(threads)
    np.testing.assert_array_equal(fastdrop.dropout(x, 0.3, generator=Generator(12)), ref)


def _layouts(base):
    yield "c", base
    yield "fortran", np.asfortranarray(base)
    big = np.zeros((base.shape[0] * 2, base.shape[1] * 3), base.dtype)
    view = big[::2, ::3]
    view[...] = base
    yield "strided", view
    rev = np.ascontiguousarray(base[::-1, ::-1])[::-1, ::-1]
    yield "negative strides", rev
    yield "transposed", np.ascontiguousarray(base.T).T


@pytest.mark.parametrize("dtype", FLOATS)
def test_mask_does_not_depend_on_layout_or_inplace(dtype):
    base = randn((301, 67), dtype) + dtype(4)
    ref = fastdrop.dropout(base, 0.4, generator=Generator(13))
    for name, x in _layouts(base):
        np.testing.assert_array_equal(x, base)
        y = fastdrop.dropout(x, 0.4, generator=Generator(13))
        np.testing.assert_array_equal(y, ref, err_msg=name)
        z = x.copy(order="K")
        fastdrop.dropout(z, 0.4, inplace=True, generator=Generator(13))
        np.testing.assert_array_equal(z, ref, err_msg=f"{name}, in place")


def test_output_layout_follows_numpy():
    f = np.asfortranarray(randn((40, 30)))
    assert fastdrop.dropout(f, 0.5).flags.f_contiguous
    assert fastdrop.dropout(randn((40, 30)), 0.5).flags.c_contiguous


def test_unaligned_input():
    raw = np.zeros(4 * 1001 + 1, np.uint8)
    x = raw[1:].view(np.float32)
    assert not x.flags.aligned
    x[...] = 1.5
    y = fastdrop.dropout(x, 0.5, generator=Generator(14))
    np.testing.assert_array_equal(
        y, fastdrop.dropout(np.full(1001, 1.5, np.float32), 0.5, generator=Generator(14))
    )


def test_numpy_generator_is_accepted_and_reproducible():
    x = np.ones(1000, np.float32)
    a = fastdrop.dropout(x, 0.5, generator=np.random.default_rng(3))
    b = fastdrop.dropout(x, 0.5, generator=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


# --- masks ------------------------------------------------------------------------------------


def test_mask_is_bit_packed_and_its_backward_is_grad_times_mask_over_keep():
    x = randn((64, 100)) + 5
    y, mask = fastdrop.dropout(x, 0.25, generator=Generator(15), return_mask=True)
    assert mask.shape == x.shape and mask.input_shape == x.shape
    assert mask.nbytes <= x.size // 8 + 8
    kept = mask.numpy()
    assert kept.dtype == bool
    np.testing.assert_array_equal(kept, y != 0)
    grad = randn(x.shape, seed=2)
    np.testing.assert_array_equal(mask.backward(grad), expected_scaled(grad * kept, 1 / 0.75))
    with pytest.raises(ValueError, match="shape"):
        mask.backward(randn((3, 3)))


def test_mask_backward_matches_finite_differences():
    x = randn(50, np.float64)
    g = Generator(16)
    state = g.get_state()
    _, mask = fastdrop.dropout(x, 0.3, generator=g, return_mask=True)
    w = randn(50, np.float64, seed=1)
    analytic = mask.backward(w)
    eps = 1e-6
    numeric = np.empty_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        g.set_state(state)
        fp = fastdrop.dropout(x + e, 0.3, generator=g) @ w
        g.set_state(state)
        fm = fastdrop.dropout(x - e, 0.3, generator=g) @ w
        numeric[i] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_p_is_a_value_error(p):
    with pytest.raises(ValueError, match="between 0 and 1"):
        fastdrop.dropout(np.ones(3, np.float32), p)


@pytest.mark.parametrize(
    "bad",
    [
        np.arange(4),
        np.ones(3, bool),
        np.ones(3, np.complex64),
        np.array([1.0, None], dtype=object),
        np.ones(3, np.int8),
    ],
)
def test_non_float_arrays_are_type_errors(bad):
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fastdrop.dropout(bad, 0.5)


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, "x", None])
def test_non_arrays_are_type_errors(bad):
    with pytest.raises(TypeError):
        fastdrop.dropout(bad, 0.5)


def test_bad_argument_types():
    with pytest.raises(TypeError):
        fastdrop.dropout(np.ones(3), "0.5")
    with pytest.raises(TypeError):
        fastdrop.dropout(np.ones(3), 0.5, generator=3)
    with pytest.raises(TypeError):
        fastdrop.dropout(np.ones(3), 0.5, training="yes")


def test_non_native_byte_order_is_refused_untouched():
    x = np.ones(10, dtype=">f4")
    with pytest.raises(TypeError, match="byte order"):
        fastdrop.dropout(x, 0.5, inplace=True)
    assert np.all(x == 1)


def test_inplace_on_read_only_is_refused_and_untouched():
    x = randn(100)
    x.flags.writeable = False
    before = x.copy()
    with pytest.raises(ValueError, match="read-only"):
        fastdrop.dropout(x, 0.5, inplace=True)
    np.testing.assert_array_equal(x, before)


def test_inplace_on_zero_stride_view_is_refused_untouched():
    base = np.ones(1, np.float32)
    x = np.lib.stride_tricks.as_strided(base, shape=(8,), strides=(0,), writeable=True)
    with pytest.raises(ValueError, match="zero stride"):
        fastdrop.dropout(x, 0.5, inplace=True)
    assert base[0] == 1
    # Out of place, a broadcast view is just an input.
    y = fastdrop.dropout(np.broadcast_to(np.float32(2), (8,)), 0.5, generator=Generator(1))
    assert set(np.unique(y)) <= {0.0, 4.0}


# --- threads and the GIL ----------------------------------------------------------------------


def test_the_gil_is_released_during_the_kernel():
    fastdrop.set_num_threads(1)
    x = np.ones(1 << 25, np.float32)
    fastdrop.dropout(x, 0.5)  # warm up
    done = threading.Event()
    ticks = 0

    def work():
        for _ in range(3):
            fastdrop.dropout(x, 0.5, inplace=True)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.0005)
    t.join()
    # With the GIL held for the whole kernel the loop would barely run between calls.
    assert ticks >= 10, ticks


def test_threads_sharing_a_generator_never_get_the_same_bits():
    g = Generator(77)
    x = np.ones(4096, np.float32)
    results: list[bytes] = []
    lock = threading.Lock()

    def work():
        for _ in range(50):
            y = fastdrop.dropout(x, 0.5, generator=g)
            with lock:
                results.append(y.tobytes())

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 400


# --- out= -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_out_receives_the_same_result_as_a_fresh_array(dtype):
    x = randn((33, 17), dtype) + dtype(2)
    buf = np.full_like(x, 7)
    ref = fastdrop.dropout(x, 0.3, generator=Generator(21))
    y = fastdrop.dropout(x, 0.3, generator=Generator(21), out=buf)
    assert y is buf
    np.testing.assert_array_equal(buf, ref)
    # Every variant takes it, the fused ones too.
    r = randn((33, 17), dtype, seed=3)
    fused = np.empty_like(x)
    fastdrop.dropout_add(x, r, 0.3, generator=Generator(22), out=fused)
    np.testing.assert_array_equal(fused, fastdrop.dropout_add(x, r, 0.3, generator=Generator(22)))
    # Identity calls still fill it.
    ident = np.empty_like(x)
    assert fastdrop.dropout(x, 0.3, training=False, out=ident) is ident
    np.testing.assert_array_equal(ident, x)


def test_out_errors_come_before_any_write():
    x = randn((4, 5))
    for bad, exc, match in [
        (np.empty((5, 4), np.float32), ValueError, "shape and dtype"),
        (np.empty((4, 5), np.float64), ValueError, "shape and dtype"),
        ([0.0] * 20, TypeError, "numpy.ndarray"),
    ]:
        with pytest.raises(exc, match=match):
            fastdrop.dropout(x, 0.5, out=bad)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastdrop.dropout(x, 0.5, out=ro)
    with pytest.raises(ValueError, match="not both"):
        fastdrop.dropout(x, 0.5, inplace=True, out=np.empty_like(x))
    before = x.copy()
    with pytest.raises(ValueError, match="overlaps"):
        fastdrop.dropout(x, 0.5, out=x[::-1])  # overlaps x without being x
    np.testing.assert_array_equal(x, before)


def test_out_is_refused_for_torch_tensors():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="out="):
        fastdrop.dropout(torch.ones(3), 0.5, out=np.empty(3, np.float32))


# --- the plain-call fast path and the output cache --------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_plain_call_gives_what_every_other_route_gives(dtype):
    # dropout(x, p) with defaults skips the general path; the same generator state must give
    # the same result through it, through out=, and with a mask returned.
    x = randn((37, 29), dtype)
    plain = fastdrop.dropout(x, 0.3, generator=Generator(5))
    buf = np.empty_like(x)
    fastdrop.dropout(x, 0.3, generator=Generator(5), out=buf)
    with_mask, mask = fastdrop.dropout(x, 0.3, generator=Generator(5), return_mask=True)
    np.testing.assert_array_equal(plain, buf)
    np.testing.assert_array_equal(plain, with_mask)
    np.testing.assert_array_equal(plain != 0, mask.numpy())  # randn has no exact zeros
    fastdrop.manual_seed(77)
    via_default = fastdrop.dropout(x, 0.3)
    np.testing.assert_array_equal(via_default, fastdrop.dropout(x, 0.3, generator=Generator(77)))


BIG = (3, 1 << 20)  # 12 MiB of float32: above the 1 MiB the cache starts at


def test_a_freed_large_output_is_reused_and_rewritten_whole():
    fastdrop.empty_cache()
    x = randn(BIG)
    y = fastdrop.dropout(x, 0.5, generator=Generator(1))
    addr = y.ctypes.data
    assert y.ctypes.data % (2 << 20) == 0
    del y
    assert fastdrop._core.cached_bytes() >= x.nbytes
    z = fastdrop.dropout(x, 0.25, generator=Generator(2))
    assert z.ctypes.data == addr, "the freed buffer of the same size is handed back"
    want = np.empty_like(x)
    fastdrop.dropout(x, 0.25, generator=Generator(2), out=want)
    np.testing.assert_array_equal(z, want)
    assert z.flags.writeable and z.flags.c_contiguous and z.flags.aligned
    assert fastdrop.empty_cache() == 0  # z is alive, so nothing is cached


def test_a_live_output_or_view_keeps_its_buffer():
    fastdrop.empty_cache()
    x = randn(BIG)
    y = fastdrop.dropout(x, 0.5)
    view = y[1:]
    before = view.copy()
    del y
    z = fastdrop.dropout(x, 0.5)  # must not land in the view's memory
    assert not np.shares_memory(z, view)
    np.testing.assert_array_equal(view, before)
    del view, z
    assert fastdrop.empty_cache() >= 2 * x.nbytes


def test_cached_outputs_follow_the_input_layout_and_dtype():
    fastdrop.empty_cache()
    for dtype in FLOATS:
        f = np.asfortranarray(randn(BIG, dtype))
        y = fastdrop.dropout(f, 0.5)
        assert y.flags.f_contiguous and y.dtype == dtype and y.shape == BIG
        del y
        y = fastdrop.dropout(f, 0.5, generator=Generator(3))
        want = np.empty_like(f)
        fastdrop.dropout(f, 0.5, generator=Generator(3), out=want)
        np.testing.assert_array_equal(y, want)
    fastdrop.empty_cache()


def test_outputs_from_one_mib_are_recycled_and_smaller_ones_are_not():
    # 1.5 MiB (timm's DropPath at ResNet's last stage is 1.6 MiB): glibc's heap gives such
    # sizes back to the OS and faults them in again, so they come from the cache too.
    fastdrop.empty_cache()
    x = randn((3, 1 << 17))
    y = fastdrop.dropout(x, 0.5)
    addr = y.ctypes.data
    assert addr % (2 << 20) == 0
    del y
    assert fastdrop._core.cached_bytes() == 2 << 20  # one granule
    z = fastdrop.dropout(x, 0.5, generator=Generator(5))
    assert z.ctypes.data == addr
    want = np.empty_like(x)
    fastdrop.dropout(x, 0.5, generator=Generator(5), out=want)
    np.testing.assert_array_equal(z, want)
    del z
    small = randn((1, (1 << 18) - 16))  # just under 1 MiB: NumPy's own allocation
    w = fastdrop.dropout(small, 0.5)
    assert w.ctypes.data != addr and fastdrop._core.cached_bytes() == 2 << 20
    del w
    assert fastdrop._core.cached_bytes() == 2 << 20
    fastdrop.empty_cache()


def test_the_cache_can_be_turned_off():
    code = (
        "import numpy as np, fastdrop\n"
        "x = np.ones((3, 1 << 20), np.float32)\n"
        "y = fastdrop.dropout(x, 0.5); del y\n"
        "print(fastdrop._core.cached_bytes())\n"
    )
    for env, cached in (("0", False), ("1073741824", True)):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "FASTDROP_CACHE_BYTES": env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert (int(out) > 0) == cached, (env, out)
