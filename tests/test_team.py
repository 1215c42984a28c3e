"""Sharing torch's threads (issue 14): inside a torch program fastdrop's parallel calls on torch
tensors run on torch's own OpenMP threads, not on a pool of its own that would wait for the
cores torch's threads hold (NumPy calls keep fastdrop's own); `torch.set_num_threads` bounds
them; a forked child falls back to its own pool; `fastdrop.share_torch_threads(False)` opts
out. Results never depend on any of it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import fastdrop
import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
        reason="torch's intra-op pool is OpenMP on Linux builds only",
    ),
]

#: Lists the process's threads by name (Linux).
THREADS = """
import os
def names():
    out = []
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/comm") as f:
            out.append(f.read().strip())
    return out
def own():
    return sum(n.startswith("fastdrop-") for n in names())
"""

#: Big enough to run in parallel: every variant with a mask of each granularity, forward and
#: backward.
CALLS = """
import torch, fastdrop, fastdrop.nn as fnn
x = torch.randn(8, 64, 32, 32, requires_grad=True)  # 524,288 elements
for m in (fnn.Dropout(0.1), fnn.DropPath(0.1), fnn.Dropout2d(0.2), fnn.DropBlock2d(0.1, 5)):
    y = m(x)
    torch.autograd.grad(y, x, torch.ones_like(y))
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTDROP_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(
        [sys.executable, "-c", THREADS + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_a_torch_program_runs_fastdrop_on_torchs_threads():
    # Before sharing, every parallel call woke fastdrop's own helpers ("fastdrop-0"), which
    # waited for a core while torch's threads spun on it.
    r = run_python(
        "import torch, fastdrop\n"
        "torch.set_num_threads(2)\n"
        "fastdrop.set_num_threads(2)\n"
        + CALLS
        + "print(fastdrop._core.shares_openmp(), own())\n"
        + "print(fastdrop.share_torch_threads(False), fastdrop._core.shares_openmp())\n"
        + "import time\n"
        # Calls alone after a loss (the back-off: up to 64 calls or 1 s) build no helper yet.
        + "end = time.monotonic() + 10\n"
        + "while own() == 0 and time.monotonic() < end:\n"
        + "    fastdrop.dropout(x, 0.5)\n"
        + "print(own())\n"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "True 0"
    assert lines[1] == "False False"
    assert int(lines[2]) == 1  # opted out: fastdrop's own helper runs the calls


def test_numpy_calls_in_a_torch_program_keep_fastdrops_own_threads():
    # A NumPy call has no torch operations around it whose threads would be awake: waking
    # torch's team for it would leave those threads spinning for milliseconds after.
    r = run_python(
        "import torch, fastdrop, numpy as np\n"
        "torch.set_num_threads(2)\n"
        "fastdrop.set_num_threads(2)\n"
        + CALLS
        + "print(fastdrop._core.shares_openmp(), own())\n"
        + "import time\n"
        + "a = np.ones(1 << 20, np.float32)\n"
        # Calls alone after a loss (the back-off: up to 64 calls or 1 s) build no helper yet.
        + "end = time.monotonic() + 10\n"
        + "while own() == 0 and time.monotonic() < end:\n"
        + "    fastdrop.dropout(a, 0.5)\n"
        + "print(own())\n"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "0", "1"]


def test_torch_set_num_threads_bounds_fastdrop():
    r = run_python(
        "import torch, fastdrop\n"
        "torch.set_num_threads(1)\n"
        "before = len(names())\n"
        + CALLS
        + "print(fastdrop._core.shares_openmp(), len(names()) - before, own())\n"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # One thread allowed: the calls ran on the caller, no thread was started for them.
    assert r.stdout.split() == ["True", "0", "0"]


def test_opting_out_before_the_first_tensor_keeps_fastdrops_own_threads():
    r = run_python(
        """
        import fastdrop
        print(fastdrop.share_torch_threads(False))
        import torch
        fastdrop.dropout(torch.ones(4), 0.5)
        print(fastdrop._core.shares_openmp())
        print(fastdrop.share_torch_threads())
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "False", "True"]


def test_a_forked_child_of_a_sharing_parent_uses_its_own_pool_and_draws_the_same_mask():
    # The child inherits torch's OpenMP pool without its threads: a parallel region there
    # waits forever. The child must not use it.
    r = run_python(
        """
        import torch, fastdrop, numpy as np
        torch.set_num_threads(2)
        x = torch.randn(1 << 20)
        torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # torch's team is up
        want = fastdrop.dropout(x, 0.3, generator=fastdrop.Generator(5))
        assert fastdrop._core.shares_openmp()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            got = fastdrop.dropout(x, 0.3, generator=fastdrop.Generator(5))
            # NumPy compares: torch's own parallel ops can hang in a fork child.
            same = np.array_equal(got.numpy(), want.numpy())
            ok = same and not fastdrop._core.shares_openmp()
            os.write(w, b"same" if ok else b"diff")
            os._exit(0)
        os.close(w)
        print(os.read(r, 4).decode())
        os.waitpid(pid, 0)
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["same"]


@pytest.fixture
def restore_sharing():
    yield
    fastdrop.share_torch_threads(True)
    fastdrop.set_num_threads(os.cpu_count() or 1)


VARIANTS = {
    "dropout": lambda x, g: fastdrop.dropout(x, 0.3, generator=g),
    "alpha_dropout": lambda x, g: fastdrop.alpha_dropout(x, 0.3, True, generator=g),
    "dropout2d": lambda x, g: fastdrop.dropout2d(x, 0.3, generator=g),
    "drop_path": lambda x, g: fastdrop.drop_path(x, 0.3, True, generator=g),
    "drop_block_2d": lambda x, g: fastdrop.drop_block_2d(x, 0.1, 5, generator=g),
    "dropout_add": lambda x, g: fastdrop.dropout_add(x, x, 0.3, generator=g),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(
    "shape",
    [
        (4, 64, 33, 31),  # 261,888 elements: parallel everywhere, with ragged chunks
        (2, 16, 45, 47),  # 67,680: parallel on torch's team only (TEAM_PARALLEL_MIN)
    ],
)
def test_results_do_not_depend_on_sharing(variant, shape, restore_sharing):
    x = torch.randn(shape)
    call = VARIANTS[variant]
    fastdrop.set_num_threads(1)
    want = call(x, fastdrop.Generator(3))
    fastdrop.set_num_threads(2)
    for share in (True, False, True):
        fastdrop.share_torch_threads(share)
        got = call(x, fastdrop.Generator(3))
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert not torch.equal(want, x)  # the variant dropped something


def test_attention_does_not_depend_on_sharing(restore_sharing):
    q, k, v = (torch.randn(2, 4, 128, 64, requires_grad=True) for _ in range(3))
    results = []
    for share, threads in ((True, 1), (True, 2), (False, 2)):
        fastdrop.share_torch_threads(share)
        fastdrop.set_num_threads(threads)
        out = fastdrop.scaled_dot_product_attention(
            q, k, v, dropout_p=0.2, generator=fastdrop.Generator(8)
        )
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        results.append([out.detach(), *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_share_torch_threads_takes_a_bool():
    with pytest.raises(TypeError, match="expects a bool, got int"):
        fastdrop.share_torch_threads(1)  # type: ignore[arg-type]
