"""The torch side of the family members that are not a mask `_Spec` (issue 16): Gaussian
dropout, PatchDropout and torchvision's DropBlock (2-D and 3-D).

On the CPU their randomness comes from the same keyed draws as NumPy input's
(`functional._normals`, `functional._seed_map`), so a `fastdrop.Generator` gives the same result
for both. Gaussian dropout's backward draws the factor again from the call's key; DropBlock's
keeps its mask as bits (a `Mask`) and differentiates through the same masked gradient as every
other variant; neither keeps a tensor of the input's size. On any other device they use
torch's own operations on that device. Imported on first use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _core
from . import functional as _f
from ._mask import Mask
from ._torch import (
    _check_host_dtype,
    _check_inplace,
    _device_generator,
    _empty_like,
    _host,
    _host_generator,
    _MaskGradFunction,
    _to_dlpack,
)


def _times(t: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """`t * factor` computed in the factor's type (float32 or float64) and rounded once to t's
    dtype: the arithmetic NumPy input gets."""
    f = torch.from_numpy(factor)
    return (t.to(f.dtype) * f).to(t.dtype)


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


def _op_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gaussian_dropout(x: torch.Tensor, sigma: float, inplace: bool, generator: Any) -> torch.Tensor:
    if not x.is_cpu:
        gen = _device_generator(generator, x.device)
        op = _op_dtype(x)
        z = torch.randn(x.shape, dtype=op, device=x.device, generator=gen)
        factor = z.mul_(sigma).add_(1.0)
        out = (x.to(op) * factor).to(x.dtype)
        return x.copy_(out) if inplace else out
    _check_host_dtype(x)
    key = _f._call_key(_host_generator(generator))
    shape = tuple(x.shape)
    op_np = np.float64 if x.dtype == torch.float64 else np.float32
    return _apply_factor(x, lambda: _f._gaussian_factor(key, shape, op_np, sigma), inplace)


def patch_dropout(
    x: torch.Tensor,
    prob: float,
    num_prefix_tokens: int,
    ordered: bool,
    training: bool,
    generator: Any,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not training or prob == 0.0:
        return x, None
    prefix, body = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    b, tokens = int(x.shape[0]), int(body.shape[1])
    if x.is_cpu:
        _check_host_dtype(x)
        key = _f._call_key(_host_generator(generator))
        idx = torch.from_numpy(_f._keep_indices(key, b, tokens, prob, ordered))
    else:
        gen = _device_generator(generator, x.device)
        num_keep = max(1, int(tokens * (1.0 - prob)))
        noise = torch.randn(b, tokens, device=x.device, generator=gen)
        idx = torch.argsort(noise, dim=-1)[:, :num_keep]
        if ordered:
            idx = idx.sort(dim=-1)[0]
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
        if return_mask:
            raise ValueError(
                f"return_mask needs a CPU tensor; a mask for a tensor on {x.device} would have "
                "to leave the device"
            )
        return _drop_block_torchvision_on_device(x, p, block_size, inplace, eps, generator)
    _check_host_dtype(x)
    key = _f._call_key(_host_generator(generator))
    mask = _f._torchvision_block_mask(key, tuple(x.shape), p, block_size, eps)
    if torch.is_grad_enabled() and x.requires_grad:
        if inplace:
            _check_inplace(x)
        out = _MaskedFunction.apply(x, mask, inplace)
    else:
        out = _masked(x, mask, inplace)
        if inplace:
            torch.autograd.graph.increment_version(x)
    return (out, mask) if return_mask else out


def _masked(x: torch.Tensor, mask: Mask, inplace: bool) -> torch.Tensor:
    """`x * mask * scale` by the kernel (dropped elements exactly 0), into x or a new tensor laid
    out as torch's dropout lays it out."""
    a = _host(x)
    if inplace:
        _core.mask_apply(mask._words(), a, a, mask.scale)
        return x
    out = _empty_like(x)
    _core.mask_apply(mask._words(), a, _to_dlpack(out), mask.scale)
    return out


class _MaskedFunction(torch.autograd.Function):
    """A mask decided outside the kernels, applied to x; the backward is the masked gradient."""

    @staticmethod
    def forward(ctx, x, mask, inplace):
        out = _masked(x, mask, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.mask, ctx.strides = mask, out.stride()
        return out

    @staticmethod
    def backward(ctx, grad):
        return _MaskGradFunction.apply(grad, ctx.mask, ctx.strides), None, None


def _drop_block_torchvision_on_device(x, p, block_size, inplace, eps, generator):
    """torchvision's recipe on the device; a seed at a corner grows into the block after it,
    which also covers even sizes."""
    spatial = tuple(int(s) for s in x.shape[2:])
    b, gamma = _f._torchvision_block_seed_rate(spatial, p, block_size)
    gen = _device_generator(generator, x.device)
    pool = F.max_pool3d if len(spatial) == 3 else F.max_pool2d
    with torch.no_grad():
        seeds = torch.empty(
            tuple(x.shape[:2]) + tuple(s - b + 1 for s in spatial), dtype=x.dtype, device=x.device
        ).bernoulli_(gamma, generator=gen)
        seeds = F.pad(seeds, [b - 1] * (2 * len(spatial)), value=0.0)
        keep = 1.0 - pool(seeds, kernel_size=b, stride=1)
        keep.mul_(keep.numel() / (eps + keep.sum()))
    return x.mul_(keep) if inplace else x * keep
