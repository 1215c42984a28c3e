"""torch.compile through fastdrop's custom ops: one graph (fullgraph=True fails on any break),
the same masks as eager under the same torch seed, and correct gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import fastdrop  # noqa: E402
import fastdrop.nn as fnn  # noqa: E402
from torch import nn  # noqa: E402


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        fnn.DropBlock2d(0.2, 3),
        fnn.Dropout2d(0.2),
        nn.Flatten(),
        fnn.Dropout(0.3),
        nn.Linear(4 * 8 * 8, 16),
        fnn.AlphaDropout(0.1),
        fnn.DropPath(0.25),
        nn.Linear(16, 2),
    )


def test_compiled_model_matches_eager_in_values_and_grads():
    torch._dynamo.reset()
    eager = _model()
    compiled_model = _model()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 3, 8, 8)
    torch.manual_seed(1)
    ref = eager(x)
    torch.manual_seed(1)
    out = compiled(x)
    assert torch.equal(out, ref)
    ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_compiled_functional_ops_and_fused_add():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, r):
        return fastdrop.dropout_add(x, r, 0.5) + fastdrop.drop_path_add(r, x, 0.5, True)

    x = torch.randn(6, 5, requires_grad=True)
    r = torch.randn(6, 5, requires_grad=True)
    torch.manual_seed(3)
    out = f(x, r)
    torch.manual_seed(3)
    ref = fastdrop.dropout_add(x, r, 0.5) + fastdrop.drop_path_add(r, x, 0.5, True)
    assert torch.equal(out, ref)
    (g,) = torch.autograd.grad(out.sum(), (r,))
    (gr,) = torch.autograd.grad(ref.sum(), (r,))
    assert torch.equal(g, gr)


def test_compiled_training_reduces_loss():
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = x[:, :1] - 2 * x[:, 1:2]
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), fnn.Dropout(0.2), nn.Linear(32, 1))
    step_model = torch.compile(model, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(step_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    assert torch.equal(step_model(x), model(x))  # eval: dropout is the identity


def test_custom_ops_are_registered_with_fake_kernels():
    import fastdrop._torch  # noqa: F401  registers the ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 20)
        out, packed = torch.ops.fastdrop.bernoulli(x, None, [4, 20], "scale", [2.0], 0.5)
    assert out.shape == (4, 20) and packed.shape == (10,) and packed.dtype == torch.uint8
    torch.library.opcheck(
        torch.ops.fastdrop.bernoulli.default,
        (torch.randn(4, 20), None, [4, 1], "scale", [2.0], 0.5),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_two_identical_calls_are_not_merged(backend):
    # Random ops must not be deduplicated by the compiler: each call draws its own key.
    torch._dynamo.reset()

    def f(x):
        return torch.stack([fastdrop.dropout(x, 0.5), fastdrop.dropout(x, 0.5)])

    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(0)
    out = torch.compile(f, fullgraph=True, backend=backend)(x)
    torch.manual_seed(0)
    ref = f(x)
    assert not torch.equal(out[0], out[1])
    assert torch.equal(out, ref)
