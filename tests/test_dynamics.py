import math

import numpy as np
import pytest

from hf_cpt.callbacks.rewarm import RewarmConfig, lr_multiplier
from hf_cpt.dynamics import (
    DynamicsLaw,
    LossLaw,
    PilotCurve,
    annealing_area,
    bootstrap_dynamics,
    fit_dynamics,
    forward_area,
    predict_band,
    predict_curves,
)

GENERAL = LossLaw(floor=2.0, scale=30.0, exponent=0.5, anneal=2e-3, shift=0.6, shift_exp=0.8, shift_rate=0.05,
                  pretrain_area=50.0)
DOMAIN = LossLaw(floor=1.5, scale=60.0, exponent=0.5, anneal=3e-3, shift=-2.0, shift_exp=0.6, shift_rate=0.02,
                 pretrain_area=50.0)
SHARES = (1.0, 0.5)


def law_at(share):
    """The true law at a domain share: the shift shrinks and slows with replay."""
    g = LossLaw(**{**vars(GENERAL), "shift": GENERAL.shift * share ** 1.5, "shift_rate": 0.05 * share})
    d = LossLaw(**{**vars(DOMAIN), "shift": DOMAIN.shift * share ** 0.7, "shift_rate": 0.02 * share ** 2})
    return DynamicsLaw(g, d, momentum=0.95, lr_unit=1e-3, lr_before=3e-4, domain_share=share)


TRUE = [law_at(p) for p in SHARES]


def lrs(kind, steps=400, peak=1e-3):
    cfg = {"constant": RewarmConfig(schedule="constant", warmup_steps=10),
           "cosine": RewarmConfig(schedule="rewarm", warmup_steps=10, min_lr_ratio=0.1),
           "wsd": RewarmConfig(schedule="wsd", warmup_steps=10, decay="linear", decay_steps=steps // 5,
                               min_lr_ratio=0.1)}[kind]
    return [peak * lr_multiplier(s, cfg, steps) for s in range(steps)]


def pilot(kind, share, noise=0.0, rng=None, steps=400):
    lr = lrs(kind, steps)
    at = list(range(0, steps + 1, steps // 20))
    g, d = predict_curves(TRUE, lr, share, at)
    if noise:
        g, d = g + noise * rng.standard_normal(len(g)), d + noise * rng.standard_normal(len(d))
    return PilotCurve(f"{kind}-{share}", kind, tuple(lr), share, tuple(at), tuple(map(float, g)),
                      tuple(map(float, d)))


def test_areas_against_a_naive_loop():
    rng = np.random.default_rng(0)
    eta = rng.uniform(0, 2e-3, 37)
    s1, s2, m, prev = [0.0], [0.0], 0.0, 5e-4
    for e in eta:
        m = 0.9 * m + (prev - e)
        prev = e
        s1.append(s1[-1] + e / 1e-3)
        s2.append(s2[-1] + m / 1e-3)
    np.testing.assert_allclose(forward_area(eta, 1e-3), s1, rtol=1e-12)
    np.testing.assert_allclose(annealing_area(eta, 0.9, 5e-4, 1e-3), s2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(annealing_area(eta, 0.0, 5e-4), np.concatenate([[0], np.cumsum(
        np.concatenate([[5e-4], eta[:-1]]) - eta)]), atol=1e-15)
    # a re-warm from a decayed checkpoint is negative annealing: the loss bump at the start of CPT
    assert annealing_area([0.0, 1e-3, 1e-3], 0.9, lr_before=1e-4)[-1] < 0


def test_law_reproduces_the_formula_at_every_step():
    lr = lrs("wsd", 53)
    law = law_at(0.5)
    g, d = law.predict(lr)
    s1, s2 = forward_area(lr, 1e-3), annealing_area(lr, 0.95, 3e-4, 1e-3)
    for k in (0, 1, 17, 52, 53):
        for p, got in ((law.general, g), (law.domain, d)):
            want = (p.floor + p.scale * (p.pretrain_area + s1[k]) ** -p.exponent - p.anneal * s2[k]
                    + p.shift * (1 - (1 + p.shift_rate * s1[k]) ** -p.shift_exp))
            assert got[k] == pytest.approx(want, rel=1e-12)
    # between fitted shares: linear interpolation of the two curves; outside: refused
    g75, d75 = predict_curves(TRUE, lr, 0.75)
    g1, d1 = law_at(1.0).predict(lr)
    np.testing.assert_allclose(g75, (g + g1) / 2, rtol=1e-12)
    np.testing.assert_allclose(d75, (d + d1) / 2, rtol=1e-12)
    with pytest.raises(ValueError, match=r"replay ratio 0.75 is outside the pilots' replay ratios \[0, 0.5\]"):
        predict_curves(TRUE, lr, 0.25)


@pytest.mark.slow  # many law fits (~24 s under load)
def test_fit_recovers_known_parameters_within_5_percent():
    pilots = [pilot(k, p, steps=n) for k in ("constant", "cosine") for p in SHARES for n in (200, 400)]
    # the synthetic laws share their continued-pretraining curve: fitted that way, every parameter is identified
    fit = fit_dynamics(pilots, pretrain_area=50.0, lr_before=3e-4, shared_curve=True)
    assert fit.shares == [0.5, 1.0] and fit.rmse_general < 1e-4 and fit.rmse_domain < 1e-4
    for law, true in zip(fit.laws, [law_at(0.5), law_at(1.0)]):
        assert law.momentum == 0.95 and law.domain_share == true.domain_share
        for got, want in ((law.general, true.general), (law.domain, true.domain)):
            for name, value in vars(want).items():
                assert getattr(got, name) == pytest.approx(value, rel=0.05), name
    # a held-out schedule (WSD) at a fitted share and between shares
    for share in (0.5, 0.75):
        g, d = fit.predict(lrs("wsd"), share)
        tg, td = predict_curves(TRUE, lrs("wsd"), share)
        assert np.abs(g - tg).max() < 1e-3 and np.abs(d - td).max() < 1e-3
    # the default fits every ratio on its own: more freedom, the same curves
    per_ratio = fit_dynamics(pilots, pretrain_area=50.0, lr_before=3e-4)
    assert not per_ratio.shared_curve and per_ratio.rmse_general < 1e-3 and per_ratio.rmse_domain < 1e-3
    g, d = per_ratio.predict(lrs("wsd"), 0.5)
    tg, td = predict_curves(TRUE, lrs("wsd"), 0.5)
    assert np.abs(g - tg).max() < 5e-3 and np.abs(d - td).max() < 5e-3


@pytest.mark.slow  # bootstrap law fits (~27 s under load)
def test_noisy_pilots_predict_a_heldout_wsd_run_and_give_a_band():
    rng = np.random.default_rng(0)
    pilots = [pilot(k, p, noise=0.005, rng=rng, steps=n) for k in ("constant", "cosine") for p in SHARES
              for n in (200, 400)]
    fit = fit_dynamics(pilots, lr_before=3e-4)  # pretraining area unknown: fitted
    assert fit.fitted_pretrain_area and 0.003 < fit.rmse_general < 0.007
    g, d = fit.predict(lrs("wsd"), 0.5)
    tg, td = predict_curves(TRUE, lrs("wsd"), 0.5)
    assert np.abs(g - tg).max() < 0.02 and np.abs(d - td).max() < 0.02
    samples = bootstrap_dynamics(fit, samples=6, seed=1)
    assert 1 <= len(samples) <= 6 and all(len(s) == 2 for s in samples)
    band = predict_band(samples, lrs("wsd"), 0.5, steps=[0, 200, 400])
    assert np.all(band["general_lo"] <= band["general_hi"]) and np.all(band["domain_hi"] - band["domain_lo"] > 0)
    assert np.isnan(predict_band([], lrs("wsd"), 0.5)["general_lo"]).all()


def test_bad_pilots_are_refused_with_the_reason():
    good = [pilot(k, p) for k in ("constant", "cosine") for p in (1.0, 0.5)]
    with pytest.raises(ValueError, match="1 pilot run"):
        fit_dynamics(good[:1])
    with pytest.raises(ValueError, match=r"at replay ratio 0 use one LR schedule only \(constant\).*add e.g. a "
                                         "constant and a cosine"):
        fit_dynamics([p for p in good if p.schedule == "constant" or p.domain_share == 0.5])
    few = [PilotCurve(p.name, p.schedule, p.lrs, p.domain_share, p.steps[:3], p.general[:3], p.domain[:3])
           for p in good]
    with pytest.raises(ValueError, match="too few evaluations at replay ratio 0.5: 4 after step 0"):
        fit_dynamics(few)
    nan = PilotCurve("x", "cosine", good[1].lrs, 1.0, good[1].steps, (math.nan,) + good[1].general[1:],
                     good[1].domain)
    with pytest.raises(ValueError, match="pilot 'x' `general` holds nan"):
        fit_dynamics([good[0], nan])
    beyond = PilotCurve("y", "cosine", good[1].lrs[:100], 1.0, good[1].steps, good[1].general, good[1].domain)
    with pytest.raises(ValueError, match=r"pilot 'y': `steps` must increase within \[0, 100\]"):
        fit_dynamics([good[0], beyond])
    flat = [PilotCurve(p.name, p.schedule, p.lrs, p.domain_share, p.steps, (3.0,) * len(p.steps), p.domain)
            for p in good]
    with pytest.raises(ValueError, match="general held-out loss does not change at replay ratio 0"):
        fit_dynamics(flat)
    with pytest.raises(ValueError, match="`pretrain_area` must be > 0"):
        fit_dynamics(good, pretrain_area=-1.0)
    with pytest.raises(ValueError, match="`momenta`"):
        fit_dynamics(good, momenta=[1.0])
    one_share = [pilot(k, 0.5) for k in ("constant", "cosine")]
    fit = fit_dynamics(one_share, pretrain_area=50.0, lr_before=3e-4, momenta=[0.95])
    fit.predict(lrs("wsd"), 0.5)
    with pytest.raises(ValueError, match=r"replay ratio 0.25 is outside the pilots' replay ratios \[0.5, 0.5\]"):
        fit.predict(lrs("wsd"), 0.75)
    with pytest.raises(ValueError, match="`steps` must lie in"):
        fit.predict(lrs("constant", 20), 0.5, steps=[21])
