"""`fastdrop.mc_sample`'s batching, memory budget and progress bar (issue 16's MC dropout):
a batch of passes computes what the passes one at a time would, the automatic batch batches
and stays within its budget, models that cannot be split by pass run one pass at a time, and
bad arguments raise before the model runs."""

from __future__ import annotations

import sys

import fastdrop
import pytest
from conftest import assert_binomial
from fastdrop import Generator

torch = pytest.importorskip("torch")
import fastdrop.nn as fnn  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402


def forward_rows(model: nn.Module) -> list:
    """The first dimension of every input `model` is called with, as a list that fills."""
    rows: list = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows


def image_model() -> nn.Module:
    """Every fastdrop module that takes an image, and torch's, timm's and torchvision's, with
    only elementwise maths between them, so batched and alone must agree to the bit."""
    timm_layers = pytest.importorskip("timm.layers")
    tv = pytest.importorskip("torchvision.ops")
    return nn.Sequential(
        fnn.Dropout2d(0.3),
        fnn.DropBlock2d(0.2, 3),
        fnn.DropPath(0.3),
        fnn.GaussianDropout(0.2),
        fnn.StochasticDepth(0.4, "batch"),
        fnn.TorchvisionDropBlock2d(0.2, 3),
        fnn.AlphaDropout(0.1),
        nn.ReLU(),
        fnn.Dropout(0.2, inplace=True),  # each pass's part written in place
        nn.Dropout(0.3),
        nn.Dropout2d(0.2),
        timm_layers.DropPath(0.3),
        tv.StochasticDepth(0.3, "batch"),
        tv.DropBlock2d(0.3, 3),
    )


class Tokens(nn.Module):
    """Embedding dropout, DropConnect on a Linear, PatchDropout and locked dropout: masks on
    weights, on token choices and shared across time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = fnn.EmbeddingDropout(nn.Embedding(20, 6), 0.3)
        self.lin = fnn.WeightDropout(nn.Linear(6, 6), 0.4)
        self.patch = fnn.PatchDropout(0.5, num_prefix_tokens=1)
        self.locked = fnn.LockedDropout(0.3, batch_first=True)
        self.drop = fnn.Dropout(0.1)

    def forward(self, words):
        return self.drop(self.locked(self.patch(self.lin(self.emb(words)))))


def test_batched_passes_equal_passes_alone_for_every_kind_of_module():
    x = torch.randn(2, 3, 8, 8)
    model = image_model()
    rows = forward_rows(model)
    with torch.no_grad():
        alone = fastdrop.mc_sample(model, x, 7, generator=Generator(1), passes_per_batch=1)
        by_three = fastdrop.mc_sample(model, x, 7, generator=Generator(1), passes_per_batch=3)
        auto = fastdrop.mc_sample(model, x, 7, generator=Generator(1))
    assert rows == [2] * 7 + [6, 6, 2] + [2, 12]
    assert torch.equal(alone, by_three) and torch.equal(alone, auto)
    assert len({tuple(v.flatten().tolist()) for v in alone}) > 1  # the passes differ

    words = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(3))
    tokens = Tokens()
    rows = forward_rows(tokens)
    alone = fastdrop.mc_sample(tokens, words, 5, generator=Generator(2), passes_per_batch=1)
    auto = fastdrop.mc_sample(tokens, words, 5, generator=Generator(2))
    assert rows == [3] * 5 + [3, 12]
    assert alone.shape == (5, 3, 5, 6)
    # The same masks; the Linear's matmul may round differently for 15 rows than for 3 (torch
    # picks its kernel by the row count: seen as 2.4e-7 apart for some inputs).
    assert torch.equal(alone == 0, auto == 0)
    torch.testing.assert_close(alone, auto, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first", [fnn.Dropout, nn.Dropout])
def test_a_dropout_in_place_on_the_input_neither_compounds_nor_touches_x(first):
    model = nn.Sequential(first(0.5, inplace=True), fnn.Dropout(0.2, inplace=True))
    x = torch.ones(4, 30)
    alone = fastdrop.mc_sample(model, x, 6, generator=Generator(13), passes_per_batch=1)
    auto = fastdrop.mc_sample(model, x, 6, generator=Generator(13))
    assert torch.equal(x, torch.ones(4, 30))
    assert torch.equal(alone, auto)
    assert set(alone.unique().tolist()) == {0.0, 2.5}  # kept: 1 / 0.5 / 0.8, once


class Inner(nn.Module):
    """A weight for WeightDropout and dropout modules inside it: one part per pass reaches
    them, which they must not split again."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
        self.drop = fnn.Dropout(0.5)
        self.torch_drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.torch_drop(self.drop(x @ self.weight))


def test_dropout_modules_inside_a_weight_dropout_draw_as_their_pass():
    model = fnn.WeightDropout(Inner(), 0.3)
    x = torch.randn(4, 6)
    rows = forward_rows(model)
    with torch.no_grad():
        alone = fastdrop.mc_sample(model, x, 5, generator=Generator(14), passes_per_batch=1)
        auto = fastdrop.mc_sample(model, x, 5, generator=Generator(14))
    assert rows == [4] * 5 + [4, 16]
    assert torch.equal(alone, auto)


def test_pass_i_is_the_model_keyed_by_fork_i():
    model = nn.Sequential(fnn.Dropout(0.5), fnn.DropPath(0.5))
    x = torch.ones(4, 50)
    samples = fastdrop.mc_sample(model, x, 6, generator=Generator(62))
    for i in (0, 3, 5):
        g = Generator(62).fork(i)
        want = fastdrop.drop_path(fastdrop.dropout(x, 0.5, generator=g), 0.5, True, generator=g)
        assert torch.equal(samples[i], want)
    # every pass its own masks: the kept fraction of all 6 x 4 x 50 is binomial
    assert_binomial(int((samples != 0).sum()), samples.numel(), 0.25, "kept")


def test_values_after_a_matrix_product_agree_to_rounding():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), fnn.Dropout(0.5), nn.Linear(64, 3))
    x = torch.randn(4, 5)
    alone = fastdrop.mc_sample(model, x, 9, generator=Generator(4), passes_per_batch=1)
    auto = fastdrop.mc_sample(model, x, 9, generator=Generator(4))
    torch.testing.assert_close(auto, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(auto[1], auto[2])


def test_gradients_of_batched_passes_equal_those_of_passes_alone():
    model = nn.Sequential(fnn.Dropout(0.4), nn.Tanh(), fnn.GaussianDropout(0.3))
    x = torch.randn(3, 7).requires_grad_()
    grads = []
    for passes in (1, None):
        s = fastdrop.mc_sample(model, x, 6, generator=Generator(5), passes_per_batch=passes)
        grads.append([torch.autograd.grad(s[i].sum(), x, retain_graph=True)[0] for i in range(6)])
    for alone, batched in zip(*grads):
        assert torch.equal(alone, batched)
    assert not torch.equal(grads[0][1], grads[0][2])


def test_without_a_generator_torch_manual_seed_reproduces_and_own_generators_stay():
    model = nn.Sequential(fnn.Dropout(0.5, generator=Generator(9)), nn.Dropout(0.5))
    own = model[0].generator
    x = torch.ones(2, 40)
    torch.manual_seed(5)
    alone = fastdrop.mc_sample(model, x, 6, passes_per_batch=1)
    torch.manual_seed(5)
    auto = fastdrop.mc_sample(model, x, 6)
    assert torch.equal(alone, auto)
    assert not torch.equal(alone, fastdrop.mc_sample(model, x, 6))
    assert model[0].generator is own


class Allocated(TorchDispatchMode):
    """The bytes torch's operators allocate (outputs that are not views of or written into an
    input), per forward of the model it is attached to."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.now, self.per_call = 0, []
        model.register_forward_pre_hook(lambda m, a: setattr(self, "now", 0))
        model.register_forward_hook(lambda m, a, out: self.per_call.append(self.now))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            self.now += sum(t.numel() * t.element_size() for t in tree_leaves(out) if t is not None)
        return out


def test_a_batch_allocates_no_more_than_the_budget():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), fnn.Dropout(0.5), nn.Linear(64, 8))
    x = torch.randn(4, 16)
    budget = 20_000
    rows = forward_rows(model)
    meter = Allocated(model)
    with torch.no_grad(), meter:
        s = fastdrop.mc_sample(model, x, 20, generator=Generator(7), memory_budget=budget)
    assert s.shape == (20, 4, 8)
    assert max(rows) > 4 and len(rows) < 20  # it batched
    for r, allocated in zip(rows, meter.per_call):
        # the batch's own allocations plus the k stacked copies of x
        assert allocated + (r // 4) * x.nbytes <= budget, (r, allocated)
    # the budget was the limit: one pass more per batch would not have fitted
    k = max(rows) // 4
    per_pass = meter.per_call[rows.index(max(rows))] / k + x.nbytes
    assert (k + 1) * per_pass > budget

    rows.clear()
    fastdrop.mc_sample(model, x, 5, generator=Generator(7), memory_budget=1)
    assert rows == [4] * 5  # a pass over the budget still runs, alone


def test_the_default_budget_on_the_cpu(monkeypatch):
    model = nn.Sequential(fnn.Dropout(0.5))
    rows = forward_rows(model)
    x = torch.ones(4, 100)
    fastdrop.mc_sample(model, x, 20)
    assert rows == [4, 76]
    rows.clear()
    monkeypatch.setattr(fnn, "MC_SAMPLE_CPU_BUDGET", 5 * 2 * x.nbytes)
    fastdrop.mc_sample(model, x, 20)
    assert rows[0] == 4 and 1 < max(rows) // 4 <= 5


class PositionDropout(nn.Module):
    """A dropout on a parameter without a batch dimension: it cannot be split by pass."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.ones(1, 6))
        self.drop = fnn.Dropout(0.5)

    def forward(self, x):
        return x + self.drop(self.pos)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.rnn = nn.LSTM(6, 6, num_layers=2, dropout=0.5, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def test_models_that_cannot_be_split_by_pass_run_one_pass_at_a_time():
    x = torch.randn(3, 6)
    model = PositionDropout()
    rows = forward_rows(model)
    with torch.no_grad():
        alone = fastdrop.mc_sample(model, x, 5, generator=Generator(9), passes_per_batch=1)
        rows.clear()
        auto = fastdrop.mc_sample(model, x, 5, generator=Generator(9))
    assert rows == [3, 12, 3, 3, 3, 3]  # the batch failed before it drew, then one at a time
    assert torch.equal(alone, auto)
    assert "forward" not in model.drop.__dict__ and model.drop.generator is None
    with pytest.raises(ValueError, match="passes_per_batch=1"):
        fastdrop.mc_sample(model, x, 5, passes_per_batch=2)

    rnn = Recurrent()
    rows = forward_rows(rnn)
    seq = torch.randn(2, 4, 6)
    with torch.no_grad():
        s = fastdrop.mc_sample(rnn, seq, 4, generator=Generator(10))
    assert rows == [2] * 4 and not torch.equal(s[0], s[1])
    rows.clear()  # forced, the batch runs: the RNN draws once for it
    assert fastdrop.mc_sample(rnn, seq, 4, passes_per_batch=2).shape == (4, 2, 4, 6)
    assert rows == [4, 4]

    summed = nn.Sequential(fnn.Dropout(0.5), nn.Flatten(0))  # the output loses x's batch
    rows = forward_rows(summed)
    assert fastdrop.mc_sample(summed, x, 3).shape == (3, 18) and rows == [3] * 3


def test_modes_generators_and_forwards_are_restored_when_a_batch_raises():
    class FailsBatched(nn.Module):
        def forward(self, x):
            if x.shape[0] > 2:
                raise RuntimeError("no batches here")
            return x

    model = nn.Sequential(fnn.Dropout(0.5), nn.Dropout(0.5), FailsBatched()).eval()
    with pytest.raises(RuntimeError, match="no batches"):
        fastdrop.mc_sample(model, torch.ones(2, 3), 4, generator=Generator(11))
    for m in model:
        assert not m.training and "forward" not in m.__dict__
    assert model[0].generator is None


def test_progress_bar_on_off_and_without_tqdm(capsys, monkeypatch):
    model = nn.Sequential(fnn.Dropout(0.5))
    x = torch.ones(2, 3)
    fastdrop.mc_sample(model, x, 3, progress=True)
    err = capsys.readouterr().err
    assert "mc_sample" in err and "3/3" in err
    fastdrop.mc_sample(model, x, 3, progress=False)
    fastdrop.mc_sample(model, x, 3)  # automatic, and stderr is not a terminal
    assert capsys.readouterr().err == ""
    # automatic on a terminal: nothing for a run shorter than the delay (2 s) ...
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    fastdrop.mc_sample(model, x, 3)
    assert capsys.readouterr().err == ""
    # ... and a bar once the run has lasted it (0 here)
    monkeypatch.setattr(fnn, "MC_SAMPLE_PROGRESS_DELAY", 0.0)
    fastdrop.mc_sample(model, x, 3)
    assert "3/3" in capsys.readouterr().err
    # without tqdm: one rewritten line
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    fastdrop.mc_sample(model, x, 3, progress=True)
    assert capsys.readouterr().err == ("\rmc_sample: 1/3 passes\rmc_sample: 3/3 passes\n")


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"n": 0}, ValueError, "n must be at least 1, got 0"),
        ({"n": 2.0}, TypeError, "n must be an int, got float"),
        ({"n": True}, TypeError, "n must be an int, got bool"),
        ({"memory_budget": 0}, ValueError, "memory_budget must be at least 1, got 0"),
        ({"memory_budget": -4096}, ValueError, "memory_budget must be at least 1"),
        ({"memory_budget": 1.5e9}, TypeError, "memory_budget must be an int, got float"),
        ({"memory_budget": "1GiB"}, TypeError, "memory_budget must be an int, got str"),
        ({"passes_per_batch": 0}, ValueError, "passes_per_batch must be at least 1"),
        ({"passes_per_batch": 2, "memory_budget": 10**6}, ValueError, "not both"),
        ({"progress": "yes"}, TypeError, "progress must be a bool or None, got str"),
        ({"generator": 3}, TypeError, "generator must be a fastdrop.Generator or None"),
        ({"x": [1.0, 2.0]}, TypeError, "x must be a torch.Tensor, got list"),
    ],
)
def test_bad_arguments_raise_before_the_model_runs(kwargs, exc, message):
    model = nn.Sequential(fnn.Dropout(0.5), nn.BatchNorm1d(3)).train()
    rows = forward_rows(model)
    call = {"n": 3, "x": torch.ones(2, 3), **kwargs}
    with pytest.raises(exc, match=message.replace("(", r"\(")):
        fastdrop.mc_sample(model, call.pop("x"), call.pop("n"), **call)
    assert rows == [] and all(m.training for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batched_passes_of_torchs_dropout_equal_passes_alone():
    model = nn.Sequential(nn.Dropout(0.5), nn.Tanh(), nn.Dropout(0.3)).cuda()
    x = torch.randn(4, 64, device="cuda")
    rows = forward_rows(model)
    with torch.no_grad():
        alone = fastdrop.mc_sample(model, x, 9, generator=Generator(12), passes_per_batch=1)
        auto = fastdrop.mc_sample(model, x, 9, generator=Generator(12))
    assert rows == [4] * 9 + [4, 32]  # the default budget on CUDA batches these
    assert auto.device.type == "cuda" and torch.equal(alone, auto)
