"""Post-hoc EMA math against ema-pytorch's independent implementation of EDM2 (KarrasEMA, solve_weights) and
against closed forms: sigma_rel <-> gamma, the power-function profile, the least-squares rebuild."""

import math

import numpy as np
import pytest
import torch

from sdlight.stages.posthoc_ema import (PowerEMA, find_snapshots, gamma_to_sigma_rel, power_beta, save_snapshot,
                                        sigma_rel_to_gamma, solve_coefficients, synthesize)

ema_pytorch = pytest.importorskip("ema_pytorch")
from ema_pytorch.post_hoc_ema import KarrasEMA, solve_weights  # noqa: E402
from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma as reference_gamma  # noqa: E402


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2])
def test_gamma_matches_the_reference_and_inverts(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(reference_gamma(sigma_rel), rel=1e-12)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    # EDM2's examples: sigma_rel 0.05 -> gamma 16.97, 0.10 -> 6.94
    assert {0.05: 16.97, 0.10: 6.94}.get(sigma_rel, gamma) == pytest.approx(gamma, abs=0.01)


def test_profile_std_is_sigma_rel_in_closed_form():
    """The profile t^gamma on [0, 1], normalised, has std sigma_rel (the definition sigma_rel_to_gamma solves)."""
    gamma = sigma_rel_to_gamma(0.08)
    t = np.linspace(0, 1, 2_000_001)
    p = t ** gamma
    p /= np.trapezoid(p, t)
    mean = np.trapezoid(t * p, t)
    assert math.sqrt(np.trapezoid((t - mean) ** 2 * p, t)) == pytest.approx(0.08, rel=1e-4)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(bad)


def test_power_ema_equals_ema_pytorch_step_for_step():
    """ema-pytorch's n-th update decays by beta(n + 1) where EDM2's training loop (and ours) uses beta(n), n the
    steps done (EDM2: t_next = cur_nimg after the step); with our step shifted by one the two agree exactly."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    reference = [KarrasEMA(net, sigma_rel=s, update_every=1) for s in (0.05, 0.10)]
    ours = PowerEMA([0.05, 0.10])
    for step in range(1, 40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        for r in reference:
            r.update()
        ours.update(dict(net.state_dict()), step + 1)
    for r, average in zip(reference, ours.averages):
        for name, value in r.ema_model.state_dict().items():
            torch.testing.assert_close(average[name], value, rtol=1e-6, atol=1e-6)


def test_power_ema_weights_follow_the_power_profile():
    """The EMA of the sequence w_i = e_i (one-hot per step) gives each step's weight: ~ i^gamma, normalised."""
    steps, gamma = 200, sigma_rel_to_gamma(0.1)
    ema = PowerEMA([0.1, 0.05])
    for i in range(1, steps + 1):
        ema.update({"w": torch.nn.functional.one_hot(torch.tensor(i - 1), steps).double()}, i)
    weights = ema.averages[0]["w"].numpy()
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    exact = np.arange(1, steps + 1, dtype=np.float64) ** gamma
    exact /= exact.sum()
    assert np.abs(weights - exact).max() < 0.02 * exact.max()  # the update's discrete form of t^gamma
    assert power_beta(1, gamma) == 0.0  # the first update copies


def test_coefficients_equal_ema_pytorch_solve():
    steps = [100, 100, 200, 200, 300, 300, 400, 400]
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10) * 4]
    target = sigma_rel_to_gamma(0.07)
    ours, error = solve_coefficients(steps, gammas, 400, target)
    reference = solve_weights(torch.tensor(steps), torch.tensor(gammas), torch.tensor([400]),
                              torch.tensor([target])).numpy()[:, 0]
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-8)
    assert 0 < error < 0.05


def test_a_stored_profile_is_rebuilt_exactly(tmp_path):
    """Asking for a sigma_rel that was kept, at a snapshot's step, gives that snapshot's weights (coefficient 1)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = PowerEMA([0.05, 0.10])
    for step in range(1, 31):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update(dict(net.state_dict()), step)
        if step % 10 == 0:
            for s, average in zip(ema.sigma_rels, ema.averages):
                save_snapshot(tmp_path, s, step, average)
    snapshots = find_snapshots(tmp_path)
    assert [(s.step, s.sigma_rel) for s in snapshots][:2] == [(10, 0.05), (10, 0.10)] and len(snapshots) == 6
    rebuilt = synthesize(snapshots, 0.10)
    assert rebuilt.error < 1e-6
    torch.testing.assert_close(rebuilt.tensors["weight"], ema.averages[1]["weight"], rtol=1e-6, atol=1e-6)
    earlier = synthesize(snapshots, 0.05, step=20)
    assert max(s.step for s, _ in earlier.coefficients) == 20
    with pytest.raises(ValueError, match="no snapshot at step 25"):
        synthesize(snapshots, 0.05, step=25)
