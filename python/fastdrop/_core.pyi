"""Type stubs for ``fastdrop._core``, the PyO3 extension (src/bindings.rs).

The kernels take NumPy arrays or CPU DLPack capsules (``torch.utils.dlpack.to_dlpack(t)``, how
torch tensors arrive, bfloat16 included): ``x``/``out``/``residual`` are float16, float32 or
float64 (or bfloat16 capsules) of one shape and dtype; ``out``
may be ``x`` itself (in place) but must be writeable, without zero or overlapping strides, and
must not overlap an input otherwise. Errors: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong value or shape, ``MemoryError`` when a mask cannot be allocated.
"""

from typing import Any, Optional, Union

import numpy as np

from fastdrop._spec import Spec

# A NumPy array or a DLPack capsule ("dltensor" / "dltensor_versioned") of CPU memory.
_Array = Union[np.ndarray, Any]

class Generator:
    """A counter-based ARS-5 generator: masks are a pure function of (seed, stream, offset,
    index). ``seed=None`` draws a seed from the OS. Seeds are ints in [-2**63, 2**64); streams,
    fork indices, ``set_state`` fields and ``_reserve`` counts in [0, 2**64) (``ValueError``
    otherwise). A call (or ``_reserve``) whose counter range would reach block 2**64 raises
    ``ValueError`` and leaves the state as it was."""

    def __init__(self, seed: Optional[int] = None, stream: Optional[int] = 0) -> None: ...
    @property
    def seed(self) -> int: ...
    @property
    def stream(self) -> int: ...
    @property
    def offset(self) -> int: ...
    def manual_seed(self, seed: int) -> Generator: ...
    def get_state(self) -> tuple[int, int, int]: ...
    def set_state(self, state: tuple[int, int, int]) -> None: ...
    def fork(self, index: int) -> Generator: ...
    def _reserve(self, blocks: int) -> int: ...
    def __reduce__(self) -> tuple[Any, tuple[tuple[int, int, int]]]: ...

def _generator_from_state(state: tuple[int, int, int]) -> Generator: ...

class MaskBits:
    """Packed keep bits (1 = kept), C-ordered over ``shape``."""

    @staticmethod
    def filled(shape: list[int], keep: bool) -> MaskBits: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...
    def count_kept(self) -> int: ...
    def to_bytes(self) -> bytes: ...

class Applied:
    """What `apply` did: read-only, for the call's backward or replay."""

    @property
    def bits(self) -> Optional[MaskBits]:
        """The mask when ``store_mask`` was true, and always for a ``Blocks`` mask (DropBlock's
        dilated bits are kept, not redrawn); otherwise None."""
    @property
    def first_block(self) -> int:
        """The first counter block the call reserved: a generator set to ``(seed, stream,
        first_block)`` draws the same mask again."""
    @property
    def scale(self) -> float:
        """What kept elements were multiplied by: for ``ScaleByKept`` the computed
        numel / kept (1.0 when nothing is kept), for ``Affine`` its ``a``, else the
        application's ``scale``."""

def apply(
    x: _Array,
    out: _Array,
    residual: Optional[_Array],
    spec: Spec,
    generator: Generator,
    store_mask: bool,
) -> Applied:
    """``out = application(mask, x) [+ residual]`` for the call ``spec`` describes (a
    `fastdrop._spec.Spec`, read by each part's ``kind`` and field names; ``grad_scale`` and
    ``origin`` are not read), with the mask drawn from ``generator``'s next counters. ``out``
    may be ``x`` (in place).

    Every check runs before anything is written or any counter is taken: ``TypeError`` for an
    unknown ``kind``, a missing or mistyped field, or a wrong operand type or dtype;
    ``ValueError`` for a probability outside [0, 1], a block larger than its map, a mask shape
    that does not broadcast to ``x`` (a ``Blocks`` mask needs a 4-D ``x``), a bad output or an
    exhausted generator stream."""

def mask_apply(
    mask: MaskBits,
    x: _Array,
    out: _Array,
    scale: float,
    residual: Optional[_Array] = None,
) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def share_openmp(path: str) -> bool: ...
def unshare_openmp() -> None: ...
def shares_openmp() -> bool: ...

MAX_THREADS: int

def simd_backend() -> str: ...

# One message per environment variable set to an unusable value; fastdrop warns with each at
# import. Every variable is read once per process, at the latest by this call.
def _env_warnings() -> list[str]: ...

# Both serve float16, float32, float64 and uint16 only (TypeError otherwise): their memory is
# uninitialised, which only plain numbers tolerate.
def empty_like(x: np.ndarray) -> np.ndarray: ...
def cached_empty(shape: tuple[int, ...], dtype: np.dtype) -> Optional[np.ndarray]: ...
def empty_cache() -> int: ...
def cached_bytes() -> int: ...

# Attention's softmax and dropout over the (..., lq, lk) weights (fastdrop.attention). The
# operands are C-contiguous, of one dtype and shape. Forward: `scores` (logits) becomes the
# softmax P of `logit_scale * scores` (keys past the diagonal masked when `causal`), `dropped`
# receives P * mask / keep; returns the mask. Backward: `grad` (of the dropped weights) becomes
# the gradient of the logits, `dropped` receives P * mask * keep_scale again.
def softmax_dropout_forward(
    scores: _Array,
    dropped: _Array,
    logit_scale: float,
    causal: bool,
    keep: float,
    generator: Generator,
) -> MaskBits: ...
def softmax_dropout_backward(
    probs: _Array, grad: _Array, dropped: _Array, mask: MaskBits, keep_scale: float
) -> None: ...

# The rest of the family: Gaussian noise, and masks decided outside the kernels
def normal_fill(out: np.ndarray, generator: Generator) -> None: ...
def mask_bits_from_packed(shape: Union[list[int], tuple[int, ...]], packed: bytes) -> MaskBits: ...
