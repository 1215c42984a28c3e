"""The typed call spec (`fastdrop._spec`) and the one door into the core (`_core_call.apply`).

Each public function describes its call as one `Spec`; these tests check the specs they build,
the core's contract for a spec (bits, first block, scale), and that a mask or application the
package does not know is an error on every path rather than being read as another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import fastdrop
import numpy as np
import pytest
from fastdrop import _core, _dispatch
from fastdrop import functional as fd
from fastdrop._core_call import apply
from fastdrop._spec import (
    Affine,
    Bernoulli,
    Blocks,
    Noise,
    Scale,
    ScaleByKept,
    Spec,
    application_args,
    application_from_args,
)


@dataclass(frozen=True)
class Shift:
    """An application fastdrop does not have."""

    kind: ClassVar[str] = "shift"
    by: float


@dataclass(frozen=True)
class Rows:
    """A mask fastdrop does not have."""

    kind: ClassVar[str] = "rows"
    shape: tuple[int, ...]
    keep: float


# --- what the public functions hand the dispatcher ------------------------------------------------


@pytest.fixture
def handed(monkeypatch):
    """The specs the public functions hand `_dispatch.run`, in call order."""
    seen: list = []
    real = fd._run

    def spy(x, spec, *args, **kwargs):
        seen.append(spec)
        return real(x, spec, *args, **kwargs)

    monkeypatch.setattr(fd, "_run", spy)
    return seen


def test_each_variant_is_one_mask_and_one_application(handed):
    x = np.ones((2, 3, 6, 6), np.float32)
    fastdrop.dropout(x, 0.2, return_mask=True)
    fastdrop.alpha_dropout(x, 0.2, training=True)
    fastdrop.dropout2d(x, 0.2)
    # return_mask keeps dropout and drop_path off their direct NumPy paths, which build the
    # same spec but hand it to the core without `_run`.
    fastdrop.drop_path(x, 0.25, True, return_mask=True)
    fastdrop.drop_path(x, 0.25, True, scale_by_keep=False, return_mask=True)
    fastdrop.drop_block_2d(x, 0.2, 3)
    fastdrop.drop_block_2d(x, 0.2, 3, with_noise=True)
    fastdrop.drop_block_2d(x, 0.2, 3, scale_by_keep=False, couple_channels=False)
    fastdrop.embedding_dropout(x[0, 0], 0.5, scale=False)
    d, alpha, d2, path, path_unscaled, block, noisy, plain, emb = handed

    assert d == Spec(Bernoulli((2, 3, 6, 6), 0.8), Scale(1 / 0.8), 1 / 0.8)
    assert type(alpha.mask) is Bernoulli and type(alpha.application) is Affine
    assert alpha.grad_scale == alpha.application.a
    assert alpha.application.shift == pytest.approx(fd.ALPHA * alpha.application.a * 0.2)
    assert alpha.application.dropped == pytest.approx(-fd.ALPHA * alpha.application.a * 0.8)
    assert d2 == Spec(Bernoulli((2, 3, 1, 1), 0.8), Scale(1 / 0.8), 1 / 0.8)
    assert path == Spec(Bernoulli((2, 1, 1, 1), 0.75), Scale(1 / 0.75), 1 / 0.75)
    assert path_unscaled == Spec(Bernoulli((2, 1, 1, 1), 0.75), Scale(1.0), 1.0)
    # DropBlock: timm's seed rate and clipped block on an (N, 1, H, W) map; the scale of kept
    # pixels is counted by the core (grad_scale None), or 1 with noise or without scaling.
    gamma = 0.2 * 36 / 9 / 16
    assert block.mask == Blocks((2, 1, 6, 6), pytest.approx(gamma), 3, 3)
    assert type(block.application) is ScaleByKept and block.grad_scale is None
    assert block.origin is not None and block.origin["block_size"] == 3
    assert noisy.application == Noise(1.0) and noisy.grad_scale == 1.0
    assert plain.mask.shape == (2, 3, 6, 6) and plain.application == Scale(1.0)
    assert emb == Spec(Bernoulli((6, 1), 0.5), Scale(1.0), 1.0)


def test_a_call_that_drops_nothing_hands_no_spec(handed):
    x = np.ones((4, 5), np.float32)
    assert fastdrop.dropout(x, 0.5, training=False) is x
    assert fastdrop.drop_path(x, 0.0, True) is x
    assert handed == [None, None]


def test_specs_are_cached_per_mask_shape_and_p(handed):
    x = np.ones((4, 5, 2, 2), np.float32)
    fastdrop.dropout2d(x, 0.3)
    fastdrop.dropout2d(x.copy(), 0.3)
    fastdrop.dropout2d(x, 0.4)
    assert handed[0] is handed[1] and handed[2] is not handed[0]


# --- the core's contract for a spec ---------------------------------------------------------------


def test_apply_reports_its_counter_block_and_a_generator_there_redraws_the_mask():
    x = np.random.default_rng(0).standard_normal((5, 70)).astype(np.float32)
    spec = Spec(Bernoulli((5, 70), 0.6), Scale(2.5), 2.5)
    gen = fastdrop.Generator(3)
    gen._reserve(7)
    seed, stream, offset = gen.get_state()
    out = np.empty_like(x)
    done = apply(x, out, None, spec, gen, False)
    assert done.bits is None and done.first_block == offset and done.scale == 2.5
    again = np.empty_like(x)
    stored = apply(x, again, None, spec, _core._generator_from_state((seed, stream, offset)), True)
    assert stored.first_block == offset and np.array_equal(out, again)
    kept = np.unpackbits(
        np.frombuffer(stored.bits.to_bytes(), np.uint8), count=x.size, bitorder="little"
    ).reshape(x.shape)
    assert np.array_equal(out != 0, kept.astype(bool))
    # The next call takes the next range: a different mask.
    nxt = apply(x, np.empty_like(x), None, spec, gen, False)
    assert nxt.first_block > offset


def test_a_block_mask_always_comes_back_with_the_scale_the_core_counted():
    x = np.ones((2, 3, 9, 9), np.float32)
    out = np.empty_like(x)
    done = apply(
        x,
        out,
        None,
        Spec(Blocks((2, 1, 9, 9), 0.05, 3, 3), ScaleByKept(), None),
        _core.Generator(1),
        False,
    )
    assert done.bits is not None and tuple(done.bits.shape) == (2, 1, 9, 9)
    kept = done.bits.count_kept()
    assert 0 < kept < 2 * 81
    assert done.scale == pytest.approx(2 * 81 / kept)
    assert set(np.unique(out).tolist()) <= {0.0, np.float32(done.scale)}
    noisy = apply(
        x,
        out,
        None,
        Spec(Blocks((2, 1, 9, 9), 0.05, 3, 3), Noise(1.0), 1.0),
        _core.Generator(1),
        False,
    )
    assert noisy.bits is not None and noisy.scale == 1.0


# --- what the package does not know is an error -------------------------------------------------


def test_an_unknown_application_or_mask_is_refused_before_anything_is_written():
    x = np.ones((4, 8), np.float32)
    for spec in (
        Spec(Bernoulli((4, 8), 0.5), Shift(1.0), 1.0),  # type: ignore[arg-type]
        Spec(Rows((4, 1), 0.5), Scale(2.0), 2.0),  # type: ignore[arg-type]
    ):
        out = np.full_like(x, 7.0)
        with pytest.raises(TypeError):
            apply(x, out, None, spec, fastdrop.Generator(0), False)
        with pytest.raises(TypeError):
            _dispatch.run(x, spec, False, None, False, out=out)
        assert np.all(out == 7.0)


def test_an_unknown_application_is_refused_on_the_torch_paths():
    torch = pytest.importorskip("torch")
    spec = Spec(Bernoulli((4, 8), 0.5), Shift(1.0), 1.0)  # type: ignore[arg-type]
    x = torch.ones(4, 8)
    with pytest.raises(TypeError):
        _dispatch.run(x, spec, True, None, False)
    assert torch.all(x == 1)
    with pytest.raises(TypeError):  # torch's ops on another device: not read as alpha dropout
        _dispatch.run(torch.empty(4, 8, device="meta"), spec, False, None, False)
    with pytest.raises(TypeError):  # the compiled ops' flat arguments
        application_args(spec.application)


@pytest.mark.parametrize(
    "app", [Scale(2.0), ScaleByKept(), Affine(1.5, 0.25, -0.75), Noise(1.0)], ids=repr
)
def test_an_application_crosses_the_custom_ops_flat_and_comes_back_equal(app):
    kind, args = application_args(app)
    assert kind == app.kind and all(type(a) is float for a in args)
    assert application_from_args(kind, args) == app


def test_an_unknown_application_kind_from_flat_arguments_is_an_error():
    with pytest.raises(ValueError, match="unknown fastdrop application kind 'shift'"):
        application_from_args("shift", [1.0])


def test_a_bernoulli_spec_grows_leading_and_trailing_dimensions_and_a_block_one_does_not():
    spec = Spec(Bernoulli((3, 1), 0.7), Scale(1 / 0.7), 1 / 0.7)
    assert spec.with_leading(5) == Spec(Bernoulli((5, 3, 1), 0.7), Scale(1 / 0.7), 1 / 0.7)
    assert spec.with_trailing_one().mask == Bernoulli((3, 1, 1), 0.7)
    block = Spec(Blocks((1, 1, 4, 4), 0.1, 2, 2), ScaleByKept(), None)
    with pytest.raises(TypeError, match="only a Bernoulli mask"):
        block.with_leading(2)
