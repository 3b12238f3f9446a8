"""Load-aware draft length: the argmin on synthetic cost curves (values worked by hand in comments)."""

import pytest

from fedge.sampling import SamplingParams
from fedge.speculative import (
    CostCurve,
    DraftLengthController,
    cloud_cost_per_token,
    expected_tokens_per_round,
    speculative_generate,
)


def _controller(curve, load, a, draft_s=0.001, rtt_s=0.04, **kw):
    c = DraftLengthController(k_max=8, cost_curve=curve, load=load, rtt_s=rtt_s, **kw)
    c.draft_s = draft_s
    c.accepted, c.rejected, c.acceptance_prior = a * 1e6, (1 - a) * 1e6, (0.0, 0.0)
    return c


def test_cost_curve_interpolates_and_rejects_bad_input():
    curve = CostCurve((1, 16, 64), (0.05, 0.06, 0.30))
    assert curve(1) == pytest.approx(0.05)
    assert curve(24) == pytest.approx(0.10)  # 0.06 + 8 * 0.24 / 48
    assert curve(80) == pytest.approx(0.38)  # extrapolated along the last segment
    for bad in [((1,), (0.1,)), ((4, 2), (0.1, 0.2)), ((1, 2), (0.1,)), ((1, 2), (-1.0, 0.2))]:
        with pytest.raises(ValueError):
            CostCurve(*bad)
    # share of a forward over 8 sessions x 2 positions, over E[tokens] = 1.8 at a = 0.8, k = 1
    assert cloud_cost_per_token(curve, 8, 0.8, 1) == pytest.approx(0.06 / 8 / 1.8)


def test_flat_curve_drafts_long():
    # memory-bound verifier: a wider forward costs nothing more, so every extra draft is free tokens
    assert _controller(CostCurve((1, 64), (0.1, 0.1)), load=8, a=0.9).choose() == 8


def test_compute_bound_curve_drafts_short():
    # C(n) = 0.01 n: cost per token 0.01 (k + 1) / E(k) grows with k at a = 0.5 (k=1: .0133, k=2: .0171)
    assert _controller(CostCurve((1, 100), (0.01, 1.0)), load=8, a=0.5).choose() == 1


def test_load_shrinks_k():
    # flat up to 16 positions, then steep. load 2: k=7 fills 16 positions (cost/token .0072 vs k=6 .0074,
    # k=8 .0081); load 8: 8 (k + 1) positions leave the flat part at k = 1 (k=1 .0042, k=2 .0051)
    curve = CostCurve((1, 16, 64), (0.05, 0.06, 0.30))
    assert _controller(curve, load=2, a=0.8, draft_s=0.005).choose() == 7
    assert _controller(curve, load=8, a=0.8, draft_s=0.005).choose() == 1


def test_long_round_trip_lengthens_k_for_latency():
    # C(n) = 0.01 n, a = 0.5, rtt 1 s: latency per token (k ds + rtt + .08 (k + 1)) / E(k) is least at
    # k = 3 (.7056; k=2 .7097, k=4 .7247); with no slack the phone's latency decides
    curve = CostCurve((1, 100), (0.01, 1.0))
    assert _controller(curve, load=8, a=0.5, rtt_s=1.0, latency_slack=1.0).choose() == 3
    assert _controller(curve, load=8, a=0.5, rtt_s=0.04, latency_slack=1.0).choose() == 1


def test_round_trip_learned_and_curve_taken_from_the_verifier(tiny):
    from fedge.edge.drafter import Drafter
    from fedge.verifier_session import TargetVerifierSession

    c = DraftLengthController()
    c.record(4, 4, draft_s=0.02, verify_s=0.1, round_trip_s=0.15)
    assert c.rtt_s == pytest.approx(0.05)
    model, tokenizer = tiny
    prompt = tokenizer("def f(x):")["input_ids"]
    verifier = TargetVerifierSession(model, prompt, SamplingParams())
    verifier.cost_curve, verifier.load = CostCurve((1, 100), (0.01, 1.0)), 8
    controller = DraftLengthController(k_max=6)
    result = speculative_generate(Drafter(model, prompt, SamplingParams()), verifier, 12, controller)
    assert controller.cost_curve is verifier.cost_curve and controller.load == 8
    # the draft is the target (a -> 1): after the first round k is the load-aware choice, not the default
    assert result.stats.ks[1:] and all(k == controller.choose_for_load(min(controller.acceptance, 0.999))
                                       for k in result.stats.ks[1:-1])
    assert expected_tokens_per_round(0.5, 1) == pytest.approx(1.5)


def test_cost_curve_measured_on_a_real_model(tiny):
    from fedge.cloud.cost_curve import measure_cost_curve

    model, _ = tiny
    curve = measure_cost_curve(model, sessions=(1, 2), widths=(1, 3), context=8, repeats=1)
    assert curve.positions == (1, 2, 3, 6)
    assert all(b >= a > 0 for a, b in zip(curve.seconds, curve.seconds[1:], strict=False))
    with pytest.raises(ValueError):
        measure_cost_curve(model, sessions=(1,), widths=(1,))


def test_heavier_load_picks_smaller_k_on_the_verifiers_measured_curve(tiny):
    from fedge.cloud.cost_curve import LiveCostCurve
    from fedge.cloud.engine import Limits, VerifierEngine
    from fedge.models import model_fingerprint, tokenizer_fingerprint

    model, tok = tiny
    engine = VerifierEngine(model, model_fingerprint(model), tokenizer_fingerprint(tok), Limits())
    measured = engine.measure_costs(sessions=(1, 4, 16), widths=(1, 5, 9), context=16, repeats=3)
    assert isinstance(engine.costs, LiveCostCurve) and engine.info().cost_positions == measured.positions
    # served forwards then show the machine saturating past 80 positions: narrow ones cost what was
    # measured, wide batches 50x that
    for _ in range(20):
        engine.costs.observe(4, measured(4))
        engine.costs.observe(16, measured(16))
        engine.costs.observe(144, 50 * measured(144))
    curve = engine.costs.curve()
    assert curve(144) > 10 * measured(144) and curve.positions == measured.positions
    light = _controller(curve, load=1, a=0.9, draft_s=0.0005, rtt_s=0.01).choose()
    heavy = _controller(curve, load=16, a=0.9, draft_s=0.0005, rtt_s=0.01).choose()
    assert heavy < light, (light, heavy, curve)
