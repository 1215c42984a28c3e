"""Every path for tensors off the CPU (CUDA, MPS, XPU, ``meta``, ...) and for tensor subclasses
that compute torch's ops themselves: torch's own operations on the input's device.

The Rust kernels work on host memory; these functions only call torch tensor operations on the
input's device: no ``.cpu()``, no ``.item()``, no NumPy, no host synchronisation. Every random
draw takes an optional ``torch.Generator`` on that device (``None``: the device's default).

`run` applies a `_spec.Spec` (the dispatcher's path for a tensor off the CPU): a Bernoulli mask
as ATen's ``_dropout_impl`` draws one, a block mask by timm's algorithm (`drop_block_2d`, with
``generator=None`` and the same ``torch.manual_seed`` exactly what timm's function returns, as it
makes the same draws and operations in the same order: timm 1.0.31, identical to timm git main
1.0.29.dev0 of 2026-08). The family members that are not a mask (`gaussian_dropout`,
`patch_indices`, `drop_block_torchvision`) have their device forms here too.

Imports torch, and of fastdrop only the bottom floor (`_checks`, `_spec`), `_core` (to
recognise a `fastdrop.Generator`) and `_keyed`'s torchvision seed rate (plain arithmetic).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import _core
from ._checks import check_int, check_prob
from ._keyed import torchvision_block_seed_rate
from ._spec import Affine, Bernoulli, Blocks, Scale, Spec

__all__ = [
    "run",
    "device_generator",
    "drop_block_2d",
    "drop_block_kernel",
    "drop_block_gamma",
    "gaussian_dropout",
    "patch_indices",
    "drop_block_torchvision",
]


def device_generator(generator: Any, device: torch.device) -> Optional[torch.Generator]:
    """A torch.Generator on `device` for torch's ops (None: the device's default generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, _core.Generator):
        if device.type == "meta":
            return None
        # Reserve one block, so each call takes a fresh, reproducible seed from the stream.
        seed, stream, _ = generator.get_state()
        offset = generator._reserve(1)
        g = torch.Generator(device=device)
        g.manual_seed(hash((seed, stream, offset)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g
    raise bad_generator(generator)


def bad_generator(generator: Any) -> TypeError:
    """The error for a `generator=` that a call on torch input cannot use (on any device, and
    at a fastdrop module's construction)."""
    return TypeError(
        "generator must be a fastdrop.Generator or a torch.Generator for torch input, got "
        f"{type(generator).__name__}"
    )


def run(
    x: torch.Tensor,
    spec: Spec,
    inplace: bool,
    generator: Optional[torch.Generator],
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`spec` applied to `x` (plus `residual`) by torch's ops on x's device."""
    mask = spec.mask
    if type(mask) is Bernoulli:
        out = _bernoulli(x, spec, inplace, generator)
    elif type(mask) is Blocks:
        # timm's own algorithm, from the public function's arguments (`origin`).
        assert spec.origin is not None
        out = drop_block_2d(x, **spec.origin, inplace=inplace, training=True, generator=generator)
    else:
        raise TypeError(f"not a fastdrop mask: {mask!r}")
    return out if residual is None else residual + out


def _bernoulli(x: torch.Tensor, spec: Spec, inplace: bool, generator: Any) -> torch.Tensor:
    """ATen's `_dropout_impl` on the spec's mask shape: noise ~ Bernoulli(keep), divided by
    keep to scale, or turned into alpha dropout's affine map."""
    mask, app = spec.mask, spec.application
    assert type(mask) is Bernoulli
    keep, shape = mask.keep, tuple(mask.shape)
    if type(app) is Scale:
        if generator is None and shape == tuple(x.shape) and app.scale != 1.0:
            return F.dropout(x, 1.0 - keep, True, inplace)
        noise = _bernoulli_noise(x, shape, keep, generator)
        if app.scale != 1.0 and keep > 0.0:
            noise.div_(keep)
        return x.mul_(noise) if inplace else x * noise
    if type(app) is Affine:
        noise = _bernoulli_noise(x, shape, keep, generator)
        b = noise.add(-1).mul_(app.shift - app.dropped).add_(app.shift)
        noise.mul_(app.a)
        return x.mul_(noise).add_(b) if inplace else x * noise + b
    raise TypeError(f"a Bernoulli mask takes a Scale or Affine application, not {app!r}")


def _bernoulli_noise(x: torch.Tensor, shape: tuple, keep: float, generator: Any) -> torch.Tensor:
    # Real noise for a complex input, as ATen's (bernoulli_ has no complex kernel).
    noise_dtype = x.real.dtype if x.is_complex() else x.dtype
    noise = torch.empty(shape, dtype=noise_dtype, device=x.device)
    return noise.bernoulli_(keep, generator=generator)


# --- timm's DropBlock ---------------------------------------------------------------------------


def drop_block_kernel(height: int, width: int, block_size: int) -> tuple[int, int]:
    """Clipped DropBlock kernel ``(kh, kw) = (min(block_size, H), min(block_size, W))``."""
    return min(block_size, height), min(block_size, width)


def drop_block_gamma(
    height: int, width: int, block_size: int, drop_prob: float, gamma_scale: float = 1.0
) -> float:
    """DropBlock seed probability, computed exactly as timm does (binary64).

    ``gamma = float(gamma_scale * drop_prob * H * W) / float(kh * kw)
    / float((H - kh + 1) * (W - kw + 1))``, evaluated left to right in
    Python floats, with ``(kh, kw)`` from :func:`drop_block_kernel`.
    """
    kh, kw = drop_block_kernel(height, width, block_size)
    return (
        float(gamma_scale * drop_prob * height * width)
        / float(kh * kw)
        / float((height - kh + 1) * (width - kw + 1))
    )


def drop_block_2d(
    x: torch.Tensor,
    drop_prob: float = 0.1,
    block_size: int = 7,
    gamma_scale: float = 1.0,
    with_noise: bool = False,
    inplace: bool = False,
    couple_channels: bool = True,
    scale_by_keep: bool = True,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropBlock (Ghiasi et al., 2018), exactly as timm >= 1.0.23 computes it.

    Algorithm, for ``x`` of shape ``(B, C, H, W)``:

    0. If ``not training``, or ``drop_prob == 0``, or ``x`` has no elements,
       return ``x`` itself (no random numbers are drawn). timm's
       ``DropBlock2d`` module short-cuts the same cases; timm's *function*
       still draws the mask when ``drop_prob == 0`` (with an all-keep mask
       the output values are ``x`` except for a mask of a single element,
       see step 5).

    1. Clipped kernel: ``kh = min(block_size, H)``, ``kw = min(block_size, W)``.

    2. Seed probability, in Python (binary64) arithmetic, left to right::

           gamma = float(gamma_scale * drop_prob * H * W) / float(kh * kw)
                   / float((H - kh + 1) * (W - kw + 1))

       (``(H - kh + 1) * (W - kw + 1)`` is the number of positions where a
       whole ``kh x kw`` block fits, but seeds are drawn over the *whole*
       ``H x W`` map, not just there.) ``gamma > 1`` (possible only with
       ``gamma_scale > 1``) raises ``ValueError``.

    3. Seed mask ``S`` of shape ``(B, 1, H, W)`` if ``couple_channels`` (one
       spatial mask per sample, shared by all channels, as in the paper),
       else ``(B, C, H, W)`` (an independent mask per channel), in ``x``'s
       dtype and device: ``S = torch.empty(shape).bernoulli_(gamma,
       generator=generator)``, i.e. each element is 1 (a block seed) with
       probability ``gamma`` independently, else 0.

    4. Block mask ``D`` (1 = dropped), same shape as ``S``: the max-pool
       ``F.max_pool2d(S, kernel_size=(kh, kw), stride=1,
       padding=(kh // 2, kw // 2))`` (implicit padding never wins the max),
       followed, if ``kh`` or ``kw`` is even, by the slice
       ``D = D[..., (kh + 1) % 2:, (kw + 1) % 2:]`` (drop the *first* row of
       the pooled output if ``kh`` is even, the first column if ``kw`` is
       even; the pooled output has ``H + 1`` rows for even ``kh``). The
       result: a seed at ``(i, j)`` drops exactly the pixels ``(r, c)`` with

           ``i - kh // 2 <= r <= i - kh // 2 + kh - 1`` and
           ``j - kw // 2 <= c <= j - kw // 2 + kw - 1``,

       intersected with the map ``0 <= r < H``, ``0 <= c < W``. For odd
       ``k`` that is the centred window ``i - (k-1)/2 .. i + (k-1)/2``; for
       even ``k`` the window is ``i - k/2 .. i + k/2 - 1``: ``k/2`` pixels
       before the seed (towards index 0) and ``k/2 - 1`` after it (e.g.
       ``k = 2`` drops rows ``i - 1`` and ``i``; ``k = 4`` rows
       ``i - 2 .. i + 1``). Equivalently pixel ``(r, c)`` is dropped iff some
       seed lies in rows ``r - (kh - 1) // 2 .. r + kh // 2`` and columns
       ``c - (kw - 1) // 2 .. c + kw // 2``. Blocks overlapping a border are
       truncated (not shifted) and overlapping blocks merge; seeds near the
       border therefore drop fewer than ``kh * kw`` pixels. ``D`` is 0 or 1.

    5. Keep mask ``K = 1 - D``.

       * ``with_noise=False``: if ``scale_by_keep``, let ``n = K.numel()``
         (``B * H * W`` when ``couple_channels``, else ``B * C * H * W``:
         the *mask's* size, not ``x``'s) and ``k`` the number of kept mask
         elements, summed in float32 (``K.to(torch.float32).sum()``; exact
         for ``k <= 2**24``). The scale is computed in float32 as::

             s = fl32(k) + fl32(1e-7)      # rounded to float32
             scale = fl32(fl32(1 / s) * fl32(n))

         (PyTorch evaluates ``n / tensor`` as ``tensor.reciprocal() * n``,
         hence reciprocal-then-multiply; note ``k = 1`` gives
         ``s = 1.0000001192092896``, and ``k >= 2`` gives ``s = k``.) The
         scale is then cast to ``x``'s dtype and ``K *= scale``. If
         everything is dropped (``k = 0``) the scale is about ``1e7 * n`` and
         ``K`` stays all zeros, so the output is all zeros -- except in
         float16, where the scale overflows to ``inf`` and ``0 * inf``
         yields NaN (timm behaves the same). Without ``scale_by_keep`` no
         scale is applied. Output: ``x * K`` (broadcast over channels when
         coupled), or ``x.mul_(K)`` if ``inplace``.

       * ``with_noise=True`` (no scaling, whatever ``scale_by_keep``): draw
         ``N = torch.empty_like(K).normal_(generator=generator)`` (mask
         shape, so with ``couple_channels`` the *same* noise is used for all
         channels), ``N *= D`` (noise only where dropped), and output
         ``x * K + N`` (or ``x.mul_(K).add_(N)`` if ``inplace``): dropped
         pixels become standard-normal noise, kept pixels are unchanged.

    The draws happen in this order: Bernoulli seeds (step 3), then, only
    with noise, the normal draw (step 5). Masks are built under
    ``torch.no_grad()``; gradients flow to ``x`` through the final multiply.

    Parameters
    ----------
    x : torch.Tensor
        Floating-point input of shape ``(B, C, H, W)``.
    drop_prob : float, optional
        Target fraction of dropped activations, in ``[0, 1]``. Default 0.1.
    block_size : int, optional
        Side of the dropped square blocks, ``>= 1``; clipped to ``H`` and
        ``W`` separately. Default 7.
    gamma_scale : float, optional
        Extra factor on the seed probability, ``>= 0``. Default 1.0.
    with_noise : bool, optional
        Fill dropped regions with Gaussian noise instead of zeros.
    inplace : bool, optional
        Modify and return ``x``.
    couple_channels : bool, optional
        Share one spatial mask across channels (default, as in the paper).
    scale_by_keep : bool, optional
        Rescale kept activations by ``n / k`` (see step 5). Default True.
    training : bool, optional
        Apply only when true. Default True (timm's function has no such
        argument and always applies).
    generator : torch.Generator, optional
        Generator for the Bernoulli and normal draws, on ``x``'s device.

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as ``x``; ``x`` itself when inplace or
        when nothing is applied.

    Raises
    ------
    ValueError
        If ``x`` is not 4-D, ``drop_prob`` is outside ``[0, 1]``,
        ``block_size < 1``, ``gamma_scale < 0`` or ``gamma > 1``.
    TypeError
        If ``x`` is not floating point or ``block_size`` is not an int.
    """
    drop_prob = check_prob(drop_prob, "drop_prob")
    block_size = check_int(block_size, "block_size", 1)
    if math.isnan(gamma_scale) or gamma_scale < 0:
        raise ValueError(f"gamma_scale must be >= 0, got {gamma_scale!r}")
    if x.ndim != 4:
        raise ValueError(f"drop_block_2d expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"drop_block_2d expects a floating-point tensor, got {x.dtype}")
    if not training or drop_prob == 0.0 or x.numel() == 0:
        return x

    B, C, H, W = x.shape
    kh, kw = drop_block_kernel(H, W, block_size)
    gamma = drop_block_gamma(H, W, block_size, drop_prob, gamma_scale)
    if gamma > 1.0:
        raise ValueError(
            f"seed probability gamma = {gamma!r} > 1 (drop_prob={drop_prob}, "
            f"gamma_scale={gamma_scale}, block_size={block_size}, H={H}, W={W})"
        )

    noise_shape = (B, 1 if couple_channels else C, H, W)
    with torch.no_grad():
        block_mask = torch.empty(noise_shape, dtype=x.dtype, device=x.device).bernoulli_(
            gamma, generator=generator
        )
        block_mask = F.max_pool2d(
            block_mask,
            kernel_size=(kh, kw),
            stride=1,
            padding=(kh // 2, kw // 2),
        )
        if kh % 2 == 0 or kw % 2 == 0:
            # even kernels: the pooled map is one larger in each even dim; drop its first row/col
            block_mask = block_mask[..., (kh + 1) % 2 :, (kw + 1) % 2 :]
        keep_mask = 1.0 - block_mask

    if with_noise:
        with torch.no_grad():
            noise = torch.empty_like(keep_mask).normal_(generator=generator)
            noise.mul_(block_mask)
        if inplace:
            x.mul_(keep_mask).add_(noise)
        else:
            x = x * keep_mask + noise
    else:
        if scale_by_keep:
            with torch.no_grad():
                kept = keep_mask.to(dtype=torch.float32).sum().add(1e-7)
                normalize_scale = keep_mask.numel() / kept  # == kept.reciprocal() * numel
                keep_mask.mul_(normalize_scale.to(x.dtype))
        if inplace:
            x.mul_(keep_mask)
        else:
            x = x * keep_mask
    return x


# --- the family members that are not a mask -----------------------------------------------------


def op_dtype(t: torch.Tensor) -> torch.dtype:
    """The real type a factor for `t` is computed in: float64 for float64 and complex128,
    float32 otherwise (torch's opmath for float16 and bfloat16)."""
    return torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32


def times(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``t * factor`` for a real factor of t's shape, computed in the factor's type and rounded
    once to t's dtype. A complex element has both parts scaled by its one real factor, as the
    masks scale them (a complex product with ``factor + 0i`` would turn an infinite part's
    ``inf * 0`` into NaN)."""
    if t.is_complex():
        pairs = torch.view_as_real(t.resolve_conj().resolve_neg()) * factor.unsqueeze(-1)
        return torch.view_as_complex(pairs.contiguous()).to(t.dtype)
    return (t.to(factor.dtype) * factor).to(t.dtype)


def gaussian_dropout(x: torch.Tensor, sigma: float, inplace: bool, generator: Any) -> torch.Tensor:
    """``x * (1 + sigma * z)`` with ``z`` drawn by torch on x's device, in float32 (float64 for
    float64 and complex128) and rounded once to x's dtype; one deviate per complex element."""
    gen = device_generator(generator, x.device)
    z = torch.randn(x.shape, dtype=op_dtype(x), device=x.device, generator=gen)
    out = times(x, z.mul_(sigma).add_(1.0))
    return x.copy_(out) if inplace else out


def patch_indices(
    x: torch.Tensor, batch: int, tokens: int, prob: float, ordered: bool, generator: Any
) -> torch.Tensor:
    """timm's PatchDropout token choice on x's device: the first ``max(1, int(L * (1 - prob)))``
    of an argsort of normal deviates, per sample."""
    gen = device_generator(generator, x.device)
    num_keep = max(1, int(tokens * (1.0 - prob)))
    noise = torch.randn(batch, tokens, device=x.device, generator=gen)
    idx = torch.argsort(noise, dim=-1)[:, :num_keep]
    if ordered:
        idx = idx.sort(dim=-1)[0]
    return idx


def drop_block_torchvision(x, p, block_size, inplace, eps, generator):
    """torchvision's recipe on the device; a seed at a corner grows into the block after it,
    which also covers even sizes."""
    spatial = tuple(int(s) for s in x.shape[2:])
    b, gamma = torchvision_block_seed_rate(spatial, p, block_size)
    gen = device_generator(generator, x.device)
    pool = F.max_pool3d if len(spatial) == 3 else F.max_pool2d
    with torch.no_grad():
        seeds = torch.empty(
            tuple(x.shape[:2]) + tuple(s - b + 1 for s in spatial), dtype=x.dtype, device=x.device
        ).bernoulli_(gamma, generator=gen)
        seeds = F.pad(seeds, [b - 1] * (2 * len(spatial)), value=0.0)
        keep = 1.0 - pool(seeds, kernel_size=b, stride=1)
        keep.mul_(keep.numel() / (eps + keep.sum()))
    return x.mul_(keep) if inplace else x * keep
