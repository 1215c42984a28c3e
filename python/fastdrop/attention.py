"""Scaled dot-product attention whose dropout is fastdrop's, and attention in `replace_dropout`.

`scaled_dot_product_attention` is torch's function (same signature, same maths) for CPU tensors,
computed as two torch matrix products around one fused Rust pass (`_core.softmax_dropout_forward`)
that scales the logits, takes the softmax and drops weights in a single sweep over the
``(..., L, S)`` attention weights. Its mask is an element mask over those weights: the keep
decision of weight ``i`` (C order) is a pure function of (seed, stream, offset, i), exactly as
``fastdrop.dropout`` on a tensor of the weights' shape would draw it. Backward keeps the softmax
output and the mask's bits (one bit a weight), where torch's math path keeps the weights, the
dropped weights and a float mask of the same size.

Importing this module imports torch (``import fastdrop`` does not: the package loads it on first
use of ``fastdrop.scaled_dot_product_attention``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _core
from ._mask import Mask

__all__ = ["scaled_dot_product_attention"]

_torch_sdpa = F.scaled_dot_product_attention
_HOST_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionArgumentError(ValueError, RuntimeError):
    """A bad argument value: a ValueError, and a RuntimeError as torch raises it."""


# --- argument checks --------------------------------------------------------------------------


def _check_dropout_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise AttentionArgumentError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p


def _check_tensors(query: Any, key: Any, value: Any, attn_mask: Any) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")


def _check_host(query, key, value, attn_mask, is_causal, enable_gqa) -> bool:
    """torch's own rules for a CPU call, checked before anything runs, in torch's order (the
    mask with is_causal, then the grouping, then the shapes the products need). Returns
    whether enable_gqa groups heads (`_grouped`)."""
    if query.dtype not in _HOST_DTYPES:
        raise TypeError(
            f"query must be a float16, bfloat16, float32 or float64 tensor, got {query.dtype}"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            "query, key and value must have one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise AttentionArgumentError(
            "query, key and value need (..., L, E) dimensions, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if attn_mask is not None:
        if is_causal:
            raise AttentionArgumentError(
                "scaled_dot_product_attention: an explicit attn_mask must not be set when "
                "is_causal=True"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise AttentionArgumentError(
                f"attn_mask is on {attn_mask.device}, query on {query.device}"
            )
    grouped = _grouped(query, key, value, enable_gqa)
    if grouped:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv or hk == 0 or hq % hk != 0:
            raise AttentionArgumentError(
                f"enable_gqa needs key and value heads ({hk}, {hv}) equal and dividing "
                f"query's ({hq})"
            )
    if key.shape[-1] != query.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise AttentionArgumentError(
            "key must share query's last dimension and value's sequence length: got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    return grouped


def _grouped(query, key, value, enable_gqa) -> bool:
    """Whether enable_gqa groups heads: torch's grouping indexes dimension -3 of query, key and
    value (an IndexError, its class, where one has fewer dimensions), after it returned early
    for an empty one."""
    if not enable_gqa or not (query.numel() and key.numel() and value.numel()):
        return False
    if min(query.dim(), key.dim(), value.dim()) < 3:
        raise IndexError(
            "enable_gqa needs a heads dimension (-3) in query, key and value, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    return True


def _weights_shape(query, key, attn_mask, grouped) -> Tuple[int, ...]:
    key_batch = tuple(key.shape[:-2])
    if grouped:
        key_batch = (*key_batch[:-1], query.shape[-3])
    batch = torch.broadcast_shapes(query.shape[:-2], key_batch)
    shape = (*batch, query.shape[-2], key.shape[-2])
    if attn_mask is not None:
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise AttentionArgumentError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
                f"attention weights' shape {shape}"
            )
    return shape


# --- the CPU path -----------------------------------------------------------------------------


def _dl(t: torch.Tensor):
    return _to_dlpack(t.detach() if t.requires_grad else t)


def _scratch(shape, dtype) -> torch.Tensor:
    """A new contiguous tensor for the weights' size: large ones on fastdrop's recycled buffers
    (see `fastdrop.empty_cache`), which spare the page faults of fresh memory."""
    from ._torch import _NUMPY_DTYPES

    buf = _core.cached_empty(tuple(shape), _NUMPY_DTYPES[dtype])
    if buf is None:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(buf).view(dtype)


def _logits(q, k, attn_mask, scale) -> Tuple[torch.Tensor, float]:
    """`Q K^T` (a fresh contiguous tensor) and the scale the kernel still has to apply: with a
    mask the scale goes in first, so that the mask adds to (or fills) the scaled logits."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    s = _scratch((*batch, q.shape[-2], k.shape[-2]), q.dtype)
    torch.matmul(q, k.transpose(-2, -1), out=s)
    if attn_mask is None:
        return s, scale
    s.mul_(scale)
    if attn_mask.dtype == torch.bool:
        s.masked_fill_(attn_mask.logical_not(), float("-inf"))
    else:
        s.add_(attn_mask)
    return s, 1.0


def _forward(q, k, v, attn_mask, scale, causal, keep, gen):
    """(output, softmax P, mask bits) for CPU tensors."""
    s, logit_scale = _logits(q, k, attn_mask, scale)
    dropped = _scratch(s.shape, s.dtype)
    bits = _core.softmax_dropout_forward(_dl(s), _dl(dropped), logit_scale, causal, keep, gen)
    return torch.matmul(dropped, v), s, bits


def _keep_scale(keep: float) -> float:
    return 1.0 / keep if keep > 0.0 else 0.0


def _reference(q, k, v, attn_mask, scale, causal, keep_mask, keep_scale):
    """The same maths in differentiable torch ops, with a given bool keep mask (for double
    backward): torch's documented reference, with torch's safe softmax (a row whose keys are all
    masked gets zero weights)."""
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    lq, lk = s.shape[-2], s.shape[-1]
    if causal:
        visible = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(visible.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            s = s + attn_mask
    p = torch.softmax(s, dim=-1)
    dead = (s == float("-inf")).all(dim=-1, keepdim=True)
    p = p.masked_fill(dead, 0.0)
    pd = torch.where(keep_mask, p * keep_scale, torch.zeros((), dtype=p.dtype))
    return torch.matmul(pd, v)


class _AttentionFunction(torch.autograd.Function):
    """Attention on CPU tensors with fastdrop's dropout. Keeps q, k, v and the mask (the
    caller's own tensors), the softmax output and the mask bits. `call` is a list
    [scale, causal, keep, generator] that forward appends the bits to."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, call):
        scale, causal, keep, gen = call
        out, probs, bits = _forward(q, k, v, attn_mask, scale, causal, keep, gen)
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.probs, ctx.bits, ctx.call = probs, bits, (scale, causal, keep)
        call.append(bits)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, attn_mask = ctx.saved_tensors
        scale, causal, keep = ctx.call
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, q, k, v, attn_mask, dout)
        probs = ctx.probs
        dout = dout.contiguous() if dout.dtype == probs.dtype else dout.to(probs.dtype)
        ds = _scratch(probs.shape, probs.dtype)
        torch.matmul(dout, v.transpose(-2, -1), out=ds)
        dropped = _scratch(probs.shape, probs.dtype)
        _core.softmax_dropout_backward(
            _dl(probs), _dl(ds), _dl(dropped), ctx.bits, _keep_scale(keep)
        )
        dq = torch.matmul(ds, k).mul_(scale).sum_to_size(q.shape) if needs[0] else None
        dk = (
            torch.matmul(ds.transpose(-2, -1), q).mul_(scale).sum_to_size(k.shape)
            if needs[1]
            else None
        )
        dv = (
            torch.matmul(dropped.transpose(-2, -1), dout).sum_to_size(v.shape) if needs[2] else None
        )
        dm = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if needs[3] else None
        return dq, dk, dv, dm, None


def _differentiable_backward(ctx, q, k, v, attn_mask, dout):
    """Backward under create_graph: the forward again in torch ops with the same mask, so that
    the gradients are themselves differentiable (double backward)."""
    scale, causal, keep = ctx.call
    keep_mask = torch.from_numpy(Mask(ctx.bits, 1.0, tuple(ctx.probs.shape)).numpy())
    with torch.enable_grad():
        # One alias per argument: q, k and v may be one tensor (self-attention), and each
        # position needs its own share of the gradient, not the total.
        q, k, v = (t.view_as(t) for t in (q, k, v))
        if attn_mask is not None and attn_mask.requires_grad:
            attn_mask = attn_mask.view_as(attn_mask)
        inputs = [t for t, need in zip((q, k, v, attn_mask), ctx.needs_input_grad) if need]
        out = _reference(q, k, v, attn_mask, scale, causal, keep_mask, _keep_scale(keep))
        grads = iter(torch.autograd.grad(out, inputs, dout, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:4]) + (None,)


def _expand_gqa(query, key, value):
    """torch's enable_gqa: each group of query heads shares one key/value head."""
    groups = query.shape[-3] // key.shape[-3]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    generator: Any = None,
    return_mask: bool = False,
) -> Any:
    """``torch.nn.functional.scaled_dot_product_attention`` with fastdrop's dropout on the CPU.

    Same arguments and maths as torch's function (its documented reference implementation):
    ``softmax(query @ key^T * scale + bias) @ value`` with ``scale`` defaulting to
    ``1/sqrt(E)``, ``attn_mask`` a bool mask (True takes part) or a float bias broadcastable to
    the ``(..., L, S)`` weights, ``is_causal`` masking the upper triangle (aligned top-left,
    not combinable with ``attn_mask``), ``enable_gqa`` sharing each key/value head among a
    group of query heads, and dropout with probability ``dropout_p`` on the weights. A row whose
    keys are all masked gets zero weights, as torch's CPU attention gives.

    On CPU tensors (float16, bfloat16, float32, float64) with ``dropout_p > 0`` the weights'
    scale, softmax and dropout run as one fused pass between two torch matrix products; the
    mask is fastdrop's element mask over the weights (weight ``i`` in C order kept as
    ``fastdrop.dropout`` would keep element ``i``), keyed by ``generator`` (a
    ``fastdrop.Generator`` or a ``torch.Generator``; None: one draw from torch's default
    generator, so ``torch.manual_seed`` makes it reproducible). Autograd keeps the softmax output
    and one bit a weight for the mask; double backward works. With ``dropout_p == 0`` (and
    anywhere but the CPU, and under ``torch.compile``) this is torch's function itself.

    ``return_mask=True`` (CPU only) also returns the ``fastdrop.Mask`` over the weights: the
    result is then exactly ``(P * mask / (1 - dropout_p)) @ value`` for ``P`` the softmax of
    the reference. ``dropout_p`` outside [0, 1] raises a ValueError (also a RuntimeError, as
    torch raises it).
    """
    p = _check_dropout_p(dropout_p)
    _check_tensors(query, key, value, attn_mask)
    is_causal = bool(is_causal)
    enable_gqa = bool(enable_gqa)
    on_cpu = query.is_cpu and key.is_cpu and value.is_cpu
    if not on_cpu or torch.compiler.is_compiling():
        if return_mask:
            raise ValueError(
                "return_mask needs CPU tensors outside torch.compile; torch's own attention ran"
            )
        return _torch_sdpa(
            query, key, value, attn_mask, p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    grouped = _check_host(query, key, value, attn_mask, is_causal, enable_gqa)
    shape = _weights_shape(query, key, attn_mask, grouped)
    if p == 0.0:
        out = _torch_sdpa(
            query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
        )
        if return_mask:
            return out, Mask(_core.MaskBits.filled(list(shape), True), 1.0, shape)
        return out
    if scale is None:
        # torch's 1/sqrt(E); with E = 0 every logit is an empty sum, 0 at any finite scale
        # (torch then weighs the keys evenly).
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    scale = float(scale)
    if grouped:
        key, value = _expand_gqa(query, key, value)
    from ._torch import _host_generator

    gen = _host_generator(generator)
    keep = 1.0 - p
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, attn_mask)
    )
    if needs_grad:
        call: List[Any] = [scale, is_causal, keep, gen]
        out = _AttentionFunction.apply(query, key, value, attn_mask, call)
        bits = call[-1]
    else:
        out, _, bits = _forward(query, key, value, attn_mask, scale, is_causal, keep, gen)
    if return_mask:
        return out, Mask(bits, _keep_scale(keep), shape)
    return out


# --- replace_dropout: attention inside a converted model ------------------------------------
#
# The dropout inside attention is not a module that could be swapped: torch's MultiheadAttention
# passes `dropout_p` to `F.scaled_dot_product_attention` (or, returning its weights, calls
# `F.dropout` on them), timm's `Attention` and Hugging Face models call
# `F.scaled_dot_product_attention` themselves. So a converted model's modules carry two hooks
# that, while the outermost of them runs a training forward on this thread, keep a torch function
# mode (`_AttentionMode`) on torch's mode stack. The mode sees every torch function the forward
# calls and reroutes the dropout family to fastdrop: `F.scaled_dot_product_attention` with a
# dropout on CPU tensors, `F.dropout` and its variants, and `F.multi_head_attention_forward` (run
# as a copy of torch's own function whose `dropout` and `scaled_dot_product_attention` are
# fastdrop's, since torch runs a mode's handler with the mode switched off). Everything else goes
# to torch untouched. Nothing global changes: another instance of the same class, not converted,
# runs torch's ops; the hooks are plain functions (the model still pickles, copies and loads its
# state_dict as before), and the post-hook runs even when forward raises.


def _fd_dropout(input, p=0.5, training=True, inplace=False):
    from . import functional

    return functional.dropout(input, p, training, inplace)


def _fd_variant(name):
    def call(input, p=0.5, training=True, inplace=False):
        from . import functional

        return getattr(functional, name)(input, p, training, inplace)

    call.__name__ = name
    return call


def _fd_sdpa(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    return scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )


def _rebound(fn, **names):
    """A copy of the Python function `fn` whose globals have `names` replaced (the module's own
    globals are left alone)."""
    import types

    scope = dict(fn.__globals__)
    scope.update(names)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_mha_forward = _rebound(
    F.multi_head_attention_forward, dropout=_fd_dropout, scaled_dot_product_attention=_fd_sdpa
)

_REROUTED = {
    F.scaled_dot_product_attention: _fd_sdpa,
    F.dropout: _fd_dropout,
    F.dropout1d: _fd_variant("dropout1d"),
    F.dropout2d: _fd_variant("dropout2d"),
    F.dropout3d: _fd_variant("dropout3d"),
    F.alpha_dropout: _fd_variant("alpha_dropout"),
    F.feature_alpha_dropout: _fd_variant("feature_alpha_dropout"),
    F.multi_head_attention_forward: _mha_forward,
}


class _AttentionMode(torch.overrides.TorchFunctionMode):
    """Reroutes the dropout family to fastdrop (see the comment above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = _REROUTED.get(func)
        if target is None:
            return func(*args, **(kwargs or {}))
        return target(*args, **(kwargs or {}))


class _Scope(threading.local):
    def __init__(self):
        self.depth = 0
        self.mode: Optional[_AttentionMode] = None


_scope = _Scope()


def _enter(module, args):
    if torch.compiler.is_compiling():
        # Traced by torch.compile: the graph keeps torch's own attention (see the README).
        return
    scope = _scope
    if scope.depth == 0 and module.training:
        # Only a training forward: in eval no dropout runs, and an active mode would turn off
        # torch's fast inference paths (MultiheadAttention's and the transformer layers').
        scope.mode = _AttentionMode()
        scope.mode.__enter__()
    scope.depth += 1


def _leave(module, args, output):
    if torch.compiler.is_compiling():
        return
    scope = _scope
    scope.depth -= 1
    if scope.depth == 0 and scope.mode is not None:
        mode, scope.mode = scope.mode, None
        mode.__exit__(None, None, None)


def _is_attention(module) -> bool:
    """Modules whose own forward runs an attention dropout: torch's MultiheadAttention, timm's
    attention blocks (an `attn_drop` beside `fused_attn`) and Hugging Face-style ones (an
    `attention_dropout` rate)."""
    if isinstance(module, torch.nn.MultiheadAttention):
        return True
    return (hasattr(module, "attn_drop") and hasattr(module, "fused_attn")) or isinstance(
        getattr(module, "attention_dropout", None), float
    )


#: Words in a forward's source that may reach a rerouted function (the dropout family, SDPA,
#: multi_head_attention_forward) or a Hugging Face attention interface.
_CALLS_REROUTED = re.compile(
    r"dropout|scaled_dot_product_attention|attention_forward|attention_interface"
)
_MAY_REROUTE: Dict[type, bool] = {}


def _may_reroute(module: torch.nn.Module) -> bool:
    """Whether `module`'s own forward may call a rerouted function: an attention module, or a
    forward whose source names one (or whose source cannot be read). Containers and layers
    such as Linear, ReLU or Sequential do not, and get no hooks: a hook pair and an active
    TorchFunctionMode cost every torch call of a small model's step (a 3-layer MLP's training
    step measured 0.71 ms against torch's 0.62 ms with them on every module)."""
    cls = type(module)
    known = _MAY_REROUTE.get(cls)
    if known is None and cls.__module__.split(".")[0] == "fastdrop":
        known = False  # fastdrop's own modules call fastdrop already
    if known is None:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            known = True
        else:
            known = bool(_CALLS_REROUTED.search(source))
        _MAY_REROUTE[cls] = known
    return known or _is_attention(module)


def convert_attention(model: torch.nn.Module) -> Dict[str, str]:
    """Routes the attention dropout of `model`'s own module instances through fastdrop (see the
    comment above): installs the two hooks on every module of `model` whose forward may call a
    rerouted function and lacks them, and returns {qualified name: class} of the attention
    modules among those. Idempotent: a second call finds nothing left to convert."""
    found: Dict[str, str] = {}
    for name, module in model.named_modules():
        if _enter in module._forward_pre_hooks.values() or not _may_reroute(module):
            continue
        module.register_forward_pre_hook(_enter)
        module.register_forward_hook(_leave, always_call=True)
        if _is_attention(module):
            cls = type(module)
            found[name] = f"{cls.__module__}.{cls.__qualname__} (attention dropout)"
    return found


# --- benchmark --------------------------------------------------------------------------------


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `fn()` runs (storage
    sizes, each storage counted once), plus what fastdrop keeps on the side (the softmax
    output and the mask bits it holds outside save_for_backward)."""
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    extra = 0
    node = out.grad_fn
    if isinstance(node, _AttentionFunction._backward_cls):  # type: ignore[attr-defined]
        probs = node.probs
        seen.setdefault(probs.untyped_storage().data_ptr(), probs.untyped_storage().nbytes())
        extra = node.bits.nbytes
    return sum(seen.values()) + extra


def _bench_one(name, bhld, dropout_p, rounds, dtype) -> Dict[str, Any]:
    import time

    b, h, seq, d = bhld
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(b, h, seq, d, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)
    )
    grad = torch.randn(b, h, seq, d, generator=gen, dtype=dtype)

    def ours():
        return scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    def theirs():
        return _torch_sdpa(q, k, v, dropout_p=dropout_p)

    inputs = sum(t.untyped_storage().nbytes() for t in (q, k, v))
    memory = {"fastdrop": _saved_bytes(ours) - inputs, "torch": _saved_bytes(theirs) - inputs}
    times: Dict[str, List[float]] = {"fastdrop": [], "torch": []}
    for r in range(rounds + 1):
        for label, fn in (("fastdrop", ours), ("torch", theirs))[:: 1 if r % 2 else -1]:
            t0 = time.perf_counter()
            fn().backward(grad)
            dt = time.perf_counter() - t0
            if r:  # the first round warms up
                times[label].append(dt)
            q.grad = k.grad = v.grad = None
    med = {label: sorted(ts)[len(ts) // 2] for label, ts in times.items()}
    return {
        "shape": name,
        "bhld": bhld,
        "fastdrop_s": med["fastdrop"],
        "torch_s": med["torch"],
        "speedup": med["torch"] / med["fastdrop"],
        "fastdrop_saved_bytes": memory["fastdrop"],
        "torch_saved_bytes": memory["torch"],
    }


def benchmark(
    shapes: Optional[List[Tuple[str, Tuple[int, int, int, int]]]] = None,
    dropout_p: float = 0.1,
    rounds: int = 15,
    dtype: torch.dtype = torch.float32,
) -> List[Dict[str, Any]]:
    """fastdrop's and torch's CPU attention, forward + backward with ``dropout_p``, alternated
    call by call in one run (the order flips every round); medians of ``rounds`` rounds after
    one warm-up. Returns one dict per shape with the medians (seconds), the speed-up and the
    bytes each keeps for backward beyond q, k and v."""
    shapes = shapes or [("ViT-S", (16, 6, 197, 64)), ("BERT-base", (8, 12, 512, 64))]
    return [_bench_one(name, bhld, dropout_p, rounds, dtype) for name, bhld in shapes]


def _without_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Takes `convert_attention`'s hooks off `model` (for benchmarks: replace_dropout's modules
    alone, as before attention was converted)."""
    for module in model.modules():
        for hooks, fn in ((module._forward_pre_hooks, _enter), (module._forward_hooks, _leave)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
    return model


def _training_models(batch: int):
    """(name, builder, input) of the end-to-end training steps the issue measures."""

    def encoder():
        layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.1, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)

    def vit_tiny():
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224",
            drop_rate=0.1,
            proj_drop_rate=0.1,
            attn_drop_rate=0.1,
            drop_path_rate=0.1,
        )

    return [
        ("transformer_encoder", encoder, (batch, 128, 256)),
        ("vit_tiny", vit_tiny, (batch, 3, 224, 224)),
    ]


def benchmark_training(batch: int = 16, rounds: int = 7) -> List[Dict[str, Any]]:
    """One SGD training step (forward, backward, update) of each model with torch's dropout,
    with `replace_dropout`'s modules but torch's attention dropout (the state before attention
    was converted), and fully converted; the three alternate step by step, each right after
    each other equally often (`bench_train.alternate_times`); medians of `rounds` rounds after
    one warm-up. Returns seconds per step."""
    from .bench_train import alternate_times
    from .nn import replace_dropout

    results = []
    for name, build, shape in _training_models(batch):
        torch.manual_seed(0)
        base = build()
        variants = {"torch": base}
        modules_only = build()
        modules_only.load_state_dict(base.state_dict())
        variants["fastdrop modules"] = _without_attention(_converted(modules_only, replace_dropout))
        full = build()
        full.load_state_dict(base.state_dict())
        variants["fastdrop + attention"] = _converted(full, replace_dropout)
        x = torch.randn(shape)
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in variants.items()}
        steps = {k: _training_step(m, opts[k], x) for k, m in variants.items()}
        times = alternate_times(steps, rounds)
        row: Dict[str, Any] = {"model": name, "batch": batch}
        row.update({k: sorted(v)[len(v) // 2] for k, v in times.items()})
        results.append(row)
    return results


def _training_step(model, opt, x) -> Callable[[], None]:
    def step() -> None:
        model.train()
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()

    return step


def _converted(model, replace):
    replace(model)
    return model


if __name__ == "__main__":  # pragma: no cover
    for row in benchmark():
        print(row)
    for row in benchmark_training():
        print(row)
