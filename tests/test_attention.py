"""fastdrop.scaled_dot_product_attention against torch's, and attention in replace_dropout."""

from __future__ import annotations

import math

import fastdrop
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from conftest import assert_binomial  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sdpa = fastdrop.scaled_dot_product_attention

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Tolerances of the fused pass (softmax in float32 for the 16-bit types) against the reference.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def qkv(b=2, h=3, lq=7, lk=9, e=8, ev=None, dtype=torch.float32, hk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hk or h, lk, e, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hk or h, lk, ev or e, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def reference(q, k, v, attn_mask=None, keep=None, p=0.0, is_causal=False, scale=None, gqa=False):
    """torch's documented reference implementation, in float64, with a given keep mask (and
    torch's safe softmax: a row of all-masked keys gets zero weights)."""
    q, k, v = q.double(), k.double(), v.double()
    lq, lk = q.size(-2), k.size(-2)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    bias = torch.zeros(lq, lk, dtype=torch.float64)
    if is_causal:
        bias.masked_fill_(torch.ones(lq, lk, dtype=torch.bool).tril().logical_not(), -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(attn_mask.logical_not(), -math.inf)
        else:
            bias = bias + attn_mask.double()
    if gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    w = q @ k.transpose(-2, -1) * scale + bias
    dead = (w == -math.inf).all(-1, keepdim=True)
    w = torch.softmax(w, dim=-1).masked_fill(dead, 0.0)
    if keep is not None:
        w = torch.where(keep, w / (1 - p), torch.zeros(()).double()) if p < 1 else w * 0
    return w @ v


def mask_tensor(mask):
    return torch.from_numpy(mask.numpy())


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_no_dropout_equals_torch(dtype, causal):
    q, k, v = qkv(dtype=dtype)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=causal), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"scale": 0.3},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"enable_gqa": True},
    ],
    ids=["plain", "causal", "scale", "bool_mask", "float_mask", "gqa"],
)
def test_dropout_equals_reference_with_the_returned_mask(dtype, kwargs):
    kwargs = dict(kwargs)
    h, hk = (6, 2) if kwargs.get("enable_gqa") else (3, None)
    q, k, v = qkv(dtype=dtype, h=h, lq=13, lk=197, hk=hk)
    g = torch.Generator().manual_seed(5)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(13, 197, generator=g) > 0.3
        kwargs["attn_mask"][4] = False  # a row with every key masked
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 13, 197, generator=g).to(dtype)
    p = 0.3
    out, mask = sdpa(
        q, k, v, dropout_p=p, return_mask=True, generator=fastdrop.Generator(1), **kwargs
    )
    assert mask.shape == (2, h, 13, 197)
    assert out.dtype == dtype and out.shape == (2, h, 13, 8)
    want = reference(
        q,
        k,
        v,
        kwargs.get("attn_mask"),
        mask_tensor(mask),
        p,
        kwargs.get("is_causal", False),
        kwargs.get("scale"),
        kwargs.get("enable_gqa", False),
    )
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    if "attn_mask" in kwargs and kwargs["attn_mask"].dtype == torch.bool:
        assert (out[:, :, 4] == 0).all()


def test_three_dimensional_inputs_and_value_width():
    q, k, v = qkv(b=1, h=4, lq=5, lk=6, e=8, ev=3)
    q, k, v = q[0], k[0], v[0]
    out, mask = sdpa(q, k, v, dropout_p=0.5, return_mask=True, generator=fastdrop.Generator(2))
    assert out.shape == (4, 5, 3) and mask.shape == (4, 5, 6)
    torch.testing.assert_close(
        out.double(), reference(q, k, v, keep=mask_tensor(mask), p=0.5), **TOL[torch.float32]
    )


def test_non_contiguous_inputs():
    # timm's layout: q, k, v are strided views of one (B, L, 3, H, D) projection.
    x = torch.randn(2, 11, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = x.unbind(0)
    out, mask = sdpa(q, k, v, dropout_p=0.2, return_mask=True, generator=fastdrop.Generator(3))
    torch.testing.assert_close(
        out.double(), reference(q, k, v, keep=mask_tensor(mask), p=0.2), **TOL[torch.float32]
    )


def test_dropout_one_gives_zeros_and_zero_gradients():
    q, k, v = (t.requires_grad_() for t in qkv())
    out, mask = sdpa(q, k, v, dropout_p=1.0, return_mask=True)
    assert mask.count_kept() == 0
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and (k.grad == 0).all() and (v.grad == 0).all()


def test_dropout_zero_returns_a_full_mask():
    q, k, v = qkv()
    out, mask = sdpa(q, k, v, dropout_p=0.0, return_mask=True)
    assert mask.count_kept() == 2 * 3 * 7 * 9
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


# --- the mask ---------------------------------------------------------------------------------


def test_mask_is_the_element_mask_of_the_weights():
    """The weights' mask is what fastdrop.dropout draws for a tensor of their shape."""
    q, k, v = qkv(lq=33, lk=70)
    _, mask = sdpa(q, k, v, dropout_p=0.25, return_mask=True, generator=fastdrop.Generator(9))
    weights = torch.ones(2, 3, 33, 70)
    _, dmask = fastdrop.dropout(weights, 0.25, return_mask=True, generator=fastdrop.Generator(9))
    np.testing.assert_array_equal(mask.numpy(), dmask.numpy())


def test_masks_are_reproducible_under_a_seed_and_fresh_per_call():
    q, k, v = qkv(lq=20, lk=30)
    torch.manual_seed(123)
    a, ma = sdpa(q, k, v, dropout_p=0.5, return_mask=True)
    b, mb = sdpa(q, k, v, dropout_p=0.5, return_mask=True)
    torch.manual_seed(123)
    c, mc = sdpa(q, k, v, dropout_p=0.5, return_mask=True)
    np.testing.assert_array_equal(ma.numpy(), mc.numpy())
    assert torch.equal(a, c)
    assert not np.array_equal(ma.numpy(), mb.numpy())
    gen = fastdrop.Generator(4)
    d = sdpa(q, k, v, dropout_p=0.5, generator=gen)
    e = sdpa(q, k, v, dropout_p=0.5, generator=gen)
    assert not torch.equal(d, e)
    assert torch.equal(d, sdpa(q, k, v, dropout_p=0.5, generator=fastdrop.Generator(4)))
    tg = torch.Generator().manual_seed(8)
    f = sdpa(q, k, v, dropout_p=0.5, generator=tg)
    assert torch.equal(f, sdpa(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(8)))


_MASK_SCRIPT = """
import hashlib, torch, fastdrop
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(4, 4, 64, 197, generator=g) for _ in range(3))
out, mask = fastdrop.scaled_dot_product_attention(
    q, k, v, dropout_p=0.1, return_mask=True, generator=fastdrop.Generator(0))
print(hashlib.sha256(mask._bits.to_bytes()).hexdigest())
"""


def test_mask_is_the_same_for_any_thread_count():
    """The attention kernels split rows over fastdrop's threads: compare processes with 1 and
    3 (FASTDROP_NUM_THREADS), so the mask cannot depend on the split."""
    import os
    import subprocess
    import sys

    digests = set()
    for n in ("1", "3"):
        env = dict(os.environ, FASTDROP_NUM_THREADS=n)
        run = subprocess.run(
            [sys.executable, "-c", _MASK_SCRIPT], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_statistics(p):
    q, k, v = qkv(b=4, h=4, lq=100, lk=197)
    _, mask = sdpa(q, k, v, dropout_p=p, return_mask=True, generator=fastdrop.Generator(77))
    n = 4 * 4 * 100 * 197
    assert_binomial(mask.count_kept(), n, 1 - p, "kept weights")
    per_row = mask.numpy().sum(-1).ravel()
    # Every row draws its own decisions: row sums are binomial(197, 1 - p) on average.
    assert abs(per_row.mean() - 197 * (1 - p)) <= 6 * math.sqrt(197 * p * (1 - p) / per_row.size)


# --- gradients --------------------------------------------------------------------------------


def _fixed(p, **kwargs):
    """The function with a fresh generator of one seed per call: the same mask every call."""

    def f(q, k, v, *mask):
        m = mask[0] if mask else kwargs.get("attn_mask")
        kw = {key: val for key, val in kwargs.items() if key != "attn_mask"}
        return sdpa(q, k, v, m, dropout_p=p, generator=fastdrop.Generator(11), **kw)

    return f


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"is_causal": True}, {"scale": 0.7}, {"enable_gqa": True}],
    ids=["plain", "causal", "scale", "gqa"],
)
def test_gradcheck(kwargs):
    h, hk = (4, 2) if kwargs.get("enable_gqa") else (2, None)
    q, k, v = (
        t.requires_grad_() for t in qkv(b=1, h=h, lq=5, lk=6, e=3, dtype=torch.float64, hk=hk)
    )
    f = _fixed(0.3, **kwargs)
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_gradgradcheck_self_attention():
    """q, k and v one tensor: each position's share of the gradient, first and second order."""
    x = qkv(b=1, h=2, lq=4, lk=4, e=3, dtype=torch.float64)[0].requires_grad_()
    f = _fixed(0.25, is_causal=True)
    (plain,) = torch.autograd.grad(f(x, x, x).sum(), x)
    (graphed,) = torch.autograd.grad(f(x, x, x).sum(), x, create_graph=True)
    torch.testing.assert_close(graphed, plain)
    assert torch.autograd.gradcheck(lambda t: f(t, t, t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: f(t, t, t), (x,))


def test_gradcheck_float_mask_and_bool_mask():
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=2, lq=4, lk=5, e=3, dtype=torch.float64))
    bias = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    f = _fixed(0.4)
    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    assert torch.autograd.gradgradcheck(f, (q, k, v, bias))
    boolean = torch.rand(4, 5) > 0.3
    boolean[1] = False
    assert torch.autograd.gradcheck(_fixed(0.4, attn_mask=boolean), (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_equal_the_reference_with_the_mask(dtype):
    q, k, v = (t.requires_grad_() for t in qkv(lq=16, lk=40, dtype=dtype))
    out, mask = sdpa(q, k, v, dropout_p=0.2, return_mask=True, generator=fastdrop.Generator(6))
    grad = torch.randn_like(out)
    out.backward(grad)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference(q2, k2, v2, keep=mask_tensor(mask), p=0.2).backward(grad.double())
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_no_grad_and_inference_mode_save_nothing():
    q, k, v = (t.requires_grad_() for t in qkv())
    with torch.no_grad():
        assert sdpa(q, k, v, dropout_p=0.5).grad_fn is None
    with torch.inference_mode():
        assert sdpa(q, k, v, dropout_p=0.5).grad_fn is None


def test_backward_keeps_less_than_torch():
    """Memory held between forward and backward: the softmax output and one bit a weight,
    where torch keeps the weights, the dropped weights and a float mask."""
    from fastdrop.attention import _saved_bytes

    q, k, v = (t.requires_grad_() for t in qkv(b=2, h=2, lq=64, lk=64, e=16))
    inputs = 3 * q.untyped_storage().nbytes()
    ours = _saved_bytes(lambda: sdpa(q, k, v, dropout_p=0.1)) - inputs
    theirs = _saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)) - inputs
    weights = 2 * 2 * 64 * 64 * 4
    assert ours <= weights + weights // 32 + 64
    assert theirs >= 2 * weights
    assert ours < theirs


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_dropout_p_raises_like_torch(p):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        sdpa(q, k, v, dropout_p=p)
    with pytest.raises(ValueError):
        sdpa(q, k, v, dropout_p=p)


def test_bad_arguments():
    q, k, v = qkv()
    with pytest.raises(TypeError):
        sdpa(q, k, v, dropout_p="0.1")
    with pytest.raises(TypeError):
        sdpa(q.numpy(), k, v, dropout_p=0.1)
    with pytest.raises(TypeError):
        sdpa(q, k.double(), v, dropout_p=0.1)
    with pytest.raises(TypeError):
        sdpa(q.int(), k.int(), v.int(), dropout_p=0.1)
    with pytest.raises(ValueError):
        sdpa(q, k[..., :4], v, dropout_p=0.1)
    with pytest.raises(ValueError):
        sdpa(q, k, v[..., :5, :], dropout_p=0.1)
    with pytest.raises(ValueError):
        sdpa(q, k, v, torch.ones(3, 3, dtype=torch.bool), dropout_p=0.1)
    with pytest.raises(RuntimeError, match="is_causal"):
        sdpa(q, k, v, torch.ones(7, 9, dtype=torch.bool), dropout_p=0.1, is_causal=True)
    with pytest.raises(TypeError):
        sdpa(q, k, v, torch.ones(7, 9, dtype=torch.int64), dropout_p=0.1)
    q6, k4, v4 = qkv(h=6, hk=4)
    with pytest.raises(ValueError):
        sdpa(q6, k4, v4, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(TypeError):
        sdpa(q, k, v, dropout_p=0.1, generator=np.random.default_rng(0))


def test_off_the_cpu_is_torchs_own():
    q, k, v = (t.to("meta") for t in qkv())
    out = sdpa(q, k, v, dropout_p=0.1)
    assert out.device.type == "meta" and out.shape == (2, 3, 7, 8)
    with pytest.raises(ValueError):
        sdpa(q, k, v, dropout_p=0.1, return_mask=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_is_torchs_own():  # pragma: no cover - no GPU in CI
    q, k, v = (t.cuda() for t in qkv())
    out = sdpa(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert sdpa(q, k, v, dropout_p=0.5).is_cuda


def test_empty_inputs():
    q, k, v = qkv(lq=0)
    assert sdpa(q, k, v, dropout_p=0.5).shape == (2, 3, 0, 8)


def test_an_empty_head_dimension_weighs_the_keys_evenly_as_torch_does():
    # Regression: with E = 0 and dropout, the default scale 1/sqrt(E) was a ZeroDivisionError;
    # every logit is an empty sum, and torch weighs the keys evenly.
    q, k, v = qkv(e=0, ev=4, dtype=torch.float64)
    assert torch.allclose(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    out, mask = sdpa(q, k, v, dropout_p=0.5, return_mask=True)
    keep = torch.from_numpy(mask.numpy()).to(torch.float64)
    want = (keep * 2.0 / k.shape[-2]) @ v
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_grouped_query_attention_without_a_heads_dimension_is_torchs_index_error(dropout_p):
    # Regression: a 2-D value made fastdrop's own check index past its shape.
    q, k, v = torch.randn(1, 4, 5, 2), torch.randn(1, 2, 3, 2), torch.randn(3, 2)
    with pytest.raises(IndexError):
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
    with pytest.raises(IndexError, match="heads dimension"):
        sdpa(q, k, v, dropout_p=dropout_p, enable_gqa=True)
    # An empty one: torch returns before grouping, and so does fastdrop.
    e = torch.randn(0, 2)
    want = F.scaled_dot_product_attention(e, k[0, 0], v, dropout_p=dropout_p, enable_gqa=True)
    assert sdpa(e, k[0, 0], v, dropout_p=dropout_p, enable_gqa=True).shape == want.shape


def test_an_explicit_mask_with_is_causal_is_refused_before_the_grouping():
    # torch's order: the mask-and-causal error comes first, also where grouping would fail.
    q, k, v = torch.randn(1, 3, 5, 1), torch.randn(1, 3, 1, 1), torch.randn(1, 1)
    m = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="attn_mask"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True)


# --- random calls against torch's ------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_calls_raise_as_torch_and_equal_the_reference(data):
    """Shapes, masks, scales, causal and grouped calls at random (no empty dimension: torch
    returns early there without checking the shapes): fastdrop raises where torch raises, an
    exception of torch's class, and otherwise gives the reference's values from its mask."""
    draw = data.draw
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    nd = draw(st.integers(2, 4))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    batch = (draw(st.integers(1, 2)), heads)[-(nd - 2) :] if nd > 2 else ()
    kv_batch = (batch[:-1] + (kv_heads,)) if nd > 2 else ()
    lq, lk, e, ev = (draw(st.integers(1, 6), label) for label in ("L", "S", "E", "Ev"))

    def shape(s, name):  # now and then a wrong one
        return (
            s
            if draw(st.integers(0, 9), name)
            else tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
        )

    qs, ks, vs = (
        shape(batch + (lq, e), "q"),
        shape(kv_batch + (lk, e), "k"),
        shape(kv_batch + (lk, ev), "v"),
    )
    mask_kind = draw(st.sampled_from([None, "bool", "float", "row"]))
    kwargs = dict(
        dropout_p=draw(st.sampled_from([0.0, 0.3, 1.0])),
        is_causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5, -1.0])),
        enable_gqa=draw(st.booleans()),
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    q, k, v = (torch.randn(s, generator=g, dtype=dtype) for s in (qs, ks, vs))
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(lq, lk, generator=g) > 0.3
    elif mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(lq, lk, generator=g, dtype=dtype)
    elif mask_kind == "row":
        kwargs["attn_mask"] = torch.rand(1, lk, generator=g) > 0.5

    try:
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    except Exception as e:  # noqa: BLE001 - its class is what fastdrop must raise
        with pytest.raises(type(e)):
            sdpa(q, k, v, **kwargs)
        return
    out, mask = sdpa(q, k, v, return_mask=True, generator=fastdrop.Generator(3), **kwargs)
    assert out.shape == want.shape and out.dtype == dtype
    p = kwargs["dropout_p"]
    ref = reference(
        q,
        k,
        v,
        kwargs.get("attn_mask"),
        mask_tensor(mask) if p > 0 else None,
        p,
        kwargs["is_causal"],
        kwargs["scale"],
        kwargs["enable_gqa"] and nd > 2,
    )
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


# --- replace_dropout --------------------------------------------------------------------------

TORCH_DROPOUT_OPS = {
    "aten::dropout",
    "aten::native_dropout",
    "aten::bernoulli_",
    "aten::_fused_dropout",
}


def torch_dropout_ops(step) -> set:
    """The torch dropout and bernoulli ops a call runs (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = {e.name for e in prof.events()}
    return names & (TORCH_DROPOUT_OPS | {"aten::bernoulli"})


def train_step(model, x):
    def step():
        model.zero_grad()
        out = model(x)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()

    return step


def encoder(seed=0, p=0.1):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=p, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_converted_encoder_runs_no_torch_dropout_and_an_unconverted_one_does():
    from fastdrop.nn import replace_dropout

    x = torch.randn(4, 10, 32)
    plain, converted = encoder(), encoder()
    replaced = replace_dropout(converted)
    assert any("attention dropout" in v for v in replaced.values())
    assert "layers.0.self_attn" in replaced
    assert torch_dropout_ops(train_step(converted, x)) == set()
    assert torch_dropout_ops(train_step(plain, x)) & TORCH_DROPOUT_OPS
    # The same weights: eval outputs agree, and the state_dict loads both ways.
    plain.load_state_dict(converted.state_dict())
    converted.load_state_dict(plain.state_dict())
    plain.eval(), converted.eval()
    torch.testing.assert_close(converted(x), plain(x))
    # In eval the converted model keeps torch's fast inference path (no mode in the way).
    with torch.no_grad(), torch.profiler.profile() as prof:
        converted(x)
    assert "aten::_native_multi_head_attention" in {e.name for e in prof.events()}


def test_converted_decoder_layer_runs_no_torch_dropout():
    from fastdrop.nn import replace_dropout

    torch.manual_seed(0)
    decoder = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.2, batch_first=True)
    replaced = replace_dropout(decoder)
    assert {"self_attn", "multihead_attn"} <= set(replaced)
    tgt, memory = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(6)

    def step():
        decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True).sum().backward()

    assert torch_dropout_ops(step) == set()


def test_converted_vit_runs_no_torch_dropout():
    timm = pytest.importorskip("timm")
    from fastdrop.nn import replace_dropout

    def vit():
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            depth=2,
            drop_rate=0.1,
            proj_drop_rate=0.1,
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
        )

    x = torch.randn(2, 3, 32, 32)
    plain, converted = vit(), vit()
    replaced = replace_dropout(converted)
    assert "blocks.0.attn" in replaced
    assert torch_dropout_ops(train_step(converted, x)) == set()
    assert torch_dropout_ops(train_step(plain, x)) & TORCH_DROPOUT_OPS
    # timm's explicit-softmax path uses the (converted) attn_drop module.
    for block in converted.blocks:
        block.attn.fused_attn = False
    assert torch_dropout_ops(train_step(converted, x)) == set()


@pytest.mark.parametrize("need_weights", [False, True])
def test_converted_multihead_attention(need_weights):
    from fastdrop.nn import replace_dropout

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    replace_dropout(mha)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def step():
        out, weights = mha(x, x, x, need_weights=need_weights, average_attn_weights=False)
        out.sum().backward()
        return out, weights

    assert torch_dropout_ops(step) == set()
    # Reproducible from torch's generator, and the weights come back after dropout.
    torch.manual_seed(3)
    out, weights = step()
    torch.manual_seed(3)
    out2, weights2 = step()
    assert torch.equal(out, out2)
    if need_weights:
        assert weights.shape == (3, 2, 5, 5)
        zeros = (weights == 0).sum().item()
        assert_binomial(zeros, weights.numel(), 0.5, "dropped weights")
        # Kept weights are softmax / (1 - p): each row sums to 2 * (kept share of the softmax).
        assert torch.equal(weights, weights2)
    else:
        assert weights is None
    mha.eval()
    with torch.no_grad():
        a = mha(x, x, x)[0]
    assert torch.equal(a, mha(x, x, x)[0].detach())


class Custom(torch.nn.Module):
    """Attention with its own dropout and no dropout module."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)


def test_a_module_calling_sdpa_itself_is_converted_and_scoped_to_its_instance():
    from fastdrop.nn import replace_dropout

    x = torch.randn(2, 6, 8)
    converted, plain = Custom(), Custom()
    assert replace_dropout(converted) == {}
    assert torch_dropout_ops(train_step(converted, x)) == set()
    assert torch_dropout_ops(train_step(plain, x)) & TORCH_DROPOUT_OPS
    # Outside the converted forward torch's own attention runs again, even after an error.
    q = torch.randn(1, 2, 4, 4)
    assert torch_dropout_ops(lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    with pytest.raises(RuntimeError):
        converted(torch.randn(2, 6, 5))
    assert torch_dropout_ops(lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    # Converting twice installs nothing twice; the model still pickles.
    hooks = len(converted._forward_pre_hooks)
    replace_dropout(converted)
    assert len(converted._forward_pre_hooks) == hooks
    import copy
    import io

    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch_dropout_ops(train_step(loaded, x)) == set()
    assert torch_dropout_ops(train_step(copy.deepcopy(converted), x)) == set()


def test_only_modules_that_may_call_a_rerouted_function_get_the_hooks():
    # Regression: every module got the hook pair, so a converted MLP's step ran all its torch
    # calls through a TorchFunctionMode (0.71 ms against torch's 0.62 ms).
    from fastdrop import attention as fa

    class FunctionalDrop(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.1, self.training)

    mlp = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2)
    )
    fastdrop.nn.replace_dropout(mlp)
    assert not any(fa._enter in m._forward_pre_hooks.values() for m in mlp.modules())

    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), FunctionalDrop(), torch.nn.MultiheadAttention(8, 2, dropout=0.1)
    )
    fastdrop.nn.replace_dropout(model)
    hooked = [
        type(m).__name__ for m in model.modules() if fa._enter in m._forward_pre_hooks.values()
    ]
    assert hooked == ["FunctionalDrop", "MultiheadAttention"]
    # The functional call in a hooked module still goes through fastdrop: fastdrop's mask.
    x = torch.ones(64, 8)
    model.train()
    torch.manual_seed(5)  # fastdrop draws a torch tensor's key from torch's generator
    rerouted = model[1](x)
    torch.manual_seed(5)
    torch.testing.assert_close(rerouted, fastdrop.dropout(x, 0.1, True), rtol=0, atol=0)


def test_the_training_benchmark_times_every_variant_in_every_round(monkeypatch):
    pytest.importorskip("timm")
    from fastdrop import attention

    calls = []
    real = torch.nn.Module.train
    monkeypatch.setattr(
        torch.nn.Module, "train", lambda m, mode=True: calls.append(m) or real(m, mode)
    )
    rows = attention.benchmark_training(batch=1, rounds=3)
    assert [r["model"] for r in rows] == ["transformer_encoder", "vit_tiny"]
    for r in rows:
        for k in ("torch", "fastdrop modules", "fastdrop + attention"):
            assert r[k] > 0
    # One warm-up round and three timed ones, each of the three variants once a round.
    tops = [m for m in calls if type(m).__name__ in ("TransformerEncoder", "VisionTransformer")]
    assert len(tops) == 2 * 3 * 4
