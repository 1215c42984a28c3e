"""Torch tensors through fastdrop: zero copies, NumPy/torch mask equality, torch-style seeding,
layouts, dtypes, autograd against the mask for every variant, devices."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastdrop  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _variants():
    """(name, call(x, generator, **kw)) for every variant on a 4-D input."""
    return [
        ("dropout", lambda x, g, **k: fastdrop.dropout(x, 0.3, generator=g, **k)),
        ("alpha_dropout", lambda x, g, **k: fastdrop.alpha_dropout(x, 0.3, True, generator=g, **k)),
        (
            "feature_alpha_dropout",
            lambda x, g, **k: fastdrop.feature_alpha_dropout(x, 0.3, True, generator=g, **k),
        ),
        ("dropout2d", lambda x, g, **k: fastdrop.dropout2d(x, 0.3, generator=g, **k)),
        ("dropout3d", lambda x, g, **k: fastdrop.dropout3d(x, 0.3, generator=g, **k)),
        ("drop_path", lambda x, g, **k: fastdrop.drop_path(x, 0.3, True, generator=g, **k)),
        ("drop_block_2d", lambda x, g, **k: fastdrop.drop_block_2d(x, 0.2, 3, generator=g, **k)),
        (
            "drop_block_2d_noise",
            lambda x, g, **k: fastdrop.drop_block_2d(x, 0.2, 3, with_noise=True, generator=g, **k),
        ),
    ]


VARIANTS = _variants()
IDS = [n for n, _ in VARIANTS]


# --- zero copies and types --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_writes_the_tensors_own_storage(dtype):
    x = torch.randn(64, 33).to(dtype)
    ptr, before = x.data_ptr(), x.clone()
    y = fastdrop.dropout(x, 0.5, inplace=True, generator=fastdrop.Generator(1))
    assert y is x and x.data_ptr() == ptr
    kept = x != 0
    assert 0 < int(kept.sum()) < x.numel()
    assert torch.equal(x[kept], (before[kept].float() * 2.0).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_type_shape_dtype_device(dtype):
    x = torch.randn(5, 7).to(dtype)
    y = fastdrop.dropout(x, 0.25, generator=fastdrop.Generator(0))
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == x.shape
    assert y.device == x.device and y.data_ptr() != x.data_ptr()


def test_input_is_read_through_dlpack_not_copied(monkeypatch):
    # What reaches Rust is a DLPack capsule of the tensor's own memory, not a copy.
    from fastdrop import _torch

    seen = []
    real = _torch._to_dlpack
    monkeypatch.setattr(_torch, "_to_dlpack", lambda t: seen.append(real(t)) or seen[-1])
    x = torch.randn(10, 10)
    fastdrop.dropout(x, 0.5)
    capsule, _out = seen  # the input's, then the output's
    assert "dltensor" in repr(capsule)
    # Rust borrowed the capsule without consuming it, so it still yields the same storage.
    assert torch.from_dlpack(capsule).data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_core_reads_versioned_dlpack_capsules(dtype):
    x = torch.randn(6, 5).to(dtype)
    out = torch.empty_like(x)
    g = fastdrop.Generator(3)
    spec_y = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(3))
    from fastdrop import _core
    from fastdrop._spec import Bernoulli, Scale, Spec

    spec = Spec(Bernoulli((6, 5), 0.5), Scale(2.0), 2.0)
    _core.apply(
        x.__dlpack__(max_version=(1, 0)), out.__dlpack__(max_version=(1, 0)), None, spec, g, False
    )
    torch.testing.assert_close(out, spec_y, rtol=0, atol=0)
    with pytest.raises(TypeError, match="DLPack dtype"):
        _core.apply(
            torch.ones(3, dtype=torch.int32).__dlpack__(),
            out.__dlpack__(),
            None,
            Spec(Bernoulli((3,), 0.5), Scale(2.0), 2.0),
            g,
            False,
        )


def test_non_float_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64, complex64 or"):
        fastdrop.dropout(torch.ones(4, dtype=torch.int32), 0.5)


def test_mixed_numpy_and_torch_residual_is_a_type_error():
    with pytest.raises(TypeError):
        fastdrop.dropout_add(torch.ones(4), np.ones(4, np.float32), 0.5)


# --- the same mask as NumPy; torch-style seeding ----------------------------------------------


@pytest.mark.parametrize("name,call", VARIANTS, ids=IDS)
def test_numpy_and_torch_give_the_same_values(name, call):
    a = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    expected = call(a.copy(), fastdrop.Generator(42))
    got = call(torch.from_numpy(a.copy()), fastdrop.Generator(42))
    np.testing.assert_array_equal(got.numpy(), expected)


def test_bfloat16_matches_float32_mask_and_rounding():
    x32 = torch.randn(1000)
    x = x32.to(torch.bfloat16)
    y = fastdrop.dropout(x, 0.4, generator=fastdrop.Generator(9))
    ref = fastdrop.dropout(x.float(), 0.4, generator=fastdrop.Generator(9))
    assert y.dtype == torch.bfloat16
    assert torch.equal((y != 0), (ref != 0))
    assert torch.equal(y, ref.to(torch.bfloat16))


def test_default_key_follows_torch_manual_seed():
    x = torch.randn(4096)
    torch.manual_seed(7)
    a = fastdrop.dropout(x, 0.5)
    b = fastdrop.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(fastdrop.dropout(x, 0.5), a)
    assert torch.equal(fastdrop.dropout(x, 0.5), b)
    assert not torch.equal(a, b)


def test_fork_rng_and_rng_state():
    x = torch.randn(4096)
    with torch.random.fork_rng():
        b = fastdrop.dropout(x, 0.5)
    assert torch.equal(fastdrop.dropout(x, 0.5), b)
    state = torch.get_rng_state()
    c = fastdrop.dropout(x, 0.5)
    torch.set_rng_state(state)
    assert torch.equal(fastdrop.dropout(x, 0.5), c)


def test_freeze_rng_state():
    pytest.importorskip("expecttest")  # torch's test helpers import it
    from torch.testing._internal.common_utils import freeze_rng_state

    x = torch.randn(4096)
    with freeze_rng_state():
        a = fastdrop.dropout(x, 0.5)
    assert torch.equal(fastdrop.dropout(x, 0.5), a)


def test_torch_generator_keys_the_call():
    x = torch.randn(4096)
    a = fastdrop.dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    b = fastdrop.dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    c = fastdrop.dropout(x, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    fastdrop.dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # the default generator was not used


# --- layouts and shape errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        lambda: torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1),
        lambda: torch.randn(6, 8)[:, ::2],
        lambda: torch.randn(6, 8).t(),
    ],
    ids=["channels_last", "permuted", "sliced", "transposed"],
)
def test_output_and_grad_layout_match_torch(make):
    x = make().requires_grad_()
    fn = fastdrop.dropout2d if x.dim() == 4 else fastdrop.dropout
    tfn = torch.nn.functional.dropout2d if x.dim() == 4 else torch.nn.functional.dropout
    y = fn(x, 0.5)
    t = x.detach().requires_grad_()  # the same strides
    ty = tfn(t, 0.5)
    assert y.stride() == ty.stride()
    y.backward(torch.ones_like(y))
    ty.backward(torch.ones_like(ty))
    assert x.grad.stride() == t.grad.stride()
    np.testing.assert_array_equal(x.grad.numpy(), (y.detach() != 0).float().numpy() * 2.0)


def test_shape_error_is_a_runtime_error_naming_the_rank():
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input, but received a 4D input"):
        fastdrop.dropout1d(torch.randn(2, 3, 4, 5), 0.5)
    with pytest.raises(ValueError):
        fastdrop.dropout2d(torch.randn(2, 3, 4, 5, 6), 0.5, strict_shapes=True)


# --- autograd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,call", VARIANTS, ids=IDS)
def test_grad_is_the_mask_backward(name, call):
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y, mask = call(x, fastdrop.Generator(11), return_mask=True)
    assert y.requires_grad and isinstance(mask, fastdrop.Mask)
    g = torch.randn_like(y)
    y.backward(g)
    keep = torch.from_numpy(mask.numpy()).expand(x.shape)
    assert torch.equal(x.grad, torch.where(keep, g * mask.scale, torch.zeros_like(g)))
    assert torch.equal(mask.backward(g), x.grad)


@pytest.mark.parametrize("name,call", VARIANTS, ids=IDS)
def test_gradcheck(name, call):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: call(t, fastdrop.Generator(5)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: call(t, fastdrop.Generator(5)), (x,))


def test_dropout1d_and_channel_grad():
    x = torch.randn(4, 6, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: fastdrop.dropout1d(t, 0.5, generator=fastdrop.Generator(2)), (x,)
    )


def test_dropout_add_grads():
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    y, mask = fastdrop.dropout_add(x, r, 0.4, generator=fastdrop.Generator(1), return_mask=True)
    ref = fastdrop.dropout(x.detach(), 0.4, generator=fastdrop.Generator(1)) + r.detach()
    assert torch.equal(y.detach(), ref)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(r.grad, g)
    assert torch.equal(x.grad, mask.backward(g))
    assert torch.autograd.gradcheck(
        lambda a, b: fastdrop.dropout_add(a, b, 0.4, generator=fastdrop.Generator(1)), (x, r)
    )


def test_drop_path_add_grads():
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    br = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y, mask = fastdrop.drop_path_add(
        x, br, 0.5, True, generator=fastdrop.Generator(4), return_mask=True
    )
    assert mask.shape == (8, 1)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)
    keep = torch.from_numpy(mask.numpy()).expand(br.shape)
    assert torch.equal(br.grad, torch.where(keep, g * 2.0, torch.zeros_like(g)))
    assert torch.autograd.gradcheck(
        lambda a, b: fastdrop.drop_path_add(a, b, 0.5, True, generator=fastdrop.Generator(4)),
        (x, br),
    )


def test_inplace_on_leaf_requiring_grad_is_torchs_error_and_writes_nothing():
    x = torch.randn(10, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fastdrop.dropout(x, 0.5, inplace=True)
    assert torch.equal(x.detach(), before)


def test_inplace_on_view_of_leaf_is_torchs_error_and_writes_nothing():
    leaf = torch.randn(10, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="view of a leaf Variable"):
        fastdrop.dropout(leaf[:5], 0.5, inplace=True)
    assert torch.equal(leaf.detach(), before)


def test_inplace_on_non_leaf_has_the_right_grad():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    h = x * 3
    y, mask = fastdrop.dropout(
        h, 0.5, inplace=True, generator=fastdrop.Generator(6), return_mask=True
    )
    assert y is h
    y.sum().backward()
    keep = torch.from_numpy(mask.numpy())
    assert torch.equal(x.grad, torch.where(keep, 6.0, 0.0).double())


def test_inplace_after_a_saved_tensor_is_detected():
    # sigmoid saves its output for backward; overwriting it must not give a silent wrong grad.
    x = torch.randn(20, requires_grad=True)
    s = torch.sigmoid(x)
    fastdrop.dropout(s, 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


def test_no_grad_gives_no_graph():
    x = torch.randn(10, requires_grad=True)
    with torch.no_grad():
        y = fastdrop.dropout(x, 0.5)
    assert not y.requires_grad


# --- other devices ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,call", VARIANTS, ids=IDS)
def test_meta_tensors_take_the_torch_path(name, call, monkeypatch):
    from fastdrop import _torch

    monkeypatch.setattr(_torch, "_host", lambda t: pytest.fail("meta tensor reached the host"))
    x = torch.empty(2, 3, 8, 8, device="meta")
    y = call(x, None)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    y = call(x, fastdrop.Generator(0))
    assert y.device.type == "meta"


def test_meta_dropout_add_and_return_mask():
    x = torch.empty(4, 5, device="meta")
    assert fastdrop.dropout_add(x, x, 0.5).device.type == "meta"
    with pytest.raises(ValueError, match="CPU tensor"):
        fastdrop.dropout(x, 0.5, return_mask=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,call", VARIANTS, ids=IDS)
def test_cuda_stays_on_device(name, call):
    x = torch.randn(4, 3, 16, 16, device="cuda", requires_grad=True)
    y = call(x, None)
    assert y.device == x.device and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.device == x.device
    g = torch.Generator(device="cuda").manual_seed(1)
    a = call(x.detach(), g)
    b = call(x.detach(), torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(a, b)
    c = call(x.detach(), fastdrop.Generator(3))
    d = call(x.detach(), fastdrop.Generator(3))
    assert torch.equal(c, d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_drop_path_matches_timm():
    timm_drop = pytest.importorskip("timm.layers.drop")
    x = torch.randn(16, 3, 8, 8, device="cuda")
    torch.manual_seed(0)
    ref = timm_drop.drop_path(x, 0.3, True)
    torch.manual_seed(0)
    assert torch.equal(fastdrop.drop_path(x, 0.3, True), ref)
    torch.manual_seed(1)
    ref = timm_drop.drop_block_2d(x, 0.2, 3)
    torch.manual_seed(1)
    assert torch.equal(fastdrop.drop_block_2d(x, 0.2, 3), ref)


def test_inference_mode_before_and_after():
    # The first call of a thread may come under inference_mode; later ones outside must work.
    import threading

    results = []

    def worker():
        with torch.inference_mode():
            results.append(fastdrop.dropout(torch.randn(8), 0.5))
        results.append(fastdrop.dropout(torch.randn(8, requires_grad=True), 0.5))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert len(results) == 2 and results[1].requires_grad


def _invert(perm):
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return inverse


@pytest.mark.parametrize(
    "fn,tfn",
    [
        (fastdrop.dropout, torch.nn.functional.dropout),
        (fastdrop.dropout2d, torch.nn.functional.dropout2d),
    ],
    ids=["dropout", "dropout2d"],
)
def test_strides_of_permuted_sliced_inputs_match_torch(fn, tfn):
    # torch's test_dropout.py `_test_dropout_stride_mean_preserve`: a sliced (not dense)
    # permuted input gives an output dense in the input's dimension order.
    import itertools

    for perm in itertools.permutations(range(4)):
        for shift in range(4):
            inp = torch.randn(5, 5, 5, 5)
            x = inp.permute(perm).contiguous().permute(_invert(perm))[shift:, shift:]
            out = fn(x, 0.3)
            assert out.permute(perm).is_contiguous()
            assert out.stride() == tfn(x, 0.3).stride(), (perm, shift)
            assert torch.equal(fn(x, 1e-10), x)


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1, 3).expand(4, 3),
        torch.randn(4, 1, 3)[:, :, ::2],
        torch.randn(2, 3, 4, 6).to(memory_format=torch.channels_last)[..., ::2],
        torch.randn(3, 1, 5).transpose(0, 2)[::2],
        torch.randn(5, 1, 4).expand(5, 3, 4)[:, :, ::2],
    ],
    ids=["broadcast", "size1", "channels_last_sliced", "transposed_sliced", "mixed"],
)
def test_strides_of_odd_layouts_match_torch(x):
    assert fastdrop.dropout(x, 0.3).stride() == torch.nn.functional.dropout(x, 0.3).stride()


def test_import_fastdrop_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, fastdrop, fastdrop.functional\n"
        "fastdrop.dropout(np.ones(8, np.float32), 0.5)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mask_backward_refuses_a_tensor_of_another_shape():
    _, mask = fastdrop.dropout(torch.ones(2, 3), 0.5, return_mask=True)
    with pytest.raises(ValueError, match=r"grad_output has shape \(3, 3\).*\(2, 3\)"):
        mask.backward(torch.ones(3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensor_outputs_reuse_freed_buffers_and_never_a_live_one(dtype):
    fastdrop.empty_cache()
    x = torch.randn(3, 1 << 21).to(dtype)  # 12 or 24 MiB: above the cache's 1 MiB floor
    y = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(4))
    addr = y.data_ptr()
    keep_alive = y[1:]
    del y
    z = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(4))
    assert z.data_ptr() != addr, "a view keeps the buffer out of the cache"
    assert torch.equal(keep_alive, z[1:])
    del keep_alive, z
    nbytes = x.numel() * x.element_size()
    assert fastdrop._core.cached_bytes() >= 2 * nbytes  # both freed buffers
    w = fastdrop.dropout(x, 0.5, generator=fastdrop.Generator(4))
    assert fastdrop._core.cached_bytes() >= nbytes  # w took one, the other waits
    want = fastdrop.dropout(x.clone(), 0.5, generator=fastdrop.Generator(4))
    assert torch.equal(w, want)
    assert w.is_contiguous() and w.dtype == x.dtype and w.shape == x.shape
    del w, want  # the second output took the other buffer; both come back now
    assert fastdrop.empty_cache() >= 2 * nbytes


def test_tensor_outputs_from_one_mib_come_from_the_cache():
    # timm's DropPath at ResNet's last stage, (8, 2048, 5, 5) float32: 1.6 MiB, forward and
    # backward outputs both recycled.
    fastdrop.empty_cache()
    x = torch.randn(8, 2048, 5, 5, requires_grad=True)
    y = fastdrop.drop_path(x, 0.5, True)
    assert y.data_ptr() % (2 << 20) == 0
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert g.data_ptr() % (2 << 20) == 0
    addr = {y.data_ptr(), g.data_ptr()}
    del y, g
    assert fastdrop._core.cached_bytes() == 2 * (2 << 20)
    again = fastdrop.drop_path(x.detach(), 0.5, True)
    assert again.data_ptr() in addr
    del again
    fastdrop.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
def test_the_plain_tensor_call_gives_what_the_general_route_gives(dtype):
    # dropout(t, p) with defaults skips the general dispatch; torch's seed still keys it, and
    # the result is the one return_mask=True (the general route) gives for the same seed.
    t = torch.randn(7, 300).to(dtype)
    torch.manual_seed(3)
    plain = fastdrop.dropout(t, 0.3)
    torch.manual_seed(3)
    general, mask = fastdrop.dropout(t, 0.3, return_mask=True)
    assert torch.equal(plain, general) and plain.dtype == dtype
    torch.manual_seed(3)
    assert torch.equal(fastdrop.dropout(t, 0.3), plain)
    assert not torch.equal(fastdrop.dropout(t, 0.3), plain)  # the seed advanced
    # Tensors the plain route must not take: they still get the general behaviour.
    leaf = t.float().requires_grad_()
    fastdrop.dropout(leaf, 0.3).sum().backward()
    assert leaf.grad is not None
    meta = fastdrop.dropout(torch.empty(4, 5, device="meta"), 0.3)
    assert meta.device.type == "meta" and meta.shape == (4, 5)
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64, complex64 or"):
        fastdrop.dropout(torch.ones(3, dtype=torch.int32), 0.3)


def _blocks(t, fn, **kw):
    """`fn` (drop_block_2d) at 0.3 with 3x3 blocks on a (16, 3, 50) tensor seen as (16, 3, 5, 10),
    its result (and mask, with return_mask) seen as (16, 3, 50) again."""
    out = fn(t.view(16, 3, 5, 10), 0.3, 3, **kw)
    if isinstance(out, tuple):
        return out[0].reshape(16, 3, 50), out[1]
    return out.reshape(16, 3, 50)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "plain, general",
    [
        (
            lambda t: fastdrop.dropout(t, 0.3),
            lambda t: fastdrop.dropout(t, 0.3, return_mask=True)[0],
        ),
        (
            lambda t: fastdrop.drop_path(t, 0.3, True),
            lambda t: fastdrop.drop_path(t, 0.3, True, return_mask=True)[0],
        ),
        (
            lambda t: fastdrop.drop_path(t, 0.3, True, False),
            lambda t: fastdrop.drop_path(t, 0.3, True, False, return_mask=True)[0],
        ),
        (
            lambda t: _blocks(t, fastdrop.drop_block_2d),
            lambda t: _blocks(t, fastdrop.drop_block_2d, return_mask=True)[0],
        ),
        (
            lambda t: _blocks(t, fastdrop.drop_block_2d, with_noise=True),
            lambda t: _blocks(t, fastdrop.drop_block_2d, with_noise=True, return_mask=True)[0],
        ),
    ],
    ids=["dropout", "drop_path", "drop_path-unscaled", "drop_block", "drop_block-noise"],
)
def test_the_plain_tensor_call_with_autograd_gives_the_general_routes_values_and_grads(
    dtype, plain, general
):
    # A tensor that requires grad also takes the plain route (straight to the autograd
    # Function): same values, same gradient, same graph kind, and the key drawn from torch's
    # seed once per call, as the general route (return_mask=True) draws it.
    x = (torch.randn(16, 3, 50) + 1).to(dtype).requires_grad_()
    g = torch.randn(16, 3, 50).to(dtype).requires_grad_()
    torch.manual_seed(5)
    a = plain(x)
    torch.manual_seed(5)
    b = general(x)
    assert torch.equal(a, b) and a.dtype == dtype
    assert type(a.grad_fn) is type(b.grad_fn)
    (ga,) = torch.autograd.grad(a, x, g, create_graph=True)
    (gb,) = torch.autograd.grad(b, x, g, create_graph=True)
    assert torch.equal(ga, gb) and 0 < int((ga == 0).sum()) < ga.numel()
    # The gradient is differentiable again (double backward), as the general route's.
    v = torch.randn_like(ga)
    (gga,) = torch.autograd.grad(ga, g, v)
    (ggb,) = torch.autograd.grad(gb, g, v)
    assert torch.equal(gga, ggb)
    assert not torch.equal(plain(x), a)  # the seed advanced
    # Under no_grad the same call gives no graph.
    with torch.no_grad():
        torch.manual_seed(5)
        c = plain(x)
    assert c.grad_fn is None and torch.equal(c, a)


def test_the_plain_drop_path_route_refuses_what_the_general_route_refuses():
    with pytest.raises(TypeError, match="layout torch.sparse_coo"):
        fastdrop.drop_path(torch.ones(4, 4).to_sparse(), 0.3, True)
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(TypeError, match="nested tensor"):
        fastdrop.drop_path(nested, 0.3, True)
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64, complex64 or"):
        fastdrop.drop_path(torch.ones(3, 2, dtype=torch.int32), 0.3, True)
    with pytest.raises(RuntimeError, match="0D"):
        fastdrop.drop_path(torch.ones(()), 0.3, True)
    meta = fastdrop.drop_path(torch.empty(4, 5, device="meta"), 0.3, True)
    assert meta.device.type == "meta" and meta.shape == (4, 5)


def test_with_the_cache_off_large_tensor_outputs_are_torchs_own():
    code = (
        "import torch, fastdrop\n"
        "y = fastdrop.dropout(torch.ones(3, 1 << 20), 0.5)\n"
        "y.resize_(4, 1 << 20)\n"  # a torch-allocated storage can grow
        "print(fastdrop._core.cached_bytes())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "FASTDROP_CACHE_BYTES": "0"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
