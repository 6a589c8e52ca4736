"""Each variant's latency profile l(b) on a worker, measured once with the worker idle and then
held fixed: where `serve --ray --accuracy-scaling` gets its capacities (as Proteus profiles
its variants offline, before serving).

Why fixed: capacities re-read every period from the engines' moving cost averages swing with
the load itself. Idle, they priced bare kernel steps (13,000 requests/s per worker); under a
load that kept the two cores busy they rose until no variant had a batch under half the SLO
and every plan placed nothing (docs/accuracy-scaling.md, "Measured"). A capacity is a property
of the variant and the device, not of how contended the device is this second.

Definitions (the contract):
- The family's *typical request* (`typical_rows`): a row of the family's mean input length
  (rounded up: the mean over 4096 rows drawn from the zoo task's own input distribution,
  bench/decoder_workload.decoder_inputs, seed 0; up, so that a mean of 6.5 drawn as 6.49
  or 6.51 gives the same length), its tokens drawn from that distribution. For the digit
  reverser: 7 digits (strings of 1-12 uniform digits, mean 6.5).
- l(b), the latency of a batch of b (`measure_points`): b typical requests (b one-row
  requests, as b clients send them) submitted together to the worker's idle engine, timed
  from the submit to the last answer; the fastest of `repeats` runs after one warm-up run,
  at b = 1, 2, 4, ... up to the engine's batch cap. The fastest, not the median: the workers
  profile at once, on a machine that may run other work, and a neighbour slows a run but
  speeds none up (the engine's start-up step costs take the fastest for the same reason; the
  median of 5 gave h16 a lower capacity than h32 on the shared 2-core VM). This is rounds x the engine's step cost at
  batch b for that request (the encoder's steps, then one decoder step per output token),
  plus the engine's own per-step and per-request work (admission, lanes started and
  finished, answers): all of what the engine spends, none of the Ray hop or HTTP.
- With `--accuracy-profiles` files (`cellserve profile --model VARIANT --json P.json`, one per
  variant), l(b) is instead plan/nexus_cellular.cellular_latency of that profile at the
  typical request's length: the same quantity, modelled from the file's measured steps
  (`points_from_profile`).
- Capacity (plan/accuracy.LatencyPoints.best_batch, Proteus's rule): among these batch sizes,
  the one with the most requests/s, b x 1000 / l(b), whose l(b) is at most half the SLO.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

PROFILE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 7
_TYPICAL_DRAWS = 4096
_TIMEOUT_S = 60.0  # a profiling request's deadline: never refused for time, whatever the machine


_clock = time.process_time


class ProfilingError(RuntimeError):
    """A variant that could not be profiled; the message names it and why."""


def typical_rows(model, n: int, seed: int = 0) -> tuple[int, list[np.ndarray]]:
    """(length, n rows of that length): the family's typical request (module docstring)."""
    from cellserve.bench.decoder_workload import decoder_inputs

    draw = decoder_inputs(model).draw
    rng = np.random.default_rng(seed)
    lengths = [len(r) for r in draw(rng, _TYPICAL_DRAWS)]
    length = max(1, math.ceil(sum(lengths) / len(lengths)))
    rows: list[np.ndarray] = []
    for _ in range(50):  # rows of exactly that length, from the task's own distribution
        rows += [np.asarray(r, np.int64) for r in draw(rng, max(n, 64)) if len(r) == length]
        if len(rows) >= n:
            return length, rows[:n]
    raise ProfilingError(f"model {model.name!r}: its task draws no rows of its mean length {length}")


def measure_points(engine, engine_name: str, input_name: str, rows: list[np.ndarray],
                   batches: tuple[int, ...] = PROFILE_BATCHES, repeats: int = REPEATS) -> list[tuple[int, float]]:
    """[(b, l(b) ms)] of `engine_name` on `engine`, which must be idle and stepping on a thread
    of its own (serve_forever); b up to the engine's batch cap and len(rows). Raises
    ProfilingError naming the model when a profiling request is not answered OK."""
    from cellserve.bench.traces import request_builder
    from cellserve.engine.request import Request, Status

    cap = min(engine.policy.max_batch, len(rows))
    request_inputs = request_builder(engine.models[engine_name], input_name)
    points = []
    for b in [b for b in batches if b <= cap]:
        runs = []
        for _ in range(repeats + 1):
            done = threading.Event()
            left, failed = [b], []
            lock = threading.Lock()

            def on_done(response, left=left, failed=failed, done=done, lock=lock) -> None:  # the engine thread
                if response.status is not Status.OK:
                    failed.append(f"{response.status.value}: {response.reason}")
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            t0 = _clock()
            for row in rows[:b]:
                engine.submit(Request(engine_name, request_inputs(row), on_done=on_done,
                                      timeout_s=_TIMEOUT_S))
            if not done.wait(_TIMEOUT_S * 2):
                raise ProfilingError(f"profiling {engine_name!r} at batch {b}: no answer within {_TIMEOUT_S * 2:g} s")
            runs.append((_clock() - t0) * 1e3)
            if failed:
                raise ProfilingError(f"profiling {engine_name!r} at batch {b}: a request failed ({failed[0]})")
        points.append((b, min(runs[1:])))  # the first run warms the size's buffers
    return points


def points_from_profile(path: str, model, length: int, batches: tuple[int, ...] = PROFILE_BATCHES,
                        stack_layers: bool = True) -> list[tuple[int, float]]:
    """[(b, ms)] of a `cellserve profile` file for `model` at the typical request's `length`
    (ProfileError naming the file and what is wrong: unreadable, another model, made with the
    other stack_layers setting)."""
    from cellserve.plan.nexus_cellular import cellular_latency
    from cellserve.plan.profile import ModelProfile, ProfileError

    profile = ModelProfile.from_json(path)
    want = model.name.split(":")[0]
    if profile.model.split(":")[0] != want:
        raise ProfileError(f"profile {path!r}: model is {profile.model!r}, not the variant {want!r}")
    if profile.stack_layers != stack_layers:
        raise ProfileError(f"profile {path!r}: stack_layers is {profile.stack_layers}, the server's engines run "
                           f"with stack_layers={stack_layers}")
    latency = cellular_latency(profile, float(length))
    return [(b, latency.ms(b)) for b in batches if b <= latency.max_batch]


def mean_points(per_worker: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The per-batch mean of several workers' points (over the batch sizes all of them have)."""
    common = set.intersection(*(set(b for b, _ in pts) for pts in per_worker)) if per_worker else set()
    return [(b, sum(dict(pts)[b] for pts in per_worker) / len(per_worker)) for b in sorted(common)]


def load_profiles(paths: list[str], variants: list[str],
                  stack_layers: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Variant -> [(b, ms)] from `--accuracy-profiles` files (one per variant, each naming its model;
    variants without a file keep the workers' start-up measurement). ProfileError naming the
    file for one that cannot be read, names no served variant, or repeats a variant."""
    from cellserve.graph.zoo import families
    from cellserve.plan.profile import ModelProfile, ProfileError

    out: dict[str, list[tuple[int, float]]] = {}
    source: dict[str, str] = {}
    for path in paths:
        name = ModelProfile.from_json(path).model.split(":")[0]
        if name not in variants:
            raise ProfileError(f"profile {str(path)!r}: model is {name!r}, which is no variant served here "
                               f"({', '.join(variants)})")
        if name in out:
            raise ProfileError(f"profile {str(path)!r}: a second profile of {name!r} (the first: {source[name]!r})")
        model = families.load(name)
        length, _ = typical_rows(model, 1)
        out[name], source[name] = points_from_profile(str(path), model, length, stack_layers=stack_layers), str(path)
    return out
