"""Keyed draws: a sample's numbers depend on (seed, step, its index) only, not on the batch it shares or its place
in it; its successive draws continue one stream; a draw without the batch as first dimension is refused."""

import numpy as np
import pytest
import torch

from sdlight.data.resumable import item_seed
from sdlight.diffusion.draw import KeyedDraws, mixed_seed


def _draws(draws):
    return draws.normal((len(draws.rows), 2, 3)), draws.uniform((len(draws.rows),)), draws.integers(1000, (len(draws.rows),))


def test_a_samples_draws_do_not_depend_on_its_batch():
    whole = _draws(KeyedDraws(7, 3, [4, 9, 2, 5]))
    halves = [_draws(KeyedDraws(7, 3, rows)) for rows in ([4, 2], [9, 5])]  # two ranks' shares of the batch
    for k in range(3):
        torch.testing.assert_close(whole[k][[0, 2]], halves[0][k], rtol=0, atol=0)
        torch.testing.assert_close(whole[k][[1, 3]], halves[1][k], rtol=0, atol=0)


def test_each_row_is_its_own_seeded_stream():
    draws = KeyedDraws(7, 3, [4])
    g = torch.Generator().manual_seed(mixed_seed(7, 3, 4))
    first, second = torch.randn((2, 3), generator=g), torch.rand((), generator=g)
    assert torch.equal(draws.normal((1, 2, 3))[0], first) and torch.equal(draws.uniform((1,))[0], second)
    other_step, other_seed = KeyedDraws(7, 4, [4]).normal((1, 8)), KeyedDraws(8, 3, [4]).normal((1, 8))
    assert not torch.equal(other_step, KeyedDraws(7, 3, [4]).normal((1, 8)))
    assert not torch.equal(other_seed, KeyedDraws(7, 3, [4]).normal((1, 8)))
    assert KeyedDraws(7, 3, torch.tensor([4])).normal((1, 2), dtype=torch.float64).dtype == torch.float64


def test_seeds_mix_all_keys_and_the_data_seed_is_unchanged():
    seeds = {mixed_seed(s, t, i) for s in range(3) for t in range(3) for i in range(3)}
    assert len(seeds) == 27 and all(0 <= x < 2**63 for x in seeds)
    # the per-item data seed (crops, flips) keeps its values: the same SeedSequence as before the helper
    expected = int(np.random.SeedSequence([5, 1, 9]).generate_state(2, np.uint64)[0] >> np.uint64(1))
    assert item_seed(5, 1, 9) == expected


def test_a_draw_without_the_batch_first_is_refused():
    with pytest.raises(ValueError, match="batch as their first dimension"):
        KeyedDraws(0, 0, [1, 2]).normal((3, 4))
