"""The cluster's Prometheus series: every worker's engine counters, labelled by worker and node.

The driver's metrics endpoint serves the frontends' series (server/metrics.py: per model,
counted where each request is answered) and these, read at scrape time from the workers'
last snapshots (polled by ray_cluster.Poller; nothing on the request path, no call to a
worker during a scrape). Series:

  cellserve_cell_steps_total{worker,node,cell_type}, cellserve_cell_lanes_total{...}
  cellserve_inference_exec_count_total{model,version,worker,node}
  cellserve_engine_step_overhead_seconds{worker,node}
  cellserve_worker_up{worker,node}                1 while live, 0 once dead
  cellserve_worker_requests_total{worker,node,outcome}   (ok, failed) answered by its engine
  cellserve_worker_active_requests{worker,node}, cellserve_worker_sequences{worker,node}
  cellserve_worker_outstanding{worker,node}       sent by the driver, not yet answered
  cellserve_cluster_retries_total                 requests sent again after their worker died
  cellserve_cluster_shed_total{model,reason}      refused 429 at the driver: plan (over the
                                                  plan's rate), unplanned, deadline (every
                                                  worker busy and predicted to miss it)

With --replan-every (the planner in the cluster, ray_replan_loop.py):
  cellserve_cluster_plan_epoch                    plans applied so far (a --plan given counts as 1)
  cellserve_cluster_sessions_moved_total          sessions the re-plans moved (nexus_epochs.moved_sessions)
  cellserve_cluster_model_rate_rps{model}         the measured arrival rate (EWMA over an epoch)
  cellserve_cluster_model_workers{model}          workers taking the model's new requests
  cellserve_worker_model_changes_total{worker,node,action}   models loaded / unloaded (load, unload)

With --core-allocation (ray_cores.py):
  cellserve_worker_cores{worker,node}             cores the worker is pinned to now
  cellserve_core_others_load{core}                others' load on each core, in cores (smoothed)
  cellserve_core_allocation_moves_total           workers moved to other cores

A dead worker's counters stay at their last polled values (counters never go back); its
gauges drop to 0 (active requests, sequences: they died with it) or go (step overhead).
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cellserve.server.metrics import executions_by_model


class ClusterCollector:
    def __init__(self, core):
        self.core = core  # a RayCore: its router's workers and its driver-side counters

    def collect(self):
        wn = ["worker", "node"]
        steps = CounterMetricFamily("cellserve_cell_steps", "Batched executions of a cell type", labels=[*wn, "cell_type"])
        lanes = CounterMetricFamily("cellserve_cell_lanes", "Lane-steps run of a cell type (sum of batch sizes)",
                                    labels=[*wn, "cell_type"])
        execs = CounterMetricFamily("cellserve_inference_exec_count", "Batched cell steps run for a model",
                                    labels=["model", "version", *wn])
        overhead = GaugeMetricFamily("cellserve_engine_step_overhead_seconds",
                                     "Seconds a busy step takes beyond the cost model's price, per worker", labels=wn)
        up = GaugeMetricFamily("cellserve_worker_up", "1 while the worker is live, 0 once it died", labels=wn)
        served = CounterMetricFamily("cellserve_worker_requests", "Requests a worker's engine answered",
                                     labels=[*wn, "outcome"])
        active = GaugeMetricFamily("cellserve_worker_active_requests", "Requests in a worker's engine", labels=wn)
        seqs = GaugeMetricFamily("cellserve_worker_sequences", "Sequence states a worker holds", labels=wn)
        outstanding = GaugeMetricFamily("cellserve_worker_outstanding", "Requests the driver sent a worker, "
                                        "not yet answered", labels=wn)
        for w in list(self.core.router.workers.values()):
            labels = [w.id, w.info.node_id]
            snap = w.snapshot
            up.add_metric(labels, 1 if w.alive else 0)
            outstanding.add_metric(labels, w.outstanding)
            if not snap:
                continue
            for cell_type, count in snap["steps"].items():  # counters: a dead worker's keep their last values
                steps.add_metric([*labels, cell_type], count)
                lanes.add_metric([*labels, cell_type], snap["lanes"].get(cell_type, 0))
            for engine_model, count in executions_by_model(snap["steps"]).items():
                name, _, version = engine_model.rpartition(":")
                execs.add_metric([name, version, *labels], count)
            for outcome, count in snap["served"].items():
                served.add_metric([*labels, outcome], count)
            if w.alive:  # gauges: what a dead worker held went with it
                overhead.add_metric(labels, snap["step_overhead_s"])
                active.add_metric(labels, snap["active"] + snap["queued"])
                seqs.add_metric(labels, snap["sequences"])
            else:
                active.add_metric(labels, 0)
                seqs.add_metric(labels, 0)
        yield from (steps, lanes, execs, overhead, up, served, active, seqs, outstanding)
        yield CounterMetricFamily("cellserve_cluster_retries", "Requests sent again after their worker died",
                                  value=self.core.retries)
        shed = CounterMetricFamily("cellserve_cluster_shed", "Requests refused (429) at the driver before any "
                                   "worker queued them", labels=["model", "reason"])
        for (model, why), count in sorted(self.core.shed.items()):
            shed.add_metric([model, why], count)
        yield shed
        replanner = getattr(self.core, "replanner", None)
        if replanner is not None:
            yield from _replan_series(replanner, self.core.router)
        allocator = getattr(self.core, "core_allocator", None)
        if allocator is not None:
            yield from _core_series(allocator)


def _core_series(allocator):
    cores = GaugeMetricFamily("cellserve_worker_cores", "Cores a worker is pinned to now", labels=["worker", "node"])
    for w in allocator.workers:
        cores.add_metric([w.state.id, w.state.info.node_id], len(w.cores))
    yield cores
    others = GaugeMetricFamily("cellserve_core_others_load", "Load other processes put on a core, in cores "
                               "(smoothed)", labels=["core"])
    for core, level in sorted(allocator.meter.level.items()):
        others.add_metric([str(core)], level)
    yield others
    yield CounterMetricFamily("cellserve_core_allocation_moves", "Workers moved to other cores",
                              value=allocator.moves)


def _replan_series(replanner, router):
    yield GaugeMetricFamily("cellserve_cluster_plan_epoch", "Plans applied by the planner in the cluster",
                            value=replanner.epoch)
    yield CounterMetricFamily("cellserve_cluster_sessions_moved", "Sessions the re-plans moved between workers",
                              value=replanner.moved_total)
    rates = GaugeMetricFamily("cellserve_cluster_model_rate_rps", "Measured arrival rate per model (EWMA over an "
                              "epoch, counted before shedding)", labels=["model"])
    for model, rate in sorted(replanner.meter.rates().items()):
        rates.add_metric([model], rate)
    yield rates
    workers = GaugeMetricFamily("cellserve_cluster_model_workers", "Live workers taking a model's new requests",
                                labels=["model"])
    for model in sorted(replanner.models):
        workers.add_metric([model], len(router.serving(model)))
    yield workers
    changes = CounterMetricFamily("cellserve_worker_model_changes", "Models loaded into or unloaded from a "
                                  "worker's running engine", labels=["worker", "node", "action"])
    for w in list(router.workers.values()):
        for action, count in sorted(w.snapshot.get("changes", {}).items()):
            changes.add_metric([w.id, w.info.node_id, action], count)
    yield changes
