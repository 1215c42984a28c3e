"""Thread counts (issue 12): `set_num_threads` and `FASTDROP_NUM_THREADS` accept 1 to
`MAX_THREADS` (1024); anything else is a `ValueError` or an import-time warning naming the
accepted range, never a panic; a pool whose threads cannot be spawned leaves the call on the
calling thread. Results never depend on the thread count."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import fastdrop
import numpy as np
import pytest
from fastdrop import Generator

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def run_python(code: str, env_threads: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTDROP_NUM_THREADS", None)
    if env_threads is not None:
        env["FASTDROP_NUM_THREADS"] = env_threads
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_max_threads_is_1024():
    assert fastdrop._core.MAX_THREADS == 1024


# (call, exception, message) for the README's error table.
ERRORS = [
    ("fastdrop.set_num_threads(0)", 0, "set_num_threads expects between 1 and 1024 threads, got 0"),
    (
        "fastdrop.set_num_threads(10**6)",
        10**6,
        "set_num_threads expects between 1 and 1024 threads, got 1000000",
    ),
    (
        "fastdrop.set_num_threads(2**64)",
        2**64,
        "set_num_threads expects between 1 and 1024 threads, got 18446744073709551616",
    ),
]


@pytest.mark.parametrize("shown,n,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_counts_outside_the_cap_are_value_errors(shown, n, message):
    # Regression: 10**6 panicked across the FFI boundary (PanicException, not an Exception)
    # while spawning threads; 2**64 raised OverflowError.
    before = fastdrop.get_num_threads()
    with pytest.raises(ValueError) as e:
        fastdrop.set_num_threads(n)
    assert str(e.value) == message
    assert fastdrop.get_num_threads() == before


def test_the_core_refuses_counts_outside_the_cap_too():
    with pytest.raises(ValueError, match="between 1 and 1024 threads, got 1025"):
        fastdrop._core.set_num_threads(1025)
    with pytest.raises(ValueError, match="got 0"):
        fastdrop._core.set_num_threads(0)


def test_the_readme_error_table_lists_the_thread_count_messages():
    table = (ROOT / "README.md").read_text()
    for shown, _, message in ERRORS:
        assert f"| `{shown}` | `ValueError` | {message} |" in table
    for value, message in ENV_WARNINGS:
        row = f"| `FASTDROP_NUM_THREADS={value}` | `RuntimeWarning` | {message.format(cpus='N')} |"
        assert row in table


def test_the_cap_itself_runs_and_draws_the_same_mask():
    # 1024 threads: 1023 helpers spawned, at most 31 with work in a 1M-element call.
    r = run_python("""
        import numpy as np, fastdrop
        x = np.ones(1 << 20, np.float32)
        fastdrop.set_num_threads(1)
        one = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(3))
        fastdrop.set_num_threads(1024)
        many = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(3))
        print(fastdrop.get_num_threads(), np.array_equal(one, many))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1024", "True"]


def test_threads_that_cannot_be_spawned_leave_the_call_on_the_caller():
    # An address-space limit below one thread stack (2 MiB) above what the process uses makes
    # the first spawn fail. Regression: building the pool panicked (PanicException). The limit
    # must leave no room for any helper: one that did start would abort the process in glibc
    # ("failed to register TLS destructor: out of memory") once its siblings' stacks took the
    # rest, which is the process's limit and no call's doing.
    r = run_python("""
        import resource, numpy as np, fastdrop
        x = np.ones(1 << 20, np.float32)
        fastdrop.set_num_threads(1)
        one = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(9))
        many = np.empty_like(x)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (1792 << 10), resource.RLIM_INFINITY))
        fastdrop.set_num_threads(1024)
        fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(9), out=many)
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print(np.array_equal(one, many))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True"]
    assert "Panic" not in r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task is Linux's")
def test_the_pool_has_no_more_threads_than_cpus_online():
    # Regression: set_num_threads(64) on a 2-CPU machine built 63 helpers, each with a stack and
    # a work queue, that could never run at once; with 1024 the queues alone took over 1 MiB.
    r = run_python("""
        import glob, os, numpy as np, fastdrop
        fastdrop.set_num_threads(64)
        fastdrop.dropout(np.ones(1 << 20, np.float32), 0.5, generator=fastdrop.Generator(1))
        names = []
        for comm in glob.glob("/proc/self/task/*/comm"):
            with open(comm) as f:
                names.append(f.read().strip())
        print(sum(n.startswith("fastdrop-") for n in names), os.sysconf("SC_NPROCESSORS_ONLN"))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    helpers, online = map(int, r.stdout.split())
    assert helpers == min(63, online - 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU sets are Linux's")
def test_helpers_stay_off_the_callers_cpu_and_inside_the_process_cpus():
    # The helpers are kept off the caller's CPU (the scheduler queued them behind the caller,
    # so 2 threads ran no faster than 1), never outside the CPUs the process was given: here
    # the caller is pinned first, to one CPU (nothing to steer to) and then to all of them.
    r = run_python("""
        import glob, os, numpy as np, fastdrop
        def helpers():
            out = []
            for status in glob.glob("/proc/self/task/*/status"):
                text = open(status).read()
                if "fastdrop-" in text.split("\\n", 1)[0]:
                    line = [l for l in text.splitlines() if l.startswith("Cpus_allowed_list")][0]
                    out.append(line.split(":")[1].strip())
            return out
        x = np.ones(1 << 20, np.float32)
        cpus = sorted(os.sched_getaffinity(0))
        fastdrop.set_num_threads(1)
        one = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(9))
        fastdrop.set_num_threads(os.sysconf("SC_NPROCESSORS_ONLN"))  # the most helpers a pool has
        os.sched_setaffinity(0, {cpus[0]})
        pinned = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(9))
        print(np.array_equal(one, pinned), "|".join(helpers()))
        os.sched_setaffinity(0, set(cpus))
        for _ in range(3):
            free = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(9))
        print(np.array_equal(one, free), "|".join(helpers()))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = r.stdout.splitlines()
    cpus = sorted(os.sched_getaffinity(0))
    helpers = os.sysconf("SC_NPROCESSORS_ONLN") - 1
    assert first == "True " + "|".join([str(cpus[0])] * helpers)  # one CPU: the helpers keep it
    if len(cpus) > 1:
        ok, lists = second.split(" ")
        assert ok == "True"
        sets = lists.split("|")  # the helpers' Cpus_allowed_list, e.g. 1|1 or 0,2-3|0,2-3
        assert len(sets) == helpers
        for cpu_list in sets:
            allowed = set()
            for part in cpu_list.split(","):
                lo, _, hi = part.partition("-")
                allowed.update(range(int(lo), int(hi or lo) + 1))
            # the caller's CPU when it last moved is gone; every other CPU of the process stays
            assert allowed < set(cpus) and len(allowed) == len(cpus) - 1


# FASTDROP_NUM_THREADS values that are not thread counts, and the warning each gets at import.
ACCEPTED = "expected an integer from 1 to 1024; using the default, {cpus} (the CPUs available)"
ENV_WARNINGS = [
    ("0", 'FASTDROP_NUM_THREADS="0" is out of range: ' + ACCEPTED),
    ("-2", 'FASTDROP_NUM_THREADS="-2" is not a thread count: ' + ACCEPTED),
    ("abc", 'FASTDROP_NUM_THREADS="abc" is not a thread count: ' + ACCEPTED),
    ("1000000", 'FASTDROP_NUM_THREADS="1000000" is out of range: ' + ACCEPTED),
]


@pytest.mark.parametrize("value,message", ENV_WARNINGS, ids=[v for v, _ in ENV_WARNINGS])
def test_a_bad_environment_count_warns_and_uses_the_default(value, message):
    # Regression: these were ignored silently; 1000000 was used and panicked in the first call.
    r = run_python(
        """
        import os, warnings, numpy as np
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastdrop
        for w in caught:
            print("WARNING", w.category.__name__, w.message)
        y = fastdrop.dropout(np.ones(1 << 20, np.float32), 0.5)
        print("THREADS", fastdrop.get_num_threads(), len(os.sched_getaffinity(0)))
        """,
        env_threads=value,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    threads, cpus = lines[-1].split()[1:]
    assert threads == cpus
    expected = message.format(cpus=cpus)
    assert lines[:-1] == [f"WARNING RuntimeWarning {expected}"]


@pytest.mark.parametrize("value,threads", [(" 3 ", 3), ("1", 1), ("1024", 1024), ("", None)])
def test_a_good_environment_count_is_used_quietly(value, threads):
    r = run_python(
        """
        import os, warnings
        warnings.simplefilter("error")
        import fastdrop
        print(fastdrop.get_num_threads(), len(os.sched_getaffinity(0)))
        """,
        env_threads=value,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got, cpus = map(int, r.stdout.split())
    assert got == (threads if threads is not None else cpus)  # empty means unset


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [(1 << 17) - 1, 1 << 17, (1 << 20) + 77])
def test_masks_do_not_depend_on_the_thread_count(threads, n):
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    fastdrop.set_num_threads(1)
    want, want_mask = fastdrop.dropout(x, 0.3, generator=Generator(11), return_mask=True)
    fastdrop.set_num_threads(threads)
    got, mask = fastdrop.dropout(x, 0.3, generator=Generator(11), return_mask=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mask.numpy(), want_mask.numpy())
    y = x.copy()
    fastdrop.dropout(y, 0.3, generator=Generator(11), inplace=True)
    np.testing.assert_array_equal(y, want)
