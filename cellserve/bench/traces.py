"""Synthetic request traces: WMT-like sentence lengths and Poisson or bursty arrivals.

Every generator takes a `numpy.random.Generator`, so a trace is reproducible from its seed.
An `InputSampler` replaces the WMT-like token rows with another distribution (a decoder
model's own task inputs: bench/decoder_workload.py; a feature model's rows:
`SequenceInput.sampler`); without one, traces are token rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_SENTENCE_TOKENS = 100
MIN_REQUESTS = 40  # a trace at a rate holds at least this many (a p99 of fewer says little)

# Log-normal in subword tokens: mean exp(mu + sigma^2 / 2) ~= 25, median ~= 21, 99th
# percentile ~= 84, about 0.5% of draws above 100 (those are clipped to 100).
_LOG_MEAN = float(np.log(25.0) - 0.6**2 / 2)
_LOG_SIGMA = 0.6


# (rng, n) -> n sequences (token ids [T] or feature rows [T, ...], T >= 1), drawn from `rng` alone
InputSampler = Callable[[np.random.Generator, int], list[np.ndarray]]


@dataclass(frozen=True)
class TraceRequest:
    request_id: int
    arrival_s: float
    sequence: np.ndarray  # one request's sequence: token ids (int64, [T]) or feature rows ([T, *features])


@dataclass(frozen=True)
class StateInput:
    """A model input beside the sequence that the benchmarks fill in: a recurrent layer's
    initial state (`lengths` False: zeros of `shape`, the batch axis 1) or its sequence
    lengths (`lengths` True: the sequence's length, shape [1])."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    lengths: bool = False

    def value(self, length: int) -> np.ndarray:
        if self.lengths:
            return np.full(self.shape, length, dtype=self.dtype)
        return np.zeros(self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class SequenceInput:
    """How the benchmarks drive a model: one sequence per request, in its input `name`, as
    token ids in [0, `vocab`) or, with `vocab` None, feature rows of shape `features` and
    `dtype` (standard normal values: a feature model's cost does not depend on them); and
    the model's other inputs, `states`, each a recurrent layer's initial state (zeros: every
    request starts fresh) or its sequence lengths."""

    name: str
    time_major: bool  # [time, batch, ...]; else [batch, time, ...]
    vocab: int | None
    features: tuple[int, ...] = ()
    dtype: str = "int64"
    longest: int | None = None  # the model's longest sequence: longer draws are cut to it
    states: tuple[StateInput, ...] = ()

    def draw(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """One sequence of `length` steps."""
        if self.vocab is not None:
            return rng.integers(0, self.vocab, size=length, dtype=np.int64)
        return rng.standard_normal((length, *self.features)).astype(self.dtype)

    def sampler(self) -> InputSampler:
        """`n` sequences of WMT-like lengths, cut at `longest` (for a token input, make_trace's
        own draw, cut)."""
        def sample(rng: np.random.Generator, n: int) -> list[np.ndarray]:
            return [self.draw(rng, int(k))[:self.longest] for k in sentence_lengths(rng, n)]
        return sample

    def request_inputs(self, sequence: np.ndarray) -> dict[str, np.ndarray]:
        """A request's inputs for one sequence: the sequence as a batch of one (see
        one_sequence), and `states`."""
        inputs = {self.name: one_sequence(sequence, self.time_major)}
        for state in self.states:
            inputs[state.name] = state.value(len(sequence))
        return inputs


def sequence_input(model) -> SequenceInput:
    """How the benchmarks drive `model` (a graph Model). Raises ValueError naming what does not
    fit: the traces are one sequence per request, so the model must take exactly one input
    whose batch and time axes the importer found (the first two), holding integer token ids
    of a known vocabulary or floating-point feature rows of a fixed shape; any other input
    must be a recurrent layer's initial state or sequence lengths (see StateInput)."""
    sequences = [s for s in model.inputs if (sem := model.semantics.get(s.name)) is not None
                 and sem.time_axis is not None]
    if len(model.inputs) > 1 and len(sequences) != 1:
        raise ValueError(f"model {model.name!r} takes {len(model.inputs)} inputs "
                         f"({', '.join(repr(s.name) for s in model.inputs)}), {len(sequences)} of them a sequence "
                         "(a time axis the importer found); the benchmarks send one sequence per request, with a "
                         "recurrent layer's initial states or sequence lengths beside it")
    spec = sequences[0] if len(model.inputs) > 1 else model.inputs[0]
    states = tuple(_state_input(model, other) for other in model.inputs if other is not spec)
    sem = model.semantics.get(spec.name)
    axes = None if sem is None else {sem.batch_axis, sem.time_axis}
    if axes != {0, 1}:
        found = "no batch or time axis" if sem is None else f"batch axis {sem.batch_axis}, time axis {sem.time_axis}"
        raise ValueError(f"model {model.name!r}: input {spec.name!r} of shape {list(spec.shape)} is not "
                         f"[batch, time, ...] or [time, batch, ...] (the importer found {found})")
    time_major = sem.time_axis == 0
    kind = np.dtype(spec.dtype).kind
    if kind in "iu":
        if len(spec.shape) != 2 or not sem.vocab:
            raise ValueError(f"model {model.name!r} takes {spec.name!r} as {spec.dtype} of shape {list(spec.shape)}; "
                             "the benchmarks send integer inputs as token ids, [batch, time] or [time, batch], "
                             "into an embedding whose vocabulary the importer found")
        return SequenceInput(spec.name, time_major, int(sem.vocab), longest=model.max_sequence_length,
                             states=states)
    features = tuple(spec.shape[2:])
    if kind != "f" or not all(isinstance(n, int) and n > 0 for n in features):
        raise ValueError(f"model {model.name!r} takes {spec.name!r} as {spec.dtype} of shape {list(spec.shape)}; "
                         "the benchmarks send token ids (an integer input) or feature rows (a floating-point "
                         "input whose axes after batch and time have fixed sizes)")
    return SequenceInput(spec.name, time_major, None, features, str(np.dtype(spec.dtype)), model.max_sequence_length,
                         states)


def _state_input(model, spec) -> StateInput:
    """`spec`, an input of `model` beside its sequence, as a StateInput, or ValueError naming it."""
    from cellserve.graph.model import GraphDecoder, layers_of

    roles = {}
    layers = [layer for step in model.recurrent_steps() if not isinstance(step, GraphDecoder)
              for layer in layers_of(step)]
    for layer in layers:
        for tensor, role in ((layer.initial_h, "state"), (layer.initial_c, "state"), (layer.seq_lens, "lengths")):
            if tensor and model.input_behind(tensor) == spec.name:
                roles[role] = True
    if len(roles) != 1:
        raise ValueError(f"model {model.name!r} takes input {spec.name!r} of shape {list(spec.shape)} beside its "
                         "sequence; the benchmarks fill in only a recurrent layer's initial state or its sequence "
                         f"lengths, and {spec.name!r} feeds " + ("both" if roles else "neither"))
    if "lengths" in roles:
        return StateInput(spec.name, (1,), spec.dtype, lengths=True)
    dynamic = [i for i, n in enumerate(spec.shape) if not (isinstance(n, int) and n > 0)]
    if len(spec.shape) != 3 or dynamic not in ([], [1]) or spec.shape[1] not in (-1, 1):
        raise ValueError(f"model {model.name!r}: initial state {spec.name!r} has shape {list(spec.shape)}, not "
                         "[directions, batch, hidden] with fixed directions and hidden sizes")
    return StateInput(spec.name, (spec.shape[0], 1, spec.shape[2]), spec.dtype)


def request_builder(model, input_name: str | None = None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """How a trace's sequence, sent as `input_name` (by default the model's sequence input,
    see sequence_name), becomes a request's inputs: with the model's initial states or
    lengths beside it (see sequence_input), or alone where the benchmarks do not drive the
    model by that input (a decoder model's own task inputs)."""
    seq = _driven(model)
    if seq is not None and input_name in (None, seq.name):
        return seq.request_inputs
    name = input_name or model.inputs[0].name
    time_major = is_time_major(model, name)
    return lambda sequence: {name: one_sequence(sequence, time_major)}


def sequence_name(model) -> str:
    """The input a trace's sequences go to: sequence_input's, or the model's first input
    where the benchmarks do not drive it by one sequence (a decoder model's task inputs)."""
    seq = _driven(model)
    return model.inputs[0].name if seq is None else seq.name


def _driven(model) -> SequenceInput | None:
    try:
        return sequence_input(model)
    except ValueError:
        return None


def is_time_major(model, input_name: str) -> bool:
    """Whether `model` takes `input_name` as [time, batch, ...] (its importer's finding)."""
    sem = model.semantics.get(input_name)
    return sem is not None and sem.time_axis == 0 and sem.batch_axis == 1


def one_sequence(sequence: np.ndarray, time_major: bool = False) -> np.ndarray:
    """One sequence ([T] token ids or [T, ...] feature rows) as a request's batch of one:
    [1, T, ...], or [T, 1, ...] for a time-major model."""
    return np.expand_dims(sequence, 1 if time_major else 0)


def sentence_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw `n` sentence lengths in tokens, integers in [1, 100].

    Shape: sentences of the WMT'14/'15 En-De and En-Fr training sets, counted in subword
    (BPE/wordpiece) tokens, are right-skewed with a mean of about 25-28 tokens and a long
    tail that thins out around 100 tokens (the usual training cut-off). We model that with
    a log-normal (mean 25, sigma 0.6 in log space) clipped to [1, 100]. The parameters are
    chosen to match that published summary; they are not fitted to any corpus on disk.
    """
    raw = rng.lognormal(mean=_LOG_MEAN, sigma=_LOG_SIGMA, size=n)
    return np.clip(np.rint(raw), 1, MAX_SENTENCE_TOKENS).astype(np.int64)


def poisson_arrivals(rng: np.random.Generator, rate_rps: float, n: int) -> np.ndarray:
    """Arrival times (seconds, increasing) of `n` requests of a Poisson process.

    Shifted so the first request arrives at 0 and a replay does not start idle.
    """
    gaps = rng.exponential(1.0 / rate_rps, size=n)
    times = np.cumsum(gaps)
    return times - times[0]


def bursty_arrivals(rng: np.random.Generator, rate_rps: float, n: int, burst_factor: float = 4.0,
                    mean_burst_s: float = 1.0, mean_calm_s: float = 4.0) -> np.ndarray:
    """Arrival times of `n` requests of a two-state Markov-modulated Poisson process.

    The process alternates between a calm and a burst state with exponential sojourns
    (means `mean_calm_s`, `mean_burst_s`); the burst rate is `burst_factor` times the calm
    rate. The calm rate is set so the long-run mean rate is `rate_rps`:
        rate = p * burst_factor * calm + (1 - p) * calm,  p = burst / (burst + calm time).
    Shifted so the first request arrives at 0.
    """
    p_burst = mean_burst_s / (mean_burst_s + mean_calm_s)
    calm_rate = rate_rps / (1.0 + p_burst * (burst_factor - 1.0))
    in_burst = bool(rng.random() < p_burst)  # start in the stationary distribution
    segments: list[np.ndarray] = []
    total, t = 0, 0.0
    while total < n:
        sojourn = rng.exponential(mean_burst_s if in_burst else mean_calm_s)
        rate = calm_rate * (burst_factor if in_burst else 1.0)
        # Given their count, a Poisson process's arrivals in a window are uniform in it.
        times = t + np.sort(rng.uniform(0.0, sojourn, size=rng.poisson(rate * sojourn)))
        segments.append(times)
        total += times.size
        t += sojourn
        in_burst = not in_burst
    arrivals = np.concatenate(segments)[:n]
    return arrivals - arrivals[0]


def burst_path(rng: np.random.Generator, seconds: float, burst_factor: float, mean_burst_s: float,
               mean_calm_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The modulating path of a two-state MMPP over [0, seconds]: the segments' edges (from 0 to
    `seconds`, one more than segments) and each segment's rate multiplier. Sojourns are
    exponential (means `mean_burst_s`, `mean_calm_s`), the first state is drawn from the
    stationary distribution, and the multipliers (calm 1 / (1 + p (b - 1)), burst b times that,
    p the long-run share of time in bursts) average 1 over the long run."""
    if seconds <= 0:
        raise ValueError(f"a burst path needs seconds > 0, got {seconds}")
    p_burst = mean_burst_s / (mean_burst_s + mean_calm_s)
    calm = 1.0 / (1.0 + p_burst * (burst_factor - 1.0))
    in_burst = bool(rng.random() < p_burst)
    edges, multipliers, t = [0.0], [], 0.0
    while t < seconds:
        t = min(seconds, t + rng.exponential(mean_burst_s if in_burst else mean_calm_s))
        edges.append(t)
        multipliers.append(calm * (burst_factor if in_burst else 1.0))
        in_burst = not in_burst
    return np.asarray(edges), np.asarray(multipliers)


UNIT_CHUNK = 4096  # unit-rate points are drawn in chunks of this size, so point k is one draw


def modulated_arrivals(rng: np.random.Generator, rate_rps: float, edges: np.ndarray,
                       multipliers: np.ndarray) -> np.ndarray:
    """Arrival times in [0, edges[-1]) of the Poisson process of intensity `rate_rps` x the
    path's multiplier (burst_path): the points of a unit-rate Poisson process drawn from `rng`,
    mapped through the inverse of the cumulative intensity.

    Common random numbers: for one `rng` seed and path, point k maps to the same place in the
    path at every rate, so a higher rate brings every arrival earlier and adds arrivals at the
    end; two rates meet the same bursts and differ by the rate alone, not by the draw."""
    if rate_rps <= 0:
        raise ValueError(f"an arrival rate must be > 0 req/s, got {rate_rps}")
    cumulative = np.concatenate(([0.0], np.cumsum(multipliers * np.diff(edges))))
    horizon = rate_rps * cumulative[-1]  # expected arrivals over the path
    points: list[np.ndarray] = []
    last = 0.0
    while last < horizon:
        chunk = last + np.cumsum(rng.exponential(1.0, size=UNIT_CHUNK))
        points.append(chunk)
        last = float(chunk[-1])
    units = np.concatenate(points)
    units = units[units < horizon]
    return np.interp(units / rate_rps, cumulative, edges)


def make_trace(rng: np.random.Generator, rate_rps: float, n: int, vocab: int,
               bursty: bool = False, inputs: InputSampler | None = None) -> list[TraceRequest]:
    """`n` requests with WMT-like lengths, token ids uniform in [0, vocab), ordered by arrival;
    with `inputs`, their sequences are `inputs(rng, n)` instead (and `vocab` is unused)."""
    arrivals = (bursty_arrivals if bursty else poisson_arrivals)(rng, rate_rps, n)
    if inputs is not None:
        rows = inputs(rng, n)
        if len(rows) != n:
            raise ValueError(f"the input sampler gave {len(rows)} rows for {n} requests")
        return [TraceRequest(request_id=i, arrival_s=float(arrivals[i]), sequence=np.asarray(rows[i]))
                for i in range(n)]
    lengths = sentence_lengths(rng, n)
    return [TraceRequest(request_id=i, arrival_s=float(arrivals[i]),
                         sequence=rng.integers(0, vocab, size=int(lengths[i]), dtype=np.int64))
            for i in range(n)]


def trace_at_rate(seed: int, rate_rps: float, seconds: float, vocab: int, bursty: bool = False,
                  min_requests: int = MIN_REQUESTS, inputs: InputSampler | None = None) -> list[TraceRequest]:
    """`seconds` of requests at `rate_rps` (at least `min_requests`), drawn from (seed, rate)
    alone: whichever ramp brings a system to a rate, it gets the same requests there.
    `inputs`: as for make_trace."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(round(rate_rps * 1000))]))
    return make_trace(rng, rate_rps, max(min_requests, int(rate_rps * seconds)), vocab, bursty=bursty,
                      inputs=inputs)
