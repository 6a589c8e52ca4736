"""Prometheus metrics, with Triton's meanings under a `cellserve_` prefix, plus what cellular
batching adds. Durations are cumulative microseconds, as Triton's are.

Triton-like, per model and version (counts, queue and compute times are of successes only):
  cellserve_inference_request_success, cellserve_inference_request_failure{reason}
  cellserve_inference_count        inferences answered (a request of batch B counts B)
  cellserve_inference_exec_count   batched cell steps run for the model: with the line
                                   above, inferences per step tell how well batching works
  cellserve_inference_request_duration_us, ..._queue_duration_us, ..._compute_duration_us
  cellserve_inference_pending_request_count
Cellular batching:
  cellserve_cell_steps_total{cell_type}, cellserve_cell_lanes_total{cell_type}: mean batch
                                   occupancy of a cell type is lanes / steps
  cellserve_slo_miss_total         the deadline passed before the answer was ready (answered 504)
  cellserve_sequences_active
  cellserve_engine_step_overhead_seconds  seconds a step takes beyond the cost model's price (added per batch)
  cellserve_engine_admitting_share  share of the engine's busy time spent admitting arrivals (stretches priced rounds)
  cellserve_deadline_margin_seconds  taken off each timeout for the answer's hand-back to the frontend
  cellserve_admission_price_ratio{quantile}  over the last 1,000 answered requests admission priced:
                                   latency from admission to answer over the price (below 1:
                                   priced high, so refusals came early; above 1: priced low)
Admission and connections (the frontends, before any decoding; not per model):
  cellserve_requests_shed_total    inference refused (429) by the frontends' bound, at the headers
  cellserve_admission_limit, cellserve_admission_in_flight   the bound now, and what it holds
  cellserve_admission_cuts_total   times the bound was cut because the engine refused or dropped
  cellserve_http_connections_open, cellserve_http_connections_refused_total (over the limit),
  cellserve_http_requests_timed_out_total (408: headers or body too slow)
Kernel versions (with --kernel-versions; docs/tenancy.md):
  cellserve_interference_cores{executor}   others' load on the executor's cores, in cores
  cellserve_kernel_version_switches_total{executor}, cellserve_kernel_version_steps_total{cell_type,version}
Failure reasons: invalid, rejected (refused at admission), dropped (deadline missed while
queued or running, a gRPC call's own deadline included), sequence (a sequence error), cancelled (the client went away before its
answer), error (the server failed).

The same counts, per model version, also feed Triton's statistics extension
(server/statistics.py reads ModelMetrics' plain numbers): a request is counted through
`answered` / `failed` / `executed` / `inferred`, which update both.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LABELS = ("model", "version")
disable_created_metrics()  # Triton exports no *_created series either


class Metrics:
    def __init__(self, engine=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.success = Counter("cellserve_inference_request_success", "Successful inference requests", LABELS,
                               registry=r)
        self.failure = Counter("cellserve_inference_request_failure", "Failed inference requests",
                               (*LABELS, "reason"), registry=r)
        self.inference_count = Counter("cellserve_inference_count", "Inferences answered (batch counts)", LABELS,
                                       registry=r)
        self.request_us = Counter("cellserve_inference_request_duration_us",
                                  "Cumulative end-to-end inference request time", LABELS, registry=r)
        self.queue_us = Counter("cellserve_inference_queue_duration_us",
                                "Cumulative time answered requests waited before the engine admitted them", LABELS, registry=r)
        self.compute_us = Counter("cellserve_inference_compute_duration_us",
                                  "Cumulative time answered requests took from admission to the answer", LABELS, registry=r)
        self.pending = Gauge("cellserve_inference_pending_request_count", "Requests received, not yet answered",
                             LABELS, registry=r)
        self.slo_miss = Counter("cellserve_slo_miss", "Requests whose deadline passed before their answer was ready",
                                LABELS, registry=r)
        self.sequences = Gauge("cellserve_sequences_active", "Active stateful sequences", ("model",), registry=r)
        if engine is not None:
            r.register(_EngineCollector(engine))

        self._models: dict[tuple[str, str], ModelMetrics] = {}

    def model(self, name: str, version: str) -> "ModelMetrics":
        """One model version's series (looked up once: labels() is slow on the request path)."""
        key = (name, version)
        if key not in self._models:
            self._models[key] = ModelMetrics(self, name, version)
        return self._models[key]

    def watch_deadline_margin(self, margin_s) -> None:
        """Export the server's deadline margin (the callable `margin_s`, read at scrape time)."""
        Gauge("cellserve_deadline_margin_seconds",
              "Seconds taken off each request's timeout for handing its answer back from the engine "
              "(a smoothed mean plus four mean deviations; at most half the timeout)",
              registry=self.registry).set_function(margin_s)

    def watch_frontends(self, admission, limits) -> None:
        """Export the frontends' admission bound and HTTP connection counts (read at scrape time)."""
        self.registry.register(_FrontendCollector(admission, limits))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Duration:
    """Triton's StatisticDuration: how many, and their total nanoseconds."""

    __slots__ = ("count", "ns")

    def __init__(self):
        self.count = self.ns = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(int(seconds * 1e9), 0)

    def as_json(self) -> dict:
        return {"count": self.count, "ns": self.ns}


class ModelMetrics:
    def __init__(self, metrics: Metrics, name: str, version: str):
        labels = {"model": name, "version": version}
        # Triton's statistics (plain numbers, on the server's loop): requests answered and
        # failed with their end-to-end times, queue and compute of those the engine ran
        self.success_time, self.fail_time = Duration(), Duration()
        self.queue_time, self.compute_time = Duration(), Duration()
        self.rows = 0  # inferences: a request of batch B counts B
        self.last_inference_ms = 0  # wall-clock milliseconds since the epoch of the last answer or failure
        self.success = metrics.success.labels(**labels)
        self.inference_count = metrics.inference_count.labels(**labels)
        self.request_us = metrics.request_us.labels(**labels)
        self.queue_us = metrics.queue_us.labels(**labels)
        self.compute_us = metrics.compute_us.labels(**labels)
        self.pending = metrics.pending.labels(**labels)
        self.slo_miss = metrics.slo_miss.labels(**labels)
        self.sequences = metrics.sequences.labels(model=name)
        self._failure = metrics.failure
        self._labels = labels

    def failure(self, reason: str):
        return self._failure.labels(**self._labels, reason=reason)

    def answered(self, seconds: float) -> None:
        """A request answered, `seconds` after it arrived."""
        self.success.inc()
        self.request_us.inc(seconds * 1e6)
        self.success_time.add(seconds)
        self.last_inference_ms = int(time.time() * 1e3)

    def failed(self, reason: str, seconds: float) -> None:
        """A request answered with an error (`reason`, see the module), `seconds` after it arrived."""
        self.failure(reason).inc()
        self.fail_time.add(seconds)
        self.last_inference_ms = int(time.time() * 1e3)

    def inferred(self, rows: int, queue_s: float | None, compute_s: float | None) -> None:
        """A request of `rows` sequences answered in time (as Triton, only those count): it
        waited `queue_s` from arrival to admission, then ran `compute_s` (None: not known)."""
        self.inference_count.inc(rows)
        self.rows += rows
        if queue_s is not None:
            self.queue_us.inc(queue_s * 1e6)
            self.queue_time.add(queue_s)
        if compute_s is not None:
            self.compute_us.inc(compute_s * 1e6)
            self.compute_time.add(compute_s)


# A reloaded version runs in the engine as "name:version#N" (model_control.py) beside the one
# it replaces until that one drains; metrics and statistics count every such generation as
# "name:version", so that counters never go back and no series is made per reload.
RELOAD_TAG = "#"


def untagged(cell_type: str) -> str:
    """A cell type's (or an engine model's) name without its reload tag."""
    model, slash, rest = cell_type.partition("/")
    return model.split(RELOAD_TAG, 1)[0] + slash + rest


def executions_by_model(steps_by_type, into: dict[str, int] | None = None) -> dict[str, int]:
    """Batched cell steps per served model ("name:version", every reload of it together),
    from steps per cell type (whose keys start "name:version[#N]/"), added to `into` when given."""
    out = {} if into is None else into
    for cell_type, count in list(steps_by_type.items()):
        engine_model = untagged(cell_type.split("/", 1)[0])
        out[engine_model] = out.get(engine_model, 0) + count
    return out


class _EngineCollector:
    """Reads the engine's step counters at scrape time (plain ints, updated by the engine thread)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        steps = CounterMetricFamily("cellserve_cell_steps", "Batched executions of a cell type", labels=["cell_type"])
        lanes = CounterMetricFamily("cellserve_cell_lanes", "Lane-steps run of a cell type (sum of batch sizes)",
                                    labels=["cell_type"])
        execs = CounterMetricFamily("cellserve_inference_exec_count", "Batched cell steps run for a model",
                                    labels=list(LABELS))
        by_type: dict[str, list[int]] = {}  # every reload of a cell type in one series
        for cell_type, count in list(stats.steps_by_type.items()):
            totals = by_type.setdefault(untagged(cell_type), [0, 0])
            totals[0] += count
            totals[1] += stats.lanes_by_type.get(cell_type, 0)
        for cell_type, (count, lane_steps) in by_type.items():
            steps.add_metric([cell_type], count)
            lanes.add_metric([cell_type], lane_steps)
        for engine_model, count in executions_by_model(stats.steps_by_type).items():
            name, _, version = engine_model.rpartition(":")
            execs.add_metric([name, version], count)
        yield steps
        yield lanes
        yield execs
        yield GaugeMetricFamily("cellserve_engine_step_overhead_seconds",
                                "Seconds a busy step takes beyond the cost model's price, added per batch as admission prices requests",
                                value=self.engine.step_overhead_s)
        yield GaugeMetricFamily("cellserve_engine_admitting_share",
                                "Share of the engine's busy time spent admitting (and refusing) arrivals, "
                                "which admission prices as time no step runs",
                                value=self.engine.admitting_share)
        yield from _version_metrics(self.engine)
        ratios = sorted(stats.price_ratios)
        if ratios:
            price = GaugeMetricFamily("cellserve_admission_price_ratio",
                                      "Over the last 1,000 answered requests admission priced: latency from "
                                      "admission to answer over the predicted latency", labels=["quantile"])
            for q in ("0.1", "0.5", "0.9"):
                price.add_metric([q], ratios[min(int(float(q) * len(ratios)), len(ratios) - 1)])
            yield price


def _version_metrics(engine):
    """--kernel-versions (executor/versions.py): what the interference meter reads and which
    version each cell type's steps ran; nothing without it."""
    with_versions = [(name, ex.versions) for name, ex in engine.executors.items()
                     if getattr(ex, "versions", None) is not None]
    if not with_versions:
        return
    level = GaugeMetricFamily("cellserve_interference_cores", "Others' load on the executor's cores, in cores "
                              "(busy time of the cores not this process's, smoothed)", labels=["executor"])
    switches = CounterMetricFamily("cellserve_kernel_version_switches", "Times the executor's kernel version "
                                   "changed between two steps", labels=["executor"])
    steps = CounterMetricFamily("cellserve_kernel_version_steps", "Steps of a cell type run on each kernel "
                                "version (openmp-N, elastic-N)", labels=["cell_type", "version"])
    for name, versions in with_versions:
        level.add_metric([name], versions.meter.level)
        switches.add_metric([name], versions.switches)
        by_type: dict[tuple[str, str], int] = {}
        for (cell_type, version), count in list(versions.steps.items()):
            key = (untagged(cell_type), version)
            by_type[key] = by_type.get(key, 0) + count
        for key, count in by_type.items():
            steps.add_metric(list(key), count)
    yield level
    yield switches
    yield steps


class _FrontendCollector:
    """Reads the admission bound and the connection counters at scrape time (plain numbers
    the frontends update on their loop: nothing on the request path)."""

    def __init__(self, admission, limits):
        self.admission, self.limits = admission, limits

    def collect(self):
        a, c = self.admission, self.limits
        yield CounterMetricFamily("cellserve_requests_shed", "Inference requests refused (429) by the frontends' "
                                  "admission bound before their body was decoded", value=a.shed)
        yield GaugeMetricFamily("cellserve_admission_limit", "Inference requests the frontends admit at once now",
                                value=int(a.limit_now()))
        yield GaugeMetricFamily("cellserve_admission_in_flight", "Inference requests admitted, not yet answered",
                                value=a.in_flight)
        yield CounterMetricFamily("cellserve_admission_cuts", "Times the admission bound was cut because the "
                                  "engine refused or dropped requests", value=a.cuts)
        yield GaugeMetricFamily("cellserve_http_connections_open", "Open HTTP client connections", value=c.open)
        yield CounterMetricFamily("cellserve_http_connections_refused", "HTTP connections closed at once: over "
                                  "--max-connections", value=c.refused)
        yield CounterMetricFamily("cellserve_http_requests_timed_out", "HTTP requests answered 408: headers or "
                                  "body slower than --read-timeout", value=c.timed_out)
