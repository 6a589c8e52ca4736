"""What Nexus's "batch" and "latency" mean for a cellular engine, derived from a ModelProfile.

Nexus plans with l(b), the latency of a batch of b requests run together start to finish. A
cellular engine never runs such a batch: requests join and leave between steps, and a round
runs each cell type once with the lanes ready in it. The two meet in steady state:

- **batch b** = b lanes in each cell type's step of a round (the engine's load: b requests in
  flight through the model, each at its own step);
- **latency l(b)** = the time a request of the mean length takes at that load: the rounds it
  needs times the round time at b lanes, plus its share of the per-request work done in
  those rounds (each of the b requests in flight starts and finishes once while a request
  passes through):

      round(b) = sum over cell types c of [step_c(b) + cold_c + host.step_s + host.step_s_per_lane * b]
      l(b)     = rounds * round(b) + b * per_request

  with step_c(b) the profile's batched step (b lanes each alone when b <= lone_lanes: b *
  lone_step_s, their per-call cost shared over the steps), rounds = the steps one request
  takes through the cell types in turn (the mean length for layers and stacks, a decoder's
  mean steps at that source length), and per_request = the lane's start and finish per token,
  the plain ops, the engine's own per-lane start and finish and its taking the request in
  (host.request_s), and the hand-back.
  Then b / l(b) is the engine's throughput at that load, as a Nexus profile's is.

`rounds` counts cell types one after another, which is exact for one cell type (the default
with stacked layers) and an upper bound when cell types run side by side in a round (the two
directions of a bidirectional layer): pass `rounds_per_request` to say otherwise. Timings are
means (`margin` scales them, e.g. 1.15 as Nexus's code does with mean + std). The wake-up of
an idle engine is not a batch's cost and is left out.

A prefix (models sharing weights, e.g. one encoder, different heads) is the same derivation
restricted to the shared cell types (`cell_types=`) with no plain ops: a model's own profile
minus its prefix's is its head.
"""

from __future__ import annotations

from cellserve.plan.nexus import LatencyProfile
from cellserve.plan.profile import ModelProfile, ProfileError


def _steps(profile: ModelProfile, cell_type: str, mean_tokens: float) -> float:
    """Steps one request takes through a cell type."""
    if profile.cell(cell_type).kind != "decoder":
        return mean_tokens
    histogram = profile.decode_steps.get(cell_type) or {}  # source length -> {steps: lanes}
    lanes = sum(n for by_steps in histogram.values() for n in by_steps.values())
    if not lanes:
        return mean_tokens + 1.0
    # the mean over the profiled lanes of steps per source token, scaled to the mean length
    ratio = sum(steps / length * n for length, by_steps in histogram.items() for steps, n in by_steps.items()) / lanes
    return ratio * mean_tokens


def cellular_latency(profile: ModelProfile, mean_tokens: float, rounds_per_request: float | None = None,
                     cell_types: list[str] | None = None, margin: float = 1.0) -> LatencyProfile:
    """l(b) in ms for b = 1 .. profile.max_batch (see the module's docstring). `cell_types`
    restricts it to those (a shared prefix: then no plain ops or hand-back either)."""
    if mean_tokens <= 0:
        raise ProfileError(f"mean_tokens must be > 0, got {mean_tokens!r}")
    types = list(profile.cell_types) if cell_types is None else cell_types
    for c in types:
        profile.cell(c)  # an unknown cell type is an error naming it
    whole = cell_types is None
    steps = {c: _steps(profile, c, mean_tokens) for c in types}
    rounds = rounds_per_request if rounds_per_request is not None else sum(steps.values())
    host = profile.host
    per_request = sum(mean_tokens * profile.cell(c).start_s_per_token + steps[c] * profile.cell(c).finish_s_per_token
                      + host.lane_start_s + host.lane_finish_s for c in types)
    if whole:
        per_request += (sum(t.mean for t in profile.plain_ops_s.values()) + profile.hand_back_s.mean
                        + host.request_s)
    points = []
    for b in range(1, profile.max_batch + 1):
        round_s = 0.0
        for c in types:
            cell = profile.cell(c)
            if b <= cell.lone_lanes and cell.lone_step_s is not None:
                step = b * cell.lone_step_s.mean + b * cell.lone_call_s / max(steps[c], 1.0) + cell.lone_cold_s
            else:
                step = cell.step_s[b].mean + cell.cold_s
            round_s += step + host.step_s + host.step_s_per_lane * b
        points.append((b, margin * 1000.0 * (rounds * round_s + b * per_request)))
    return LatencyProfile(tuple(points))
