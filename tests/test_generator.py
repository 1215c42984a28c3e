"""fastdrop.Generator: seeding, state save/replay, forks, pickling and the default generator."""

from __future__ import annotations

import pickle

import fastdrop
import numpy as np
import pytest
from fastdrop import Generator

X = np.ones(5000, np.float32)


def draw(g):
    return fastdrop.dropout(X, 0.5, generator=g)


def test_seed_is_readable_and_none_draws_from_the_os():
    assert Generator(123).seed == 123
    seeds = {Generator().seed for _ in range(20)}
    assert len(seeds) == 20


def test_negative_seeds_wrap_like_torch_and_bad_seeds_are_refused():
    assert Generator(-1).seed == 2**64 - 1
    with pytest.raises(ValueError):
        Generator(2**64)
    with pytest.raises(TypeError):
        Generator(1.5)
    with pytest.raises(TypeError):
        Generator("1")


def test_state_replays_the_following_calls():
    g = Generator(5)
    draw(g)
    state = g.get_state()
    a, b = draw(g), draw(g)
    assert g.offset > state[2]
    g.set_state(state)
    np.testing.assert_array_equal(draw(g), a)
    np.testing.assert_array_equal(draw(g), b)
    with pytest.raises(TypeError, match="get_state"):
        g.set_state("nope")


def test_offset_advances_by_what_the_mask_needs_only():
    g = Generator(1)
    fastdrop.dropout(np.ones((8, 16, 5, 5), np.float32), 0.5, generator=g)
    per_element = g.offset
    g2 = Generator(1)
    fastdrop.dropout2d(np.ones((8, 16, 5, 5), np.float32), 0.5, generator=g2)
    assert 0 < g2.offset < per_element


def test_manual_seed_resets_the_default_generator():
    fastdrop.manual_seed(31)
    a = draw(None)
    fastdrop.manual_seed(31)
    np.testing.assert_array_equal(draw(None), a)
    assert fastdrop.default_generator.seed == 31


def test_forks_are_deterministic_and_independent():
    g = Generator(9)
    a, b = draw(g.fork(0)), draw(g.fork(1))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, draw(Generator(9).fork(0)))
    assert not np.array_equal(a, draw(Generator(9)))
    assert g.fork(3).seed == 9 and g.fork(3).stream != 0


def test_pickle_round_trip_keeps_the_state():
    g = Generator(77)
    draw(g)
    h = pickle.loads(pickle.dumps(g))
    assert h.get_state() == g.get_state()
    np.testing.assert_array_equal(draw(h), draw(g))
    assert "seed=77" in repr(g)
