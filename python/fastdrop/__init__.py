"""fastdrop: fast, exact, reproducible dropout for NumPy and PyTorch on the CPU.

The whole dropout family (``dropout``, ``alpha_dropout``, ``feature_alpha_dropout``,
``dropout1d/2d/3d``, ``drop_path``, ``drop_block_2d`` and the fused ``dropout_add`` /
``drop_path_add``) with torch's and timm's maths, computed by a Rust core: masks come from the
counter-based ARS-5 generator, so a mask is a pure function of (seed, offset, element index),
whatever the thread count, memory layout or SIMD path.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Optional

from . import _core, _threads, schedules
from ._core import Generator
from ._mask import Mask
from .functional import (
    ShapeError,
    alpha_dropout,
    default_generator,
    drop_block_2d,
    # issue 16: the rest of the family
    drop_block_3d,
    drop_path,
    drop_path_add,
    dropout,
    dropout1d,
    dropout2d,
    dropout3d,
    dropout_add,
    embedding_dropout,
    feature_alpha_dropout,
    gaussian_dropout,
    locked_dropout,
    patch_dropout,
    stochastic_depth,
)
from .schedules import calculate_drop_path_rates

__version__ = "0.1.0"

# The core reads its environment variables once; an unusable value falls back to the default,
# and says so here (see the README's "Environment variables").
for _message in _core._env_warnings():
    warnings.warn(_message, RuntimeWarning, stacklevel=2)

__all__ = [
    "Generator",
    "Mask",
    "ShapeError",
    "alpha_dropout",
    "calculate_drop_path_rates",
    "default_generator",
    "drop_block_2d",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
    "feature_alpha_dropout",
    "get_num_threads",
    "manual_seed",
    "schedules",
    "set_num_threads",
    "share_torch_threads",
    "simd_backend",
    "empty_cache",
    # issue 16: the rest of the family
    "drop_block_3d",
    "embedding_dropout",
    "gaussian_dropout",
    "locked_dropout",
    "mc_sample",
    "patch_dropout",
    "stochastic_depth",
]


def manual_seed(seed: int) -> Generator:
    """Seeds ``fastdrop.default_generator`` (offset back to 0) and returns it."""
    return default_generator.manual_seed(seed)


def set_num_threads(n: int) -> None:
    """Sets the threads fastdrop's kernels use, from 1 to ``_core.MAX_THREADS`` (1024); the
    default is ``FASTDROP_NUM_THREADS`` or the CPUs available. Results never depend on it.

    A call smaller than 131,072 elements runs on the calling thread whatever this says, and no
    call runs on more threads than the machine has CPUs online (more cannot run at once)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads expects an int, got {type(n).__name__}")
    if not 1 <= n <= _core.MAX_THREADS:
        raise ValueError(
            f"set_num_threads expects between 1 and {_core.MAX_THREADS} threads, got {n}"
        )
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The threads fastdrop's kernels use."""
    return int(_core.get_num_threads())


def share_torch_threads(share: bool = True) -> bool:
    """Whether fastdrop's parallel calls on torch tensors run on torch's intra-op threads (the
    default, from the first torch tensor fastdrop sees) or on fastdrop's own; returns whether
    torch's are in use now. NumPy calls always use fastdrop's own.

    Inside a torch program the cores belong to torch's OpenMP threads, which stay awake for a
    while after each of torch's operations; fastdrop's own threads would wait for a core there,
    torch's are ready. Shared, a call uses at most ``min(get_num_threads(),
    torch.get_num_threads())`` threads, so ``torch.set_num_threads`` bounds fastdrop too. Only a
    runtime torch already loaded is used (GNU, Intel or LLVM OpenMP); where torch's pool is not
    OpenMP, or in a child made by ``fork`` (whose copy of torch's pool has no threads), fastdrop
    uses its own. ``share=True`` imports torch; results never depend on the choice.
    """
    if not isinstance(share, bool):
        raise TypeError(f"share_torch_threads expects a bool, got {type(share).__name__}")
    _threads.share_torch = share
    if not share:
        _core.unshare_openmp()
        return False
    from . import _torch

    return _torch.share_threads()


def simd_backend() -> str:
    """The generator's code path: ``"vaes"``, ``"aesni"`` or ``"portable"`` (set
    ``FASTDROP_SIMD=portable`` to force the portable one; results are bit-identical)."""
    return str(_core.simd_backend())


def empty_cache() -> int:
    """Frees the large output buffers fastdrop keeps for reuse and returns how many bytes that
    released.

    An out-of-place call on an array of 1 MiB or more writes into a buffer that an earlier,
    since-freed output of the same size left behind, instead of fresh memory the OS must fault
    in and zero (which costs about as much as the dropout). At most 8 buffers and
    ``FASTDROP_CACHE_BYTES`` bytes (default 1 GiB; ``0`` disables the cache) are kept."""
    return int(_core.empty_cache())


def mc_sample(
    model,
    x,
    n: int,
    *,
    generator=None,
    passes_per_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: Optional[bool] = None,
):
    """``n`` stochastic forward passes of a torch model under MC dropout, stacked on a new first
    dimension, batched as memory allows: `fastdrop.nn.mc_sample` (imported here on first use,
    as it needs torch)."""
    from .nn import mc_sample as sample

    return sample(
        model,
        x,
        n,
        generator=generator,
        passes_per_batch=passes_per_batch,
        memory_budget=memory_budget,
        progress=progress,
    )


def __getattr__(name: str):
    # `fastdrop.nn` needs torch, so it loads on first use and `import fastdrop` stays torch-free.
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    if name == "scaled_dot_product_attention":
        # Also torch-only (fastdrop.attention imports torch): loaded on first use.
        from .attention import scaled_dot_product_attention

        return scaled_dot_product_attention
    raise AttributeError(f"module 'fastdrop' has no attribute {name!r}")
