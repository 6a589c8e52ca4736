"""Ray Serve's queue-length autoscaler, by hand: more replicas when ongoing requests per
replica stay above the target (2) for the upscale delay, fewer when below for the downscale
delay; and the router in a simulation adds replicas under load."""

from __future__ import annotations

from cellserve.cluster import systems
from cellserve.cluster.ray_serve import Autoscaler, AutoscalingConfig
from cellserve.cluster.workload import session_arrivals

CONFIG = AutoscalingConfig(target_ongoing=2.0, upscale_delay_s=0.5, downscale_delay_s=2.0, look_back_s=0.5,
                           interval_s=0.1, min_replicas=1)


def drive(scaler, replicas, ongoing, until, start=0.0):
    """Tick every interval with `ongoing` requests in all; return the replica counts."""
    seen, t = [], start
    while t <= until + 1e-9:
        replicas = scaler.tick(t, ongoing, replicas)
        seen.append((round(t, 1), replicas))
        t += CONFIG.interval_s
    return seen


def test_scales_up_after_the_delay_when_above_target():
    seen = drive(Autoscaler(CONFIG), replicas=2, ongoing=10.0, until=1.0)  # 5 per replica
    before = [r for t, r in seen if t < 0.5]
    assert set(before) == {2}  # wishes, but waits the upscale delay
    assert dict(seen)[0.5] == 5  # ceil(2 * 5 / 2)


def test_scales_down_after_the_delay_when_below_target():
    seen = drive(Autoscaler(CONFIG), replicas=4, ongoing=1.0, until=2.5)  # 0.25 per replica
    assert all(r == 4 for t, r in seen if t < 2.0)
    assert dict(seen)[2.0] == 1  # ceil(4 * 0.25 / 2) = 1, the minimum


def test_holds_at_target_and_respects_bounds():
    assert {r for _, r in drive(Autoscaler(CONFIG), replicas=3, ongoing=6.0, until=3.0)} == {3}
    capped = AutoscalingConfig(upscale_delay_s=0.0, look_back_s=0.5, min_replicas=2, max_replicas=4)
    assert Autoscaler(capped).tick(0.0, 100.0, 2) == 4
    assert Autoscaler(AutoscalingConfig(downscale_delay_s=0.0, min_replicas=2)).tick(0.0, 0.0, 3) == 2


def test_a_wish_that_turns_restarts_the_delay():
    scaler = Autoscaler(CONFIG)
    drive(scaler, replicas=2, ongoing=10.0, until=0.3)  # wants more, not yet for long enough
    drive(scaler, replicas=2, ongoing=4.0, until=1.0, start=0.4)  # the average falls back to target
    seen = drive(scaler, replicas=2, ongoing=10.0, until=2.0, start=1.1)
    assert dict(seen)[1.5] == 2  # not the 0.5 s the first wish had run: timed from 1.1 s at most
    assert seen[-1][1] > 2


def test_router_adds_replicas_under_load(tiny):
    deployment = systems.build("ray-serve", tiny, 8, 3000.0)
    router = deployment.router
    start = sum(router.replicas().values())
    deployment.simulation.run(deployment.arrivals(session_arrivals(tiny, 3000.0, 1.2, seed=1)), drain_s=0.5)
    assert sum(router.replicas().values()) > start
    assert router.history and deployment.devices_used > start
    assert all(n >= 1 for n in router.replicas().values())
