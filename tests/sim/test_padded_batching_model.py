"""The single-server batching model (plan/batching_queue.py) against the engine itself: the
`padded` policy run on the simulated engine (a given profile, so a cohort's time is known
exactly), its service times measured as a user would (a cohort of n sent at once to an idle
engine), then a Poisson trace. The model's mean batch and p95 must be the engine's."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.plan.batching import Service
from cellserve.plan.batching_map import Map
from cellserve.plan.batching_queue import evaluate_single_server
from cellserve.plan.profile import synthetic_profile
from cellserve.sim.loop import SimArrival, Simulation

MS = 1e-3
TOKENS = 10


def _step_s(batch: int) -> float:
    return (0.2 + 0.05 * batch) * MS


def _run(model, B: int, timeout_s: float, times_s) -> tuple[list, object]:
    sim = Simulation(seed=0)
    engine = sim.add_engine([model], {model.name: synthetic_profile(model, _step_s, max_batch=16)},
                            EngineConfig(policy="padded", max_batch=B, batch_timeout_s=timeout_s, profile=False,
                                         pin_threads=False)).engine
    tokens = {"tokens": np.ones((1, TOKENS), np.int64)}
    out = sim.run([SimArrival(float(t), model.name, tokens, None, 0, i) for i, t in enumerate(times_s)])
    return out, engine.stats


@pytest.mark.parametrize("B,T_ms", [(8, 1.0), (8, 5.0)])
def test_the_engines_padded_policy_is_what_the_single_server_model_predicts(models, B, T_ms):
    model = models.models["gru"]
    # the service profile, measured: n requests at once on an idle engine, a cohort of exactly n
    service_ms = {}
    for n in (1, 2, 4, 8):
        out, _ = _run(model, n, 0.0, [0.0] * n)
        service_ms[n] = max(o.finish_s for o in out) / MS
    service = Service(tuple(service_ms.items()))
    rate = 400.0
    times = np.cumsum(np.random.default_rng(B + int(T_ms)).exponential(1.0 / rate, size=20_000))
    out, stats = _run(model, B, T_ms * MS, times)
    assert len(out) == len(times) and all(o.status.name == "OK" for o in out)
    latency_ms = np.array([(o.finish_s - o.arrival_s) / MS for o in out])
    engine_p95 = float(np.quantile(latency_ms, 0.95, method="inverted_cdf"))
    engine_mean_batch = stats.batch_size_sum / stats.cell_steps  # every cohort steps TOKENS times, unpadded
    predicted = evaluate_single_server(Map.poisson(rate), service, B, T_ms, 95.0)
    assert predicted.mean_batch == pytest.approx(engine_mean_batch, rel=0.03)
    assert predicted.latency_percentile_ms == pytest.approx(engine_p95, rel=0.05)
