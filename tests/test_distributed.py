"""fastdrop modules under DistributedDataParallel: two gloo processes on this machine."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2


def _worker(rank: int, out_dir: str) -> None:
    import fastdrop
    import fastdrop.nn as fnn
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    fastdrop.set_num_threads(1)
    # A file store in the test's own directory: no port to pick, so no race for one.
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        # The same seed on every rank, split per rank: ranks draw different masks.
        def make(generator):
            torch.manual_seed(0)  # identical initial weights, as DDP expects
            return nn.Sequential(
                nn.Linear(16, 32),
                nn.ReLU(),
                fnn.Dropout(0.5, generator=generator),
                nn.Linear(32, 1),
            )

        model = make(fastdrop.Generator(1234).fork(rank))
        shadow = make(fastdrop.Generator(1234).fork(rank))  # replays this rank's masks locally
        ddp = DDP(model)
        torch.manual_seed(100 + rank)
        x, y = torch.randn(64, 16), torch.randn(64, 1)

        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        nn.functional.mse_loss(shadow(x), y).backward()
        local = torch.cat([p.grad.flatten() for p in shadow.parameters()])
        mean = local.clone()
        dist.all_reduce(mean)
        mean /= WORLD
        synced = torch.cat([p.grad.flatten() for p in model.parameters()])
        grads_ok = torch.allclose(synced, mean, rtol=1e-5, atol=1e-6)

        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        first = loss.item()
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(params) for _ in range(WORLD)]
        dist.all_gather(gathered, params)

        probe = torch.ones(4096)
        forked = fastdrop.dropout(probe, 0.5, generator=fastdrop.Generator(7).fork(rank))
        shared = fastdrop.dropout(probe, 0.5, generator=fastdrop.Generator(7))
        masks_f = [torch.empty_like(forked) for _ in range(WORLD)]
        masks_s = [torch.empty_like(shared) for _ in range(WORLD)]
        dist.all_gather(masks_f, forked)
        dist.all_gather(masks_s, shared)
        torch.save(
            {
                "grads_ok": grads_ok,
                "loss_fell": loss.item() < first,
                "params_equal": all(torch.equal(g, gathered[0]) for g in gathered),
                "forked_differ": not torch.equal(masks_f[0], masks_f[1]),
                "shared_equal": torch.equal(masks_s[0], masks_s[1]),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _spawn(out_dir):
    """Runs the two ranks. A rank that dies by SIGABRT ("terminate called without an active
    exception": a C++ thread of gloo's still joinable while the process tears down) after it
    saved its result has done everything this test checks; one that died before saving is run
    again once. That abort comes from torch's gloo teardown (fastdrop runs on one thread here),
    seen once in about ten runs on the 2-core CI machine."""
    import torch.multiprocessing as mp

    for attempt in range(2):
        run_dir = out_dir / f"attempt{attempt}"
        run_dir.mkdir()
        try:
            mp.spawn(_worker, args=(str(run_dir),), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as e:
            if e.signal_name != "SIGABRT":
                raise
            if all((run_dir / f"rank{r}.pt").exists() for r in range(WORLD)):
                return run_dir
            if attempt == 1:
                raise
            continue
        return run_dir


@pytest.mark.timeout(240)
def test_ddp_gloo_two_ranks(tmp_path):
    tmp_path = _spawn(tmp_path)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result == {
            "grads_ok": True,
            "loss_fell": True,
            "params_equal": True,
            "forked_differ": True,
            "shared_equal": True,
        }, (rank, result)
