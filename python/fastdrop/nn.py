"""Dropout modules that replace torch.nn's and timm's, `replace_dropout`, `DropRateScheduler`.

Each module stores its arguments and calls the function of the same name in
`fastdrop.functional`; none re-implements the maths. The torch.nn ones subclass torch's own
classes, so constructors, argument checks, `extra_repr` and `isinstance(m, nn.Dropout)` checks
in existing code behave as before; only `forward` changes. None has parameters or buffers, so
a checkpoint's `state_dict` is the same with either.

Every module also takes a keyword-only ``generator`` (a `fastdrop.Generator` or a
`torch.Generator`); left as None, masks are keyed from torch's default generator, so
`torch.manual_seed` makes runs reproducible exactly as with torch's modules.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _device
from . import functional as F

__all__ = [
    "AlphaDropout",
    "DropBlock2d",
    "DropPath",
    "DropRateScheduler",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
    "replace_dropout",
]

log = logging.getLogger(__name__)


def _check_generator(generator: Any) -> Any:
    """A module's `generator=`, checked at construction, as its other arguments are: the
    forward would refuse anything else."""
    if generator is None or isinstance(generator, (F._core.Generator, torch.Generator)):
        return generator
    raise _device.bad_generator(generator)


class Dropout(nn.Dropout):
    """`torch.nn.Dropout`, computed by `fastdrop.dropout`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__(p, inplace)
        self.generator = _check_generator(generator)

    def forward(self, input):
        return F.dropout(input, self.p, self.training, self.inplace, generator=self.generator)


class Dropout1d(nn.Dropout1d):
    """`torch.nn.Dropout1d`, computed by `fastdrop.dropout1d`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__(p, inplace)
        self.generator = _check_generator(generator)

    def forward(self, input):
        return F.dropout1d(input, self.p, self.training, self.inplace, generator=self.generator)


class Dropout2d(nn.Dropout2d):
    """`torch.nn.Dropout2d`, computed by `fastdrop.dropout2d`: shapes are read as torch reads
    them (a 3-D input as (N, C, L), with torch's warning). ``strict_shapes=True`` reads a 3-D
    input as unbatched (C, H, W) and refuses other ranks but 4 (see `fastdrop.dropout2d`)."""

    def __init__(
        self,
        p: float = 0.5,
        inplace: bool = False,
        *,
        generator: Any = None,
        strict_shapes: bool = False,
    ):
        super().__init__(p, inplace)
        self.generator = _check_generator(generator)
        self.strict_shapes = strict_shapes

    def forward(self, input):
        return F.dropout2d(
            input,
            self.p,
            self.training,
            self.inplace,
            generator=self.generator,
            strict_shapes=self.strict_shapes,
        )


class Dropout3d(nn.Dropout3d):
    """`torch.nn.Dropout3d`, computed by `fastdrop.dropout3d`: shapes are read as torch reads
    them; ``strict_shapes=True`` refuses ranks other than 4 and 5."""

    def __init__(
        self,
        p: float = 0.5,
        inplace: bool = False,
        *,
        generator: Any = None,
        strict_shapes: bool = False,
    ):
        super().__init__(p, inplace)
        self.generator = _check_generator(generator)
        self.strict_shapes = strict_shapes

    def forward(self, input):
        return F.dropout3d(
            input,
            self.p,
            self.training,
            self.inplace,
            generator=self.generator,
            strict_shapes=self.strict_shapes,
        )


class AlphaDropout(nn.AlphaDropout):
    """`torch.nn.AlphaDropout`, computed by `fastdrop.alpha_dropout`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__(p, inplace)
        self.generator = _check_generator(generator)

    def forward(self, input):
        return F.alpha_dropout(input, self.p, self.training, self.inplace, generator=self.generator)


class FeatureAlphaDropout(nn.FeatureAlphaDropout):
    """`torch.nn.FeatureAlphaDropout`, computed by `fastdrop.feature_alpha_dropout`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__(p, inplace)
        self.generator = _check_generator(generator)

    def forward(self, input):
        return F.feature_alpha_dropout(
            input, self.p, self.training, self.inplace, generator=self.generator
        )


class DropPath(nn.Module):
    """timm's `DropPath` (stochastic depth), computed by `fastdrop.drop_path`."""

    def __init__(
        self, drop_prob: float = 0.0, scale_by_keep: bool = True, *, generator: Any = None
    ):
        super().__init__()
        # Checked at construction, as torch's modules check p (timm's check at the forward).
        F._check_prob(drop_prob, "drop_prob")
        F._check_bool(scale_by_keep, "scale_by_keep")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep
        self.generator = _check_generator(generator)

    def forward(self, x):
        return F.drop_path(
            x, self.drop_prob, self.training, self.scale_by_keep, generator=self.generator
        )

    def extra_repr(self) -> str:
        return f"drop_prob={round(float(self.drop_prob), 3):0.3f}"


class DropBlock2d(nn.Module):
    """timm's `DropBlock2d`, computed by `fastdrop.drop_block_2d`. Like timm's, it silently
    accepts the `batchwise` and `fast` arguments timm retired and warns on unknown ones."""

    def __init__(
        self,
        drop_prob: float = 0.1,
        block_size: int = 7,
        gamma_scale: float = 1.0,
        with_noise: bool = False,
        inplace: bool = False,
        couple_channels: bool = True,
        scale_by_keep: bool = True,
        *,
        generator: Any = None,
        **kwargs,
    ):
        super().__init__()
        F._block_args(
            drop_prob, block_size, gamma_scale, with_noise, couple_channels, scale_by_keep
        )
        F._check_bool(inplace, "inplace")
        self.drop_prob = drop_prob
        self.block_size = block_size
        self.gamma_scale = gamma_scale
        self.with_noise = with_noise
        self.inplace = inplace
        self.couple_channels = couple_channels
        self.scale_by_keep = scale_by_keep
        self.generator = _check_generator(generator)
        for k in kwargs:
            if k not in ("batchwise", "fast"):
                warnings.warn(f"DropBlock2d() got unexpected keyword argument '{k}'", stacklevel=2)

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        return F.drop_block_2d(
            x,
            self.drop_prob,
            self.block_size,
            self.gamma_scale,
            self.with_noise,
            self.inplace,
            self.couple_channels,
            self.scale_by_keep,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"drop_prob={self.drop_prob}, block_size={self.block_size}, "
            f"gamma_scale={self.gamma_scale}, with_noise={self.with_noise}, "
            f"inplace={self.inplace}, couple_channels={self.couple_channels}, "
            f"scale_by_keep={self.scale_by_keep}"
        )


# --- replace_dropout --------------------------------------------------------------------------

_TORCH_EQUIVALENTS = {
    nn.Dropout: Dropout,
    nn.Dropout1d: Dropout1d,
    nn.Dropout2d: Dropout2d,
    nn.Dropout3d: Dropout3d,
    nn.AlphaDropout: AlphaDropout,
    nn.FeatureAlphaDropout: FeatureAlphaDropout,
}


def _equivalent(module: Any) -> Optional[nn.Module]:
    """fastdrop's module for `module` with the same arguments, or None. Exact types only: a
    subclass may have changed forward, and fastdrop's own modules are already in place."""
    cls = type(module)
    if cls in _TORCH_EQUIVALENTS:
        return _TORCH_EQUIVALENTS[cls](module.p, module.inplace)
    # timm is optional: recognise its classes by where they live, without importing it.
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name in ("timm.layers.drop.DropPath", "timm.models.layers.drop.DropPath"):
        return DropPath(module.drop_prob, module.scale_by_keep)
    if name in ("timm.layers.drop.DropBlock2d", "timm.models.layers.drop.DropBlock2d"):
        return DropBlock2d(
            module.drop_prob,
            module.block_size,
            module.gamma_scale,
            module.with_noise,
            module.inplace,
            getattr(module, "couple_channels", True),
            getattr(module, "scale_by_keep", True),
        )
    return _family_equivalent(module)


def replace_dropout(model: nn.Module) -> Dict[str, str]:
    """Swaps, in place, every torch.nn dropout module and timm `DropPath` / `DropBlock2d` in
    `model` for fastdrop's equivalent with the same arguments and train/eval state.

    Attention's dropout goes through fastdrop too (`fastdrop.scaled_dot_product_attention`):
    while a module of `model` runs its forward, a torch function mode reroutes
    `F.scaled_dot_product_attention` with a dropout, `F.dropout` and its variants and
    `nn.MultiheadAttention`'s dropout to fastdrop, for this model's instances only (see
    `fastdrop.attention.convert_attention`).

    Returns {qualified module name: original class name} for what was replaced, the attention
    modules marked "(attention dropout)" (also logged at INFO level). The model's eval-mode
    outputs and its `state_dict` do not change.
    """
    replaced: Dict[str, str] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = _equivalent(child)
            if new is None:
                continue
            new.train(child.training)
            setattr(parent, name, new)
            full = f"{parent_name}.{name}" if parent_name else name
            replaced[full] = f"{type(child).__module__}.{type(child).__qualname__}"
    # The dropout inside attention, which no module holds (see fastdrop.attention).
    from .attention import convert_attention

    replaced.update(convert_attention(model))
    log.info("replace_dropout: replaced %d modules: %s", len(replaced), replaced)
    return replaced


# --- DropRateScheduler ------------------------------------------------------------------------

_RATE_ATTR = {
    Dropout: "p",
    Dropout1d: "p",
    Dropout2d: "p",
    Dropout3d: "p",
    AlphaDropout: "p",
    FeatureAlphaDropout: "p",
    DropPath: "drop_prob",
    DropBlock2d: "drop_prob",
}

Selector = Union[
    None, type, Tuple[type, ...], Callable[[str, nn.Module], bool], Iterable[nn.Module]
]


def _selected(model: nn.Module, select: Selector) -> List[Tuple[nn.Module, str]]:
    if select is None or isinstance(select, (type, tuple)):
        types = tuple(_RATE_ATTR) if select is None else select
        chosen = [m for m in model.modules() if isinstance(m, types)]
    elif callable(select):
        chosen = [m for n, m in model.named_modules() if select(n, m)]
    else:
        chosen = list(select)
    out = []
    for m in chosen:
        attr = next((a for cls, a in _RATE_ATTR.items() if isinstance(m, cls)), None)
        if attr is None:
            raise TypeError(
                f"DropRateScheduler: {type(m).__name__} is not a fastdrop module; "
                "call fastdrop.nn.replace_dropout(model) first"
            )
        out.append((m, attr))
    return out


class DropRateScheduler:
    """Sets the drop rate of fastdrop modules from a schedule, as learning-rate schedulers set
    learning rates: ``schedule(step)`` at construction (step 0) and after every `step()`.

    Args:
        model: the module tree to schedule.
        schedule: a callable ``step -> rate`` (e.g. `fastdrop.schedules.LinearWarmup`).
        select: which modules: None (every fastdrop module), a class or tuple of classes
            (e.g. ``fastdrop.nn.DropPath``), a predicate ``(name, module) -> bool``, or an
            iterable of modules.
    """

    def __init__(self, model: nn.Module, schedule: Callable[[int], float], select: Selector = None):
        if not callable(schedule):
            raise TypeError(f"schedule must be callable, got {type(schedule).__name__}")
        self.schedule = schedule
        self._targets = _selected(model, select)
        self.last_step = 0
        self._apply()

    @property
    def rate(self) -> float:
        """The rate set at `last_step`."""
        return self._rate

    def _apply(self) -> None:
        rate = F._check_prob(self.schedule(self.last_step), "scheduled drop rate")
        for m, attr in self._targets:
            setattr(m, attr, rate)
        self._rate = rate

    def step(self) -> float:
        """Advances one step and sets the new rate, which it returns."""
        self.last_step += 1
        self._apply()
        return self._rate

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()

    def __repr__(self) -> str:
        return (
            f"DropRateScheduler(schedule={self.schedule!r}, modules={len(self._targets)}, "
            f"last_step={self.last_step}, rate={self._rate})"
        )


# === NEW: the rest of the family (issue 16) ==================================================
# LockedDropout, EmbeddingDropout, GaussianDropout, WeightDropout, PatchDropout, DropBlock3d,
# StochasticDepth, mc_dropout / mc_sample, and replace_dropout's conversions of timm's
# PatchDropout and torchvision's StochasticDepth / DropBlock2d / DropBlock3d.

import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

__all__ += [
    "DropBlock3d",
    "EmbeddingDropout",
    "GaussianDropout",
    "LockedDropout",
    "PatchDropout",
    "StochasticDepth",
    "TorchvisionDropBlock2d",
    "WeightDropout",
    "mc_dropout",
    "mc_sample",
]


class LockedDropout(nn.Module):
    """Sequence (variational) dropout, computed by `fastdrop.locked_dropout`: one mask per
    (batch, feature) shared by every time step of a (seq, batch, feature) input, or
    (batch, seq, feature) with ``batch_first`` (fastai's ``RNNDropout``)."""

    def __init__(self, p: float = 0.5, batch_first: bool = False, *, generator: Any = None):
        super().__init__()
        F._check_prob(p)
        F._check_bool(batch_first, "batch_first")
        self.p = p
        self.batch_first = batch_first
        self.generator = _check_generator(generator)

    def forward(self, x):
        return F.locked_dropout(
            x, self.p, self.training, self.batch_first, generator=self.generator
        )

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"


class EmbeddingDropout(nn.Module):
    """Wraps an ``nn.Embedding`` and drops whole rows of its weight while training (word
    dropout, fastai's ``EmbeddingDropout``), kept rows scaled by ``1 / (1 - p)``, through
    `fastdrop.embedding_dropout`. The embedding's own weight stays the only parameter; its
    padding index, ``max_norm`` and the rest are honoured."""

    def __init__(self, embedding: nn.Embedding, p: float, *, generator: Any = None):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        if embedding.sparse:
            # The masked weight is a dense tensor computed from the whole weight, so its
            # gradient is dense too, which sparse optimizers (SparseAdam) refuse.
            raise ValueError(
                "EmbeddingDropout needs a dense embedding (sparse=False): the gradient through "
                "the row mask is dense"
            )
        F._check_prob(p)
        self.emb = embedding
        self.p = p
        self.generator = _check_generator(generator)

    def forward(self, words):
        e = self.emb
        weight = F.embedding_dropout(e.weight, self.p, self.training, generator=self.generator)
        return nn.functional.embedding(
            words, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse
        )

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GaussianDropout(nn.Module):
    """Multiplicative Gaussian noise ``x * N(1, p / (1 - p))`` while training (Keras's
    ``GaussianDropout``), computed by `fastdrop.gaussian_dropout`; ``p`` in [0, 1)."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__()
        if F._check_prob(p) == 1.0:
            raise ValueError("GaussianDropout: p must be in [0, 1), got 1.0")
        F._check_bool(inplace, "inplace")
        self.p = p
        self.inplace = inplace
        self.generator = _check_generator(generator)

    def forward(self, x):
        return F.gaussian_dropout(x, self.p, self.training, self.inplace, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class WeightDropout(nn.Module):
    """DropConnect on the named parameters of a wrapped module (fastai's ``WeightDropout``,
    AWD-LSTM's weight drop): each named parameter moves to this module as ``<name>_raw``, and
    every training forward sets the wrapped module's ``<name>`` to
    ``fastdrop.dropout(<name>_raw, p)``, a fresh mask each time (kept weights scaled by
    ``1 / (1 - p)``); in eval mode the raw weight is used as it is. Gradients reach the raw
    parameters, the only trainable tensors of those shapes. Works with ``nn.Linear``
    (``names=("weight",)``) and RNNs such as ``nn.LSTM`` (``names=("weight_hh_l0",)``)."""

    def __init__(
        self,
        module: nn.Module,
        p: float,
        names: Iterable[str] = ("weight",),
        *,
        generator: Any = None,
    ):
        super().__init__()
        F._check_prob(p)
        self.module = module
        self.p = p
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self.generator = _check_generator(generator)
        for name in self.names:
            w = getattr(module, name, None)
            if not isinstance(w, nn.Parameter):
                raise ValueError(
                    f"WeightDropout: {type(module).__name__} has no parameter named {name!r}"
                )
        for name in self.names:
            w = getattr(module, name)
            delattr(module, name)
            self.register_parameter(f"{name}_raw", nn.Parameter(w.detach()))
            setattr(module, name, w.detach().clone())
        if isinstance(module, nn.RNNBase):
            # The weights are plain tensors now; flattening them into one buffer would undo the
            # per-forward masks (fastai does the same).
            module.flatten_parameters = _no_flatten  # type: ignore[method-assign]

    def _set_weights(self) -> None:
        for name in self.names:
            raw = getattr(self, f"{name}_raw")
            if self.training and self.p:
                w = F.dropout(raw, self.p, True, generator=self.generator)
            else:
                w = raw.view_as(raw)  # a plain tensor: setattr must not register raw twice
            setattr(self.module, name, w)

    def forward(self, *args, **kwargs):
        self._set_weights()
        with warnings.catch_warnings():
            # RNNs warn that non-flattened weights are slower.
            warnings.simplefilter("ignore", category=UserWarning)
            return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"p={self.p}, names={self.names}"


def _no_flatten() -> None:
    pass


class PatchDropout(nn.Module):
    """timm's ``PatchDropout``, computed by `fastdrop.patch_dropout`: keeps
    ``max(1, int(L * (1 - prob)))`` random tokens per sample behind the prefix tokens while
    training. With ``return_indices`` (timm's ``PatchDropoutWithIndices``) forward returns
    ``(out, keep_indices)``."""

    def __init__(
        self,
        prob: float = 0.5,
        num_prefix_tokens: int = 1,
        ordered: bool = False,
        return_indices: bool = False,
        *,
        generator: Any = None,
    ):
        super().__init__()
        if not 0.0 <= F._patch_args(prob, num_prefix_tokens, ordered, return_indices)[0] < 1.0:
            raise ValueError(f"PatchDropout: prob must be in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered
        self.return_indices = return_indices
        self.generator = _check_generator(generator)

    def forward(self, x):
        return F.patch_dropout(
            x,
            self.prob,
            self.num_prefix_tokens,
            self.ordered,
            self.return_indices,
            training=self.training,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"ordered={self.ordered}, return_indices={self.return_indices}"
        )


class _TorchvisionDropBlock(nn.Module):
    """torchvision's ``ops.DropBlock2d``/``DropBlock3d(p, block_size, inplace=False,
    eps=1e-06)``, over `_spatial` dimensions, computed by `functional._drop_block_torchvision`
    (even block sizes allowed). The two classes differ only in their rank."""

    _spatial: int
    _name: str

    def __init__(
        self,
        p: float,
        block_size: int,
        inplace: bool = False,
        eps: float = 1e-06,
        *,
        generator: Any = None,
    ):
        super().__init__()
        F._torchvision_block_args(p, block_size, inplace, eps)
        self.p = p
        self.block_size = block_size
        self.inplace = inplace
        self.eps = eps
        self.generator = _check_generator(generator)

    def forward(self, input):
        return F._drop_block_torchvision(
            self._name,
            self._spatial,
            input,
            self.p,
            self.block_size,
            self.inplace,
            self.eps,
            self.training,
            self.generator,
            False,
            None,
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(p={self.p}, block_size={self.block_size}, "
            f"inplace={self.inplace})"
        )


class DropBlock3d(_TorchvisionDropBlock):
    """torchvision's ``ops.DropBlock3d``, computed as `fastdrop.drop_block_3d` computes it
    (even block sizes allowed)."""

    _spatial, _name = 3, "drop_block_3d"


class TorchvisionDropBlock2d(_TorchvisionDropBlock):
    """torchvision's ``ops.DropBlock2d(p, block_size, inplace=False, eps=1e-06)`` with its maths,
    which are not timm's (see `DropBlock2d`): seeds only where a whole block fits, one map per
    (sample, channel), kept pixels scaled by ``numel / (eps + kept)``. `replace_dropout` puts it
    in place of torchvision's module; even block sizes are allowed."""

    _spatial, _name = 2, "drop_block_2d"


class StochasticDepth(nn.Module):
    """torchvision's ``ops.StochasticDepth(p, mode)``, computed by `fastdrop.stochastic_depth`
    (``mode`` "row": one decision per sample; "batch": one for the whole input)."""

    def __init__(self, p: float, mode: str, *, generator: Any = None):
        super().__init__()
        F._check_prob(p, "drop probability")
        F._check_mode(mode)
        self.p = p
        self.mode = mode
        self.generator = _check_generator(generator)

    def forward(self, input):
        return F.stochastic_depth(input, self.p, self.mode, self.training, generator=self.generator)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


_FAMILY_RATE_ATTR: Dict[Any, str] = {
    LockedDropout: "p",
    EmbeddingDropout: "p",
    GaussianDropout: "p",
    WeightDropout: "p",
    PatchDropout: "prob",
    DropBlock3d: "p",
    TorchvisionDropBlock2d: "p",
    StochasticDepth: "p",
}
_RATE_ATTR.update(_FAMILY_RATE_ATTR)

# --- MC dropout -------------------------------------------------------------------------------

_FASTDROP_FAMILY = (
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    AlphaDropout,
    FeatureAlphaDropout,
    DropPath,
    DropBlock2d,
    LockedDropout,
    EmbeddingDropout,
    GaussianDropout,
    WeightDropout,
    PatchDropout,
    DropBlock3d,
    TorchvisionDropBlock2d,
    StochasticDepth,
)

#: Third-party dropout modules, by where their classes live (neither library is imported).
_THIRD_PARTY_FAMILY = frozenset(
    {
        "timm.layers.drop.DropPath",
        "timm.models.layers.drop.DropPath",
        "timm.layers.drop.DropBlock2d",
        "timm.models.layers.drop.DropBlock2d",
        "timm.layers.patch_dropout.PatchDropout",
        "timm.layers.patch_dropout.PatchDropoutWithIndices",
        "torchvision.ops.stochastic_depth.StochasticDepth",
        "torchvision.ops.drop_block.DropBlock2d",
        "torchvision.ops.drop_block.DropBlock3d",
    }
)


def _is_dropout_module(m: nn.Module) -> bool:
    if isinstance(m, (nn.modules.dropout._DropoutNd, _FASTDROP_FAMILY)):
        return True
    if isinstance(m, nn.RNNBase) and m.dropout > 0:
        return True  # its training flag switches only the dropout between its layers
    return f"{type(m).__module__}.{type(m).__qualname__}" in _THIRD_PARTY_FAMILY


@contextlib.contextmanager
def mc_dropout(model: nn.Module):
    """Monte Carlo dropout: inside the block `model` is in eval mode (BatchNorm on its running
    statistics and so on) except its dropout-family modules, which keep sampling: torch's
    dropout modules (and RNNs with ``dropout > 0``), fastdrop's, timm's DropPath / DropBlock2d
    / PatchDropout and torchvision's StochasticDepth / DropBlock2d / DropBlock3d. Every
    module's mode is restored on exit, also when the block raises. Yields the model."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in model.modules():
            if _is_dropout_module(m):
                m.training = True  # this module only: a wrapped module keeps eval mode
        yield model
    finally:
        for m, mode in saved:
            m.training = mode


#: `mc_sample`'s default memory budget for one batch of passes on the CPU: 16 MiB. Sized for
#: the cache rather than the RAM (torch has no CPU memory query anyway): on the CPU a batch
#: saves per-forward overhead and re-reads of the weights, and larger batches measured slower
#: (README, "MC dropout").
MC_SAMPLE_CPU_BUDGET = 16 * 2**20
#: On CUDA the default budget is this fraction of the device's free memory after the first
#: pass (the driver's free memory plus what torch's caching allocator holds unused).
MC_SAMPLE_CUDA_FRACTION = 0.5
#: With ``progress=None`` a bar appears once a run on a terminal has lasted this many seconds.
MC_SAMPLE_PROGRESS_DELAY = 2.0


class _PassKeys:
    """The randomness of one MC pass: ``fork``, which fastdrop modules draw from, and a torch
    generator state seeded from it, which torch's own (and timm's, torchvision's) modules draw
    from. Both advance as the pass draws, whether the pass runs alone or in a batch."""

    def __init__(self, base: Any, index: int, device: torch.device):
        self.fork = base.fork(index)
        seed, stream, _ = self.fork.get_state()
        self.cpu_state, self.cuda_state = _torch_states(hash((seed, stream)), device)

    @contextlib.contextmanager
    def torch_rng(self, device: torch.device):
        """torch's default generator (and `device`'s, on CUDA) set to this pass's state."""
        saved = _swap_torch_states(self.cpu_state, self.cuda_state, device)
        try:
            yield
        finally:
            self.cpu_state, self.cuda_state = _swap_torch_states(*saved, device)


def _torch_states(seed: int, device: torch.device) -> Tuple[torch.Tensor, Any]:
    seed &= 0x7FFF_FFFF_FFFF_FFFF
    cpu = torch.Generator().manual_seed(seed).get_state()
    cuda = None
    if device.type == "cuda":
        cuda = torch.Generator(device=device).manual_seed(seed).get_state()
    return cpu, cuda


def _swap_torch_states(cpu: torch.Tensor, cuda: Any, device: torch.device) -> Tuple[Any, Any]:
    """Sets torch's generators to (cpu, cuda) and returns the states they had."""
    old_cpu = torch.default_generator.get_state()
    torch.default_generator.set_state(cpu)
    old_cuda = None
    if cuda is not None:
        old_cuda = torch.cuda.get_rng_state(device)
        torch.cuda.set_rng_state(cuda, device)
    return old_cpu, old_cuda


class _Unbatchable(Exception):
    """A dropout-family module could not split a batch of passes into one part per pass."""


def _pass_dim(m: nn.Module) -> Optional[int]:
    """The dimension along which a batch of passes reaches the dropout-family module `m`, one
    equal part per pass, or None for modules whose inputs cannot be split so (RNNs)."""
    if isinstance(m, LockedDropout):
        return 0 if m.batch_first else 1
    if isinstance(m, nn.RNNBase) or (
        isinstance(m, WeightDropout) and isinstance(m.module, nn.RNNBase)
    ):
        return None
    return 0


def _concat(parts: List[Any], dim: int) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim)
    if isinstance(first, tuple):  # PatchDropout's (out, keep_indices)
        return tuple(_concat(list(p), dim) for p in zip(*parts))
    if first is None:
        return None
    raise _Unbatchable(f"an output of type {type(first).__name__}")


def _per_pass(
    module: nn.Module,
    forward: Callable,
    dim: int,
    passes: List[_PassKeys],
    device: torch.device,
    running: List[Optional[_PassKeys]],
) -> Callable:
    """`module`'s forward for a batch of passes: each pass's part of the input, alone and
    keyed by that pass (its fork for fastdrop's modules, its torch state for everything the
    part runs), so the batch computes what the passes one at a time would. ``running[0]`` is
    the pass whose part is running: a dropout module inside another's part (a dropout inside
    a `WeightDropout`) gets only that pass's input, and draws as that pass without splitting."""
    draws_from_fork = isinstance(module, _FASTDROP_FAMILY)

    def run(*args, **kwargs):
        inside = running[0]
        if inside is not None:
            if draws_from_fork:
                module.generator = inside.fork  # type: ignore[assignment]
            return forward(*args, **kwargs)
        k = len(passes)
        x = args[0] if args else None  # an input passed by keyword is not split
        if not isinstance(x, torch.Tensor) or x.ndim <= dim or x.shape[dim] % k:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise _Unbatchable(
                f"{type(module).__name__} received {shape}, which does not split into {k} "
                f"equal parts along dimension {dim}"
            )
        outs = []
        for keys, part in zip(passes, x.split(x.shape[dim] // k, dim)):
            if draws_from_fork:
                module.generator = keys.fork  # type: ignore[assignment]
            running[0] = keys
            try:
                with keys.torch_rng(device):
                    outs.append(forward(part, *args[1:], **kwargs))
            finally:
                running[0] = None
        if getattr(module, "inplace", False):
            return x  # each part was written in place
        return _concat(outs, dim)

    return run


@contextlib.contextmanager
def _keyed(model: nn.Module, passes: List[_PassKeys], device: torch.device):
    """Keys one forward of `model` over ``len(passes)`` passes stacked along dimension 0: each
    dropout-family module runs once per pass on that pass's part of its input, fastdrop's
    drawing from the pass's fork and the others from torch's generator in the pass's state.
    Modules that cannot split (RNNs with dropout, `WeightDropout` of an RNN) draw once for
    the whole batch: fastdrop's from the first pass's fork, torch's from a state seeded apart
    from the passes'."""
    family = [m for m in model.modules() if _is_dropout_module(m)]
    ours = [m for m in family if isinstance(m, _FASTDROP_FAMILY)]
    saved_generators = [m.generator for m in ours]
    wrapped: List[Tuple[nn.Module, Any]] = []
    running: List[Optional[_PassKeys]] = [None]
    first = passes[0]
    try:
        for m in ours:
            m.generator = first.fork  # type: ignore[assignment]
        if len(passes) == 1:
            with first.torch_rng(device):
                yield
            return
        for module in family:
            dim = _pass_dim(module)
            if dim is not None:
                wrapped.append((module, module.__dict__.get("forward")))
                split = _per_pass(module, module.forward, dim, passes, device, running)
                module.forward = split  # type: ignore[method-assign]
        seed, stream, _ = first.fork.get_state()
        ambient = _torch_states(hash((seed, stream, 1)), device)
        saved = _swap_torch_states(*ambient, device)
        try:
            yield
        finally:
            _swap_torch_states(*saved, device)
    finally:
        for module, own in wrapped:
            if own is None:
                del module.forward
            else:
                module.forward = own  # type: ignore[method-assign]
        for m, g in zip(ours, saved_generators):
            m.generator = g


class _Allocations(TorchDispatchMode):
    """Counts the bytes of every tensor that torch's operators allocate (outputs that are not
    views of, or written into, an input): an upper bound on what a forward adds at once."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        if schema is None or all(r.alias_info is None for r in schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


@contextlib.contextmanager
def _counting_family_outputs(model: nn.Module, meter: _Allocations):
    """Adds to `meter` the outputs of the dropout-family modules that do not write in place:
    in a batch each is made of one part per pass and copied once more to join them."""

    def count(module, args, out):
        meter.bytes += sum(
            t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
        )

    handles = [
        m.register_forward_hook(count)
        for m in model.modules()
        if _is_dropout_module(m) and not getattr(m, "inplace", False)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _budget(memory_budget: Optional[int], device: torch.device) -> int:
    if memory_budget is not None:
        return memory_budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + unused) * MC_SAMPLE_CUDA_FRACTION)
    return MC_SAMPLE_CPU_BUDGET


class _Progress:
    """tqdm when installed, else one rewritten stderr line; shown from the start when forced,
    after `MC_SAMPLE_PROGRESS_DELAY` seconds on a terminal when automatic."""

    def __init__(self, total: int, progress: Optional[bool]):
        self.total, self.done = total, 0
        self.bar: Any = None
        self.enabled = progress is True or (progress is None and sys.stderr.isatty())
        self.delay = 0.0 if progress else MC_SAMPLE_PROGRESS_DELAY
        self.start = time.monotonic()
        self.shown = False
        if self.enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(
                total=total, desc="mc_sample", unit="pass", delay=self.delay, file=sys.stderr
            )

    def update(self, k: int) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and time.monotonic() - self.start >= self.delay:
            self.shown = True
            sys.stderr.write(f"\rmc_sample: {self.done}/{self.total} passes")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.shown:
            sys.stderr.write("\n")


def mc_sample(
    model: nn.Module,
    x: torch.Tensor,
    n: int,
    *,
    generator: Any = None,
    passes_per_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: Optional[bool] = None,
) -> torch.Tensor:
    """Runs `model` on `x` `n` times under `mc_dropout` and returns the outputs stacked on a
    new first dimension, shape (n, *output.shape), for uncertainty estimates.

    Pass i is keyed by ``generator.fork(i)``: fastdrop modules draw from the fork, and torch's
    own dropout modules (and timm's, torchvision's) from torch's generator seeded from it for
    the pass (and restored after). So passes have independent masks and the same seed gives
    the same samples. Without a `generator`, one draw from torch's default generator seeds one,
    so `torch.manual_seed` makes the call reproducible. The modules' own ``generator``
    attributes are not used during the call, and `x` is never written (a dropout module that
    works in place gets a copy).

    Passes run in batches: k passes as one forward on k copies of `x` stacked along dimension
    0 (the model must keep that dimension as its batch, as most do). Inside a batch every
    dropout-family module runs once per pass on that pass's part of its input, keyed by that
    pass, so a pass computes the same masks batched or alone (values after a matrix product
    may differ in the last bits, as the product of a larger batch rounds differently). That
    holds for the dropout-family modules `mc_dropout` knows; other random draws in the model,
    and RNNs with dropout (whose inputs cannot be split by pass; the automatic choice runs them
    one pass at a time) draw once for a whole batch.

    Args:
        model: a torch module; its train/eval modes are restored on return.
        x: the input, a tensor.
        n: how many passes, at least 1.
        generator: a `fastdrop.Generator`, or None.
        passes_per_batch: passes per forward. None (default) chooses: pass 0 runs alone,
            counting the bytes torch's operators allocate in it, plus a copy of `x` and of
            each dropout module's output (a batch joins the passes' parts of those), and the
            other passes run as many to a batch as fit `memory_budget`. One pass at a time
            when the model holds an RNN with dropout (its input cannot be split by pass) or
            its output does not keep `x`'s first dimension, or when a module meets an input
            that does not split into one part per pass (a dropout on a tensor without a batch
            dimension). An int k forces k passes per forward (the last batch smaller).
        memory_budget: bytes one batch may allocate, for ``passes_per_batch=None``. Default:
            `MC_SAMPLE_CPU_BUDGET` (16 MiB) on the CPU; on CUDA `MC_SAMPLE_CUDA_FRACTION`
            (half) of the device's free memory after pass 0. A pass larger than the budget
            still runs, alone.
        progress: a progress bar on stderr (tqdm if installed, else a line of text). None
            (default): when stderr is a terminal and the run has lasted
            `MC_SAMPLE_PROGRESS_DELAY` (2) seconds; True: always, from the start; False: never.

    Gradients are recorded as the caller's grad mode says; wrap the call in
    ``torch.no_grad()`` to save memory (the memory estimate counts what a forward allocates,
    which is what it keeps for backward too).

    Raises:
        TypeError: `n`, `passes_per_batch` or `memory_budget` not an int, `progress` not a
            bool or None, `generator` not a `fastdrop.Generator` or None, `x` not a tensor.
        ValueError: `n`, `passes_per_batch` or `memory_budget` below 1, both
            `passes_per_batch` and `memory_budget` given, or ``passes_per_batch > 1`` for a
            model whose dropout modules cannot split a batch into one part per pass.
    """
    n = F._check_int(n, "n", 1)
    if passes_per_batch is not None:
        passes_per_batch = F._check_int(passes_per_batch, "passes_per_batch", 1)
    if memory_budget is not None:
        memory_budget = F._check_int(memory_budget, "memory_budget", 1)
        if passes_per_batch is not None:
            raise ValueError(
                "mc_sample: give passes_per_batch or memory_budget, not both (the budget "
                "chooses passes_per_batch)"
            )
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
    if generator is not None and not isinstance(generator, F._core.Generator):
        raise TypeError(
            f"generator must be a fastdrop.Generator or None, got {type(generator).__name__}"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if generator is None:
        generator = F._core.Generator(int(torch.empty((), dtype=torch.int64).random_()))
    device = x.device
    family = [m for m in model.modules() if _is_dropout_module(m)]
    splittable = x.ndim > 0 and all(_pass_dim(m) is not None for m in family)
    # A dropout that writes in place may be handed x itself: each pass gets its own copy, so
    # passes do not compound and the caller's x stays as it was (a batch copies x anyway).
    writes_in_place = any(getattr(m, "inplace", False) for m in family)
    outputs: List[torch.Tensor] = []
    bar = _Progress(n, progress)

    def run(start: int, k: int) -> None:
        passes = [_PassKeys(generator, i, device) for i in range(start, start + k)]
        with _keyed(model, passes, device):
            if k == 1:
                outputs.append(model(x.clone() if writes_in_place else x))
                return
            y = model(torch.cat([x] * k, dim=0))
        if not isinstance(y, torch.Tensor) or y.ndim == 0 or y.shape[0] % k:
            raise _Unbatchable(f"the model's output {_describe(y)} does not split by pass")
        outputs.extend(y.reshape((k, -1) + tuple(y.shape[1:])).unbind(0))

    try:
        with mc_dropout(model):
            k = passes_per_batch
            i = 0
            if k is None:
                # Pass 0 alone, measured: how many more fit the budget?
                meter = _Allocations()
                if splittable and n > 1:
                    with meter, _counting_family_outputs(model, meter):
                        run(0, 1)
                else:
                    run(0, 1)
                bar.update(1)
                i = 1
                y0 = outputs[0]
                batchable = (
                    splittable
                    and isinstance(y0, torch.Tensor)
                    and y0.ndim > 0
                    and y0.shape[0] == x.shape[0]
                )
                per_pass = meter.bytes + x.numel() * x.element_size()
                k = max(1, _budget(memory_budget, device) // max(per_pass, 1)) if batchable else 1
            while i < n:
                step = min(k, n - i)
                try:
                    run(i, step)
                except _Unbatchable as e:
                    if passes_per_batch is not None:
                        raise ValueError(
                            f"mc_sample: passes_per_batch={passes_per_batch} needs the model to "
                            f"keep the passes along dimension 0, but {e}; pass "
                            "passes_per_batch=1"
                        ) from None
                    step = k = 1  # the passes of the failed batch rerun one at a time
                    run(i, 1)
                bar.update(step)
                i += step
    finally:
        bar.close()
    return torch.stack(outputs)


def _describe(y: Any) -> str:
    if isinstance(y, torch.Tensor):
        return f"of shape {tuple(y.shape)}"
    return f"of type {type(y).__name__}"


# --- replace_dropout: timm's PatchDropout and torchvision's modules ----------------------------


def _family_equivalent(module: Any) -> Optional[nn.Module]:
    """fastdrop's module for timm's PatchDropout and torchvision's StochasticDepth /
    DropBlock2d / DropBlock3d (by class path, neither library imported), or None."""
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name == "timm.layers.patch_dropout.PatchDropout":
        # timm before 1.0 gave PatchDropout itself a return_indices argument.
        return PatchDropout(
            module.prob,
            module.num_prefix_tokens,
            module.ordered,
            getattr(module, "return_indices", False),
        )
    if name == "timm.layers.patch_dropout.PatchDropoutWithIndices":
        return PatchDropout(module.prob, module.num_prefix_tokens, module.ordered, True)
    if name == "torchvision.ops.stochastic_depth.StochasticDepth":
        return StochasticDepth(module.p, module.mode)
    if name == "torchvision.ops.drop_block.DropBlock2d":
        return TorchvisionDropBlock2d(module.p, module.block_size, module.inplace, module.eps)
    if name == "torchvision.ops.drop_block.DropBlock3d":
        return DropBlock3d(module.p, module.block_size, module.inplace, module.eps)
    return None
