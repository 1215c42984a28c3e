"""Torch tensors through fastdrop: the CPU path into Rust, autograd, torch.compile, other devices.

Imported the first time a torch tensor reaches the dispatcher (`_dispatch.run`), so `import
fastdrop` never imports torch. `path_for` checks a call's tensors and names one of three paths:

- `run_host`: a CPU tensor is handed to Rust as a DLPack capsule of its own storage (zero
  copies) through `_mask.apply_spec`, the same call NumPy input makes, so the same generator
  state gives the same mask; a tensor that needs a gradient goes through `_DropoutFunction`,
  which saves the bit-packed `Mask` (or its key), never a tensor of the input's size;
- `run_compiled`: under `torch.compile` the same kernels run as the custom ops
  `fastdrop::bernoulli` and `fastdrop::drop_block`, whose fake implementations let the compiler
  trace through them; the spec travels as their flat arguments (`_spec.application_args`);
- `run_device`: a tensor on any other device (CUDA, ``meta``, ...) stays there and goes to
  torch's own operations (`_device`), never touching host memory.

The family members that are not a mask spec (`gaussian_dropout`, `patch_dropout`, torchvision's
DropBlock) have their torch side at the end. Imports only downward: the bottom floor
(`_checks`, `_spec`), `_core_call`, `_mask`, `_keyed` and `_device`.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.autograd.forward_ad as _fwAD
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _core, _device, _keyed, _threads
from ._core_call import apply as core_apply
from ._mask import Mask, apply_spec
from ._spec import (
    Affine,
    Bernoulli,
    Blocks,
    Scale,
    Spec,
    application_args,
    application_from_args,
)

#: What the kernels read directly; a complex tensor is read as its float pairs (view_as_real).
_HOST_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)

# --- keys and views ---------------------------------------------------------------------------


class _PerThread(threading.local):
    """What each thread reuses call after call: a 0-d tensor to draw keys into (read back
    through its NumPy view, cheaper than `.item()`) and the Generator the key is set into."""

    def __init__(self):
        # A normal tensor even when first made under inference_mode, which would otherwise
        # forbid drawing into it later outside that mode, or inside a torch.func transform,
        # which would make it a wrapper without storage.
        with torch.inference_mode(False), torch._C._DisableFuncTorch():
            self.key = torch.empty((), dtype=torch.int64)
            self.key_view = self.key.numpy()
        self.generator = _core.Generator(0)


_local = _PerThread()


def _default_host_generator() -> _core.Generator:
    """`_host_generator(None)`: this thread's reused Generator keyed by one 63-bit draw from
    torch's default generator, so `torch.manual_seed`, `fork_rng` and `freeze_rng_state` govern
    fastdrop as they govern torch's dropout. Its own function, called straight from
    `run_plain`: in a training step it runs between torch's operations with its code out of
    the caches, where each Python call costs microseconds."""
    local = _local
    local.key.random_()  # passing generator=None costs a third more
    gen = local.generator
    gen.set_state((int(local.key_view), 0, 0))
    return gen


def _host_generator(generator: Any) -> _core.Generator:
    """The fastdrop Generator a CPU call draws its mask from: for a torch key, this thread's
    reused Generator set to (key, stream 0, offset 0), the same as `Generator(key)`."""
    if generator is None:
        return _default_host_generator()
    if isinstance(generator, _core.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(
                f"a torch.Generator on {generator.device} cannot key a CPU tensor's mask; "
                "pass a CPU generator"
            )
        local = _local
        local.key.random_(generator=generator)
        gen = local.generator
        gen.set_state((int(local.key_view), 0, 0))
        return gen
    raise _device.bad_generator(generator)


def _host(t: torch.Tensor):
    """A DLPack capsule of a CPU tensor's own storage (zero copies; bfloat16 included), which
    the Rust bindings read directly: about 1 us, where `np.from_dlpack` costs several.

    The capsule is made from a detached alias, never from `t` itself: torch's capsule shares the
    tensor it is made from, so `t.set_(...)` in another thread (while the kernel runs without
    the GIL) would free the memory under it and change the shape it reports. The alias holds
    its own reference to the storage (about 0.4 us)."""
    return _to_dlpack(t.detach())


def _check_host_dtype(t: torch.Tensor, name: str = "input") -> None:
    if t.dtype not in _HOST_DTYPES and t.dtype not in _COMPLEX_DTYPES:
        raise TypeError(
            f"{name} must be a float16, bfloat16, float32, float64, complex64 or complex128 "
            f"tensor, got {t.dtype}"
        )


def _check_kind(t: torch.Tensor, name: str = "input") -> None:
    """A TypeError for a tensor whose elements are not one strided block of memory (sparse,
    nested, MKL-DNN): the kernels could not read it, and torch's dropout family mostly refuses
    it too."""
    if t.is_nested:
        raise TypeError(
            f"{name} is a nested tensor; fastdrop takes dense (strided) tensors: apply it to "
            "each component, or to the nested tensor's values()"
        )
    if t.layout is not torch.strided:
        raise TypeError(
            f"{name} has layout {t.layout}; fastdrop takes dense (strided) tensors: convert it "
            "with .to_dense()"
        )


def _materialized(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values in memory the kernels can read: a tensor with the negative or conjugate bit
    resolved (its storage holds the other sign), a ZeroTensor (no storage at all) as zeros."""
    t = t.detach()
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype)
    return t.resolve_conj().resolve_neg()


def _unusual(t: torch.Tensor) -> bool:
    """Whether `t`'s storage is not simply its values: complex, or a neg/conj bit, or none."""
    return t.is_complex() or t.is_neg() or t._is_zerotensor()


_ZERO_TENSOR_IMMUTABLE = (
    "ZeroTensors are immutable. Please use the materialized zero tensor obtained using .clone() "
    "if you want a mutable tensor."
)


# --- the CPU path -----------------------------------------------------------------------------


#: The NumPy dtype of a cached buffer for each torch dtype (bfloat16: its 16-bit words, viewed
#: as bfloat16 by torch).
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.bfloat16: np.dtype(np.uint16),
}
#: Outputs from this size (bytes) on come from fastdrop's buffer cache, as NumPy ones do (the
#: core decides, from 1 MiB; this only spares small tensors the call).
_CACHED_OUTPUT_MIN = 1 << 20


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """An output laid out as torch's dropout lays it out: a dense input's own strides (so
    channels_last stays so); otherwise dense, with the input's dimensions ordered by stride as
    TensorIterator orders them (size-1 and broadcast dimensions stay where they are)."""
    if x.is_contiguous():
        np_dtype = _NUMPY_DTYPES.get(x.dtype) if x.numel() >= _CACHED_OUTPUT_MIN // 8 else None
        if np_dtype is not None:
            # A large output on a recycled buffer (see fastdrop.empty_cache): torch's allocator
            # would fault fresh pages in, which costs about as much as the dropout.
            buf = _core.cached_empty(tuple(x.shape), np_dtype)
            if buf is not None:
                t = torch.from_numpy(buf)  # bfloat16's words are uint16 to NumPy
                return t.view(torch.bfloat16) if x.dtype is torch.bfloat16 else t
        return torch.empty_like(x)
    sizes, strides = x.shape, x.stride()
    movable = [d for d in range(x.dim()) if sizes[d] > 1 and strides[d] != 0]
    order = list(range(x.dim()))
    for slot, d in zip(movable, sorted(movable, key=lambda d: strides[d], reverse=True)):
        order[slot] = d
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return torch.empty([sizes[d] for d in order], dtype=x.dtype).permute(inverse)


def _forward(x, residual, spec, gen, inplace, want_mask):
    """Runs `spec` on CPU tensors; returns (out, mask or None)."""
    # `_unusual(x)`, inlined: this runs on every CPU call (three checks, about 0.25 us).
    if (
        x.is_complex()
        or x.is_neg()
        or x._is_zerotensor()
        or (residual is not None and _unusual(residual))
    ):
        return _forward_unusual(x, residual, spec, gen, inplace, want_mask)
    a = _to_dlpack(x.detach())  # `_host(x)`, inlined
    if inplace:
        out, o = x, a
    else:
        out = _empty_like(x)  # a fresh tensor needs no detach
        o = _to_dlpack(out)
    r = None if residual is None else _host(residual)
    return out, apply_spec(a, o, r, spec, gen, want_mask, tuple(x.shape))


class _Call(list):
    """[spec, generator, inplace, want_mask, mask]: one call's arguments to a Function, whose
    last slot the forward fills. A list subclass because torch.func's transforms rebuild plain
    lists (pytree nodes) on the way to the forward, and the caller must see the mask."""

    __slots__ = ()


class _FactorMask:
    """A mask as a tensor of factors (the gradient scale where kept, 0 where dropped), applied
    with torch's own operations: what a call under `torch.func.vmap` hands the transforms
    around it, batched at the vmap's level, as torch's dropout hands them its mask tensor."""

    __slots__ = ("factor",)

    def __init__(self, factor: torch.Tensor):
        self.factor = factor


def _forward_unusual(x, residual, spec, gen, inplace, want_mask):
    """`_forward` for complex tensors and tensors whose storage is not their values."""
    if inplace and x._is_zerotensor():
        raise RuntimeError(_ZERO_TENSOR_IMMUTABLE)
    if inplace and (x.is_neg() or x.is_conj()):
        # As torch's in-place ops do: the result of the values the view shows, written back
        # through the view (which stores it with the bit applied).
        out, mask = _forward_unusual(_materialized(x), residual, spec, gen, False, want_mask)
        with torch.no_grad():
            x.copy_(out)
        return x, mask
    if x.is_neg() or x.is_conj() or x._is_zerotensor():
        x = _materialized(x)
    if residual is not None and (
        residual.is_neg() or residual.is_conj() or residual._is_zerotensor()
    ):
        residual = _materialized(residual)
    if not x.is_complex():
        return _forward(x, residual, spec, gen, inplace, want_mask)
    return _forward_complex(x, residual, spec, gen, inplace, want_mask)


def _forward_complex(x, residual, spec, gen, inplace, want_mask):
    """A complex tensor as its (..., 2) float pairs, in place, with one decision per complex
    element, as torch's dropout family computes it: a real noise tensor times the complex input,
    so both parts are scaled by the same factor, and alpha dropout's shift (a real number) is
    added to the real part only."""
    if type(spec.mask) is not Bernoulli:
        raise TypeError(
            f"drop_block_2d takes real tensors, got {x.dtype} (timm's DropBlock has no complex "
            "form)"
        )
    out = x if inplace else _empty_like(x)
    xr, outr = torch.view_as_real(x.detach()), torch.view_as_real(out.detach())
    shape = tuple(x.shape)
    app = spec.application
    if type(app) is Scale:
        # The mask gets a trailing 1, so one decision covers both parts of a pair.
        r = None if residual is None else _to_dlpack(torch.view_as_real(residual.detach()))
        pairs = spec.with_trailing_one()
        mask = apply_spec(_to_dlpack(xr), _to_dlpack(outr), r, pairs, gen, want_mask, shape)
        return out, mask
    if type(app) is not Affine:
        raise TypeError(f"a Bernoulli mask takes a Scale or Affine application, not {app!r}")
    # Alpha dropout (never fused with a residual): the affine map on the real parts, whose mask
    # then scales the imaginary parts by `a` (kept) or zeroes them (dropped).
    bits = core_apply(_to_dlpack(xr[..., 0]), _to_dlpack(outr[..., 0]), None, spec, gen, True).bits
    assert bits is not None
    _core.mask_apply(bits, _to_dlpack(xr[..., 1]), _to_dlpack(outr[..., 1]), app.a)
    return out, Mask(bits, spec.grad_scale, shape) if want_mask else None  # type: ignore[arg-type]


def _mask_operands(bits_rank: int, grad: torch.Tensor, out: torch.Tensor):
    """(grad, out) pairs of float views for `_core.mask_apply` with a mask of `bits_rank`
    dimensions: a complex tensor as its (..., 2) pairs, for a mask drawn for a real input (one
    dimension fewer) as its real and imaginary parts; a real tensor with a trailing 1 for a mask
    drawn for a complex input (which has one)."""
    if grad.is_complex():
        g, o = torch.view_as_real(grad), torch.view_as_real(out)
        if bits_rank == g.dim():
            return [(g, o)]
        return [(g[..., 0], o[..., 0]), (g[..., 1], o[..., 1])]
    if bits_rank == grad.dim() + 1:
        return [(grad.unsqueeze(-1), out.unsqueeze(-1))]
    return [(grad, out)]


def _mask_grad(mask: Mask, grad: torch.Tensor, strides: Optional[Tuple[int, ...]]):
    """`grad * mask * scale` into a tensor with `strides` (the forward output's) or grad's.
    `grad` has the mask's input shape: autograd guarantees it, `Mask.backward` checks it."""
    if not grad.is_cpu or _is_legacy_batched(grad):
        # Another device, or the batched gradients of `torch.autograd.grad(...,
        # is_grads_batched=True)` (which have no storage): torch's operations on the bits.
        keep = torch.from_numpy(mask.numpy()).to(grad.device)
        return torch.where(
            keep, grad * mask.scale, torch.zeros((), dtype=grad.dtype, device=grad.device)
        )
    # The checks and `_host`, inlined (as in `_forward`): a backward runs with its code out of
    # the caches, between torch's operations, where each Python call costs microseconds.
    if grad.dtype not in _HOST_DTYPES:
        _check_host_dtype(grad, "grad_output")
    unusual = grad.is_complex() or grad.is_neg() or grad._is_zerotensor()
    if unusual:
        grad = _materialized(grad)
    if strides is None or strides == grad.stride():
        out = _empty_like(grad)  # large dense gradients reuse freed buffers, as forwards do
    else:
        out = torch.empty_strided(grad.shape, strides, dtype=grad.dtype)
    if not unusual and len(mask._shape) == grad.dim():
        mask._apply(_to_dlpack(grad.detach()), _to_dlpack(out))
        return out
    for g, o in _mask_operands(len(mask._shape), grad.detach(), out):
        mask._apply(_to_dlpack(g), _to_dlpack(o))
    return out


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_functorch_active = torch._C._are_functorch_transforms_active


def _masked(mask: Any, t: torch.Tensor, strides: Optional[Tuple[int, ...]]) -> torch.Tensor:
    """`t * mask * scale`, itself differentiable (reverse, forward, vmap) when anything may
    differentiate it; the kernel straight away otherwise (a backward without create_graph)."""
    if type(mask) is _FactorMask:
        return t * mask.factor.to(t.dtype)
    if _functorch_active():
        return _MaskGradFunctionTF.apply(t, mask, strides)
    if (t.requires_grad and torch.is_grad_enabled()) or _fwAD._current_level >= 0:
        return _MaskGradFunction.apply(t, mask, strides)
    return _mask_grad(mask, t, strides)


def _output_strides(out: torch.Tensor) -> Optional[Tuple[int, ...]]:
    try:
        return out.stride()
    except RuntimeError:  # a torch.func wrapper may have no strides to tell
        return None


def _broadcast_mask(mask: Mask, shape: Tuple[int, ...]) -> Any:
    """`mask` for a tensor of `shape` = (batch, *mask.input_shape): one mask for the whole
    batch (a batched gradient, or vmap's randomness='same')."""
    if mask._key is not None:
        return mask._with_shape((1,) + mask.shape, shape)
    factor = torch.from_numpy(mask.numpy()).to(torch.float64) * mask.scale
    return _FactorMask(factor)


class _MaskGradFunction(torch.autograd.Function):
    """`t * mask * scale`: the backward (and forward-AD tangent) of every masked op is itself
    masked, so double backward and forward-over-reverse work. The classic `forward(ctx, ...)`
    style: torch binds a setup_context-style Function's arguments through `inspect.signature`
    on every call, which costs more than the kernel on small tensors (`_MaskGradFunctionTF`
    is the style torch.func needs)."""

    @staticmethod
    def forward(ctx, grad, mask, strides):
        ctx.mask, ctx.strides = mask, strides
        return _mask_grad(mask, grad, strides)

    @staticmethod
    def backward(ctx, grad_grad):
        return _masked(ctx.mask, grad_grad, ctx.strides), None, None

    @staticmethod
    def jvp(ctx, grad_t, _mask, _strides):
        return _masked(ctx.mask, grad_t, ctx.strides)


class _MaskGradFunctionTF(_MaskGradFunction):
    """`_MaskGradFunction` under torch.func transforms, with a vmap rule."""

    @staticmethod
    def forward(grad, mask, strides):  # type: ignore[override]
        return _mask_grad(mask, grad, strides)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mask, ctx.strides = inputs[1], inputs[2]

    @staticmethod
    def vmap(info, in_dims, grad, mask, strides):
        # A batch of gradients (is_grads_batched, jacrev, vmap over a vjp) against one mask:
        # the mask with a size-1 batch dimension, in one kernel call.
        g = grad.movedim(in_dims[0], 0)
        return _masked(_broadcast_mask(mask, tuple(g.shape)), g, None), 0


#: torch's own words for a random operation under vmap(randomness='error').
_RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the "
    "'same' or 'different' randomness flags on vmap or perform the randomness operation out "
    "of vmap"
)


def _check_randomness(return_mask: bool) -> List[Tuple[int, int]]:
    """torch's error when any enclosing `torch.func.vmap` has randomness='error', as torch's
    dropout raises it (also where the input is not batched, as under jacfwd). Returns the
    (level, batch size) of the vmaps with randomness='different', outermost first."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    different = []
    for i in retrieve_all_functorch_interpreters():
        if i.key() == TransformType.Vmap:
            randomness = i.randomness()  # type: ignore[attr-defined]
            if randomness == "error":
                raise RuntimeError(_RANDOMNESS_ERROR)
            if return_mask:
                raise ValueError(
                    "return_mask is not supported under torch.func.vmap: the mask would be "
                    "one per batch element"
                )
            if randomness == "different":
                different.append((i.level(), i.batch_size()))  # type: ignore[attr-defined]
    return different


def _batched_for(t: Any, different: List[Tuple[int, int]]) -> Any:
    """A plain tensor that vmaps with randomness='different' do not batch, batched at each of
    them (expanded, as torch's dropout does), so that each batch element draws its own mask."""
    if t is None or torch._C._functorch.is_functorch_wrapped_tensor(t):
        return t
    for level, size in different:
        t = torch._C._functorch._add_batch_dim(t.expand(size, *t.shape), 0, level)
    return t


def _factor(mask: Any) -> torch.Tensor:
    """A mask as a tensor of factors: the mask an inner vmap already made one (batched at its
    level), or the bits of a plain call."""
    if type(mask) is _FactorMask:
        return mask.factor
    return torch.from_numpy(mask.numpy()).to(torch.float64) * mask.scale


def _vmap_forward(info, in_dims, x, residual, call):
    """A variant under `torch.func.vmap`, as torch's dropout behaves there: with
    randomness='different' one call whose mask shape leads with the batch size draws an
    independent mask per batch element; with 'same' the mask leads with 1 and one mask serves
    the batch; 'error' raises torch's error. Returns (output, out_dim)."""
    if info.randomness == "error":
        raise RuntimeError(_RANDOMNESS_ERROR)
    spec, gen, inplace, want = call[0], call[1], call[2], call[3]
    n = info.batch_size
    if in_dims[0] is None:
        if inplace:
            raise RuntimeError(
                "vmap: inplace dropout on a tensor that is not batched is not possible: the "
                "output would need the batch dimension"
            )
        xb = x.expand(n, *x.shape)
    else:
        xb = x.movedim(in_dims[0], 0)
    rb = None
    if residual is not None:
        rd = in_dims[1]
        rb = residual.expand(n, *residual.shape) if rd is None else residual.movedim(rd, 0)
    same = info.randomness == "same"
    if type(spec.mask) is Bernoulli:
        inner = _Call((spec.with_leading(1 if same else n), gen, inplace, want, None))
        out = _apply_dropout(xb, rb, inner)
        factor = _factor(inner[4])
        if same:
            factor = factor[0]
    else:
        # A block mask is drawn per map (its scale counts one sample's kept pixels), so each
        # batch element is one call: from one generator state for 'same', in turn otherwise.
        state = gen.get_state()
        outs, factors = [], []
        for b in range(n):
            g = _core._generator_from_state(state) if same else gen
            inner = _Call((spec, g, False, want, None))
            outs.append(_apply_dropout(xb[b], None, inner))
            factors.append(_factor(inner[4]))
        if same:
            gen.set_state(g.get_state())
        out = torch.stack(outs)
        if inplace:
            out = xb.copy_(out)
        factor = factors[0] if same else torch.stack(factors)
    if not same:
        # Batched at this vmap's level (the one below the current depth), so the transforms
        # around it apply the same masks to gradients and tangents.
        level = torch._C._functorch.get_dynamic_layer_stack_depth() + 1
        factor = torch._C._functorch._add_batch_dim(factor, 0, level)
    call[4] = _FactorMask(factor)
    if inplace:
        return x, in_dims[0]
    return out, 0


def _dropout_setup(ctx, x, call, out) -> None:
    if call[2]:
        ctx.mark_dirty(x)
    ctx.mask, ctx.strides, ctx.inplace = call[4], _output_strides(out), call[2]


class _DropoutFunction(torch.autograd.Function):
    """Any variant on a CPU tensor. `call` is a `_Call` [spec, generator, inplace, want_mask,
    mask] whose last slot forward fills (one argument, because Function.apply spends about half
    a microsecond on each). A channel or sample mask is kept as its key (see
    `ELEMENT_MASKS_AS_KEY`) unless return_mask asked for bits: the backward redraws the bits
    inside its kernel. Classic style, as
    `_MaskGradFunction`; `_DropoutFunctionTF` is the same under torch.func."""

    @staticmethod
    def forward(ctx, x, call):
        out, call[4] = _forward(x, None, call[0], call[1], call[2], call[3])
        _dropout_setup(ctx, x, call, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _masked(ctx.mask, grad, ctx.strides), None

    @staticmethod
    def jvp(ctx, x_t, _call):
        t = _masked(ctx.mask, x_t, ctx.strides)
        return x_t.copy_(t) if ctx.inplace else t


class _DropoutFunctionTF(_DropoutFunction):
    @staticmethod
    def forward(x, call):  # type: ignore[override]
        out, call[4] = _forward(x, None, call[0], call[1], call[2], call[3])
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dropout_setup(ctx, inputs[0], inputs[1], output)

    @staticmethod
    def vmap(info, in_dims, x, call):
        return _vmap_forward(info, in_dims, x, None, call)


class _DropoutAddFunction(torch.autograd.Function):
    """The fused `residual + variant(x)`: the residual's gradient is the incoming one."""

    @staticmethod
    def forward(ctx, x, residual, call):
        out, call[4] = _forward(x, residual, call[0], call[1], False, call[3])
        ctx.mask, ctx.strides = call[4], _output_strides(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx = _masked(ctx.mask, grad, ctx.strides) if ctx.needs_input_grad[0] else None
        return gx, grad if ctx.needs_input_grad[1] else None, None

    @staticmethod
    def jvp(ctx, x_t, residual_t, _call):
        t = None if x_t is None else _masked(ctx.mask, x_t, ctx.strides)
        if residual_t is None:
            return t
        return residual_t.clone() if t is None else t + residual_t


class _DropoutAddFunctionTF(_DropoutAddFunction):
    @staticmethod
    def forward(x, residual, call):  # type: ignore[override]
        out, call[4] = _forward(x, residual, call[0], call[1], False, call[3])
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mask, ctx.strides = inputs[2][4], _output_strides(output)

    @staticmethod
    def vmap(info, in_dims, x, residual, call):
        return _vmap_forward(info, in_dims, x, residual, call)


def _apply_dropout(x, residual, call):
    """The Function for the call: the classic one unless a torch.func transform is active."""
    if residual is None:
        fn = _DropoutFunctionTF if _functorch_active() else _DropoutFunction
        return fn.apply(x, call)
    fn2 = _DropoutAddFunctionTF if _functorch_active() else _DropoutAddFunction
    return fn2.apply(x, residual, call)


def mask_backward(mask: Mask, grad: torch.Tensor) -> torch.Tensor:
    """`Mask.backward` for a tensor: the gradient with respect to the masked op's input."""
    return _masked(mask, grad, None)


_CreationMeta = torch._C._autograd.CreationMeta
#: The endings of torch's error for in-place on a view autograd cannot rebase (torch's
#: handle_view_on_rebase, word for word), by how the view was made.
_VIEW_REBASE_REASONS = {
    _CreationMeta.MULTI_OUTPUT_NODE: (
        " This view is the output of a function that returns multiple views. Such functions do "
        "not allow the output views to be modified inplace. You should replace the inplace "
        "operation by an out-of-place one."
    ),
    _CreationMeta.NO_GRAD_MODE: (
        " Given that this use case is ambiguous and error-prone, it is forbidden. You can clarify "
        "your code by moving both the view and the inplace either both inside the no_grad block "
        "(if you don't want the inplace to be tracked) or both outside (if you want the inplace "
        "to be tracked)."
    ),
    _CreationMeta.INFERENCE_MODE: (
        " Given that this use case is ambiguous and error-prone, it is forbidden. You can clarify "
        "your code by moving both the view and the inplace either both inside the inference_mode "
        "block (if you don't want the inplace to be tracked) or both outside (if you want the "
        "inplace to be tracked)."
    ),
    _CreationMeta.IN_CUSTOM_FUNCTION: (
        " This view was created inside a custom Function (or because an input was returned "
        "as-is) and the autograd logic to handle view+inplace would override the custom backward "
        "associated with the custom Function, leading to incorrect gradients. This behavior is "
        "forbidden. You can fix this by cloning the output of the custom Function."
    ),
}
_BACKWARD_SUFFIX = re.compile(r"Backward\d*$")


def _view_rebase_error(x: torch.Tensor, meta: Any) -> str:
    """torch's message for an in-place write to a view made as `meta` says."""
    grad_fn = x.grad_fn
    name = None if grad_fn is None else _BACKWARD_SUFFIX.sub("", grad_fn.name())
    if meta in (_CreationMeta.INFERENCE_MODE, _CreationMeta.NO_GRAD_MODE) or grad_fn is None:
        prefix = (
            "A view was created in"
            if grad_fn is None
            else f"Output {x.output_nr} of {name} is a view of a view which was created in"
        )
        if meta == _CreationMeta.INFERENCE_MODE:
            head = f"{prefix} inference mode and is being modified inplace in normal mode."
        else:
            head = f"{prefix} no_grad mode and is being modified inplace with grad mode enabled."
    else:
        head = f"Output {x.output_nr} of {name} is a view and is being modified inplace."
    return head + _VIEW_REBASE_REASONS[meta]


def _check_inplace(x: torch.Tensor) -> None:
    """torch's own errors for in-place on a tensor that requires grad (with grad mode on), in
    torch's order (its check_inplace): a view autograd cannot rebase (an output of unbind,
    split or chunk, of a custom Function, or made in no_grad or inference mode), a view of a
    leaf, a leaf. Raised here because autograd would raise them only after the kernel wrote."""
    if x._is_view():
        meta = torch._C._autograd._get_creation_meta(x)
        if meta != _CreationMeta.DEFAULT:
            raise RuntimeError(_view_rebase_error(x, meta))
        base = x._base
        if base is not None and base.is_leaf:
            raise RuntimeError(
                "a view of a leaf Variable that requires grad is being used in an in-place "
                "operation."
            )
    if x.is_leaf:
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place operation."
        )


#: torch's words for writing in place into an inference tensor outside inference mode.
_INFERENCE_INPLACE = (
    "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone "
    "to get a normal tensor before doing inplace update.See "
    "https://github.com/pytorch/rfcs/pull/17 for more details."
)

#: torch's words when an in-place op would write one memory location through several elements.
_INTERNAL_OVERLAP = (
    "unsupported operation: more than one element of the written-to tensor refers to a single "
    "memory location. Please clone() the tensor before performing the operation."
)


def _check_no_internal_overlap(x: torch.Tensor) -> None:
    """torch's error (a RuntimeError, after its autograd checks) for writing in place into a
    tensor with a zero stride over a dimension longer than 1, as `expand` makes: its
    `assert_no_internal_overlap`. A tensor whose elements overlap otherwise (`as_strided`),
    which torch writes without a check, is the kernels' ValueError (see the README)."""
    if any(step == 0 and n > 1 for step, n in zip(x.stride(), x.shape)):
        raise RuntimeError(_INTERNAL_OVERLAP)


def check_unsqueeze_(x: torch.Tensor) -> None:
    """The errors of torch's `x.unsqueeze_(0)`, which torch's dropout1d and dropout3d run on an
    unbatched input even when they then drop nothing: an inference tensor outside inference
    mode, and autograd's in-place errors (under torch.func.grad too, whose input is a leaf)."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_INPLACE)
    if torch.is_grad_enabled() and x.requires_grad:
        _check_inplace(x)


def _check_writable(x: torch.Tensor) -> None:
    """torch's errors for writing in place into a tensor that no mode allows writing: an
    inference tensor outside inference mode, a ZeroTensor (which has no storage)."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_INPLACE)
    if x._is_zerotensor():
        raise RuntimeError(_ZERO_TENSOR_IMMUTABLE)


def run_plain(x: torch.Tensor, spec: Spec) -> torch.Tensor:
    """`spec` on a `torch.Tensor` (exactly that type) for a call with every other argument at
    its default (no generator, mask, residual or in place; the caller checked the rest and built
    `spec`), as the dispatcher's paths would run it: the common CPU case, with or without
    autograd, goes straight to the kernel or its autograd Function; anything else (forward AD,
    torch.func, torch.compile, another device, a dtype or layout the kernels do not read) through
    the dispatcher's paths. The paths' checks cost more than the kernel on the tensors of real
    layers: measured 10-16 us a call (2-core machine), against 18 us for the kernel of timm's
    DropPath at ResNet's last stage, (8, 2048, 5, 5)."""
    if (
        not x.is_cpu
        or x.dtype not in _HOST_DTYPES
        or x.layout is not torch.strided
        or x.is_nested
        or _fwAD._current_level >= 0
        or _functorch_active()
        or torch.compiler.is_compiling()
    ):
        return path_for(x, None, None, False)(x, spec, False, None, False, None)
    gen = _default_host_generator()
    if x.requires_grad and torch.is_grad_enabled():
        call = _Call((spec, gen, False, _want_for_backward(spec, x, False), None))
        return _DropoutFunction.apply(x, call)
    return _forward(x, None, spec, gen, False, False)[0]


#: Whether an element mask (one decision per element) is kept for backward as its key alone.
#: Measured (16, 197, 768) float32, p = 0.1, 2-core machine, medians of 25 alternating rounds:
#: redrawing costs 4.6 ms against 3.0 ms for reading stored bits (1 thread; 4.5 against 3.0 on
#: 2), about the forward's own cost, while the bits are 1/32 of a float32 tensor (296 KiB of
#: 9.2 MiB). So element masks keep their bits; channel and sample masks, whose redraw is a few
#: decisions per (n, c) or n, keep only the key, and so does every mask when this is True.
ELEMENT_MASKS_AS_KEY = False


def _want_for_backward(spec: Spec, x: torch.Tensor, return_mask: bool) -> Any:
    """What autograd keeps of the mask: its key alone ("key") for a Bernoulli mask that
    broadcasts (see `ELEMENT_MASKS_AS_KEY`) unless the caller wants the Mask, else the bits."""
    if return_mask or type(spec.mask) is not Bernoulli:
        return True
    if ELEMENT_MASKS_AS_KEY or tuple(spec.mask.shape) != tuple(x.shape):
        return "key"
    return True


def run_host(x, spec, inplace, generator, return_mask, residual):
    """The CPU path: the kernels on the tensors' own storage."""
    if inplace:
        _check_writable(x)
    _check_host_dtype(x)
    transformed = _functorch_active()
    if transformed:
        different = _check_randomness(return_mask)
        if different and not inplace:
            x, residual = _batched_for(x, different), _batched_for(residual, different)
        # The key is drawn outside the transforms: it is not a tensor they could batch or
        # differentiate, and torch.func forbids writing the reused key tensor in place.
        with torch._C._DisableFuncTorch():
            gen = _host_generator(generator)
    else:
        gen = generator if type(generator) is _core.Generator else _host_generator(generator)
    grad_mode = torch.is_grad_enabled()
    needs_function = (
        transformed
        or _fwAD._current_level >= 0
        or (grad_mode and (x.requires_grad or (residual is not None and residual.requires_grad)))
    )
    if inplace and grad_mode and x.requires_grad:
        _check_inplace(x)
    if inplace:
        _check_no_internal_overlap(x)
    if needs_function:
        call = _Call((spec, gen, inplace, _want_for_backward(spec, x, return_mask), None))
        out = _apply_dropout(x, residual, call)
        mask = call[4]
    else:
        out, mask = _forward(x, residual, spec, gen, inplace, return_mask)
        if inplace:
            # Tensors saved for backward elsewhere must see that their values changed.
            torch.autograd.graph.increment_version(x)
    return (out, mask) if return_mask else out


def run_device(x, spec, inplace, generator, return_mask, residual):
    """Another device (or a tensor subclass that computes torch's ops): torch's own ops there."""
    gen = _device.device_generator(generator, x.device)
    return _device.run(x, spec, inplace, gen, residual)


# --- torch.compile: the CPU kernels as custom ops ---------------------------------------------


def _packed(mask: Mask) -> torch.Tensor:
    data = mask._words().to_bytes()
    if not data:  # an empty input's mask: torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _packed_len(mask_shape) -> int:
    return (_numel(mask_shape) + 7) // 8


# Each call draws a fresh key: without this tag the compiler merges two identical calls into one.
_RANDOM = (torch.Tag.nondeterministic_seeded,)


def _op_grad_scale(app_args: List[float], keep: float) -> float:
    """A kept element's gradient factor from an op's flat arguments: the scale, or alpha
    dropout's `a` (each its application's first number)."""
    return 0.0 if keep == 0.0 else app_args[0]


# The ops' schemas take no classes, so a spec crosses as its flat parts: the Bernoulli mask's
# shape and keep, the block mask's shape, gamma and block, and `_spec.application_args`.


@torch.library.custom_op("fastdrop::bernoulli", mutates_args=(), device_types="cpu", tags=_RANDOM)
def _bernoulli_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    mask_shape: List[int],
    application: str,
    app_args: List[float],
    keep: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    app = application_from_args(application, app_args)
    spec = Spec(Bernoulli(tuple(mask_shape), keep), app, _op_grad_scale(app_args, keep))
    out, mask = _forward(x, residual, spec, _host_generator(None), False, True)
    return out, _packed(mask)


@_bernoulli_op.register_fake
def _(x, residual, mask_shape, application, app_args, keep):
    return torch.empty_like(x), x.new_empty((_packed_len(mask_shape),), dtype=torch.uint8)


@torch.library.custom_op("fastdrop::drop_block", mutates_args=(), device_types="cpu", tags=_RANDOM)
def _drop_block_op(
    x: torch.Tensor,
    mask_shape: List[int],
    gamma: float,
    kh: int,
    kw: int,
    application: str,
    app_args: List[float],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = mask_shape
    app = application_from_args(application, app_args)
    grad_scale = app_args[0] if app_args else None  # ScaleByKept: the scale the core computed
    spec = Spec(Blocks((n, c, h, w), gamma, kh, kw), app, grad_scale)
    out, mask = _forward(x, None, spec, _host_generator(None), False, True)
    return out, _packed(mask), torch.tensor(mask.scale, dtype=torch.float64)


@_drop_block_op.register_fake
def _(x, mask_shape, gamma, kh, kw, application, app_args):
    return (
        torch.empty_like(x),
        x.new_empty((_packed_len(mask_shape),), dtype=torch.uint8),
        x.new_empty((), dtype=torch.float64),
    )


def _unpack(packed: torch.Tensor, mask_shape) -> torch.Tensor:
    """Packed little-endian bits -> a bool tensor of mask_shape, in torch ops (traceable)."""
    bits = torch.arange(8, dtype=torch.uint8, device=packed.device)
    flat = ((packed.unsqueeze(-1) >> bits) & 1).flatten()
    return flat[: _numel(mask_shape)].view(mask_shape).bool()


def _compiled_grad(grad, packed, mask_shape, scale):
    return torch.where(_unpack(packed, mask_shape), grad * scale, torch.zeros_like(grad))


def _bernoulli_setup(ctx, inputs, output):
    x, residual, mask_shape, application, app_args, keep = inputs
    ctx.mask_shape, ctx.has_residual = list(mask_shape), residual is not None
    ctx.scale = _op_grad_scale(app_args, keep)
    ctx.save_for_backward(output[1])


def _bernoulli_backward(ctx, grad, _grad_packed):
    (packed,) = ctx.saved_tensors
    gr = grad if ctx.has_residual else None
    return _compiled_grad(grad, packed, ctx.mask_shape, ctx.scale), gr, None, None, None, None


_bernoulli_op.register_autograd(_bernoulli_backward, setup_context=_bernoulli_setup)


def _drop_block_setup(ctx, inputs, output):
    ctx.mask_shape = list(inputs[1])
    ctx.save_for_backward(output[1], output[2])


def _drop_block_backward(ctx, grad, _grad_packed, _grad_scale):
    packed, scale = ctx.saved_tensors
    keep = _unpack(packed, ctx.mask_shape)
    grad_x = torch.where(keep, grad * scale.to(grad.dtype), torch.zeros_like(grad))
    return grad_x, None, None, None, None, None, None


_drop_block_op.register_autograd(_drop_block_backward, setup_context=_drop_block_setup)


def run_compiled(x, spec, inplace, generator, return_mask, residual):
    """Under torch.compile: the spec's custom op, keyed from torch's default generator."""
    mask = spec.mask
    kind, args = application_args(spec.application)
    if type(mask) is Bernoulli:
        out = torch.ops.fastdrop.bernoulli(
            x, residual, list(mask.shape), kind, args, float(mask.keep)
        )[0]
    elif type(mask) is Blocks:
        out = torch.ops.fastdrop.drop_block(
            x, list(mask.shape), mask.gamma, mask.kh, mask.kw, kind, args
        )[0]
    else:
        raise TypeError(f"not a fastdrop mask: {mask!r}")
    # In place under compile: the same values written back, which the compiler can trace.
    return x.copy_(out) if inplace else out


# --- which path -------------------------------------------------------------------------------

_Path = Callable[..., Any]


def path_for(x: Any, residual: Any, generator: Any, return_mask: bool) -> _Path:
    """The path for a call on torch tensors (`run_host`, `run_compiled` or `run_device`),
    after the checks every path shares and those of the path chosen, so that a call that drops
    nothing raises what the same call dropping something would."""
    if not isinstance(x, torch.Tensor) or (
        residual is not None and not isinstance(residual, torch.Tensor)
    ):
        raise TypeError("input and residual must both be torch tensors or both NumPy arrays")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(
            f"residual must match the input: got {tuple(residual.shape)} {residual.dtype} on "
            f"{residual.device} for input {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if not x.is_cpu:  # is_cpu: a fifth of the cost of device.type, on every call
        return _device_path(x, return_mask)
    if torch.compiler.is_compiling():
        if generator is not None or return_mask:
            raise ValueError(
                "under torch.compile fastdrop keys masks from torch's default generator and "
                "keeps them inside the graph: leave generator=None and return_mask=False"
            )
        return run_compiled
    if x.layout is not torch.strided or x.is_nested:
        _check_kind(x)
    if residual is not None:
        _check_kind(residual, "residual")
    if type(x) is not torch.Tensor or (residual is not None and type(residual) is not torch.Tensor):
        if _is_python_subclass(x) or (residual is not None and _is_python_subclass(residual)):
            # A tensor subclass that overrides torch's ops (a wrapper with no storage of its own,
            # say) gets them: torch's answer, computed by the subclass.
            return _device_path(x, return_mask)
    return run_host


def _device_path(x: torch.Tensor, return_mask: bool) -> _Path:
    if return_mask:
        raise ValueError(
            f"return_mask needs a CPU tensor; a mask for a tensor on {x.device} would have to "
            "leave the device"
        )
    return run_device


def _is_python_subclass(t: torch.Tensor) -> bool:
    """Whether `t` is a tensor subclass with its own `__torch_dispatch__` (a wrapper tensor)."""
    return torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python)


# --- the family members that are not a mask spec ----------------------------------------------
# Their CPU randomness is `_keyed`'s (the draws NumPy input makes, so a fastdrop.Generator gives
# both the same result); off the CPU, `_device`'s torch ops.


def _family_key(generator: Any, name: str) -> Tuple[Tuple[int, int, int], bool]:
    """(the call's key, whether torch.func transforms are active) for the members whose
    randomness is decided outside the kernels (Gaussian and patch dropout, torchvision's
    DropBlock). Under the transforms the key is drawn outside them (it is no tensor they could
    batch or differentiate; torch.func forbids writing the reused key tensor in place), after
    torch's randomness check: 'error' raises torch's error, and 'different' is refused, as
    these members draw one noise, token choice or block map per call, not per batch element."""
    if not _functorch_active():
        return _keyed.call_key(_host_generator(generator)), False
    if _check_randomness(False):
        raise RuntimeError(
            f"{name} under torch.func.vmap supports randomness='same' only: it draws one "
            "noise, token choice or block map per call, not one per batch element; use "
            "randomness='same', or call it once per element"
        )
    with torch._C._DisableFuncTorch():
        return _keyed.call_key(_host_generator(generator)), True


def _times(t: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """`t * factor` computed in the factor's type (float32 or float64) and rounded once to t's
    dtype: the arithmetic NumPy input gets (both parts of a complex element scaled)."""
    return _device.times(t, torch.from_numpy(factor))


class _FactorFunction(torch.autograd.Function):
    """``x * factor`` where ``make()`` builds the factor (a NumPy array) from the call's key.
    The backward builds it again, so nothing of the input's size is saved; it is made of torch
    ops, so double backward works."""

    @staticmethod
    def forward(ctx, x, make):
        ctx.make = make
        return _times(x, make())

    @staticmethod
    def backward(ctx, grad):
        return _times(grad, ctx.make()), None


def _apply_factor(x: torch.Tensor, make: Callable[[], np.ndarray], inplace: bool) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FactorFunction.apply(x, make)
    else:
        out = _times(x, make())
    if inplace:
        # copy_ raises torch's own error for a leaf that requires grad, before writing.
        return x.copy_(out)
    return out


def gaussian_dropout(x: torch.Tensor, sigma: float, inplace: bool, generator: Any) -> torch.Tensor:
    """`fastdrop.gaussian_dropout` for a tensor (the caller checked the arguments)."""
    if not x.is_cpu:
        return _device.gaussian_dropout(x, sigma, inplace, generator)
    _check_host_dtype(x)
    key, transformed = _family_key(generator, "gaussian_dropout")
    shape = tuple(x.shape)
    op_np = np.float64 if _device.op_dtype(x) == torch.float64 else np.float32
    if transformed:
        # torch's own ops, which the transforms differentiate and batch (one noise for a batch).
        out = _times(x, _keyed.gaussian_factor(key, shape, op_np, sigma))
        return x.copy_(out) if inplace else out
    return _apply_factor(x, lambda: _keyed.gaussian_factor(key, shape, op_np, sigma), inplace)


def patch_dropout(
    x: torch.Tensor,
    prob: float,
    num_prefix_tokens: int,
    ordered: bool,
    training: bool,
    generator: Any,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`fastdrop.patch_dropout` for a tensor: (out, keep indices or None)."""
    if not training or prob == 0.0:
        return x, None
    prefix, body = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    b, tokens = int(x.shape[0]), int(body.shape[1])
    if x.is_cpu:
        _check_host_dtype(x)
        key, _ = _family_key(generator, "patch_dropout")
        idx = torch.from_numpy(_keyed.keep_indices(key, b, tokens, prob, ordered))
    else:
        idx = _device.patch_indices(x, b, tokens, prob, ordered, generator)
    kept = body.gather(1, idx.unsqueeze(-1).expand((-1, -1) + tuple(body.shape[2:])))
    out = torch.cat((prefix, kept), dim=1) if num_prefix_tokens else kept
    return out, idx


def drop_block_torchvision(
    x: torch.Tensor,
    p: float,
    block_size: int,
    inplace: bool,
    eps: float,
    generator: Any,
    return_mask: bool,
):
    """torchvision's DropBlock over x's 2 or 3 trailing dimensions; the mask is kept as bits."""
    if not x.is_cpu:
        _device_path(x, return_mask)
        return _device.drop_block_torchvision(x, p, block_size, inplace, eps, generator)
    _check_host_dtype(x)
    key, transformed = _family_key(generator, "drop_block_3d" if x.dim() == 5 else "DropBlock2d")
    mask = _keyed.torchvision_block_mask(key, tuple(x.shape), p, block_size, eps)
    if transformed:
        if return_mask:
            raise ValueError("return_mask is not supported under torch.func transforms")
        # torch's own ops, which the transforms differentiate and batch (one map for a batch):
        # `x * scale` rounds as the kernel does, and dropped elements are exactly 0.
        keep = torch.from_numpy(mask.numpy())
        out = torch.where(keep, x * mask.scale, torch.zeros((), dtype=x.dtype))
        return x.copy_(out) if inplace else out
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    # A forward-mode dual tensor needs the Function too: its tangent is masked alike.
    tracked = needs_grad or _fwAD._current_level >= 0
    if inplace:
        # torchvision's `mul_` raises these after drawing its noise, as here.
        _check_writable(x)
        if needs_grad:
            _check_inplace(x)
        _check_no_internal_overlap(x)
    if tracked:
        out = _MaskedFunction.apply(x, mask, inplace)
    else:
        out = _apply_mask(x, mask, inplace)
        if inplace:
            torch.autograd.graph.increment_version(x)
    return (out, mask) if return_mask else out


def _apply_mask(x: torch.Tensor, mask: Mask, inplace: bool) -> torch.Tensor:
    """`x * mask * scale` by the kernel (dropped elements exactly 0), into x or a new tensor laid
    out as torch's dropout lays it out. A complex tensor, a negative or conjugate view or a
    ZeroTensor is read by its values (the masked product of `_mask_grad`); in place the result
    is written back through the view, as torch's in-place ops do."""
    if _unusual(x):
        if inplace and x._is_zerotensor():
            raise RuntimeError(_ZERO_TENSOR_IMMUTABLE)
        out = _mask_grad(mask, x.detach(), None)
        if not inplace:
            return out
        with torch.no_grad():
            x.copy_(out)
        return x
    a = _host(x)
    if inplace:
        _core.mask_apply(mask._words(), a, a, mask.scale)
        return x
    out = _empty_like(x)
    _core.mask_apply(mask._words(), a, _to_dlpack(out), mask.scale)
    return out


class _MaskedFunction(torch.autograd.Function):
    """A mask decided outside the kernels, applied to x; the backward is the masked gradient,
    and so is the forward-mode tangent."""

    @staticmethod
    def forward(ctx, x, mask, inplace):
        out = _apply_mask(x, mask, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.mask, ctx.strides, ctx.inplace = mask, out.stride(), inplace
        return out

    @staticmethod
    def backward(ctx, grad):
        return _MaskGradFunction.apply(grad, ctx.mask, ctx.strides), None, None

    @staticmethod
    def jvp(ctx, x_t, _mask, _inplace):
        t = _masked(ctx.mask, x_t, ctx.strides)
        return x_t.copy_(t) if ctx.inplace else t


#: The names an OpenMP runtime's library starts with: GNU's, Intel's and LLVM's.
_OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")


def _openmp_runtimes() -> List[str]:
    """The OpenMP runtimes loaded in this process (from /proc/self/maps), torch's own first;
    none where torch's intra-op pool is not OpenMP or the maps cannot be read."""
    if not torch.backends.openmp.is_available():
        return []
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    paths: List[str] = []
    for line in lines:
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith("/") and os.path.basename(path).startswith(_OPENMP_LIBRARIES):
            if path not in paths:
                paths.append(path)
    home = os.path.dirname(torch.__file__) + os.sep
    return sorted(paths, key=lambda p: not p.startswith(home))


def share_threads() -> bool:
    """Runs fastdrop's parallel calls on torch tensors on torch's OpenMP threads; returns whether
    they are shared now (`fastdrop.share_torch_threads(False)` goes back to fastdrop's own)."""
    return any(_core.share_openmp(path) for path in _openmp_runtimes())


# The first torch tensor: from here on parallel calls run on torch's threads, unless the user
# said otherwise (fastdrop.share_torch_threads(False)) before.
if _threads.share_torch:
    share_threads()
