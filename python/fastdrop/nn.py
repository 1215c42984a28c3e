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

from torch import nn

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


class Dropout(nn.Dropout):
    """`torch.nn.Dropout`, computed by `fastdrop.dropout`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__(p, inplace)
        self.generator = generator

    def forward(self, input):
        return F.dropout(input, self.p, self.training, self.inplace, generator=self.generator)


class Dropout1d(nn.Dropout1d):
    """`torch.nn.Dropout1d`, computed by `fastdrop.dropout1d`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__(p, inplace)
        self.generator = generator

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
        self.generator = generator
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
        self.generator = generator
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
        self.generator = generator

    def forward(self, input):
        return F.alpha_dropout(input, self.p, self.training, self.inplace, generator=self.generator)


class FeatureAlphaDropout(nn.FeatureAlphaDropout):
    """`torch.nn.FeatureAlphaDropout`, computed by `fastdrop.feature_alpha_dropout`."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, generator: Any = None):
        super().__init__(p, inplace)
        self.generator = generator

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
        F._check_prob(drop_prob, "drop_prob")  # at construction, as torch's modules check p
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep
        self.generator = generator

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
        F._check_prob(drop_prob, "drop_prob")
        self.drop_prob = drop_prob
        self.block_size = block_size
        self.gamma_scale = gamma_scale
        self.with_noise = with_noise
        self.inplace = inplace
        self.couple_channels = couple_channels
        self.scale_by_keep = scale_by_keep
        self.generator = generator
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
    return None


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
