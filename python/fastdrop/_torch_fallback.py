"""Pure-PyTorch implementations used for tensors that are not on the CPU.

The Rust kernels of fastdrop work on host memory. For tensors on any other
device (CUDA, MPS, XPU, ``meta``, ...) these functions are used instead. They
only call PyTorch tensor operations on the input's device: no ``.cpu()``, no
``.item()``, no NumPy, no host synchronisation. Every random draw takes an
optional ``torch.Generator`` (``None`` means PyTorch's default generator of
the device).

The maths follows ``timm.layers.drop`` (timm 1.0.31, identical to timm git
main 1.0.29.dev0 of 2026-08): with ``generator=None`` and the same
``torch.manual_seed``, :func:`drop_path` and :func:`drop_block_2d` return
exactly what timm's functions of the same name return, because they perform
the same random draws and the same operations in the same order.

This module deliberately does not import the ``fastdrop`` package (nor its
compiled extension), so it can be imported and tested on its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "drop_path",
    "drop_block_2d",
    "dropout_add",
    "drop_path_add",
    "drop_block_kernel",
    "drop_block_gamma",
]


def _check_prob(p: float, name: str) -> None:
    """Raise ``ValueError`` unless ``0 <= p <= 1`` (NaN rejected)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(p).__name__}")
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")


def drop_path(
    x: torch.Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop whole samples (stochastic depth), as ``timm.layers.drop_path``.

    If ``drop_prob == 0`` or ``not training`` the input itself is returned.
    Otherwise, with ``keep = 1 - drop_prob``::

        mask = x.new_empty((N, 1, ..., 1)).bernoulli_(keep, generator=generator)
        if keep > 0 and scale_by_keep:
            mask.div_(keep)
        return x * mask

    where the mask has ``x.ndim`` dimensions, ``N = x.shape[0]``, and the
    mask has ``x``'s dtype and device (so the ``1 / keep`` factor is rounded
    to ``x``'s dtype). With ``drop_prob == 1`` every sample is zeroed and
    nothing is scaled.

    Parameters
    ----------
    x : torch.Tensor
        Input of at least one dimension; dimension 0 is the sample dimension.
    drop_prob : float, optional
        Probability of dropping each sample, in ``[0, 1]``. Default 0.0.
    training : bool, optional
        Apply the drop only when true. Default False (as timm).
    scale_by_keep : bool, optional
        Divide kept samples by ``keep``. Default True.
    generator : torch.Generator, optional
        Generator for the Bernoulli draw, on ``x``'s device.

    Returns
    -------
    torch.Tensor
        ``x`` itself when nothing is applied, else a new tensor.

    Raises
    ------
    ValueError
        If ``drop_prob`` is outside ``[0, 1]`` or ``x`` is 0-dimensional.
    """
    _check_prob(drop_prob, "drop_prob")
    if drop_prob == 0.0 or not training:
        return x
    if x.ndim == 0:
        raise ValueError("drop_path needs a tensor with a batch dimension, got a 0-d tensor")
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob, generator=generator)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


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
    _check_prob(drop_prob, "drop_prob")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
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


def dropout_add(
    input: torch.Tensor,
    residual: torch.Tensor,
    p: float,
    training: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + F.dropout(input, p, training)``.

    With ``generator=None`` this is literally that expression. With a
    generator, the dropout is spelled out the way PyTorch's non-fused
    (CPU) ``dropout`` computes it, drawing from ``generator``::

        mask = torch.empty_like(input).bernoulli_(1 - p, generator=generator)
        mask.div_(1 - p)
        out = residual + input * mask      # p == 1: residual + input * 0

    On the CPU this gives the same values as ``F.dropout`` seeded
    identically; on CUDA ``F.dropout`` uses a fused kernel with its own
    random stream, so only the distribution is the same.

    Parameters
    ----------
    input : torch.Tensor
        Tensor to drop out.
    residual : torch.Tensor
        Tensor added to the result (broadcasting as ``+`` does).
    p : float
        Drop probability in ``[0, 1]``.
    training : bool
        Apply dropout only when true.
    generator : torch.Generator, optional
        Generator for the Bernoulli draw, on ``input``'s device.

    Returns
    -------
    torch.Tensor
        A new tensor.

    Raises
    ------
    ValueError
        If ``p`` is outside ``[0, 1]``.
    """
    if generator is None:
        return residual + F.dropout(input, p, training)
    _check_prob(p, "p")
    if not training or p == 0.0 or input.numel() == 0:
        return residual + input
    if p == 1.0:
        return residual + input * torch.zeros((), dtype=input.dtype, device=input.device)
    noise = torch.empty_like(input).bernoulli_(1 - p, generator=generator)
    noise.div_(1 - p)
    return residual + input * noise


def drop_path_add(
    x: torch.Tensor,
    branch: torch.Tensor,
    drop_prob: float,
    training: bool,
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``x + drop_path(branch, drop_prob, training, scale_by_keep, generator)``.

    The residual update of a block with stochastic depth: the branch output
    is dropped (and rescaled) per sample, then added to the shortcut ``x``.

    Parameters
    ----------
    x : torch.Tensor
        Shortcut tensor.
    branch : torch.Tensor
        Residual-branch output; dimension 0 is the sample dimension.
    drop_prob : float
        Probability of dropping the branch of each sample, in ``[0, 1]``.
    training : bool
        Apply only when true.
    scale_by_keep : bool, optional
        Divide kept branches by ``1 - drop_prob``. Default True.
    generator : torch.Generator, optional
        Generator for the Bernoulli draw.

    Returns
    -------
    torch.Tensor
        A new tensor.
    """
    return x + drop_path(branch, drop_prob, training, scale_by_keep, generator)
