"""Forked children (issue 12): after a call large enough to start fastdrop's thread pool, a child
made by `os.fork`, a `multiprocessing` fork pool or a torch `DataLoader` worker inherits the pool
but none of its threads. Each must still work, and draw the masks the parent would draw for the
same generator state. Every wait is bounded, so a regression fails instead of hanging."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import fastdrop
import numpy as np
import pytest
from fastdrop import Generator

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"), reason="needs fork"),
    pytest.mark.timeout(180),
]

N = 1 << 20  # float32 elements: well past PARALLEL_MIN, so the call uses the pool
WAIT = 60.0  # seconds a child may take before the test calls it hung


def drop_digest(seed: int) -> str:
    """The digest of a 1M-element dropout drawn from a fresh Generator(seed)."""
    y = fastdrop.dropout(np.ones(N, np.float32), 0.5, generator=Generator(seed))
    return hashlib.sha256(y.tobytes()).hexdigest()


@pytest.fixture
def warm_pool():
    """The parent runs a call on two threads first, so the pool (and its threads) exists."""
    fastdrop.set_num_threads(2)
    drop_digest(0)


def in_fork_child(job) -> str:
    """`job()` run in a child made by `os.fork`; its string result, or a failure after WAIT."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        code = 1
        try:
            os.write(write, job().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + WAIT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(read)
            pytest.fail(f"the forked child hung for {WAIT} s in a 1M-element dropout")
        time.sleep(0.02)
    got = os.read(read, 4096).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    return got


def test_an_os_fork_child_draws_the_parents_masks(warm_pool):
    assert in_fork_child(lambda: drop_digest(7)) == drop_digest(7)


def test_a_fork_child_that_sets_its_own_thread_count_and_forks_again_works(warm_pool):
    def child() -> str:
        fastdrop.set_num_threads(3)  # a pool of another size in the child
        mine = drop_digest(5)
        return mine + " " + in_fork_child(lambda: drop_digest(5))  # and in a grandchild

    assert in_fork_child(child).split() == [drop_digest(5)] * 2


def run_isolated(code: str) -> str:
    """`code` run by a fresh interpreter in its own session, killed with all its children if it
    takes longer than WAIT (a hung fork worker must not outlive the test); its stdout."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"fork workers hung for {WAIT} s in a 1M-element dropout")
    assert proc.returncode == 0, err[-3000:]
    return out


PRELUDE = """
    import hashlib, multiprocessing, numpy as np, fastdrop
    from fastdrop import Generator
    N = 1 << 20

    def drop_digest(seed):
        y = fastdrop.dropout(np.ones(N, np.float32), 0.5, generator=Generator(seed))
        return hashlib.sha256(y.tobytes()).hexdigest()

    fastdrop.set_num_threads(2)
    drop_digest(0)  # the pool and its threads exist before the fork
"""


def test_a_multiprocessing_fork_pool_draws_the_parents_masks():
    out = run_isolated(
        PRELUDE
        + """
    seeds = [1, 2, 3, 4]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(drop_digest, seeds)
    print(got == [drop_digest(s) for s in seeds])
    """
    )
    assert out.split() == ["True"]


def test_torch_dataloader_fork_workers_draw_the_parents_masks():
    pytest.importorskip("torch")
    out = run_isolated(
        PRELUDE
        + """
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Dropped(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return fastdrop.dropout(torch.ones(N), 0.5, generator=Generator(100 + i))

    expected = torch.stack([Dropped()[i] for i in range(4)])
    loader = DataLoader(Dropped(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    print(torch.equal(torch.cat(list(loader)), expected))
    """
    )
    assert out.split() == ["True"]


def test_attention_in_a_fork_child_draws_the_parents_masks(warm_pool):
    # The attention kernels run on fastdrop's pool too (they once used rayon's global pool, which
    # a forked child inherits without its threads: the child hung).
    torch = pytest.importorskip("torch")

    def attention_mask_digest() -> str:
        q = torch.ones(4, 4, 128, 64)
        _, mask = fastdrop.scaled_dot_product_attention(
            q, q, q, dropout_p=0.3, generator=Generator(3), return_mask=True
        )
        return hashlib.sha256(mask.numpy().tobytes()).hexdigest()

    def in_child() -> str:
        # As a DataLoader worker does: torch's own OpenMP pool does not survive a fork either.
        torch.set_num_threads(1)
        return attention_mask_digest()

    want = attention_mask_digest()  # in the parent first, so the threads exist before the fork
    assert in_fork_child(in_child) == want
