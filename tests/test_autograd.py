"""Autograd beyond plain backward (issue 11) and the key-only backward (issue 14): forward-mode
AD, batched gradients, torch.func.vmap / jvp / jacfwd / jacrev, torch's OpInfo-style gradient
checks for every variant, and a backward that redraws the mask from the call's key."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastdrop  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
from conftest import assert_binomial  # noqa: E402

#: The dtypes the OpInfo-style checks run on (torch checks its dropout on both).
AD_DTYPES = [torch.float64, torch.complex128]
#: The dtypes whose redrawn backward must equal the stored-bits backward bit for bit.
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


#: (name, number of tensor inputs, call(*tensors, generator, **kw), index of the masked input)
VARIANTS = [
    ("dropout", 1, lambda x, g, **k: fastdrop.dropout(x, 0.3, generator=g, **k), 0),
    (
        "alpha_dropout",
        1,
        lambda x, g, **k: fastdrop.alpha_dropout(x, 0.3, True, generator=g, **k),
        0,
    ),
    (
        "feature_alpha_dropout",
        1,
        lambda x, g, **k: fastdrop.feature_alpha_dropout(x, 0.3, True, generator=g, **k),
        0,
    ),
    ("dropout1d", 1, lambda x, g, **k: fastdrop.dropout1d(x.flatten(2), 0.3, generator=g, **k), 0),
    ("dropout2d", 1, lambda x, g, **k: fastdrop.dropout2d(x, 0.3, generator=g, **k), 0),
    ("dropout3d", 1, lambda x, g, **k: fastdrop.dropout3d(x, 0.3, generator=g, **k), 0),
    ("drop_path", 1, lambda x, g, **k: fastdrop.drop_path(x, 0.3, True, generator=g, **k), 0),
    (
        "drop_block_2d",
        1,
        lambda x, g, **k: fastdrop.drop_block_2d(x, 0.2, 3, generator=g, **k),
        0,
    ),
    (
        "drop_block_2d_noise",
        1,
        lambda x, g, **k: fastdrop.drop_block_2d(x, 0.2, 3, with_noise=True, generator=g, **k),
        0,
    ),
    (
        "dropout_add",
        2,
        lambda x, r, g, **k: fastdrop.dropout_add(x, r, 0.3, generator=g, **k),
        0,
    ),
    (
        "drop_path_add",
        2,
        lambda x, b, g, **k: fastdrop.drop_path_add(x, b, 0.3, True, generator=g, **k),
        1,
    ),
]
IDS = [v[0] for v in VARIANTS]
#: Variants whose masks are Bernoulli draws (kept as a key); DropBlock keeps its bits.
KEYED = [v for v in VARIANTS if not v[0].startswith("drop_block")]


def _inputs(n, dtype=torch.float64, shape=(2, 3, 6, 6), seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=gen, dtype=torch.float64)
        .to(dtype)
        .requires_grad_(requires_grad)
        for _ in range(n)
    )


def _fixed(call, seed=5):
    """The variant with a fresh fastdrop.Generator(seed) each call: the same mask every time,
    as gradcheck's repeated evaluations need."""
    return lambda *ts: call(*ts, fastdrop.Generator(seed))


def _expected_tangent(name, n, call, masked, xs, ts, seed=5):
    """t * mask * scale on the masked input's tangent (+ the other input's tangent for the
    fused adds), from the Mask the same generator state gives."""
    _, mask = call(*xs, fastdrop.Generator(seed), return_mask=True)
    t = ts[masked].flatten(2) if name == "dropout1d" else ts[masked]
    keep = torch.from_numpy(mask.numpy())
    want = torch.where(keep, t * mask.scale, torch.zeros((), dtype=t.dtype))
    if n == 2:
        want = want + ts[1 - masked]
    return want


# --- forward-mode AD --------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True], ids=["dual_only", "requires_grad"])
@pytest.mark.parametrize("name,n,call,masked", VARIANTS, ids=IDS)
def test_forward_ad_tangent_is_the_primals_mask(name, n, call, masked, requires_grad):
    xs = _inputs(n, requires_grad=requires_grad)
    ts = _inputs(n, seed=1)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(xs, ts)]
        y = call(*duals, fastdrop.Generator(5))
        primal, tangent = fwAD.unpack_dual(y)
    assert tangent is not None, "the tangent was dropped"
    ref = call(*[x.detach() for x in xs], fastdrop.Generator(5))
    assert torch.equal(primal.detach(), ref)
    want = _expected_tangent(name, n, call, masked, tuple(x.detach() for x in xs), ts)
    torch.testing.assert_close(tangent, want, rtol=0, atol=0)


def test_forward_ad_through_an_inplace_call():
    x, t = _inputs(2)
    with fwAD.dual_level():
        d = fwAD.make_dual(x.clone(), t.clone()) * 1.0  # a non-leaf dual
        y = fastdrop.dropout(d, 0.5, inplace=True, generator=fastdrop.Generator(2))
        assert y is d
        tangent = fwAD.unpack_dual(y).tangent
    keep = fastdrop.dropout(torch.ones_like(x), 0.5, generator=fastdrop.Generator(2)) != 0
    torch.testing.assert_close(tangent, torch.where(keep, t * 2.0, 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("name,n,call,masked", VARIANTS, ids=IDS)
def test_func_jvp(name, n, call, masked):
    xs, ts = _inputs(n), _inputs(n, seed=1)
    primal, tangent = torch.func.jvp(_fixed(call), xs, ts)
    assert torch.equal(primal, call(*xs, fastdrop.Generator(5)))
    want = _expected_tangent(name, n, call, masked, xs, ts)
    torch.testing.assert_close(tangent, want, rtol=0, atol=0)


def test_jacfwd_with_same_randomness_is_the_diagonal_of_the_mask():
    x = torch.randn(12, dtype=torch.float64)
    f = _fixed(lambda t, g: fastdrop.dropout(t, 0.5, generator=g))
    jac = torch.func.jacfwd(f, randomness="same")(x)
    keep = (f(torch.ones_like(x)) != 0).double()
    torch.testing.assert_close(jac, torch.diag(keep * 2.0), rtol=0, atol=0)
    torch.testing.assert_close(torch.func.jacrev(f)(x), jac, rtol=0, atol=0)
    # torch's dropout under jacfwd's default randomness='error' raises; so does fastdrop.
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.jacfwd(lambda t: torch.nn.functional.dropout(t, 0.5))(x)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.jacfwd(f)(x)


# --- batched gradients and torch's OpInfo-style checks ----------------------------------------


@pytest.mark.parametrize("name,n,call,masked", VARIANTS, ids=IDS)
def test_is_grads_batched(name, n, call, masked):
    xs = _inputs(n, shape=(2, 3, 4, 4), requires_grad=True)
    y = call(*xs, fastdrop.Generator(5))
    k = y.numel()
    eye = torch.eye(k, dtype=y.dtype).view(k, *y.shape)
    grads = torch.autograd.grad(y, xs, eye, is_grads_batched=True)
    for i, g in enumerate(grads):
        rows = [torch.autograd.grad(y, xs[i], eye[j], retain_graph=True)[0] for j in range(k)]
        torch.testing.assert_close(g, torch.stack(rows), rtol=0, atol=0)


#: Every (variant, dtype) the OpInfo-style checks run: DropBlock takes real tensors only, as
#: timm's (its max_pool2d has no complex form; test_parity checks the TypeError).
OPINFO_CASES = [
    pytest.param(*v, dtype, id=f"{v[0]}-{str(dtype).split('.')[-1]}")
    for dtype in AD_DTYPES
    for v in VARIANTS
    if not (dtype.is_complex and v[0].startswith("drop_block"))
]


@pytest.mark.parametrize("name,n,call,masked,dtype", OPINFO_CASES)
def test_opinfo_gradchecks(name, n, call, masked, dtype):
    xs = _inputs(n, dtype=dtype, shape=(2, 3, 4, 4), requires_grad=True)
    f = _fixed(call)
    assert torch.autograd.gradcheck(
        f,
        xs,
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )
    assert torch.autograd.gradgradcheck(
        f, xs, check_fwd_over_rev=True, check_rev_over_rev=True, check_batched_grad=True
    )


def test_forward_over_reverse_of_the_backward():
    # The backward as a function of the incoming gradient, checked in forward mode too.
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def backward_of(g):
        y = fastdrop.dropout(x, 0.4, generator=fastdrop.Generator(8))
        return torch.autograd.grad(y, x, g, create_graph=True)[0]

    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(backward_of, (g,), check_forward_ad=True)


@pytest.mark.parametrize("dtype", AD_DTYPES)
def test_inplace_variants_gradcheck(dtype):
    def f(t, p_fn):
        return p_fn(t * 1.0)  # in place on a non-leaf, as torch's OpInfo does

    calls = [
        lambda h: fastdrop.dropout(h, 0.3, inplace=True, generator=fastdrop.Generator(3)),
        lambda h: fastdrop.alpha_dropout(
            h, 0.3, True, inplace=True, generator=fastdrop.Generator(3)
        ),
        lambda h: fastdrop.dropout2d(h, 0.3, inplace=True, generator=fastdrop.Generator(3)),
        lambda h: fastdrop.drop_block_2d(h, 0.2, 3, inplace=True, generator=fastdrop.Generator(3)),
    ]
    if dtype.is_complex:
        calls.pop()  # DropBlock takes real tensors only, as timm's
    x = torch.randn(2, 3, 5, 5, dtype=dtype, requires_grad=True)
    for c in calls:
        assert torch.autograd.gradcheck(lambda t, c=c: f(t, c), (x,), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(lambda t, c=c: f(t, c), (x,))


# --- torch.func.vmap --------------------------------------------------------------------------


def _flat_batch(name, x):
    """The unvmapped call equal to vmap(randomness='different') over x's first dimension: the
    batch folded into the mask's leading dimension, as one call draws it."""
    if name in ("dropout", "alpha_dropout"):
        return x
    return x.reshape(-1, *x.shape[2:])


@pytest.mark.parametrize(
    "name,call",
    [(v[0], v[2]) for v in VARIANTS if v[1] == 1 and v[0] != "dropout1d"],
    ids=[v[0] for v in VARIANTS if v[1] == 1 and v[0] != "dropout1d"],
)
def test_vmap_different_draws_one_mask_per_batch_element(name, call):
    x = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64)
    got = torch.func.vmap(_fixed(call), randomness="different")(x)
    if name.startswith("drop_block"):
        g = fastdrop.Generator(5)  # one call per batch element, the generator advancing
        want = torch.stack([call(x[b], g) for b in range(3)])
    else:
        want = call(_flat_batch(name, x), fastdrop.Generator(5)).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if "alpha" not in name and "noise" not in name:  # dropped values are 0 here
        assert not torch.equal(got[0] == 0, got[1] == 0), "the batch elements share a mask"


@pytest.mark.parametrize(
    "name,call",
    [(v[0], v[2]) for v in VARIANTS if v[1] == 1],
    ids=[v[0] for v in VARIANTS if v[1] == 1],
)
def test_vmap_same_uses_one_mask_for_the_batch(name, call):
    x = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64)
    got = torch.func.vmap(_fixed(call), randomness="same")(x)
    want = torch.stack([call(x[b], fastdrop.Generator(5)) for b in range(3)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_vmap_error_randomness_is_torchs_error():
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(lambda t: fastdrop.dropout(t, 0.5))(x)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(lambda t: fastdrop.dropout(t, 0.5, generator=fastdrop.Generator(1)))(x)


def test_vmap_fused_add_batches_both_inputs():
    x, r = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    f = _fixed(lambda a, b, g: fastdrop.dropout_add(a, b, 0.5, generator=g))
    got = torch.func.vmap(f, randomness="different")(x, r)
    torch.testing.assert_close(got, f(x, r), rtol=0, atol=0)
    # A residual not batched is broadcast over the batch.
    got = torch.func.vmap(f, in_dims=(0, None), randomness="different")(x, r[0])
    torch.testing.assert_close(got, f(x, r[0].expand(4, 50)), rtol=0, atol=0)


def test_vmap_different_masks_are_independent():
    x = torch.ones(64, 512)
    y = torch.func.vmap(lambda t: fastdrop.dropout(t, 0.5), randomness="different")(x)
    both = ((y[0::2] != 0) & (y[1::2] != 0)).sum().item()
    assert_binomial(int(both), 32 * 512, 0.25, "kept in two batch elements")


def test_per_sample_grads_under_vmap_use_each_samples_mask():
    x = torch.randn(4, 30, dtype=torch.float64)
    f = _fixed(lambda t, g: fastdrop.dropout(t, 0.5, generator=g))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: f(t).sum()), randomness="different")(x)
    keep = f(torch.ones_like(x)) != 0  # the same call, unvmapped: mask shape (4, 30)
    torch.testing.assert_close(per_sample, keep.double() * 2.0, rtol=0, atol=0)
    jac = torch.func.vmap(torch.func.jacrev(f), randomness="different")(x)
    torch.testing.assert_close(
        jac, torch.stack([torch.diag(k.double() * 2.0) for k in keep]), rtol=0, atol=0
    )


# --- the backward from the key ----------------------------------------------------------------


ELEMENT = ("dropout", "alpha_dropout", "dropout_add")


@pytest.mark.parametrize("name,n,call,masked", VARIANTS, ids=IDS)
def test_what_a_forward_keeps_for_backward(name, n, call, masked):
    xs = _inputs(n, dtype=torch.float32, requires_grad=True)
    y = call(*xs, fastdrop.Generator(5))
    mask = y.grad_fn.mask
    if name.startswith("drop_block") or name in ELEMENT:
        # Dilated blocks, and element masks, whose redraw costs as much as the forward (see
        # _torch.ELEMENT_MASKS_AS_KEY), keep their bits: one per decision.
        assert mask._key is None and mask.nbytes == 8 * -(-int(np.prod(mask.shape)) // 64)
    else:
        assert mask.nbytes == 0 and mask._key is not None  # channel and sample masks: the key
    # Nothing else is saved for backward: no tensor of the input's size.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        call(*xs, fastdrop.Generator(5))
    assert saved == []


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name,n,call,masked", KEYED, ids=[v[0] for v in KEYED])
def test_the_redrawn_backward_equals_the_stored_bits_backward(
    name, n, call, masked, dtype, threads, monkeypatch
):
    from fastdrop import _torch

    monkeypatch.setattr(_torch, "ELEMENT_MASKS_AS_KEY", True)  # element masks redrawn too
    fastdrop.set_num_threads(threads)
    shape = (3, 5, 33, 17)  # odd sizes: partial words and thread chunks
    xs = _inputs(n, dtype=dtype, shape=shape, requires_grad=True)
    g = torch.randn(call(*xs, fastdrop.Generator(9)).shape).to(dtype)
    y = call(*xs, fastdrop.Generator(9))  # key only
    assert y.grad_fn.mask.nbytes == 0
    y_bits, mask = call(*xs, fastdrop.Generator(9), return_mask=True)  # bits
    assert torch.equal(y, y_bits)
    grads = torch.autograd.grad(y, xs, g)
    grads_bits = torch.autograd.grad(y_bits, xs, g)
    for a, b in zip(grads, grads_bits):
        assert torch.equal(a, b)
    # And both are the Mask's own backward.
    gm = grads[masked].flatten(2) if name == "dropout1d" else grads[masked]
    assert torch.equal(gm, mask.backward(g))


def test_redrawn_backward_of_a_permuted_input_matches_the_bits(monkeypatch):
    from fastdrop import _torch

    monkeypatch.setattr(_torch, "ELEMENT_MASKS_AS_KEY", True)
    x = torch.randn(4, 6, 5, 7).permute(0, 3, 1, 2).requires_grad_()
    g = torch.randn(x.shape).to(memory_format=torch.channels_last)
    y = fastdrop.dropout(x, 0.3, generator=fastdrop.Generator(4))
    (gx,) = torch.autograd.grad(y, x, g)
    _, mask = fastdrop.dropout(x.detach(), 0.3, generator=fastdrop.Generator(4), return_mask=True)
    assert torch.equal(gx, mask.backward(g))


@pytest.mark.parametrize("fn", [fastdrop.dropout, fastdrop.dropout1d], ids=["bits", "key"])
def test_a_users_generator_advances_once_per_forward_and_never_in_backward(fn):
    gen = fastdrop.Generator(11)
    x = torch.randn(100, 100, requires_grad=True)
    y = fn(x, 0.5, generator=gen)
    after_forward = gen.get_state()
    assert after_forward != (11, 0, 0)
    g = torch.ones_like(y, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    gx.sum().backward()  # the double backward
    assert gen.get_state() == after_forward
    z = fn(x.detach(), 0.5, generator=fastdrop.Generator(11))
    assert torch.equal(gx.detach() != 0, z != 0)
    assert torch.equal(g.grad != 0, z != 0)


def test_a_keyed_mask_gives_its_bits_on_request():
    x = torch.randn(7, 9, 5, requires_grad=True)
    y = fastdrop.dropout1d(x, 0.4, generator=fastdrop.Generator(3))
    keyed = y.grad_fn.mask
    assert keyed.nbytes == 0
    _, stored = fastdrop.dropout1d(
        x.detach(), 0.4, generator=fastdrop.Generator(3), return_mask=True
    )
    np.testing.assert_array_equal(keyed.numpy(), stored.numpy())
    assert keyed.count_kept() == stored.count_kept() and keyed.shape == stored.shape


def test_return_mask_under_autograd_is_a_real_mask():
    x = torch.randn(5, 8, requires_grad=True)
    y, mask = fastdrop.dropout(x, 0.5, return_mask=True)
    assert isinstance(mask, fastdrop.Mask) and mask.nbytes > 0
    assert torch.equal(mask.backward(torch.ones_like(y)), (y.detach() != 0).float() * 2.0)


def test_nested_vmaps_and_grad_outside_a_vmap():
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    f = _fixed(lambda t, g: fastdrop.dropout(t, 0.5, generator=g))
    inner = torch.func.vmap(f, randomness="different")
    y = torch.func.vmap(inner, randomness="different")(x)
    torch.testing.assert_close(y, f(x), rtol=0, atol=0)  # one call, mask shape (3, 2, 5)
    per_sample = torch.func.vmap(
        torch.func.vmap(torch.func.grad(lambda t: f(t).sum()), randomness="different"),
        randomness="different",
    )(x)
    torch.testing.assert_close(per_sample, (y != 0).double() * 2.0, rtol=0, atol=0)
    # grad and jacrev of a function that vmaps inside.
    g = torch.func.grad(lambda t: torch.func.vmap(f, randomness="different")(t).sum())(x)
    torch.testing.assert_close(g, (y != 0).double() * 2.0, rtol=0, atol=0)


def test_the_first_call_of_a_process_may_come_inside_a_transform():
    import subprocess
    import sys

    code = (
        "import torch, fastdrop\n"
        "x = torch.randn(3, 4)\n"
        "f = lambda t: fastdrop.dropout(t, 0.5)\n"
        "torch.func.grad(lambda t: torch.func.vmap(f, randomness='different')(t).sum())(x)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_vmap_different_over_an_input_it_does_not_batch_draws_per_element():
    # torch's dropout expands an unbatched input under randomness='different'; so does fastdrop.
    x = torch.ones(50, dtype=torch.float64)
    f = _fixed(lambda t, g: fastdrop.dropout(t, 0.5, generator=g))
    y = torch.func.vmap(lambda s: f(x), randomness="different")(torch.zeros(4))
    assert y.shape == (4, 50)
    torch.testing.assert_close(y, f(x.expand(4, 50).contiguous()), rtol=0, atol=0)
    same = torch.func.vmap(lambda s: f(x), randomness="same")(torch.zeros(4))
    torch.testing.assert_close(same, f(x).expand(4, 50), rtol=0, atol=0)
